"""Is a megatron .bin/.idx pair whole? Checked at start-up against each other and the manifest.

A `.bin` cut short (a copy that stopped, a full disk) otherwise trains until a sample reaches the
missing bytes, possibly hours later in a validation pass. The `.idx` (megatron-core's
MMIDIDX format: header, sequence lengths, byte pointers, document indices) says exactly how long
the `.bin` must be, and the manifest says how many documents and tokens data_prep wrote.
Only the headers and the last pointer are read: no scan of the data.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from msa_megatron.config import ConfigError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron-core's DType codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def check_index_pair(key: str, prefix: str, manifest) -> None:
    """Raise ConfigError naming `key` (e.g. data.blend[0]) when the pair is damaged or not the
    one the manifest describes."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"

    def fail(why: str):
        raise ConfigError(f"{key}={prefix!r}: {why}; re-run data_prep for it")

    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:9] != INDEX_MAGIC:
        fail(f"{idx} is not a megatron index (bad header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in DTYPES:
        fail(f"{idx} has an unknown version {version} or dtype code {code}")
    expected_idx = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if idx_size != expected_idx:
        fail(f"{idx} has {idx_size} bytes, its header describes {expected_idx} (cut short or damaged)")
    dtype = np.dtype(DTYPES[code])
    if sequences:
        lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(sequences,))
        pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * sequences, shape=(sequences,))
        expected_bin = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
        tokens = int(lengths.sum(dtype=np.int64))
    else:
        expected_bin, tokens = 0, 0
    bin_size = os.path.getsize(bin_)
    if bin_size != expected_bin:
        fail(f"{bin_} has {bin_size} bytes but its .idx describes {expected_bin} (cut short, or from another run)")
    if manifest.dtype != dtype.name:
        fail(f"{idx} stores {dtype.name} tokens but the manifest says {manifest.dtype}")
    if (sequences, tokens) != (manifest.documents, manifest.tokens):
        fail(
            f"{idx} holds {sequences} documents / {tokens} tokens but the manifest says "
            f"{manifest.documents} / {manifest.tokens} (files from different runs)"
        )
