"""Import a DeepSpeed ZeRO (stage 1, 2 or 3) checkpoint.

DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`) gathers the fp32 master weights of
every data-parallel partition into whole tensors named after the trained module; nothing here
parses its files. The module names then pick the mapping:

- Hugging Face modules (`model.layers.N.self_attn.q_proj.weight` ...), e.g. from the HF Trainer:
  transformers turns its in-memory names (fused MoE experts) back into the checkpoint names
  (`revert_weight_conversion`), and the Hugging Face rules apply; the architecture comes from the
  config.json beside the checkpoint (`--hf-config` to point elsewhere).
- Megatron-DeepSpeed GPT modules (`language_model.encoder.layers.N.self_attention.query_key_value`,
  or the pipeline module's `N.self_attention...`): the same fused q/k/v and gate/up layouts as
  megatron-core; the model shape comes from the `args` Megatron-DeepSpeed stores in the model
  states file.

Host memory: DeepSpeed's consolidation holds the fp32 master weights once (4 bytes/parameter);
our converted copy adds the same again.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

import torch

from msa_megatron.convert import ConvertError
from msa_megatron.convert.hf import DictTensors, cast, import_hf_tensors, read_json
from msa_megatron.convert.megatron_args import model_from_args
from msa_megatron.convert.writer import Converted


def consolidate(src: str, tag: Optional[str]) -> tuple[str, dict]:
    """(tag, name -> fp32 tensor) through DeepSpeed's zero_to_fp32."""
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such directory")
    if tag is None:
        latest = os.path.join(src, "latest")
        if not os.path.isfile(latest):
            tags = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
            raise ConvertError(f"{src}: no 'latest' file naming the checkpoint tag; pass --tag (found: {', '.join(tags) or 'nothing'})")
        tag = open(latest).read().strip()
    if not os.path.isdir(os.path.join(src, tag)):
        raise ConvertError(f"{src}: tag {tag!r} has no directory {os.path.join(src, tag)}")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(src, tag=tag, lazy_mode=True)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, EOFError) as e:
        raise ConvertError(f"{os.path.join(src, tag)}: DeepSpeed could not consolidate it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return tag, {k: (v if torch.is_tensor(v) else v.contiguous()) for k, v in state.items()}


def _model_states_args(ckpt: str):
    files = sorted(glob.glob(os.path.join(ckpt, "*model_states.pt")))
    if not files:
        raise ConvertError(f"{ckpt}: no *model_states.pt file")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return state.get("args")


def import_deepspeed(src: str, name: str, tag: Optional[str] = None, hf_config: Optional[str] = None, dtype: Optional[str] = None) -> Converted:
    tag, state = consolidate(src, tag)
    names = list(state)
    if any(n.startswith(("model.layers.", "model.embed_tokens.")) for n in names):
        config_dir = hf_config or src
        config = read_json(os.path.join(config_dir, "config.json"), "the Hugging Face config of the trained modules; pass --hf-config")
        state = _hub_names(config, state)
        result = import_hf_tensors(config, DictTensors(state), src, name)
    elif any(_MDS_LAYER.match(n) for n in names):
        result = _import_megatron_deepspeed(state, _model_states_args(os.path.join(src, tag)), src, name)
    else:
        raise ConvertError(f"{src}: module names not recognised as Hugging Face or Megatron-DeepSpeed GPT (e.g. {names[0] if names else 'none'})")
    result.source_format = "deepspeed"
    result.params = cast(result.params, dtype)
    return result


def _hub_names(config: dict, state: dict) -> dict:
    """transformers' in-memory names (fused MoE experts) -> its checkpoint names, by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    hf_cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return revert_weight_conversion(model, dict(state))


# Megatron-DeepSpeed GPT: GPTModel (language_model.*) and GPTModelPipe (numbered pipeline stages).
_MDS_LAYER = re.compile(r"^(?:language_model\.encoder\.layers\.(\d+)|(\d+))\.(input_layernorm|self_attention|post_attention_layernorm|mlp)\.(.+)$")
_MDS_SUB = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight",
}


def _mds_name(name: str, layers: int) -> Optional[str]:
    m = _MDS_LAYER.match(name)
    if m:
        layer = int(m.group(1)) if m.group(1) is not None else int(m.group(2)) - 2  # pipeline: embedding is stage 1
        sub = _MDS_SUB.get(f"{m.group(3)}.{m.group(4)}")
        return f"decoder.layers.{layer}.{sub}" if sub and 0 <= layer < layers else None
    top = {
        "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
        "1.word_embeddings.weight": "embedding.word_embeddings.weight",
        "tied_modules.embed.word_embeddings.weight": "embedding.word_embeddings.weight",
        "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
        f"{layers + 2}.weight": "decoder.final_layernorm.weight",
        "language_model.output_layer.weight": "output_layer.weight",
        f"{layers + 3}.lm_head.weight": "output_layer.weight",
    }
    return top.get(name)


def _import_megatron_deepspeed(state: dict, args, src: str, name: str) -> Converted:
    from msa_megatron.convert.hf_config import SourceModel
    from msa_megatron.convert.megatron_lm import finish_megatron_params

    model, _ = model_from_args(args, name)
    rows = model["vocab_size"]
    params, dropped, unknown = {}, [], []
    for n, t in state.items():
        ours = _mds_name(n, model["num_layers"])
        if ours is not None:
            params[ours] = t
        elif n.endswith("inv_freq"):
            dropped.append(f"{n}: recomputed from the RoPE base")
        else:
            unknown.append(n)
    if unknown:
        raise ConvertError(f"{src}: {len(unknown)} tensors the model has no place for, e.g. {', '.join(unknown[:3])}")
    source = SourceModel("megatron_deepspeed_gpt", model, {}, rows)
    cfg, params = finish_megatron_params(source, params, src)
    return Converted(cfg=cfg, params=params, source=src, source_format="deepspeed", model_type="megatron_deepspeed_gpt",
                     vocab_rows=rows, mapped=len(params), dropped=dropped)
