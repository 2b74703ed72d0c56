"""The Slurm launcher's checks of its environment (no cluster needed): each mistake is one line on
stderr and exit code 2 before anything starts; and the per-task rank variables come from Slurm's.
The real cluster runs are in test_slurm.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.paths import ROOT

LAUNCH = os.path.join(ROOT, "slurm", "launch.sh")


def slurm_env(tmp_path, **changes) -> dict:
    """What a batch job of one task sees (sbatch's variables), pointing at this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MSA_", "WANDB_"))}
    env.update(
        SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="1",
        MSA_PYTHON=sys.executable, MSA_OUTPUT_ROOT=str(tmp_path / "outputs"),
    )
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(script, args, env):
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def assert_one_line(proc, pattern):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr


@pytest.mark.parametrize(
    "args, changes, pattern",
    [
        (["train"], {"SLURM_JOB_ID": None}, r"^launch\.sh: SLURM_JOB_ID is not set: submit the sbatch script with sbatch"),
        (["fly"], {}, r"^launch\.sh: usage: launch\.sh train\|preprocess"),
        (["train"], {"MSA_HOME": "/nonexistent/checkout"}, r"MSA_HOME=/nonexistent/checkout: not an msa-megatron checkout"),
        (["train"], {"MSA_PYTHON": "/nonexistent/python"}, r"MSA_PYTHON=/nonexistent/python: not an executable interpreter"),
        (["train"], {"MSA_PYTHON": None, "MSA_VENV": "/nonexistent/venv"}, r"MSA_PYTHON=/nonexistent/venv/bin/python: not an executable"),
        (["train"], {"WANDB_MODE": "sometimes"}, r"WANDB_MODE=sometimes: must be online, offline or disabled"),
        (["train"], {"MSA_MASTER_PORT": "70000"}, r"MSA_MASTER_PORT=70000: not a port number"),
        (["train"], {"MSA_OUTPUT_ROOT": "/proc/outputs"}, r"MSA_OUTPUT_ROOT=/proc/outputs: cannot write there"),
        (["preprocess", "x.jsonl"], {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": None}, r"SLURM_ARRAY_TASK_COUNT is not set"),
    ],
)
def test_launcher_refuses_a_bad_environment(tmp_path, args, changes, pattern):
    proc = run(LAUNCH, args, slurm_env(tmp_path, **changes))
    assert_one_line(proc, pattern)
    assert "srun" not in proc.stdout  # nothing was launched


def test_cpt_job_needs_the_dense_checkpoint(tmp_path):
    proc = run(os.path.join(ROOT, "slurm", "cpt.sbatch"), ["model=tiny"], slurm_env(tmp_path))
    assert_one_line(proc, r"^cpt\.sbatch: needs checkpoint\.init_from=<dense GQA checkpoint directory>")


def test_local_cluster_usage(tmp_path):
    proc = run(os.path.join(ROOT, "slurm", "local_cluster.sh"), ["begin", str(tmp_path)], dict(os.environ))
    assert_one_line(proc, r"^local_cluster: usage: .* start\|stop DIR")


def test_task_mode_maps_slurm_ranks(tmp_path):
    env = slurm_env(tmp_path, SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="4")
    proc = subprocess.run(["bash", LAUNCH, "task", "env"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["LOCAL_RANK"], seen["LOCAL_WORLD_SIZE"]) == ("3", "8", "1", "4")


def test_a_user_error_inside_the_job_is_passed_on_not_requeued(tmp_path):
    """train.py's exit code 2 comes back as the job's exit code; only a clean stop after USR1 requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stand-ins for Slurm's commands: srun runs the task in place; scontrol answers hostnames and
    # records any requeue
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\n[[ $1 == show ]] && echo localhost && exit 0\necho "$@" >> {tmp_path}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    env = slurm_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = run(LAUNCH, ["train", "attention.block_size=100"], env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "config error: attention.block_size=100: must be a power of two"
    assert not (tmp_path / "scontrol.log").exists()  # no requeue
