"""logging=wandb end to end, offline: read back what wandb wrote (history keys, resolved config,
one run id across a resume), next to metrics.jsonl."""

from __future__ import annotations

import pytest

from msa_megatron.training import checkpoint
from tests.inproc import train_main, train_records
from tests.wandb_records import history, offline_runs, read_records, run_info

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.slow
def test_offline_run_keeps_its_id_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    common = ["logging=wandb", "train.steps=4", "stage.warmup_tokens=256", "logging.peak_tflops_per_gpu=0.001"]
    assert train_main(tmp_path, *common, "train.exit_interval=2") == 0
    assert train_main(tmp_path, *common) == 0

    first, second = offline_runs(str(tmp_path))  # one offline run directory per start
    (id1, config), (id2, _) = run_info(read_records(first)), run_info(read_records(second))
    assert id1 == id2 == (tmp_path / "wandb_run_id.txt").read_text()
    meta = checkpoint.read_meta(str(tmp_path / "checkpoints"), 4)
    assert meta["wandb_run_id"] == id1
    # the resolved config: interpolations filled in, every group present
    assert config["output_dir"] == str(tmp_path) and config["data"]["seq_length"] == 128
    assert config["checkpoint"]["save"] == f"{tmp_path}/checkpoints" and config["train"]["steps"] == 4

    rows = history(read_records(first)) + history(read_records(second))
    assert [r["train/step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/lm_loss", "train/kl_loss", "msa/kl_loss/layer_01", "msa/kl_loss/layer_02", "msa/stage", "train/mfu", "mem/max_rss_gb"):
        assert all(key in r for r in rows), key
    assert [r["msa/stage"] for r in rows] == [0, 1, 1, 1]  # 256 tokens of dense warmup, then sparse
    jsonl = train_records(tmp_path)
    assert [r["train/lm_loss"] for r in rows] == pytest.approx([r["train/lm_loss"] for r in jsonl])
    assert all(r["train/mfu"] == pytest.approx(r["train/tflops_per_gpu"] / 0.001) for r in jsonl)
