"""Data sources for training: each yields PackedBatch micro-batches for one data-parallel rank."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from msa_megatron.data.batch import PackedBatch, pack_samples

__all__ = ["DataStreams", "PackedBatch", "build_data", "pack_samples"]


@dataclass
class DataStreams:
    train: Iterator[PackedBatch]  # endless micro-batches for this data-parallel rank
    valid: Optional[Callable[[], Iterator[PackedBatch]]]  # fresh pass over validation micro-batches, or None
    eod: int


def build_data(cfg, *, dp_rank: int, dp_size: int, consumed_microbatches: int = 0) -> DataStreams:
    """Streams for `cfg.data.type`. `consumed_microbatches` (per rank) lets a resumed run continue the stream."""
    d = cfg.data
    if d.type in ("mock", "passkey"):
        from msa_megatron.data.mock import mock_batches
        from msa_megatron.data.passkey import passkey_batches

        common = dict(
            vocab_size=cfg.model.vocab_size,
            seq_length=d.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            min_doc=d.mock_min_doc,
            max_doc=d.mock_max_doc,
        )
        if d.type == "passkey":
            common.update(pairs=d.passkey_pairs, digits=d.passkey_digits)
        batches = passkey_batches if d.type == "passkey" else mock_batches
        per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)
        train = batches(
            **common, seed=cfg.train.seed, dp_rank=dp_rank, dp_size=dp_size, microbatches_per_step=per_step, start=consumed_microbatches
        )
        # Validation: a fixed, separate stream (another seed), the same documents on every pass.
        valid = lambda: itertools.islice(
            batches(**common, seed=cfg.train.seed + 1, dp_rank=dp_rank, dp_size=dp_size, microbatches_per_step=d.valid_microbatches),
            d.valid_microbatches,
        )
        return DataStreams(train=train, valid=valid, eod=cfg.model.vocab_size - 1)
    if d.type == "indexed":
        from msa_megatron.data.indexed import indexed_streams

        return indexed_streams(cfg, dp_rank=dp_rank, dp_size=dp_size, consumed_microbatches=consumed_microbatches)
    raise ValueError(f"data.type={d.type!r}: not available yet")
