"""The README's train.py commands of "Pretrain", "Resume", "Convert" (its local MSA-CPT) and
"Monitor" (W&B offline, then the plot), run as written on the CPU quickstart corpus; each section in a fresh directory (the commands share run
names), the commands of a section in order."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.paths import ROOT, readme_section_commands

SECTIONS = {
    "pretrain": "## Pretrain (MSA-PT)",
    "resume": "## Resume",
    "convert": "## Convert a dense model to MSA (MSA-CPT)",
    "monitor": "## Monitor",
}


def train_commands(section: str) -> list[list[str]]:
    """The section's `.venv/bin/python train.py` / `.venv/bin/torchrun ... train.py` commands as argv."""
    return [argv for env, argv in section_commands(section) if any(a.endswith("train.py") for a in argv)]


def section_commands(section: str) -> list[tuple[dict, list[str]]]:
    """The section's `.venv/bin/python` / `.venv/bin/torchrun` commands as (the VAR=value
    assignments before them, argv), paths inside the checkout made absolute."""
    out = []
    for line in readme_section_commands(SECTIONS[section]):
        argv = shlex.split(line, comments=True)
        env = {}
        while argv and "=" in argv[0] and not argv[0].startswith("."):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        if not argv or argv[0] not in (".venv/bin/python", ".venv/bin/torchrun"):
            continue
        launcher = [sys.executable] if argv[0] == ".venv/bin/python" else [sys.executable, "-m", "torch.distributed.run"]
        script = lambda a: os.path.join(ROOT, a) if a == "train.py" or a.startswith("tools/") else a
        out.append((env, launcher + [script(a) for a in argv[1:]]))
    return out


@pytest.fixture(scope="module")
def corpus_env(tmp_path_factory):
    """What `make train` builds first: the stdlib corpus and its tokenizer (here in a scratch cache)."""
    cache = tmp_path_factory.mktemp("cache")
    subprocess.run([sys.executable, "-m", "data_prep.corpus", "--out", str(cache / "stdlib")], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    env = {**os.environ, "MSA_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    env.pop("MSA_OUTPUT_ROOT", None)
    return env


def run_in(directory, argv, env) -> str:
    proc = subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def records(directory, name: str) -> list[dict]:
    with open(os.path.join(directory, "outputs", name, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train/lm_loss" in r]


@pytest.mark.slow
def test_pretrain_commands(tmp_path, corpus_env):
    commands = train_commands("pretrain")
    assert len(commands) == 4
    expect = {  # run name -> (last step, stages seen)
        "tiny-msa-msa_pt": (200, {"dense", "sparse"}),
        "tiny-gqa-msa_pt": (60, {"gqa"}),
        "tiny-msa-dense": (60, {"dense"}),
    }
    seen = []
    for i, argv in enumerate(commands):
        where = tmp_path / str(i)
        where.mkdir()
        run_in(where, argv, corpus_env)
        (name,) = os.listdir(where / "outputs")
        steps = records(where, name)
        seen.append((name, steps[-1]["train/step"], {r["msa/stage_name"] for r in steps}))
    assert seen[0] == ("tiny-msa-msa_pt", *expect["tiny-msa-msa_pt"])
    assert seen[1][0] == "tiny-msa-msa_pt" and seen[1][1] == 60  # the tensor-parallel run: 2 ranks, one record stream
    assert seen[2] == ("tiny-gqa-msa_pt", *expect["tiny-gqa-msa_pt"])
    assert seen[3][0] == "tiny-msa-dense" and seen[3][1:] == expect["tiny-msa-dense"]


@pytest.mark.slow
def test_resume_commands(tmp_path, corpus_env):
    first, again, longer = train_commands("resume")
    run_in(tmp_path, first, corpus_env)
    assert records(tmp_path, "tiny-msa-msa_pt")[-1]["train/step"] == 30
    run_in(tmp_path, again, corpus_env)
    steps = [r["train/step"] for r in records(tmp_path, "tiny-msa-msa_pt")]
    assert steps == list(range(1, 61))  # resumed at step 31
    out = run_in(tmp_path, longer, corpus_env)
    assert "LR schedule follows this run's config from step 60" in out
    assert [r["train/step"] for r in records(tmp_path, "tiny-msa-msa_pt")][-60:] == list(range(61, 121))


@pytest.mark.slow
def test_convert_commands(tmp_path, corpus_env):
    # the third, from an imported Hugging Face checkpoint, is run by tests/test_convert_cli.py
    dense, convert, imported = train_commands("convert")
    assert "recipe=qwen3-moe" in imported
    run_in(tmp_path, dense, corpus_env)
    assert {r["msa/stage_name"] for r in records(tmp_path, "tiny-gqa-msa_pt")} == {"gqa"}
    run_in(tmp_path, convert, corpus_env)
    (name,) = [n for n in os.listdir(tmp_path / "outputs") if n != "tiny-gqa-msa_pt"]
    steps = records(tmp_path, name)
    assert steps[0]["train/step"] == 1 and {r["msa/stage_name"] for r in steps} >= {"dense"}
    # converted, not trained from scratch: the first LM loss is the dense model's level, not a fresh init's
    fresh = records(tmp_path, "tiny-gqa-msa_pt")[0]["train/lm_loss"]
    assert steps[0]["train/lm_loss"] < fresh - 0.5


@pytest.mark.slow
def test_monitor_commands(tmp_path, corpus_env):
    """W&B offline logs the same records as metrics.jsonl; the plot command draws that run."""
    from tests.wandb_records import history, offline_runs, read_records

    (train_env, train), (plot_env, plot) = section_commands("monitor")
    assert train_env == {"WANDB_MODE": "offline"} and "logging=wandb" in train and not plot_env
    env = {**corpus_env, **train_env, "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    run_in(tmp_path, train, env)
    steps = records(tmp_path, "tiny-msa-msa_pt")
    (run,) = offline_runs(str(tmp_path / "outputs" / "tiny-msa-msa_pt"))
    logged = [r for r in history(read_records(run)) if "train/lm_loss" in r]
    assert [r["train/step"] for r in logged] == [r["train/step"] for r in steps] and len(steps) >= 10
    assert [r["train/lm_loss"] for r in logged] == pytest.approx([r["train/lm_loss"] for r in steps])
    out = run_in(tmp_path, plot, corpus_env)
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, out
