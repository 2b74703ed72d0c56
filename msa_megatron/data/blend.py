"""Startup checks of `data.blend` against the files on disk, their manifests, the tokenizer and the model.

Everything that would otherwise surface as a shape error, a hang or silently wrong tokens hours into
a job fails here, before any rank builds an index, with one line naming the key and the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from msa_megatron.config import ConfigError, RunConfig
from msa_megatron.data.index_check import check_index_pair
from data_prep.manifest import Manifest, manifest_path
from data_prep.tokenizer_file import TokenizerFileError, file_sha256, load_tokenizer, resolve_tokenizer_file


@dataclass
class CheckedBlend:
    prefixes: list[str]
    weights: list[float]
    manifests: list[Manifest]
    vocab_size: int  # largest over the blend
    eod: int
    tokenizer_sha256: str


def check_blend(cfg: RunConfig) -> CheckedBlend:
    d = cfg.data
    if not d.blend:
        raise ConfigError(f"data.blend={d.blend!r}: is empty: list [weight, prefix] pairs")
    weights = [float(w) for w, _ in d.blend]
    prefixes = [str(p) for _, p in d.blend]
    for i, w in enumerate(weights):
        if not w > 0:
            raise ConfigError(f"data.blend[{i}][0]={w!r}: weight must be a number > 0")

    manifests = [_read_manifest(i, prefix) for i, prefix in enumerate(prefixes)]
    for i, (prefix, m) in enumerate(zip(prefixes, manifests)):
        if m.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"data.blend[{i}]={prefix!r}: tokenized with vocab_size={m.vocab_size} > model.vocab_size={cfg.model.vocab_size}"
            )
        if m.eod_id != manifests[0].eod_id:
            raise ConfigError(
                f"data.blend[{i}]={prefix!r}: EOD id {m.eod_id} differs from data.blend[0]={prefixes[0]!r} (EOD id {manifests[0].eod_id})"
            )
        check_index_pair(f"data.blend[{i}]", prefix, m)
        _check_split_nonempty(i, prefix, m, d.split)

    if d.tokenizer:
        _check_tokenizer(d.tokenizer, prefixes, manifests, cfg.model.vocab_size)
    return CheckedBlend(
        prefixes=prefixes,
        weights=weights,
        manifests=manifests,
        vocab_size=max(m.vocab_size for m in manifests),
        eod=manifests[0].eod_id,
        tokenizer_sha256=manifests[0].tokenizer_sha256,
    )


def _read_manifest(i: int, prefix: str) -> Manifest:
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise ConfigError(f"data.blend[{i}]={prefix!r}: missing {path} (prefixes name <prefix>_text_document without extension)")
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        raise ConfigError(f"data.blend[{i}]={prefix!r}: missing {path}; data_prep writes it last, so the dataset is incomplete or not from data_prep")
    try:
        return Manifest.read(prefix)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data.blend[{i}]={prefix!r}: unreadable manifest {path} ({e})") from None


def _check_split_nonempty(i: int, prefix: str, m: Manifest, split: str) -> None:
    """Megatron loops forever building an index over a split without documents; name it instead."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError):
        raise ConfigError(f"data.split={split!r}: expected up to three non-negative weights like '98,2,0'") from None
    for name, bounds in zip(("train", "valid"), matrix[:2]):
        # the same rounding megatron's builder applies to the document count
        documents = 0 if bounds is None else int(round(bounds[1] * m.documents)) - int(round(bounds[0] * m.documents))
        if documents < 1:
            raise ConfigError(
                f"data.split={split!r}: the {name} split of data.blend[{i}]={prefix!r} gets no documents (of {m.documents}); "
                "give it a larger share or use more data"
            )


def _check_tokenizer(path: str, prefixes: list[str], manifests: list[Manifest], model_vocab: int) -> None:
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerFileError as e:
        raise ConfigError(f"data.{e}") from None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model_vocab:
        raise ConfigError(f"data.tokenizer={path!r}: vocab_size={vocab} > model.vocab_size={model_vocab}")
    for i, (prefix, m) in enumerate(zip(prefixes, manifests)):
        token_id = tokenizer.token_to_id(m.eod_token)
        if token_id != m.eod_id:
            raise ConfigError(
                f"data.tokenizer={path!r}: EOD {m.eod_token!r} has id {token_id} there, "
                f"but data.blend[{i}]={prefix!r} was tokenized with EOD id {m.eod_id}"
            )
    # the same vocabulary size and EOD can still map ids to other strings
    sha = file_sha256(resolve_tokenizer_file(path))
    for i, (prefix, m) in enumerate(zip(prefixes, manifests)):
        if m.tokenizer_sha256 and m.tokenizer_sha256 != sha:
            raise ConfigError(
                f"data.tokenizer={path!r}: not the tokenizer data.blend[{i}]={prefix!r} was made with "
                f"(sha256 {sha[:12]}... vs the manifest's {m.tokenizer_sha256[:12]}...)"
            )
