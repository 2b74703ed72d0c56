"""Import a Hugging Face checkpoint directory (config.json + *.safetensors) into our names.

Everything is checked before any tensor data is read: the architecture and its config, every
tensor's presence and shape (from the safetensors headers), the tokenizer's size, and leftover
tensors (only ones that change nothing may be dropped). Tensors are then read one at a time from
memory-mapped files and joined into our layout.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from tqdm import tqdm

from msa_megatron.config import ConfigError, load_config
from msa_megatron.convert import ConvertError
from msa_megatron.convert.hf_config import M3, SourceModel, model_from_hf
from msa_megatron.convert.hf_names import droppable, tensor_rules
from msa_megatron.convert.writer import Converted, build_meta_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SafetensorsDir:
    """The tensors of a directory of safetensors files (an index json or every *.safetensors)."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f).get("weight_map", {}).values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ConvertError(f"{path}: no *.safetensors files (save the model with save_pretrained, safe_serialization=True)")
        self.where = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise ConvertError(f"{index}: names {name}, which does not exist")
            try:
                handle = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
            for key in handle.keys():
                if key in self.where:
                    raise ConvertError(f"{file}: tensor {key} also appears in another file")
                self.where[key] = handle

    def names(self) -> list:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise ConvertError(f"{path}: missing ({what})")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def run_config(source: SourceModel, attention: Optional[dict] = None):
    """The RunConfig of an imported model (dense GQA unless the source brings an index branch)."""
    try:
        return load_config({"model": source.model, "attention": attention or source.attention or {"type": "gqa"}})
    except ConfigError as e:
        raise ConvertError(f"the imported model is not a valid configuration: {e}") from None


def check_vocab(src: str, rows: int, vocab_size: Optional[int]) -> None:
    """The training vocabulary (--vocab-size, or the tokenizer beside the weights) must fit the embedding."""
    if vocab_size is not None and vocab_size > rows:
        raise ConvertError(f"--vocab-size={vocab_size}: larger than the model's vocabulary ({rows} embedding rows)")
    tokenizer = os.path.join(src, "tokenizer.json")
    if vocab_size is None and os.path.exists(tokenizer):
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(tokenizer).get_vocab_size(with_added_tokens=True)
        if size > rows:
            raise ConvertError(f"{tokenizer}: {size} tokens, larger than the model's vocabulary ({rows} embedding rows)")


def convert_tensors(rules: list, get, shape_of, names: list, source: str, our_shapes: dict, tied=()) -> tuple[dict, int, list]:
    """Join source tensors into ours after checking all names and shapes; (params, used, dropped)."""
    available = set(names)
    missing = [h for r in rules for h in r.hf if h not in available]
    if missing:
        raise ConvertError(f"{source}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    for r in rules:
        for h, want in zip(r.hf, r.shapes(our_shapes[r.ours])):
            got = shape_of(h)
            if r.ours.endswith(("word_embeddings.weight", "output_layer.weight")):
                want = (got[0], *want[1:])  # rows: checked against the config's vocab_size below
            if tuple(got) != tuple(want):
                raise ConvertError(f"{source}: {h} has shape {tuple(got)}, the config implies {tuple(want)}")
    used = {h for r in rules for h in r.hf}
    dropped, unknown = [], []
    for h in sorted(available - used):
        (dropped if h in tied or droppable(h, lambda: not bool(get(h).any())) else unknown).append(h)
    if unknown:
        raise ConvertError(f"{source}: {len(unknown)} tensors the model has no place for, e.g. {', '.join(unknown[:3])}")
    params = {}
    for r in tqdm(rules, desc="converting", unit="tensor", leave=False):
        params[r.ours] = r.join(*(get(h) for h in r.hf))
    return params, len(used), dropped


def cast(params: dict, dtype: Optional[str]) -> dict:
    if dtype is None or dtype == "auto":
        return params
    return {k: v.to(DTYPES[dtype]) for k, v in params.items()}


def import_hf(src: str, name: str, vocab_size: Optional[int] = None, dtype: Optional[str] = None) -> Converted:
    """A Hugging Face directory -> our parameters (nothing written)."""
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such directory")
    config = read_json(os.path.join(src, "config.json"), "the model's config.json")
    source = model_from_hf(config, name)  # refuses unsupported models before any file is opened
    files = SafetensorsDir(src)
    check_vocab(src, source.vocab_rows, vocab_size)
    result = import_hf_tensors(config, files, src, name)
    result.params = cast(result.params, dtype)
    return result


class DictTensors:
    """The SafetensorsDir interface over tensors already in memory."""

    def __init__(self, tensors: dict):
        self.where = tensors

    def names(self) -> list:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return tuple(self.where[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name]


def import_hf_tensors(config: dict, tensors, src: str, name: str) -> Converted:
    """Hugging Face-named tensors (a SafetensorsDir or DictTensors) -> our parameters."""
    source = model_from_hf(config, name)
    cfg = run_config(source)
    rows = source.vocab_rows
    rules = tensor_rules(source.model_type, cfg, rows)
    embed = rules[0].hf[0]
    if embed in tensors.where and tensors.shape(embed)[0] != rows:
        raise ConvertError(f"{src}: {embed} has {tensors.shape(embed)[0]} rows but config.json vocab_size={rows}")
    our_shapes = {n: tuple(p.shape) for n, p in build_meta_model(cfg).named_parameters()}
    tied = () if cfg.model.untie_embeddings_and_output_weights else ("lm_head.weight", "language_model.lm_head.weight")
    params, used, dropped = convert_tensors(rules, tensors.get, tensors.shape, tensors.names(), src, our_shapes, tied)
    return Converted(
        cfg=cfg,
        params=params,
        source=src,
        source_format="hf",
        model_type=source.model_type,
        vocab_rows=rows,
        mapped=used,
        dropped=[f"{h}: {'tied to the embedding' if h in tied else 'zero or recomputed (inert)'}" for h in dropped],
        attention=source.attention if source.model_type == M3 else {},
    )
