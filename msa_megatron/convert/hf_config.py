"""Hugging Face `config.json` <-> this project's `model.*` / `attention.*` keys.

Import reads the architecture's config and returns the complete `model` block the training run
uses (plus the `attention` block for MiniMax-M3 files). What `model.*` cannot express is refused
with one line naming the config key: biases other than Qwen2's q/k/v, sliding windows, RoPE
scaling, activations other than SiLU, MoE routing without top-k renormalisation.

Export writes the config of a dense architecture, or MiniMax-M3's (`sparse_attention_config`
says which layers are sparse, from `attention.dense_layers`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from msa_megatron.config import ModelConfig, RunConfig
from msa_megatron.convert import ConvertError
from msa_megatron.model.specs import is_moe_layer, is_msa_layer

# model_type -> architectures entry (what transformers instantiates)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "minimax_m3_vl": "MiniMaxM3SparseForConditionalGeneration",
}
MOE_TYPES = ("qwen3_moe", "mixtral", "minimax_m3_vl")
M3 = "minimax_m3_vl"
# Written into an exported MiniMax-M3 config: what this project's model computes where M3 differs.
OURS_KEY = "msa_megatron"
# Pad the embedding rows to a multiple of 128 * 8 so that every TP size up to 8 loads the checkpoint
# without re-padding (megatron pads the vocabulary to a multiple of 128 * TP).
VOCAB_MULTIPLE = 1024


@dataclass
class SourceModel:
    """What an importer learned from a config: the run's model block and the source's facts."""

    model_type: str
    model: dict  # every ModelConfig key
    attention: dict = field(default_factory=dict)  # attention.* keys (MiniMax-M3 sources)
    vocab_rows: int = 0  # rows of the source's embedding (before our padding)
    moe_layers: list = field(default_factory=list)  # per layer: MoE MLP?


def text_config(config: dict) -> dict:
    """The language model's config (MiniMax-M3 nests it under text_config)."""
    if config.get("model_type") == M3:
        return config.get("text_config") or {}
    return config


def _rope(c: dict, key_prefix: str) -> tuple[float, float]:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConvertError(f"{key_prefix}rope_parameters.rope_type={rope_type!r}: RoPE scaling is not supported (model.rotary_base only)")
    theta = params.get("rope_theta", c.get("rope_theta"))
    if theta is None:
        raise ConvertError(f"{key_prefix}rope_theta: missing from config.json")
    fraction = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    return float(theta), float(fraction)


def _refuse_if(cond: bool, key: str, value, why: str) -> None:
    if cond:
        raise ConvertError(f"config.json {key}={value!r}: {why}")


