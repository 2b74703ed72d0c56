"""megatron-core layer specs with MSA (or the dense baseline) as the self-attention.

One spec per layer: the attention is MSA unless `attention.type=gqa` or the layer is listed in
`attention.dense_layers` (full attention, no index branch), or the local-only baseline with
`attention.type=local` (the most recent blocks, no index branch); the FFN is MoE unless
`model.moe_layer_freq` marks the layer dense. All variants share every parameter name except the
`*.indexer.*` weights. Local spec pieces by default; Transformer Engine linears and norms when
`model.transformer_impl` selects them (TE's fused norm+qkv linear is not used: the index branch
must see the normalized input that feeds linear_qkv).
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from msa_megatron.config import is_local_layer, is_moe_layer, is_msa_layer
from msa_megatron.model.attention import (
    LocalCoreAttention,
    MSACoreAttention,
    MSASelfAttention,
    MSASelfAttentionSubmodules,
    PackedCoreAttention,
    PackedSelfAttention,
)
from msa_megatron.model.indexer import MSAIndexer, MSAIndexerSubmodules
from msa_megatron.model.norms import RMSNorm


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except Exception:
        return False
    return True


def _local_submodules(cfg, moe: bool):
    m = cfg.model
    sub = get_gpt_layer_local_submodules(
        num_experts=m.num_moe_experts if moe else None,
        moe_grouped_gemm=m.moe_grouped_gemm,
        qk_layernorm=m.qk_layernorm,
        normalization="RMSNorm",
    )
    # megatron-core's torch norm refuses sequence parallelism (needed by MoE + TP): use ours.
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    if m.qk_layernorm:
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    return sub, RMSNorm, MSAIndexerSubmodules()


def _te_submodules(cfg, moe: bool):
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TELinear, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_submodules

    m = cfg.model
    sub = get_gpt_layer_with_transformer_engine_submodules(
        num_experts=m.num_moe_experts if moe else None, moe_grouped_gemm=m.moe_grouped_gemm, qk_layernorm=m.qk_layernorm
    )
    sub.input_layernorm = TENorm
    sub.self_attention.submodules.linear_qkv = TEColumnParallelLinear
    # Same checkpoint names as the local spec (and as TE's fused layer): input_layernorm is saved
    # as linear_qkv.layer_norm_*.
    sub.sharded_state_dict_keys_map = {**sub.sharded_state_dict_keys_map, "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    indexer = MSAIndexerSubmodules(
        linear_q=TEColumnParallelLinear, linear_k=ModuleSpec(module=TELinear, params={"parallel_mode": "duplicated"})
    )
    return sub, TENorm, indexer


def layer_spec(cfg, use_te: bool, layer: int = 0) -> tuple[ModuleSpec, type]:
    """(TransformerLayer spec, final-norm class) of 0-based `layer`."""
    moe = is_moe_layer(cfg, layer)
    sub, final_norm, indexer = _te_submodules(cfg, moe) if use_te else _local_submodules(cfg, moe)
    attn = sub.self_attention
    core_args = {"msa": cfg.attention, "num_query_groups": cfg.model.num_query_groups}
    if is_msa_layer(cfg, layer):
        attn.module = MSASelfAttention
        attn.params = {**attn.params, "msa": cfg.attention}
        fields = {f.name: getattr(attn.submodules, f.name) for f in dataclasses.fields(attn.submodules)}
        attn.submodules = MSASelfAttentionSubmodules(**fields, indexer=ModuleSpec(module=MSAIndexer, submodules=indexer))
        attn.submodules.core_attention = functools.partial(MSACoreAttention, **core_args)
    else:
        attn.module = PackedSelfAttention
        core = LocalCoreAttention if is_local_layer(cfg, layer) else PackedCoreAttention
        attn.submodules.core_attention = functools.partial(core, **core_args)
    return ModuleSpec(module=TransformerLayer, submodules=sub), final_norm


def block_spec(cfg, tconfig, use_te: bool, vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """Specs of the layers this pipeline stage (and virtual stage) builds."""
    first = get_transformer_layer_offset(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    specs = [layer_spec(cfg, use_te, layer)[0] for layer in range(first, first + n)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=layer_spec(cfg, use_te)[1])
