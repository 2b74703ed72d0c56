"""On a GPU: the tiny MSA MoE trains with the Triton kernels like it does with the PyTorch reference."""

import pytest
import torch

from tests.runs import train

pytestmark = pytest.mark.gpu

# r = 4 query heads per group, d = di = 64, blocks of 32, 4 blocks kept; 2K-token packs so that the
# sparse stage (from step 7) drops blocks; bf16 as on a cluster.
SETUP = [
    "train.steps=20", "train.precision=bf16", "parallel.distributed_backend=nccl",
    "model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=2", "model.kv_channels=64",
    "model.moe_ffn_hidden_size=256", "attention.block_size=32", "attention.topk_blocks=4",
    "attention.index_head_dim=64", "data.seq_length=2048", "data.mock_min_doc=64", "data.mock_max_doc=4096",
    "stage.warmup_tokens=24576", "optim.lr_warmup_steps=3", "attention.recall_interval=5",
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_backend_tracks_the_reference(tmp_path):
    ref = train(tmp_path / "reference", *SETUP, "attention.backend=reference")
    tri = train(tmp_path / "triton", *SETUP, "attention.backend=triton")
    assert [r["msa/stage_name"] for r in tri] == ["dense"] * 6 + ["sparse"] * 14
    for a, b in zip(ref, tri):
        print(a["train/step"], a["msa/stage_name"], f"lm {a['train/lm_loss']:.4f} {b['train/lm_loss']:.4f}",
              f"kl {a['train/kl_loss']:.4f} {b['train/kl_loss']:.4f}", f"t {a['train/step_time_s']:.3f} {b['train/step_time_s']:.3f}")
    for a, b in zip(ref, tri):  # bf16 noise grows with training; the curves must stay together
        assert b["train/lm_loss"] == pytest.approx(a["train/lm_loss"], rel=2e-2), a["train/step"]
        assert b["train/kl_loss"] == pytest.approx(a["train/kl_loss"], rel=0.1, abs=5e-3), a["train/step"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensor_parallel_on_nccl_tracks_one_gpu(tmp_path):
    """TP=2 (+SP) over NCCL with the Triton kernels follows the one-GPU run within bf16 noise."""
    same_init = ["attention.backend=triton", "model.use_cpu_initialization=true"]  # TP-independent weights
    one = train(tmp_path / "tp1", *SETUP, *same_init)
    two = train(tmp_path / "tp2", *SETUP, *same_init, "parallel.tensor_model_parallel_size=2", nproc=2)
    for a, b in zip(one, two):
        print(a["train/step"], a["msa/stage_name"], f"lm {a['train/lm_loss']:.4f} {b['train/lm_loss']:.4f}",
              f"kl {a['train/kl_loss']:.4f} {b['train/kl_loss']:.4f}", f"gnorm {a['train/grad_norm']:.3f} {b['train/grad_norm']:.3f}")
    for a, b in zip(one, two):
        assert b["train/lm_loss"] == pytest.approx(a["train/lm_loss"], rel=2e-2), a["train/step"]
        assert b["train/kl_loss"] == pytest.approx(a["train/kl_loss"], rel=0.1, abs=5e-3), a["train/step"]