def model_from_hf(config: dict, name: str) -> SourceModel:
    """The `model` (and `attention`) blocks for a Hugging Face config.json."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConvertError(
            f"config.json model_type={model_type!r}: not an importable architecture (supported: {', '.join(ARCHITECTURES)})"
        )
    c = text_config(config)
    prefix = "text_config." if model_type == M3 else ""
    if model_type == M3 and not c.get(OURS_KEY):
        raise ConvertError(
            "config.json: MiniMax-M3 checkpoints use clamped SwiGLU-OAI MLPs and sigmoid routing, which model.* cannot "
            f"express; only files written by tools/convert.py export (with a text_config.{OURS_KEY} block) import"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(c.get(key), int):
            raise ConvertError(f"config.json {prefix}{key}: missing or not an integer")
    act = c.get("hidden_act", "silu")
    _refuse_if(act != "silu" and model_type != M3, f"{prefix}hidden_act", act, "only SiLU gated MLPs (SwiGLU) are supported")
    _refuse_if(bool(c.get("attention_bias")) and model_type != "qwen2", f"{prefix}attention_bias", True, "attention biases are not supported (Qwen2's q/k/v biases are)")
    _refuse_if(bool(c.get("mlp_bias")), f"{prefix}mlp_bias", True, "MLP biases are not supported")
    window = c.get("sliding_window") if model_type in ("mistral", "mixtral") or c.get("use_sliding_window") else None
    _refuse_if(window is not None, f"{prefix}sliding_window", window, "sliding-window attention is not supported")
    _refuse_if(any(t == "sliding_attention" for t in c.get("layer_types") or []), f"{prefix}layer_types", "sliding_attention", "sliding-window attention is not supported")
    theta, fraction = _rope(c, prefix)
    heads = c["num_attention_heads"]
    groups = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    layers = c["num_hidden_layers"]
    m = {
        "name": name,
        "num_layers": layers,
        "hidden_size": c["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "ffn_hidden_size": c.get("intermediate_size"),
        "num_moe_experts": None,
        "moe_ffn_hidden_size": None,
        "moe_shared_expert_intermediate_size": None,
        "vocab_size": padded_vocab(c["vocab_size"]),
        "max_position_embeddings": c.get("max_position_embeddings", 4096),
        "rotary_base": int(theta) if float(theta).is_integer() else theta,
        "rotary_percent": fraction,
        "qk_layernorm": model_type in ("qwen3", "qwen3_moe", M3),
        "layernorm_epsilon": c.get("rms_norm_eps", 1e-6),
        "init_method_std": c.get("initializer_range", 0.02),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", c.get("tie_word_embeddings", False)),
    }
    if model_type == "qwen2":
        m["add_qkv_bias"] = True
    moe_layers = [False] * layers
    if model_type in MOE_TYPES:
        moe_layers = _moe_from_hf(model_type, c, m, prefix)
    attention = _attention_from_m3(config, c, layers) if model_type == M3 else {}
    return SourceModel(model_type, _complete_model(m, moe_layers), attention, c["vocab_size"], moe_layers)


def _moe_from_hf(model_type: str, c: dict, m: dict, prefix: str) -> list:
    layers = m["num_layers"]
    if model_type == "qwen3_moe":
        _refuse_if(not c.get("norm_topk_prob", False), f"{prefix}norm_topk_prob", c.get("norm_topk_prob"), "softmax-then-top-k without renormalisation is not supported (megatron's top-k softmax renormalises)")
        step = c.get("decoder_sparse_step", 1) or 1
        dense = set(c.get("mlp_only_layers") or [])
        experts = c.get("num_experts", c.get("num_local_experts", 0))  # transformers 5 writes the latter
        moe_layers = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)]
        m.update(num_moe_experts=experts, moe_ffn_hidden_size=c["moe_intermediate_size"])
    elif model_type == "mixtral":
        moe_layers = [True] * layers
        m.update(num_moe_experts=c["num_local_experts"], moe_ffn_hidden_size=c["intermediate_size"])
    else:  # MiniMax-M3 written by our exporter
        kinds = c.get("mlp_layer_types") or ["sparse"] * layers
        moe_layers = [k == "sparse" for k in kinds]
        m.update(
            num_moe_experts=c.get("num_local_experts"),
            moe_ffn_hidden_size=c.get("intermediate_size"),
            ffn_hidden_size=c.get("dense_intermediate_size"),
            moe_shared_expert_intermediate_size=(c.get(OURS_KEY) or {}).get("shared_expert_intermediate_size"),
        )
    m["moe_router_topk"] = c["num_experts_per_tok"]
    if "router_aux_loss_coef" in c:
        m["moe_aux_loss_coeff"] = c["router_aux_loss_coef"]
    if not any(moe_layers):
        m.update(num_moe_experts=None, moe_ffn_hidden_size=None)
    return moe_layers


def _complete_model(m: dict, moe_layers: list) -> dict:
    """Every ModelConfig key, so no preset (model=tiny) leaks into the imported model."""
    if any(moe_layers) and not all(moe_layers):
        m["moe_layer_freq"] = [int(x) for x in moe_layers]
    if m["ffn_hidden_size"] is None:
        m["ffn_hidden_size"] = m.get("moe_ffn_hidden_size") or 4 * m["hidden_size"]
    full = dataclasses.asdict(ModelConfig())
    full.update(m)
    return full


def _attention_from_m3(config: dict, c: dict, layers: int) -> dict:
    _refuse_if(c.get("routed_scaling_factor", 1.0) != 1.0, "text_config.routed_scaling_factor", c.get("routed_scaling_factor"), "must be 1.0")
    sparse = c.get("sparse_attention_config") or {}
    kinds = c.get("layer_types") or ["minimax_m3_sparse" if f else "full_attention" for f in sparse.get("sparse_attention_freq", [1] * layers)]
    dense_layers = [i for i, k in enumerate(kinds) if k != "minimax_m3_sparse"]
    attention = {
        "type": "msa" if len(dense_layers) < layers else "gqa",
        "block_size": c.get("index_block_size", sparse.get("sparse_block_size")),
        "topk_blocks": c.get("index_topk_blocks", sparse.get("sparse_topk_blocks")),
        "index_head_dim": c.get("index_head_dim", sparse.get("sparse_index_dim")),
        "index_norm": True,
        "index_rope": True,
    }
    if dense_layers and attention["type"] == "msa":
        attention["dense_layers"] = dense_layers
    return {k: v for k, v in attention.items() if v is not None}


def padded_vocab(rows: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-rows // multiple) * multiple


# ----------------------------------------------------------------------------------- export


def hf_config(model_type: str, cfg: RunConfig, vocab_rows: int) -> dict:
    """config.json for our model in a Hugging Face architecture."""
    m = cfg.model
    moe = [is_moe_layer(cfg, i) for i in range(m.num_layers)]
    text = {
        "model_type": model_type,
        "vocab_size": vocab_rows,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.layernorm_epsilon,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
    }
    if m.rotary_percent != 1.0:
        text["rope_parameters"]["partial_rotary_factor"] = m.rotary_percent
    if model_type == "qwen2":
        text["use_sliding_window"] = False
    if model_type in ("qwen3_moe", "mixtral"):
        text["num_experts_per_tok"] = m.moe_router_topk
        text["router_aux_loss_coef"] = m.moe_aux_loss_coeff
    if model_type == "qwen3_moe":
        text.update(num_experts=m.num_moe_experts or 0, moe_intermediate_size=m.moe_ffn_hidden_size, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[i for i, x in enumerate(moe) if not x])
    if model_type == "mixtral":
        text.update(num_local_experts=m.num_moe_experts, intermediate_size=m.moe_ffn_hidden_size)
    if model_type != M3:
        return {"architectures": [ARCHITECTURES[model_type]], **text, "dtype": "float32"}
    return _m3_config(cfg, text, moe)


def _m3_config(cfg: RunConfig, text: dict, moe: list) -> dict:
    m, a = cfg.model, cfg.attention
    sparse_layers = [is_msa_layer(cfg, i) for i in range(m.num_layers)]
    text.update(
        model_type="minimax_m3_vl_text",
        dense_intermediate_size=m.ffn_hidden_size,
        intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        shared_intermediate_size=m.moe_shared_expert_intermediate_size or 1,
        num_local_experts=m.num_moe_experts or 1,
        num_experts_per_tok=m.moe_router_topk if m.num_moe_experts else 1,
        router_aux_loss_coef=m.moe_aux_loss_coeff,
        routed_scaling_factor=1.0,
        rotary_dim=int(m.kv_channels * m.rotary_percent),
        mlp_layer_types=["sparse" if x else "dense" for x in moe],
        layer_types=["minimax_m3_sparse" if s else "full_attention" for s in sparse_layers],
        sparse_attention_config={
            "use_sparse_attention": any(sparse_layers),
            "sparse_index_dim": a.index_head_dim,
            "sparse_num_index_heads": m.num_query_groups,
            "sparse_topk_blocks": a.topk_blocks,
            "sparse_block_size": a.block_size,
            "sparse_score_type": "max",
            "sparse_init_block": 0,
            "sparse_local_block": 1,
            "sparse_disable_index_value": True,
            "sparse_attention_freq": [int(s) for s in sparse_layers],
        },
    )
    text[OURS_KEY] = {
        "mlp_activation": "silu_glu (M3: clamped SwiGLU-OAI)",
        "router": "softmax over the top-k logits (M3: sigmoid + e_score_correction_bias, exported as zeros)",
        "shared_expert_intermediate_size": m.moe_shared_expert_intermediate_size,
        "index_score_scale": f"1/sqrt({a.index_head_dim}) in training; transformers omits it (top-k selection is unchanged)",
        "norms": "exported as Gemma-style x*(1+w): w_hf = w - 1",
    }
    return {
        "architectures": [ARCHITECTURES[M3]],
        "model_type": M3,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "text_config": text,
    }


def check_m3_exportable(cfg: RunConfig) -> None:
    """One line for what MiniMax-M3's layout cannot hold."""
    m, a = cfg.model, cfg.attention
    if not m.qk_layernorm:
        raise ConvertError("model.qk_layernorm=False: MiniMax-M3 always normalises q and k per head; export with --arch of the source model")
    if getattr(m, "add_qkv_bias", False):
        raise ConvertError("model.add_qkv_bias=True: MiniMax-M3 has no q/k/v biases; export with --arch qwen2")
    if a.type == "msa" and not (a.index_norm and a.index_rope):
        raise ConvertError("attention.index_norm / index_rope: MiniMax-M3's index branch always normalises and rotates; both must be true")
    if a.type == "msa" and m.kv_channels * m.rotary_percent > a.index_head_dim:
        raise ConvertError(f"attention.index_head_dim={a.index_head_dim}: smaller than the rotary dims")
