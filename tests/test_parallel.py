"""Tensor parallelism (2 gloo ranks) reproduces the single-process run, in both MSA stages."""

import pytest

from tests.runs import train

# 4 steps of 2 micro-batches x 256 tokens: steps 1-2 dense warmup, steps 3-4 sparse.
COMMON = [
    "train.steps=4",
    "train.global_batch_size=2",
    "data.seq_length=256",
    "data.mock_min_doc=40",
    "data.mock_max_doc=300",
    "optim.lr_warmup_steps=1",
    "stage.warmup_tokens=1024",
    "attention.block_size=16",
    "attention.recall_interval=1",
]


@pytest.mark.slow
def test_tp2_matches_tp1_in_both_stages(tmp_path):
    one = train(tmp_path / "tp1", *COMMON)
    two = train(tmp_path / "tp2", *COMMON, "parallel.tensor_model_parallel_size=2", nproc=2)
    assert [r["msa/stage_name"] for r in one] == ["dense", "dense", "sparse", "sparse"]
    assert [r["train/step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("train/lm_loss", "train/kl_loss", "train/grad_norm", "msa/kl_loss/layer_01", "msa/kl_loss/layer_02",
                    "msa/block_recall", "msa/score_recall"):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), (a["train/step"], key, a[key], b[key])
