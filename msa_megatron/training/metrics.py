"""Where the numbers go: one console line, one metrics.jsonl record and one W&B log per log step.

Only the logging rank (last pipeline stage, TP rank 0, DP rank 0) writes. The W&B run id is kept
in the run directory so a resumed or requeued job keeps appending to the same run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from typing import Optional


def format_console_line(r: dict, total_steps: int) -> str:
    def num(key, fmt):
        v = r.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    eta = datetime.timedelta(seconds=int(r.get("eta_s", 0)))
    return (
        f"step {r['train/step']:>6}/{total_steps} | {r['msa/stage_name']:<6} | lm {num('train/lm_loss', '.4f')} | "
        f"kl {num('train/kl_loss', '.4f')} | lr {num('train/lr', '.3e')} | gnorm {num('train/grad_norm', '.3f')} | "
        f"{r['train/tokens_per_sec']:,.0f} tok/s | eta {eta}"
    )


class MetricsWriter:
    def __init__(self, cfg, run_dir: str, active: bool):
        self.active = active
        self.total_steps = cfg.train.steps
        self.console = cfg.logging.console
        self.jsonl = None
        self.wandb_run = None
        if not active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if cfg.logging.metrics_jsonl:
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "disabled":
            self.wandb_run = _start_wandb(cfg, run_dir)

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict) -> None:
        if not self.active:
            return
        if self.console:
            print(format_console_line(record, self.total_steps), file=sys.stdout, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
            self.wandb_run.log(numeric, step=record["train/step"])

    def log_validation(self, record: dict) -> None:
        if not self.active:
            return
        if self.console:
            lm, kl = record.get("val/lm_loss"), record.get("val/kl_loss")
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
            print(f"validation at step {record['train/step']} | lm {fmt(lm)} | kl {fmt(kl)}", flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if v is not None}, step=record["train/step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(cfg, run_dir: str):
    import wandb
    from omegaconf import OmegaConf

    w = cfg.logging.wandb
    id_file = os.path.join(run_dir, "wandb_run_id.txt")
    run_id: Optional[str] = open(id_file).read().strip() if os.path.exists(id_file) else None
    run = wandb.init(
        project=w.project,
        entity=w.entity,
        name=cfg.name,
        id=run_id or wandb.util.generate_id(),
        resume="allow",
        mode=w.mode,
        dir=run_dir,
        tags=list(w.tags),
        config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    )
    with open(id_file, "w") as f:
        f.write(run.id)
    run.define_metric("train/step")
    run.define_metric("*", step_metric="train/step")
    return run
