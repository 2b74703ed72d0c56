"""Where the numbers go: one console line, one metrics.jsonl record and one W&B log per log step.

Only the logging rank (last pipeline stage, TP rank 0, DP rank 0) writes. The W&B run id is kept
in the run directory (and in every checkpoint's msa_meta.json), so a resumed or requeued job keeps
appending to the same run. A resumed job replays the steps after its checkpoint: their earlier
records leave metrics.jsonl for metrics.replayed.jsonl, so every step has one record.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import sys
from typing import Optional

METRICS_FILE = "metrics.jsonl"
REPLAYED_FILE = "metrics.replayed.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"
CONFIG_FILE = "config.yaml"  # the resolved config of the latest start of this run


class LoggingSetupError(RuntimeError):
    """A logging backend cannot start as configured (e.g. W&B online without credentials)."""


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


def read_wandb_run_id(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if not os.path.exists(path):
        return None
    return open(path).read().strip() or None


def write_config_record(cfg, run_dir: str) -> None:
    from omegaconf import OmegaConf

    tmp = os.path.join(run_dir, CONFIG_FILE + ".tmp")
    OmegaConf.save(OmegaConf.structured(cfg), tmp, resolve=True)
    os.replace(tmp, os.path.join(run_dir, CONFIG_FILE))


def drop_replayed_records(run_dir: str, resume_step: int) -> int:
    """Move the records of steps after `resume_step` from metrics.jsonl to metrics.replayed.jsonl
    (the resumed run logs those steps again); returns how many moved."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep, replayed = [], []
    for line in lines:
        try:
            step = json.loads(line).get("train/step", 0)
        except ValueError:  # a line cut by a crash mid-write
            replayed.append(line if line.endswith("\n") else line + "\n")
            continue
        (replayed if step > resume_step else keep).append(line)
    if not replayed:
        return 0
    with open(os.path.join(run_dir, REPLAYED_FILE), "a") as f:
        f.writelines(replayed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(replayed)


class MetricsWriter:
    def __init__(self, cfg, run_dir: str, active: bool, resume_step: int = 0, wandb_run_id: Optional[str] = None):
        self.active = active
        self.total_steps = cfg.train.steps
        self.console = cfg.logging.console
        self.jsonl = None
        self.wandb_run = None
        if not active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "disabled":
            self.wandb_run = _start_wandb(cfg, run_dir, read_wandb_run_id(run_dir) or wandb_run_id)
        write_config_record(cfg, run_dir)  # every check has passed: this start is the run's latest
        if cfg.logging.metrics_jsonl:
            drop_replayed_records(run_dir, resume_step)
            self.jsonl = open(os.path.join(run_dir, METRICS_FILE), "a", buffering=1)

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
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb_run.log(numeric, step=record["train/step"])

    def log_validation(self, record: dict) -> None:
        if not self.active:
            return
        if self.console:
            lm, kl = record.get("val/lm_loss"), record.get("val/kl_loss")
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
            line = f"validation at step {record['train/step']} | lm {fmt(lm)} | kl {fmt(kl)}"
            if "val/answer_acc" in record:
                line += f" | answer accuracy {record['val/answer_acc']:.3f}"
            print(line, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if v is not None}, step=record["train/step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(cfg, run_dir: str, run_id: Optional[str]):
    import wandb
    from omegaconf import OmegaConf

    w = cfg.logging.wandb
    try:
        run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=cfg.name,
            id=run_id,  # None: wandb makes a new id, kept below for the next job
            resume="allow",
            mode=w.mode,
            dir=run_dir,
            tags=list(w.tags),
            config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        )
    except wandb.Error as e:
        reason = " ".join(str(e).split())
        raise LoggingSetupError(
            f"logging.wandb.mode={w.mode!r}: W&B did not start ({reason}); log in (WANDB_API_KEY) or use WANDB_MODE=offline"
        ) from None
    with open(os.path.join(run_dir, WANDB_ID_FILE), "w") as f:
        f.write(run.id)
    run.define_metric("train/step")
    run.define_metric("*", step_metric="train/step")
    return run


def throughput_metrics(flops_per_token: int, tokens_per_sec_per_gpu: float, peak_flops: Optional[float]) -> dict:
    """Achieved model TFLOP/s per GPU and, when the peak is known, MFU."""
    achieved = flops_per_token * tokens_per_sec_per_gpu
    record = {"train/tflops_per_gpu": achieved / 1e12}
    if peak_flops:
        record["train/mfu"] = achieved / peak_flops
    return record


def memory_metrics(device) -> dict:
    """Peak memory of the busiest rank (collective: every rank calls it). GPUs: the allocator's
    peak allocated and reserved bytes; CPU: the process's peak resident set."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        names = ("mem/max_allocated_gb", "mem/max_reserved_gb")
        values = [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]
    else:
        names = ("mem/max_rss_gb",)
        values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]  # KiB on Linux
    peak = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {name: float(v) / 2**30 for name, v in zip(names, peak.tolist())}
