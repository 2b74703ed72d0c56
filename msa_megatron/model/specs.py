"""megatron-core layer specs with MSA (or the dense baseline) as the self-attention.

Both attention types come from one spec function, so `attention.type=gqa` and `=msa` share every
parameter name except the `*.indexer.*` weights. Local spec by default pieces; Transformer Engine
linears and norms when `model.transformer_impl` selects them (TE's fused norm+qkv linear is
not used: the index branch must see the normalized input that feeds linear_qkv).
"""

from __future__ import annotations

import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

from msa_megatron.model.attention import MSACoreAttention, MSASelfAttention, PackedCoreAttention
from msa_megatron.model.norms import RMSNorm


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except Exception:
        return False
    return True


def _local_submodules(cfg):
    m = cfg.model
    sub = get_gpt_layer_local_submodules(
        num_experts=m.num_moe_experts, moe_grouped_gemm=m.moe_grouped_gemm, qk_layernorm=m.qk_layernorm, normalization="RMSNorm"
    )
    # megatron-core's torch norm refuses sequence parallelism (needed by MoE + TP): use ours.
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    if m.qk_layernorm:
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    return sub, RMSNorm


def _te_submodules(cfg):
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_submodules

    m = cfg.model
    sub = get_gpt_layer_with_transformer_engine_submodules(
        num_experts=m.num_moe_experts, moe_grouped_gemm=m.moe_grouped_gemm, qk_layernorm=m.qk_layernorm
    )
    sub.input_layernorm = TENorm
    sub.self_attention.submodules.linear_qkv = TEColumnParallelLinear
    # Same checkpoint names as the local spec (and as TE's fused layer): input_layernorm is saved
    # as linear_qkv.layer_norm_*.
    sub.sharded_state_dict_keys_map = {**sub.sharded_state_dict_keys_map, "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    return sub, TENorm


def layer_spec(cfg, use_te: bool) -> tuple[ModuleSpec, type]:
    """(TransformerLayer spec, final-norm class) for cfg.attention.type."""
    sub, final_norm = _te_submodules(cfg) if use_te else _local_submodules(cfg)
    attn = sub.self_attention
    if cfg.attention.type == "msa":
        attn.module = MSASelfAttention
        attn.params = {**attn.params, "msa": cfg.attention}
        core = MSACoreAttention
    else:
        core = PackedCoreAttention
    attn.submodules.core_attention = functools.partial(core, msa=cfg.attention)
    return ModuleSpec(module=TransformerLayer, submodules=sub), final_norm


def block_spec(cfg, tconfig, use_te: bool, pp_rank=None) -> TransformerBlockSubmodules:
    spec, final_norm = layer_spec(cfg, use_te)
    n = get_num_layers_to_build(tconfig, vp_stage=None, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=final_norm)

