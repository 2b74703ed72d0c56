"""Export one of our checkpoints as a Hugging Face model directory.

`--arch minimax_m3` (default) writes MiniMax-M3's layout: dense weights under
`language_model.model.*`, the index branch as `self_attn.index_{q,k}_{proj,norm}`, Gemma-style
norms (w - 1), and a config.json with `sparse_attention_config`. The dense architectures (llama,
qwen2, qwen3, qwen3_moe, mixtral) write the names and config.json transformers loads for them
(the index branch is dropped there: those architectures have none).

Host memory: the checkpoint once (loaded at TP = PP = EP = 1) plus one output shard.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from tqdm import tqdm

from msa_megatron.convert import ConvertError
from msa_megatron.convert.hf import DTYPES
from msa_megatron.convert.hf_config import ARCHITECTURES, M3, check_m3_exportable, hf_config
from msa_megatron.convert.hf_names import m3_constant_tensors, tensor_rules
from msa_megatron.convert.writer import check_destination, read, staging_dir

ARCH_NAMES = {"minimax_m3": M3, **{k: k for k in ARCHITECTURES if k != M3}}
SHARD_BYTES = 5 * 2**30


def export_hf(src: str, out_dir: str, arch: str = "minimax_m3", vocab_size: Optional[int] = None,
              dtype: Optional[str] = None, shard_bytes: int = SHARD_BYTES) -> dict:
    if arch not in ARCH_NAMES:
        raise ConvertError(f"--arch={arch!r}: one of {', '.join(ARCH_NAMES)}")
    model_type = ARCH_NAMES[arch]
    check_destination(out_dir)
    cfg, params, meta = read(src)
    if model_type == M3:
        check_m3_exportable(cfg)
    rows = cfg.model.vocab_size
    vocab = vocab_size or meta.get("vocab_rows") or rows
    if vocab > rows:
        raise ConvertError(f"--vocab-size={vocab}: larger than the model's vocabulary ({rows} rows)")
    rules = tensor_rules(model_type, cfg, vocab)
    covered = {r.ours for r in rules}
    lacking = [r.ours for r in rules if r.ours not in params]
    if lacking:
        raise ConvertError(f"--arch={arch}: needs {lacking[0]}, which this model does not have ({len(lacking)} such tensors)")
    left = [n for n in params if n not in covered]
    dropped = [n for n in left if ".indexer." in n]
    if len(dropped) < len(left):
        other = [n for n in left if ".indexer." not in n]
        raise ConvertError(f"--arch={arch}: has no place for {other[0]} ({len(other)} such tensors); pick the architecture the model came from")

    def tensors():
        for r in rules:
            yield from zip(r.hf, r.split(params.pop(r.ours)))  # pop: free each parameter once written
        if model_type == M3:
            yield from m3_constant_tensors(cfg).items()

    tmp = staging_dir(out_dir)
    try:
        written = _write_shards(tmp, tensors(), DTYPES.get(dtype), shard_bytes, total=sum(len(r.hf) for r in rules))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model_type, cfg, vocab), f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"model_type": model_type, "written_tensors": written, "vocab_rows": vocab,
            "dropped": [f"{len(dropped)} *.indexer.* tensors: {arch} has no index branch"] if dropped else []}


def _write_shards(out: str, tensors, dtype, shard_bytes: int, total: int) -> int:
    from safetensors.torch import save_file

    shards, current, size, count = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            path = os.path.join(out, f"shard-{len(shards):05d}.safetensors")
            save_file(current, path, metadata={"format": "pt"})
            shards[-1] = list(current)
            current, size = {}, 0

    for name, t in tqdm(tensors, desc="exporting", unit="tensor", total=total, leave=False):
        t = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        if size and size + t.numel() * t.element_size() > shard_bytes:
            flush()
        current[name] = t
        size += t.numel() * t.element_size()
        count += 1
    flush()
    _name_shards(out, shards)
    return count


def _name_shards(out: str, shards: list) -> None:
    """Hugging Face's names: model.safetensors, or model-0000i-of-0000n.safetensors + an index."""
    if len(shards) == 1:
        os.rename(os.path.join(out, "shard-00001.safetensors"), os.path.join(out, "model.safetensors"))
        return
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(out, f"shard-{i:05d}.safetensors"), os.path.join(out, final))
        weight_map.update({n: final for n in names})
        total += os.path.getsize(os.path.join(out, final))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
