"""The sbatch scripts on a real one-node Slurm cluster (slurmctld + slurmd + munge on loopback,
started by slurm/local_cluster.sh, which installs Debian's packages when they are missing).

- A 2-task preprocess array writes 2 shards; the pretrain job that depends on it trains on them,
  receives USR1 mid-run (what `--signal=B:USR1@600` sends before the time limit), saves, requeues
  itself, resumes at the saved step, and ends with the metrics of an uninterrupted run, in the
  same W&B (offline) run.
- A CPT job chained with --dependency=afterok after the job that writes a dense GQA checkpoint
  initialises from it and switches to sparse attention.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.inproc import records, train_records
from tests.paths import ROOT
from tests.runs import train as train_directly
from tests.tiny_data import documents, make_tokenizer, write_jsonl
from tests.wandb_records import history, offline_runs, read_records, run_info

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

CLUSTER = os.path.join(ROOT, "slurm", "local_cluster.sh")
ON_CPU = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]  # the scripts ask for 8 GPUs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", CLUSTER, "start", str(state)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MSA_", "WANDB_"))}
    env.update(SLURM_CONF=str(state / "slurm.conf"), MSA_HOME=ROOT, MSA_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    yield env
    subprocess.run(["bash", CLUSTER, "stop", str(state)], capture_output=True, text=True, timeout=120)


def sbatch(env, cwd, *args) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_fields(env, job) -> list[dict]:
    """scontrol's fields of a job (one dict per array task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_until_done(env, job, timeout=300) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        fields = job_fields(env, job)
        if fields and all(f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY") for f in fields):
            return fields
        assert time.time() < deadline, f"job {job} still {[f['JobState'] for f in fields]}"
        time.sleep(1)


def log_of(cwd, pattern) -> str:
    names = [n for n in os.listdir(cwd) if re.fullmatch(pattern, n)]
    assert len(names) == 1, (pattern, os.listdir(cwd))
    return open(os.path.join(cwd, names[0])).read()


def test_preprocess_array_then_pretrain_that_requeues_itself(cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    texts = documents(5, 160)
    src = write_jsonl(data / "web.jsonl", texts)
    tokenizer = make_tokenizer(data / "tokenizer.json", texts)
    env = {**cluster, "MSA_OUTPUT_ROOT": str(tmp_path / "out"), "WANDB_MODE": "offline",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}

    prep = sbatch(env, tmp_path, "--array=0-1", "--cpus-per-task=1", os.path.join(ROOT, "slurm", "preprocess.sbatch"),
                  str(src), "--tokenizer", tokenizer, "--output-prefix", str(data / "web"))
    shards = [str(data / f"web-0000{i}-of-00002_text_document") for i in range(2)]
    train_args = [
        "data.type=indexed", f"data.blend=[[1.0,'{shards[0]}'],[1.0,'{shards[1]}']]", f"data.tokenizer='{tokenizer}'",
        "data.split='90,10,0'", "model.vocab_size=512", "data.seq_length=128", "train.steps=40", "train.eval_interval=0",
        "name=slurm-pt",
    ]
    job = sbatch(env, tmp_path, f"--dependency=afterok:{prep}", *ON_CPU, os.path.join(ROOT, "slurm", "pretrain.sbatch"),
                 *train_args, f"data.cache_dir={tmp_path / 'cache_slurm'}", "logging=wandb")

    tasks = wait_until_done(env, prep, timeout=180)
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"], tasks
    for i, prefix in enumerate(shards):
        assert all(os.path.exists(prefix + s) for s in (".bin", ".idx", ".manifest.json")), prefix
        assert json.load(open(prefix + ".manifest.json"))["shard"] == [i, 2]

    # The pretrain job runs; an uninterrupted copy of it runs outside Slurm meanwhile.
    reference = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={tmp_path / 'reference'}", *train_args,
         f"data.cache_dir={tmp_path / 'cache_ref'}"], cwd=ROOT, env={**env, "WANDB_MODE": "disabled"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    run_dir = tmp_path / "out" / "slurm-pt"
    deadline = time.time() + 240
    while len(train_records(run_dir)) < 4:
        assert time.time() < deadline and job_fields(env, job)[0]["JobState"] in ("PENDING", "RUNNING"), job_fields(env, job)
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)

    (fields,) = wait_until_done(env, job, timeout=300)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    log = log_of(tmp_path, rf"slurm-msa-pretrain-{job}\.out")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0" and fields["Restarts"] == "1", fields
    stopped = int(re.search(r"exiting at step (\d+) \(SIGUSR1\)", log).group(1))
    assert 4 <= stopped < 40, log[-3000:]
    assert f"launch.sh: requeueing job {job}" in log and f"launch.sh: job {job}, restart 1" in log
    assert re.search(rf"resumed from .* at step {stopped} ", log)

    resumed, straight = train_records(run_dir), train_records(tmp_path / "reference")
    assert [r["train/step"] for r in resumed] == list(range(1, 41))
    for a, b in zip(resumed, straight):
        for key in ("train/lm_loss", "train/kl_loss", "train/grad_norm", "train/lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["train/step"], key)
    assert not records(run_dir, "metrics.replayed.jsonl")  # the save was at the stop: nothing replayed

    first, second = offline_runs(str(run_dir))
    assert run_info(read_records(first))[0] == run_info(read_records(second))[0] == (run_dir / "wandb_run_id.txt").read_text()
    assert [r["train/step"] for r in history(read_records(first))] == list(range(1, stopped + 1))
    assert [r["train/step"] for r in history(read_records(second))] == list(range(stopped + 1, 41))


def test_cpt_job_chained_after_the_dense_job(cluster, tmp_path):
    env = {**cluster, "MSA_OUTPUT_ROOT": str(tmp_path / "out")}
    common = ["data=mock", "model.vocab_size=512", "data.seq_length=128", "train.steps=3", "train.eval_interval=0"]
    dense = sbatch(env, tmp_path, *ON_CPU, os.path.join(ROOT, "slurm", "pretrain.sbatch"), *common, "attention=gqa")
    dense_ckpt = tmp_path / "out" / "tiny-gqa-msa_pt" / "checkpoints"
    cpt = sbatch(env, tmp_path, f"--dependency=afterok:{dense}", *ON_CPU, os.path.join(ROOT, "slurm", "cpt.sbatch"),
                 *common, f"checkpoint.init_from={dense_ckpt}", "stage.warmup_tokens=256")
    (dense_fields,) = wait_until_done(env, dense, timeout=180)
    (cpt_fields,) = wait_until_done(env, cpt, timeout=180)
    assert dense_fields["JobState"] == cpt_fields["JobState"] == "COMPLETED", (dense_fields, cpt_fields)
    log = log_of(tmp_path, rf"slurm-msa-cpt-{cpt}\.out")
    assert re.search(rf"initialised weights from {dense_ckpt}; freshly initialised: \d+ tensors", log), log[-3000:]
    steps = train_records(tmp_path / "out" / "tiny-msa-msa_cpt")
    assert [r["msa/stage_name"] for r in steps] == ["dense", "sparse", "sparse"]
