"""Write imported weights as a megatron-core dist checkpoint; read ours back for export.

The model for the imported config is built on the meta device (no memory), the converted tensors
are assigned to its parameters (no copy), and megatron-core's own `sharded_state_dict()` names
and shards them: layers stacked along a layer axis, experts along an expert axis, exactly what a
training run at any TP / PP / EP layout asks dist_checkpointing for. Host memory: one copy of the
converted weights in their stored dtype (plus one source tensor at a time).

Layout of an imported checkpoint directory (usable as `checkpoint.init_from`):
    metadata.json, .metadata, __0_0.distcp ...   the dist checkpoint (dense weights)
    convert_meta.json                            source, model config, what was mapped / dropped
    conf/recipe/<name>.yaml                      the `model` (and `attention`) blocks of the run
It is written under a temporary name beside the destination and renamed when complete, so a
failed import leaves nothing at the destination.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml

from msa_megatron.config import RunConfig, load_config, to_transformer_config
from msa_megatron.convert import ConvertError

META = "convert_meta.json"
FRESH = "*.indexer.*"  # created at checkpoint.init_from (MSA-CPT)


@dataclass
class Converted:
    """An importer's result: the run config and our tensors, plus the summary's facts."""

    cfg: RunConfig
    params: dict  # our parameter name -> tensor (global, TP = PP = EP = 1)
    source: str
    source_format: str
    model_type: str
    vocab_rows: int
    mapped: int = 0  # source tensors used
    dropped: list = field(default_factory=list)  # source tensors left behind (name: reason)
    attention: dict = field(default_factory=dict)  # attention.* keys the source determines (MiniMax-M3)


def ensure_world() -> None:
    """A one-process gloo world with model-parallel sizes 1 (megatron-core needs one to build)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise RuntimeError(f"conversion runs at TP=PP=EP=1, the process has {sizes}")
        return
    from msa_megatron.training.distributed import init_distributed

    init_distributed(RunConfig())


def build_meta_model(cfg: RunConfig, dtype: torch.dtype = torch.float32):
    """Our GPTModel for cfg at TP = PP = EP = 1 with parameters on the meta device."""
    from msa_megatron.model.builder import build_model

    ensure_world()
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = "fp32"  # no Float16Module wrapper: parameter names stay the model's
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.expert_model_parallel_size, cfg.parallel.expert_tensor_parallel_size = 1, None
    tconfig = to_transformer_config(cfg, use_cpu_initialization=True)
    tconfig.params_dtype = dtype
    with torch.device("meta"):
        return build_model(cfg, tconfig)


