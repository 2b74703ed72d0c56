"""`python train.py` end to end on CPU: the loss falls, the KL falls in warmup, the stage switches on time."""

import os
import subprocess
import sys

import pytest

from tests.paths import ROOT
from tests.runs import train

STEPS = 24
WARMUP_STEPS = 8
TOKENS_PER_STEP = 2 * 512  # global batch 2 x seq 512


@pytest.mark.slow
def test_tiny_msa_pt_run(tmp_path):
    records = train(
        tmp_path,
        f"train.steps={STEPS}",
        "data.seq_length=512",
        f"stage.warmup_tokens={WARMUP_STEPS * TOKENS_PER_STEP}",
        "attention.recall_interval=4",
        "train.eval_interval=12",
    )
    val = [r for r in records if "val/lm_loss" in r]
    records = [r for r in records if "train/lm_loss" in r]
    assert [r["train/step"] for r in val] == [12, 24] and all(r["val/kl_loss"] > 0 for r in val)
    assert [r["train/step"] for r in records] == list(range(1, STEPS + 1))  # every step logged
    stages = [r["msa/stage_name"] for r in records]
    assert stages == ["dense"] * WARMUP_STEPS + ["sparse"] * (STEPS - WARMUP_STEPS)
    assert [r["train/tokens"] for r in records] == [TOKENS_PER_STEP * s for s in range(1, STEPS + 1)]
    lm = [r["train/lm_loss"] for r in records]
    assert sum(lm[-4:]) / 4 < sum(lm[:4]) / 4 - 0.1, lm
    kl = [r["train/kl_loss"] for r in records[:WARMUP_STEPS]]
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3, kl
    assert all(r["train/kl_loss"] >= 0 for r in records)
    recall = [r for r in records if "msa/block_recall" in r]
    assert [r["train/step"] for r in recall] == [4, 8, 12, 16, 20, 24]
    assert all(0 <= r["msa/block_recall"] <= 1 and 0 <= r["msa/score_recall"] <= 1 for r in recall)
    assert os.path.exists(tmp_path / "config.yaml")  # the resolved config of the run


def test_bad_config_exits_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={tmp_path}", "attention.block_size=100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "config error: attention.block_size=100: must be a power of two"
