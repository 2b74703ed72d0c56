"""Run train.py as a user would (plain, or under torchrun) and read back its metrics.jsonl."""

import json
import os
import socket
import subprocess
import sys

from tests.paths import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Tests run on the synthetic data unless they ask otherwise (the quickstart recipe uses the corpus).
TEST_DEFAULTS = {"data": "mock", "model.vocab_size": "512", "train.eval_interval": "0"}


def train(out_dir, *overrides, nproc: int = 1, timeout: int = 600) -> list[dict]:
    given = {o.split("=", 1)[0] for o in overrides}
    overrides = [f"{k}={v}" for k, v in TEST_DEFAULTS.items() if k not in given] + list(overrides)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    cmd = launcher + [os.path.join(ROOT, "train.py"), f"output_dir={out_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
