"""Token ids -> megatron .bin/.idx (megatron-core's IndexedDatasetBuilder) + manifest, atomically.

Files are written under temporary names and renamed at the end, the manifest last: a pair without a
manifest is incomplete, and an interrupted run never leaves a valid-looking one behind.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from data_prep.manifest import Manifest, manifest_path


def output_prefix(prefix: str, shard: tuple[int, int] | None) -> str:
    """`<prefix>_text_document`, with `-iiiii-of-nnnnn` before the suffix for a shard of several."""
    if shard is not None and shard[1] > 1:
        prefix = f"{prefix}-{shard[0]:05d}-of-{shard[1]:05d}"
    return prefix + "_text_document"


def _import_indexed_dataset():
    # megatron.core warns at import about optional GPU packages a tokenizer run never uses.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


_import: Future | None = None


def start_megatron_import() -> None:
    """Import megatron-core (torch included, seconds) in a background thread, so that it overlaps
    the worker start-up and the first chunks; the tokenizer workers never need it."""
    global _import
    if _import is None:
        _import = ThreadPoolExecutor(1, thread_name_prefix="megatron-import").submit(_import_indexed_dataset)


def _indexed_dataset_module():
    start_megatron_import()
    return _import.result()


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype megatron's own preprocessing picks: uint16 while the vocabulary fits, else int32."""
    return np.dtype(_indexed_dataset_module().DType.optimal_dtype(vocab_size))


class DatasetWriter:
    def __init__(self, prefix: str, dtype: np.dtype):
        IndexedDatasetBuilder = _indexed_dataset_module().IndexedDatasetBuilder
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        self._bin, self._idx = prefix + ".bin.partial", prefix + ".idx.partial"
        self.builder = IndexedDatasetBuilder(self._bin, dtype=np.dtype(dtype).type)  # wants the scalar type
        self.documents = self.tokens = self.max_document_tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated ids and per-document lengths."""
        start = 0
        for length in lengths.tolist():
            self.builder.add_document(tokens[start : start + length], [length])
            start += length
        self.documents += len(lengths)
        self.tokens += start
        if len(lengths):
            self.max_document_tokens = max(self.max_document_tokens, int(lengths.max()))

    def finish(self, manifest: Manifest) -> None:
        self.builder.finalize(self._idx)
        if os.path.exists(manifest_path(self.prefix)):
            os.remove(manifest_path(self.prefix))  # the old pair stops being "complete" first
        os.replace(self._bin, self.prefix + ".bin")
        os.replace(self._idx, self.prefix + ".idx")
        manifest.write(self.prefix)

    def abort(self) -> None:
        self.builder.data_file.close()
        for path in (self._bin, self._idx):
            if os.path.exists(path):
                os.remove(path)
