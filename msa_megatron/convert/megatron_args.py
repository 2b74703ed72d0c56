"""The `model` block from the argparse Namespace that Megatron-LM and Megatron-DeepSpeed save with
their checkpoints (`args`). Both spell most options the same way; the differences are handled
here. What our model cannot express is refused with one line naming the argument."""

from __future__ import annotations

from msa_megatron.convert import ConvertError
from msa_megatron.convert.hf_config import _complete_model


def _arg(args, *names, default=None):
    for n in names:
        value = getattr(args, n, None)
        if value is not None:
            return value
    return default


def _refuse(cond: bool, name: str, value, why: str) -> None:
    if cond:
        raise ConvertError(f"checkpoint args.{name}={value!r}: {why}")


def model_from_args(args, name: str) -> tuple[dict, list]:
    """(every ModelConfig key, per-layer MoE flags) for a Megatron checkpoint's args."""
    if args is None:
        raise ConvertError("checkpoint: no 'args' saved with it, so the model shape is unknown")
    norm = str(_arg(args, "normalization", default="LayerNorm")).lower()
    _refuse(norm != "rmsnorm", "normalization", norm, "only RMSNorm models are supported")
    _refuse(not _arg(args, "swiglu", default=False), "swiglu", False, "only SwiGLU MLPs are supported")
    _refuse(bool(_arg(args, "add_bias_linear", default=False)), "add_bias_linear", True, "linear-layer biases are not supported")
    rope = _arg(args, "position_embedding_type", default="rope" if _arg(args, "use_rotary_position_embeddings") else None)
    _refuse(rope != "rope", "position_embedding_type", rope, "only RoPE models are supported")
    _refuse(bool(_arg(args, "use_legacy_models", default=False)), "use_legacy_models", True, "the legacy (pre-megatron-core) model names are not supported")
    _refuse(_arg(args, "rotary_interleaved", default=False), "rotary_interleaved", True, "interleaved RoPE is not supported")
    _refuse(bool(_arg(args, "moe_router_pre_softmax", default=False)), "moe_router_pre_softmax", True, "softmax before top-k is not supported")
    _refuse(_arg(args, "moe_router_score_function", default="softmax") != "softmax", "moe_router_score_function",
            _arg(args, "moe_router_score_function"), "only softmax routing is supported")
    heads = _arg(args, "num_attention_heads")
    if heads is None or _arg(args, "num_layers") is None or _arg(args, "hidden_size") is None:
        raise ConvertError("checkpoint args: num_layers / hidden_size / num_attention_heads missing")
    if _arg(args, "group_query_attention") is False:
        groups = heads
    else:
        groups = _arg(args, "num_query_groups", "num_key_value_heads", default=heads)
    layers = args.num_layers
    experts = _arg(args, "num_experts")
    if isinstance(experts, (list, tuple)):  # Megatron-DeepSpeed: [1] means dense
        _refuse(any(e > 1 for e in experts), "num_experts", experts, "DeepSpeed-MoE checkpoints are not supported")
        experts = None
    moe_layers = [False] * layers
    m = {
        "name": name,
        "num_layers": layers,
        "hidden_size": args.hidden_size,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": _arg(args, "kv_channels", default=args.hidden_size // heads),
        "ffn_hidden_size": _arg(args, "ffn_hidden_size", default=4 * args.hidden_size),
        "num_moe_experts": None,
        "moe_ffn_hidden_size": None,
        "moe_shared_expert_intermediate_size": None,
        "vocab_size": _arg(args, "padded_vocab_size"),
        "max_position_embeddings": _arg(args, "max_position_embeddings", "seq_length", default=4096),
        "rotary_base": _arg(args, "rotary_base", "rope_theta", default=10000),
        "rotary_percent": float(_arg(args, "rotary_percent", default=1.0)),
        "qk_layernorm": bool(_arg(args, "qk_layernorm", default=False)),
        "add_qkv_bias": bool(_arg(args, "add_qkv_bias", default=False)),
        "layernorm_epsilon": _arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5),
        "init_method_std": _arg(args, "init_method_std", default=0.02),
        "untie_embeddings_and_output_weights": bool(_arg(args, "untie_embeddings_and_output_weights", default=False)),
    }
    if m["vocab_size"] is None:
        raise ConvertError("checkpoint args.padded_vocab_size: missing")
    if experts:
        freq = _arg(args, "moe_layer_freq", default=1)
        moe_layers = [i % freq == 0 for i in range(layers)] if isinstance(freq, int) else [bool(x) for x in freq]
        m.update(
            num_moe_experts=experts,
            moe_router_topk=_arg(args, "moe_router_topk", default=2),
            moe_ffn_hidden_size=_arg(args, "moe_ffn_hidden_size", default=m["ffn_hidden_size"]),
            moe_shared_expert_intermediate_size=_arg(args, "moe_shared_expert_intermediate_size"),
            moe_aux_loss_coeff=_arg(args, "moe_aux_loss_coeff", default=0.0),
        )
    return _complete_model(m, moe_layers), moe_layers
