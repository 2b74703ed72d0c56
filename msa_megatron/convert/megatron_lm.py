"""Import a Megatron-LM GPT checkpoint (megatron-core models): torch_dist or the legacy per-rank files.

- torch_dist (`iter_N/` with metadata.json, common.pt): megatron-core's dist_checkpointing reads
  the model tensors (not the optimizer's) into our model built at the source's shape, resharding
  from whatever TP / PP / EP the source was saved at. Its parameter names are ours.
- legacy (`iter_N/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`): every rank's `model` state dict is
  merged into global tensors. Column-parallel weights (fused q/k/v: whole KV groups per rank,
  embedding and output rows) join along dim 0; SwiGLU fc1 joins its gate and up halves separately;
  row-parallel weights (linear_proj, fc2) along dim 1; norms and routers are replicated. Pipeline
  ranks hold consecutive layers, expert-parallel ranks consecutive experts.

The model shape comes from the `args` Megatron-LM saves in the checkpoint. Host memory: the model
once (plus, for legacy files, one rank's file at a time while merging).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Optional

import torch

from msa_megatron.convert import ConvertError
from msa_megatron.convert.hf import cast, run_config
from msa_megatron.convert.hf_config import SourceModel, padded_vocab
from msa_megatron.convert.megatron_args import model_from_args
from msa_megatron.convert.writer import Converted, build_meta_model

TRACKER = "latest_checkpointed_iteration.txt"
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def iteration_dir(src: str) -> str:
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such directory")
    tracker = os.path.join(src, TRACKER)
    if not os.path.exists(tracker):
        return src
    text = open(tracker).read().strip()
    if text == "release":
        return os.path.join(src, "release")
    if not text.isdigit():
        raise ConvertError(f"{tracker}: expected an iteration number, found {text!r}")
    path = os.path.join(src, f"iter_{int(text):07d}")
    if not os.path.isdir(path):
        raise ConvertError(f"{tracker} names iteration {text}, but {path} does not exist")
    return path


def import_megatron(src: str, name: str, dtype: Optional[str] = None) -> Converted:
    path = iteration_dir(src)
    if os.path.exists(os.path.join(path, "metadata.json")):
        fmt, args, params = "torch_dist", *_read_torch_dist(path, name)
    elif any(d.startswith("mp_rank_") for d in os.listdir(path)):
        fmt, args, params = "legacy", *_read_legacy(path)
    else:
        raise ConvertError(f"{path}: neither a torch_dist checkpoint (metadata.json) nor legacy mp_rank_* directories")
    model, moe_layers = model_from_args(args, name)
    source = SourceModel("megatron_lm_gpt", model, {}, model["vocab_size"], moe_layers)
    cfg, params = finish_megatron_params(source, params, src)
    return Converted(cfg=cfg, params=cast(params, dtype), source=src, source_format=f"megatron_lm ({fmt})",
                     model_type="megatron_lm_gpt", vocab_rows=source.vocab_rows, mapped=len(params))


def finish_megatron_params(source: SourceModel, params: dict, src: str):
    """Pad the vocabulary rows to ours (zero rows) and build the run config."""
    rows = source.vocab_rows
    source.model["vocab_size"] = padded_vocab(rows)
    cfg = run_config(source)
    for n in VOCAB_PARAMS:
        if n in params:
            t = params[n]
            if t.shape[0] != rows:
                raise ConvertError(f"{src}: {n} has {t.shape[0]} rows, args.padded_vocab_size={rows}")
            params[n] = torch.cat([t, t.new_zeros(cfg.model.vocab_size - rows, *t.shape[1:])])
    return cfg, params


# ---------------------------------------------------------------------------------- torch_dist


def _read_torch_dist(path: str, name: str):
    from megatron.core import dist_checkpointing

    from msa_megatron.training import checkpoint

    common = dist_checkpointing.load_common_state_dict(path)
    args = common.get("args") if isinstance(common, dict) else None
    model, moe_layers = model_from_args(args, name)
    source = SourceModel("megatron_lm_gpt", dict(model), {}, model["vocab_size"], moe_layers)
    cfg = run_config(source)  # the source's own vocabulary rows: args.padded_vocab_size
    meta_model = build_meta_model(cfg)
    meta_model.to_empty(device="cpu")
    try:
        checkpoint.init_weights(meta_model, path, [])
    except checkpoint.CheckpointError as e:
        raise ConvertError(str(e)) from None
    return args, {n: p.detach() for n, p in meta_model.named_parameters()}


# -------------------------------------------------------------------------------------- legacy

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})((?:_\d{3}){0,2})$")


def _read_legacy(path: str):
    files = {}
    for d in sorted(os.listdir(path)):
        m = _RANK_DIR.match(d)
        if m and os.path.exists(os.path.join(path, d, "model_optim_rng.pt")):
            files[d] = (int(m.group(1)), [int(x) for x in m.group(2).split("_")[1:]])
    if not files:
        raise ConvertError(f"{path}: no mp_rank_*/model_optim_rng.pt files")
    first = _load(path, next(iter(files)))
    args = first.get("args")
    if args is None:
        raise ConvertError(f"{path}: the checkpoint has no 'args', so its layout is unknown")
    tp, pp, ep = (getattr(args, k, 1) or 1 for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise ConvertError(f"{path}: args.virtual_pipeline_model_parallel_size is set; interleaved pipeline checkpoints are not supported")
    if getattr(args, "decoder_first_pipeline_num_layers", None) or getattr(args, "decoder_last_pipeline_num_layers", None):
        raise ConvertError(f"{path}: uneven pipeline stages (args.decoder_*_pipeline_num_layers) are not supported")
    ranks = {}
    for d, (t, rest) in files.items():
        p = rest[0] if pp > 1 else 0
        e = rest[-1] if ep > 1 else 0
        ranks[(t, p, e)] = d
    layers_per_stage = args.num_layers // pp
    experts = getattr(args, "num_experts", None) or 0
    local_experts = experts // ep if experts else 0
    shards = defaultdict(dict)  # our global name -> {tensor-parallel index: tensor}
    for (t, p, e), d in sorted(ranks.items()):
        state = first if d == next(iter(files)) else _load(path, d)
        model_sd = state.get("model")
        if model_sd is None:
            raise ConvertError(f"{os.path.join(path, d)}: no 'model' state dict (virtual pipeline 'model0' files are not supported)")
        for local, tensor in model_sd.items():
            if local.endswith("_extra_state") or not torch.is_tensor(tensor):
                continue
            name, is_expert = _global_name(local, p * layers_per_stage, e * local_experts, path)
            index = 0 if is_expert and etp == 1 else t  # experts are whole on every rank when ETP is 1
            shards[name].setdefault(index, tensor)
        del state
    params = {name: _merge(name, parts, path) for name, parts in shards.items()}
    return args, params


def _load(path: str, d: str) -> dict:
    try:
        return torch.load(os.path.join(path, d, "model_optim_rng.pt"), map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: report which one
        raise ConvertError(f"{os.path.join(path, d, 'model_optim_rng.pt')}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def _global_name(local: str, layer_offset: int, expert_offset: int, path: str) -> tuple[str, bool]:
    """(our global name, is it an expert weight?) of a rank's local parameter name."""
    m = _LAYER.match(local)
    if not m:
        return local, False
    layer, rest = int(m.group(1)) + layer_offset, m.group(2)
    expert = f"decoder.layers.{layer}.mlp.experts.local_experts."
    e = _SEQ_EXPERT.match(rest)  # SequentialMLP: local_experts.E.linear_fc1.weight
    if e:
        return f"{expert}{int(e.group(1)) + expert_offset}.{e.group(2)}", True
    e = _GROUPED_EXPERT.match(rest)  # TEGroupedMLP: linear_fc1.weightE
    if e:
        return f"{expert}{int(e.group(2)) + expert_offset}.{e.group(1)}.weight", True
    if rest.startswith("mlp.experts.weight"):
        raise ConvertError(f"{path}: legacy GroupedMLP expert weights (mlp.experts.weight1/2) are not supported")
    return f"decoder.layers.{layer}.{rest}", False


def _merge(name: str, parts: dict, path: str) -> torch.Tensor:
    shards = [parts[i] for i in sorted(parts)]
    if len(shards) == 1:
        return shards[0].clone()
    if sorted(parts) != list(range(len(parts))):
        raise ConvertError(f"{path}: tensor-parallel shards of {name} are incomplete (have {sorted(parts)})")
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)
    if name.endswith("linear_fc1.weight"):  # each shard is [gate_r; up_r]
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return torch.cat(shards, dim=0)
    return shards[0].clone()  # replicated: norms, router