def check_destination(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConvertError(f"{out_dir}: already exists and is not empty (nothing is overwritten)")


def staging_dir(out_dir: str) -> str:
    """A new directory beside out_dir (parents created now, after the conversion succeeded)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=os.path.basename(os.path.abspath(out_dir)) + ".partial-")


def check_params(model, params: dict, source: str) -> list:
    """Names and shapes against the model; returns the parameters left for init_from to create."""
    expected = dict(model.named_parameters())
    missing = [n for n in expected if n not in params]
    fresh = [n for n in missing if fnmatch.fnmatchcase(n, FRESH)]
    lacking = [n for n in missing if n not in fresh]
    if lacking:
        raise ConvertError(f"{source}: {len(lacking)} tensors of the model are missing: {', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}")
    extra = [n for n in params if n not in expected]
    if extra:
        raise ConvertError(f"{source}: {len(extra)} tensors have no place in the model: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for name, p in expected.items():
        if name in params and tuple(params[name].shape) != tuple(p.shape):
            raise ConvertError(f"{source}: {name} has shape {tuple(params[name].shape)}, the model expects {tuple(p.shape)}")
    return fresh


def write(out_dir: str, result: Converted, recipe_name: str) -> dict:
    """Save result as a dist checkpoint at out_dir; returns the summary written to convert_meta.json."""
    from megatron.core import dist_checkpointing

    check_destination(out_dir)
    model = build_meta_model(result.cfg)
    fresh = check_params(model, result.params, result.source)
    model.load_state_dict(result.params, strict=False, assign=True)  # no copy: the model holds our tensors
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not _is_meta(v)}
    summary = {
        "source": os.path.abspath(result.source),
        "format": result.source_format,
        "model_type": result.model_type,
        "vocab_rows": result.vocab_rows,
        "mapped_source_tensors": result.mapped,
        "written_tensors": len(result.params),
        "dropped": result.dropped,
        "fresh_at_init_from": _fresh_note(result.cfg, fresh),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in result.params.values()}),
        "config": {"model": _plain(result.cfg.model), "attention": _plain(result.cfg.attention)},
    }
    tmp = staging_dir(out_dir)
    try:
        dist_checkpointing.save(sharded, tmp)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(summary, f, indent=1)
        _write_recipe(tmp, recipe_name, result, out_dir)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _is_meta(entry) -> bool:
    data = getattr(entry, "data", None)
    return torch.is_tensor(data) and data.is_meta


def _plain(section) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(section))


def _fresh_note(cfg: RunConfig, missing: list) -> str:
    """What checkpoint.init_from will create fresh for an MSA run from this checkpoint."""
    if cfg.attention.type == "msa":  # the source brought its index branch (MiniMax-M3 layout)
        return f"{len(missing)} tensors" if missing else "nothing (the index branch was imported)"
    per_layer = 4 if cfg.attention.index_norm else 2
    return f"{FRESH} ({per_layer * cfg.model.num_layers} tensors when attention.type=msa)"


def recipe_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, "conf", "recipe", f"{name}.yaml")


def _write_recipe(tmp: str, name: str, result: Converted, out_dir: str) -> None:
    path = recipe_path(tmp, name)
    os.makedirs(os.path.dirname(path))
    body = {"model": _plain(result.cfg.model)}
    if result.attention:
        body["attention"] = result.attention
    with open(path, "w") as f:
        f.write("# @package _global_\n")
        f.write(f"# The model imported from {result.source} by tools/convert.py. Train it with\n")
        f.write(f"#   train.py --config-dir {os.path.abspath(out_dir)}/conf recipe={name} stage=msa_cpt \\\n")
        f.write(f"#       checkpoint.init_from={os.path.abspath(out_dir)}\n")
        yaml.safe_dump(body, f, sort_keys=False)


# ------------------------------------------------------------------------------------ reading


def resolve_checkpoint(root: str) -> str:
    """A dist checkpoint directory: root itself, or the newest iteration under a training root."""
    from msa_megatron.training import checkpoint

    if not os.path.isdir(root):
        raise ConvertError(f"{root}: no such directory")
    step = checkpoint.latest_step(root) if os.path.exists(os.path.join(root, checkpoint.TRACKER)) else None
    path = checkpoint.iteration_dir(root, step) if step is not None else root
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise ConvertError(f"{root}: not a dist checkpoint of this project (no metadata.json)")
    return path


def read_config(path: str) -> tuple[RunConfig, dict]:
    """The run config stored with a checkpoint (training: msa_meta.json; import: convert_meta.json)."""
    from msa_megatron.training.checkpoint import META as TRAIN_META

    for name in (TRAIN_META, META):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                meta = json.load(f)
            return load_config(meta["config"]), meta
    raise ConvertError(f"{path}: has neither {TRAIN_META} nor {META}: the model config is unknown")


def read(root: str) -> tuple[RunConfig, dict, dict]:
    """(run config, our parameters as CPU tensors, metadata) of one of our checkpoints."""
    from megatron.core import dist_checkpointing

    from msa_megatron.training import checkpoint

    path = resolve_checkpoint(root)
    cfg, meta = read_config(path)
    stored = dist_checkpointing.load_tensors_metadata(path)
    dtype = next((t.dtype for k, t in stored.items() if k.startswith("decoder.")), torch.float32)
    model = build_meta_model(cfg, dtype)
    model.to_empty(device="cpu")
    try:
        checkpoint.init_weights(model, path, [])
    except checkpoint.CheckpointError as e:
        raise ConvertError(str(e)) from None
    return cfg, {n: p.detach() for n, p in model.named_parameters()}, meta
