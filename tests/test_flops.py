"""Model FLOPs per token (train/mfu's numerator): MSA.md's cost model, and the matrix multiplies
counted from the real megatron-core modules."""

from __future__ import annotations

import pytest

from msa_megatron import flops
from msa_megatron.config import load_config, to_transformer_config

pytestmark = pytest.mark.filterwarnings("ignore")


def paper_layer(seq_length: int):
    """One layer of the paper's attention shape: 64 query heads, 4 KV groups, d = di = 128, k = 16 x 128."""
    return load_config({
        "model": {"num_layers": 1, "hidden_size": 1024, "num_attention_heads": 64, "num_query_groups": 4, "kv_channels": 128,
                  "max_position_embeddings": seq_length, "num_moe_experts": None},
        "attention": {"block_size": 128, "topk_blocks": 16, "index_head_dim": 128},
        "data": {"seq_length": seq_length},
    })


def test_attention_follows_the_cost_model_of_msa_md():
    cfg = paper_layer(2**20)
    dense, sparse = flops.forward_flops_per_token(cfg, sparse=False), flops.forward_flops_per_token(cfg, sparse=True)
    # MSA.md at N = 2^20: dense 17.18 GFLOP vs index 0.537 + main 0.067 GFLOP, the paper's 28.4x
    assert dense.attention_core / 1e9 == pytest.approx(17.18, abs=0.01)
    assert sparse.index_scores / 1e9 == pytest.approx(0.537, abs=0.001)
    assert sparse.attention_core / 1e9 == pytest.approx(0.067, abs=0.001)
    assert dense.attention_core / (sparse.index_scores + sparse.attention_core) == pytest.approx(28.4, abs=0.1)
    assert dense.index_scores == sparse.index_scores  # the indexer scores every visible token in both stages


def test_short_contexts_cost_the_same_in_both_stages():
    cfg = paper_layer(2048)  # every visible block is selected while N <= k * Bk
    assert flops.forward_flops_per_token(cfg, True) == flops.forward_flops_per_token(cfg, False)
    assert flops.mean_attended_keys(10, cap=4) == pytest.approx((1 + 2 + 3 + 4 + 4 * 6) / 10)


@pytest.mark.parametrize("moe", [True, False])
def test_matmuls_are_twice_the_weights_a_token_uses(moe):
    """Counted from the built model: every 2-D weight but the input embedding, experts at top-k / E."""
    from msa_megatron.model.builder import build_model
    from msa_megatron.training.distributed import init_distributed, shutdown

    cfg = load_config({"model": {"num_moe_experts": 4 if moe else None}, "data": {"seq_length": 128}})
    init_distributed(cfg)
    try:
        model = build_model(cfg, to_transformer_config(cfg, use_cpu_initialization=True))
        used = 0.0
        for name, p in model.named_parameters():
            if p.dim() != 2 or name.startswith("embedding."):
                continue
            share = cfg.model.moe_router_topk / cfg.model.num_moe_experts if ".experts." in name else 1.0
            used += p.numel() * share
    finally:
        shutdown()
    f = flops.forward_flops_per_token(cfg, sparse=True)
    assert f.total - f.attention_core - f.index_scores == pytest.approx(2 * used)
    assert flops.training_flops_per_token(cfg, True) == 3 * f.total


def test_gqa_and_dense_layers_have_no_index_cost():
    cfg = load_config({"attention": {"type": "gqa"}, "data": {"seq_length": 128}})
    f = flops.forward_flops_per_token(cfg, sparse=False)
    assert f.index_projections == f.index_scores == 0


def test_peak_of_known_gpus_only():
    assert flops.peak_flops_per_gpu("bf16", "NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_gpu("bf16", None) is None  # CPU: no MFU
    assert flops.peak_flops_per_gpu("fp32", "Some Accelerator", override_tflops=2.0) == 2e12


def test_dense_layers_and_moe_pattern():
    """attention.dense_layers (0-based) keep dense attention and no index branch; model.moe_layer_freq
    picks the MoE layers (an int: every N-th from the first; a list: one flag per layer)."""
    base = {"model": {"num_layers": 4}, "data": {"seq_length": 4096}, "attention": {"block_size": 32, "topk_blocks": 4}}
    cfg = load_config({**base, "attention": {**base["attention"], "dense_layers": [0, 1]}})
    assert flops.msa_layer_numbers(cfg) == [3, 4]
    full = flops.forward_flops_per_token(load_config(base), sparse=True)
    part = flops.forward_flops_per_token(cfg, sparse=True)
    assert part.index_projections == full.index_projections // 2 and part.index_scores == full.index_scores // 2
    assert part.attention_core > full.attention_core  # two layers attend densely over 4096 tokens
    assert flops.moe_layer_numbers(load_config({**base, "model": {"num_layers": 4, "moe_layer_freq": 2}})) == [1, 3]
    assert flops.moe_layer_numbers(load_config({**base, "model": {"num_layers": 4, "moe_layer_freq": [0, 0, 1, 1]}})) == [3, 4]
