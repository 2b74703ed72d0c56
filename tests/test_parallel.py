"""Tensor and data parallelism (2 gloo ranks) reproduce the single-process run, in both MSA stages."""

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


KEYS = ("train/lm_loss", "train/kl_loss", "train/grad_norm", "msa/kl_loss/layer_01", "msa/kl_loss/layer_02",
        "msa/block_recall", "msa/score_recall")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    records = train(tmp_path_factory.mktemp("tp1"), *COMMON)
    assert [r["msa/stage_name"] for r in records] == ["dense", "dense", "sparse", "sparse"]
    return records


def assert_same_run(one, other):
    assert [r["train/step"] for r in other] == [1, 2, 3, 4]
    for a, b in zip(one, other):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), (a["train/step"], key, a[key], b[key])


@pytest.mark.slow
def test_tp2_matches_tp1_in_both_stages(single_process, tmp_path):
    assert_same_run(single_process, train(tmp_path, *COMMON, "parallel.tensor_model_parallel_size=2", nproc=2))


@pytest.mark.slow
def test_dp2_matches_one_process(single_process, tmp_path):
    """Two data-parallel ranks, one micro-batch each, train on the same samples as one process."""
    assert_same_run(single_process, train(tmp_path, *COMMON, nproc=2))
