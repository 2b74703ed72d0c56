"""Checkpoints: exact resume across the stage switch, dense GQA -> MSA initialisation, clear errors."""

import os

import pytest
import torch
from megatron.core import dist_checkpointing

from msa_megatron.model.attention import set_sparse_stage
from msa_megatron.training import checkpoint
from msa_megatron.training.checkpoint import CheckpointError
from tests.runs import train
from tests.test_model import batch, build, config, lm_loss, single_process_world  # noqa: F401  (fixture)

KEYS = ("train/lm_loss", "train/kl_loss", "train/grad_norm", "train/lr", "msa/stage_name")


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = ["train.steps=6", "optim.lr_warmup_steps=1", "data.seq_length=256", "stage.warmup_tokens=2048", "checkpoint.keep_last=1"]
    straight = train(tmp_path / "a", *common)
    first = train(tmp_path / "b", *common, "train.exit_interval=3")
    assert [r["train/step"] for r in first] == [1, 2, 3]
    assert open(tmp_path / "b" / "checkpoints" / checkpoint.TRACKER).read() == "3"
    resumed = train(tmp_path / "b", *common)  # same command again: resumes at step 3
    assert [r["train/step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl is appended
    assert [r["msa/stage_name"] for r in resumed] == ["dense"] * 4 + ["sparse"] * 2
    for a, b in zip(straight, resumed):
        for key in KEYS:
            assert a[key] == (pytest.approx(b[key], rel=1e-6) if isinstance(a[key], float) else b[key]), (a["train/step"], key)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["iter_0000006", checkpoint.TRACKER]  # keep_last=1


def _save_weights(model, path):
    os.makedirs(path)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(path))


def test_dense_gqa_weights_initialise_msa_exactly(tmp_path):
    gqa = build(config(attention={"type": "gqa"}), seed=1)
    _save_weights(gqa, tmp_path / "gqa")
    msa = build(config(), seed=2)
    fresh = checkpoint.init_weights(msa, str(tmp_path / "gqa"), ["*.indexer.*"])
    assert fresh and all(".indexer." in k for k in fresh)
    msa_params = dict(msa.named_parameters())
    for name, p in gqa.named_parameters():
        assert torch.equal(msa_params[name], p), name
    # The dense warmup stage of the converted model computes exactly the dense model.
    set_sparse_stage(msa, False)
    b = batch(config())
    torch.testing.assert_close(lm_loss(msa, b), lm_loss(gqa, b), rtol=0, atol=0)


def test_init_errors_name_the_problem(tmp_path):
    msa = build(config())
    _save_weights(msa, tmp_path / "msa")
    _save_weights(build(config(attention={"type": "gqa"})), tmp_path / "gqa")
    with pytest.raises(CheckpointError, match=r"lacks \d+ model tensors outside checkpoint.init_allow_missing=\[\]: .*indexer"):
        checkpoint.init_weights(build(config()), str(tmp_path / "gqa"), [])
    with pytest.raises(CheckpointError, match="tensors this model does not have: .*indexer"):
        checkpoint.init_weights(build(config(attention={"type": "gqa"})), str(tmp_path / "msa"), ["*.indexer.*"])
    with pytest.raises(CheckpointError, match=r"has shape \(128, 32\) in the checkpoint but \(128, 48\)"):
        checkpoint.init_weights(build(config(model={"hidden_size": 48})), str(tmp_path / "msa"), ["*.indexer.*"])
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint.init_weights(msa, str(tmp_path / "nothing"), [])


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path):
    """Slurm's SIGTERM mid-run: the job saves at the next step boundary and exits 0; a rerun resumes."""
    import signal
    import subprocess
    import sys
    import time

    from tests.paths import ROOT

    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={tmp_path}", "train.steps=400", "data=mock", "model.vocab_size=512", "data.seq_length=256"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-2000:]
    step = checkpoint.latest_step(str(tmp_path / "checkpoints"))
    assert step is not None and 2 <= step < 400
    assert f"exiting at step {step} (SIGTERM)" in out
