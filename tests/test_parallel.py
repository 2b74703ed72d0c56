"""Every parallel layout trains exactly like one process started from the same weights (CPU, gloo).

A 4-layer tiny MoE (layers 0-1 keep full attention, layer 0 a dense FFN) trains 4 steps: steps
1-2 in the dense warmup, 3-4 sparse. Every layout starts from the same weights (a 1-step
checkpoint loaded with checkpoint.init_from, so TP/EP/PP initialisation does not matter) and must
match the one-process run in LM loss, mean KL, every per-layer KL and grad norm to 1e-5 (fp32).
Documents of up to 300 tokens cross the context-parallel chunk edges (64 tokens) and exceed the
block budget topk*block = 48 tokens, so the sparse selection is real.
"""

import os
import re
import shlex

import pytest

from tests.paths import ROOT
from tests.runs import train

MODEL = [
    "model.num_layers=4",
    "attention.dense_layers=[0,1]",
    "model.moe_layer_freq=[0,1,1,1]",
    "attention.block_size=16",
    "attention.topk_blocks=3",
]
COMMON = MODEL + [
    "train.steps=4",
    "train.global_batch_size=2",
    "data.seq_length=256",
    "data.mock_min_doc=40",
    "data.mock_max_doc=300",
    "optim.lr_warmup_steps=1",
    "stage.warmup_tokens=1024",
    "checkpoint.save=null",
]
KEYS = ("train/lm_loss", "train/kl_loss", "train/grad_norm", "msa/kl_loss/layer_03", "msa/kl_loss/layer_04")


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    train(out, *MODEL, "train.steps=1", "optim.lr_warmup_steps=0", "data.seq_length=256")
    return str(out / "checkpoints")


@pytest.fixture(scope="module")
def single_process(initial_weights, tmp_path_factory):
    records = train(tmp_path_factory.mktemp("one"), *COMMON, f"checkpoint.init_from={initial_weights}")
    assert [r["msa/stage_name"] for r in records] == ["dense", "dense", "sparse", "sparse"]
    assert "msa/kl_loss/layer_01" not in records[0]  # dense layers own no index branch and no KL
    return records


def run_layout(tmp_path, initial_weights, *layout, nproc):
    return train(tmp_path, *COMMON, f"checkpoint.init_from={initial_weights}", *layout, nproc=nproc)


def assert_same_run(one, other):
    assert [r["train/step"] for r in other] == [1, 2, 3, 4]
    for a, b in zip(one, other):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["train/step"], key, a[key], b[key])
        kl_layers = [a[f"msa/kl_loss/layer_{n:02d}"] for n in (3, 4)]
        assert a["train/kl_loss"] == pytest.approx(sum(kl_layers) / 2, rel=1e-6)  # the mean counts MSA layers only


def readme_layouts() -> dict:
    """The commands of the README's "Parallelism" section: {their overrides: (overrides, ranks)}."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Parallelism", 1)[1].split("\n## ", 1)[0]
    layouts = {}
    for line in re.findall(r"^\.venv/bin/(?:torchrun|python) .*$", section, flags=re.M):
        words = shlex.split(line)
        nproc = int(words[words.index("--nproc_per_node") + 1]) if "--nproc_per_node" in words else 1
        overrides = words[words.index("train.py") + 1 :]
        layouts[" ".join(overrides)] = (overrides, nproc)
    return layouts


LAYOUTS = readme_layouts()


def test_readme_shows_every_parallel_kind():
    shown = " ".join(LAYOUTS)
    for key in ("context_parallel_size", "tensor_model_parallel_size=4", "expert_model_parallel_size",
                "expert_tensor_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                "use_distributed_optimizer", "recompute_granularity=selective", "recompute_granularity=full"):
        assert key in shown, key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, single_process, initial_weights, tmp_path):
    layout, nproc = LAYOUTS[name]
    assert_same_run(single_process, run_layout(tmp_path, initial_weights, *layout, nproc=nproc))


RESHARDS = {
    # saved with ... -> resumed with ...
    "tp2xpp2_to_cp2": (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 4,
                       ["parallel.context_parallel_size=2"], 2),
    "dp2_distopt_to_pp2_distopt": (["parallel.use_distributed_optimizer=true"], 2,
                                   ["parallel.pipeline_model_parallel_size=2", "parallel.use_distributed_optimizer=true"], 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESHARDS))
def test_resume_with_another_layout_continues_the_run(name, single_process, initial_weights, tmp_path):
    """Steps 1-2 with one layout, saved; steps 3-4 resumed with another: the same losses as the
    uninterrupted one-process run (weights, optimizer state, LR schedule, data position reshard)."""
    before, n_before, after, n_after = RESHARDS[name]
    ckpt = f"checkpoint.save={tmp_path / 'ckpt'}"
    first = run_layout(tmp_path / "a", initial_weights, *before, ckpt, "train.exit_interval=2", nproc=n_before)
    assert [r["train/step"] for r in first] == [1, 2]
    second = run_layout(tmp_path / "b", initial_weights, *after, ckpt, nproc=n_after)
    assert [r["train/step"] for r in second] == [3, 4]
    assert_same_run(single_process, first + second)


@pytest.mark.slow
def test_switching_the_optimizer_kind_on_resume_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    train(tmp_path, *MODEL, "train.steps=1", "optim.lr_warmup_steps=0", "data.seq_length=256")
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={tmp_path}", "data=mock", "model.vocab_size=512",
           *MODEL, "train.steps=2", "optim.lr_warmup_steps=0", "data.seq_length=256", "parallel.use_distributed_optimizer=true"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("checkpoint error: parallel.use_distributed_optimizer=True: ") and "saved with False" in last, last
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # nothing written
