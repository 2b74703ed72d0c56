"""Run train.py from a tool (one process, or torchrun) and read back what it logged.

Shared by tools/check_plan.py, tools/bench_train.py and tools/quality_study.py: launching, the
metrics.jsonl records, a timing summary of the steps, the machine's versions, and the planner's
view of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the tools import msa_megatron (planner, data constants) from a checkout
    sys.path.insert(0, ROOT)
TRAIN = os.path.join(ROOT, "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    overrides: list[str], run_dir: str, *, gpus: int = 1, timeout: float = 600, cpu: bool = False, entry: str = TRAIN,
    grace: float = 90, env: dict | None = None,
) -> dict:
    """Run `entry` (train.py or a wrapper with its command line) with `output_dir=run_dir` and the
    overrides; one process, or `gpus` under torchrun. Console output is appended to run_dir/log.txt.

    Returns {"records": metrics.jsonl records, "wall_s"}, with "stopped": why when the run was
    still going at `timeout` seconds: it then got SIGTERM (train.py saves a checkpoint at the next
    step and exits; rerunning resumes) and, after `grace` more seconds, SIGKILL. On a failure:
    {"error": one line}. `env`: variables to set for this run (e.g. CUDA_VISIBLE_DEVICES)."""
    os.makedirs(run_dir, exist_ok=True)
    launcher = [sys.executable]  # one process: train.py makes its own world of one
    if gpus > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={gpus}", f"--master_port={free_port()}"]
    cmd = launcher + [entry, f"output_dir={run_dir}", *overrides]
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    log_path = os.path.join(run_dir, "log.txt")
    t0, stopped = time.time(), None
    with open(log_path, "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            stopped = f"time limit of {timeout:.0f} s: stopped with SIGTERM"
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return {"error": f"timed out after {timeout:.0f} s and did not stop within {grace:.0f} s of SIGTERM"}
    if proc.returncode != 0 and stopped is None:
        with open(log_path) as f:
            tail = [line.strip() for line in f.read().splitlines() if line.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
    result = {"records": read_records(run_dir), "wall_s": round(time.time() - t0, 1)}
    if stopped:
        result["stopped"] = stopped
    return result


def read_records(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_summary(records: list[dict], skip: int) -> dict:
    """Medians over the training steps after the first `skip` (JIT, autotuning), and peaks."""
    steps = [r for r in records if "train/step_time_s" in r]
    timed = steps[skip:] or steps[-1:]

    def median(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    def peak(key):
        values = [r[key] for r in steps if r.get(key) is not None]
        return max(values) if values else None

    return {
        "step_time_s": median("train/step_time_s"),
        "tokens_per_s_per_gpu": median("train/tokens_per_sec_per_gpu"),
        "tflops_per_gpu": median("train/tflops_per_gpu"),
        "mfu": median("train/mfu"),
        "peak_gib": peak("mem/max_allocated_gb"),  # GiB despite the key's name (bytes / 2**30)
        "reserved_gib": peak("mem/max_reserved_gb"),
        "steps_timed": len(timed),
        "lm_loss_last": steps[-1].get("train/lm_loss") if steps else None,
    }


def environment(cpu: bool) -> dict:
    """Versions of what ran: GPU, driver, CUDA, torch, Triton, megatron-core, Transformer Engine."""
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if not cpu and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus_visible"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a missing nvidia-smi only loses the driver line
            env["driver"] = f"unknown ({type(e).__name__})"
    for mod in ("triton", "megatron.core", "transformer_engine"):
        try:
            module = __import__(mod, fromlist=["__version__"])
            env[mod] = getattr(module, "__version__", "importable")
        except Exception:
            env[mod] = None
    return env


def fmt(value, spec: str = ".3f", none: str = "n/a") -> str:
    """A report cell: the value formatted, or `none` when it was not measured."""
    return none if value is None else format(value, spec)


def report_header(command: str, env: dict) -> list[str]:
    """The first lines of a tool's markdown report: the command and the environment it ran in."""
    return [f"`{command}`", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]


def compose(overrides: list[str]):
    """The RunConfig train.py would run for these overrides (validated, without a world size)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from msa_megatron.config import load_config, register_hydra_schema

    register_hydra_schema()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return load_config(hydra_compose(config_name="config", overrides=overrides))


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None
