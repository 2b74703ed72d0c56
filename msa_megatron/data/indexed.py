"""Megatron indexed datasets (data_prep output) -> packed micro-batches for one data-parallel rank.

megatron-core builds the datasets: `BlendedMegatronDatasetBuilder` over `GPTDataset`s from
`data.blend`, `data.split`, `data.seq_length`, with its index cache in `data.cache_dir`. A sample
is seq_length + 1 token ids of concatenated documents; `pack_samples` turns `micro_batch_size` of
them into one THD micro-batch with a cu_seqlens entry per document.

Sample order follows megatron's pretraining sampler: the global stream is cut into chunks of
micro_batch_size * dp_size samples and rank r takes slice r of every chunk, so ranks never share a
sample, a global batch is the same set of samples whatever the data-parallel size, and micro-batch
n of a rank depends only on n (which is how `consumed_microbatches` resumes the stream).
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterator, Optional

import torch

from msa_megatron.config import RunConfig
from msa_megatron.data.batch import PackedBatch, pack_samples
from msa_megatron.data.blend import CheckedBlend, check_blend


class ManifestTokenizer:
    """What megatron's GPTDataset asks of a tokenizer: the vocabulary size, the EOD id, and
    identifiers that enter its index-cache hash. No `pad`: megatron then pads with -1, an id no
    dataset holds, so no real token is ever masked as padding."""

    def __init__(self, vocab_size: int, eod: int, tokenizer_sha256: str):
        self.vocab_size, self.eod, self.tokenizer_sha256 = vocab_size, eod, tokenizer_sha256

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod, "tokenizer_sha256": self.tokenizer_sha256}


class MicroBatchSampler:
    """Global sample indices of one rank's micro-batches n = start, start + 1, ... (wrapping around
    the dataset if a run outlasts the samples it was built for)."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, start: int = 0, count: Optional[int] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.start, self.count = dp_rank, dp_size, start, count

    def indices(self, n: int) -> list[int]:
        first = (n * self.dp_size + self.dp_rank) * self.micro_batch_size
        return [(first + k) % self.num_samples for k in range(self.micro_batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        n = self.start
        while self.count is None or n < self.start + self.count:
            yield self.indices(n)
            n += 1


def collate_packed(samples: list[dict], eod: int, split_documents: bool, reset_positions: bool) -> PackedBatch:
    # GPTDataset hands out the seq_length + 1 ids as tokens = ids[:-1], labels = ids[1:].
    ids = [torch.cat([s["tokens"], s["labels"][-1:]]) for s in samples]
    return pack_samples(ids, eod, split_documents=split_documents, reset_positions=reset_positions)


def build_datasets(cfg: RunConfig, blend: CheckedBlend, dp_size: int):
    """(train, valid) megatron datasets sized for the run: train.steps global batches, and one
    validation pass of data.valid_microbatches micro-batches on every rank."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optional GPU packages, irrelevant here
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.train
    config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=d.seq_length,
        # one prefix: megatron's unblended path; several: weights normalised by megatron
        blend=(blend.prefixes, None if len(blend.prefixes) == 1 else blend.weights),
        split=d.split,
        path_to_cache=d.cache_dir,
        tokenizer=ManifestTokenizer(blend.vocab_size, blend.eod, blend.tokenizer_sha256),
        # masks and positions come from pack_samples; megatron only slices token ids
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [t.steps * t.global_batch_size, d.valid_microbatches * t.micro_batch_size * dp_size, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


def _loader(dataset, sampler: MicroBatchSampler, cfg: RunConfig, eod: int) -> Iterator[PackedBatch]:
    collate = functools.partial(
        collate_packed, eod=eod, split_documents=cfg.data.pack_documents, reset_positions=cfg.data.reset_position_ids
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    return iter(loader)


def indexed_streams(cfg: RunConfig, *, dp_rank: int, dp_size: int, consumed_microbatches: int = 0):
    from msa_megatron.data import DataStreams

    blend = check_blend(cfg)
    train_ds, valid_ds = build_datasets(cfg, blend, dp_size)
    mbs = cfg.train.micro_batch_size
    train = _loader(train_ds, MicroBatchSampler(len(train_ds), mbs, dp_rank, dp_size, start=consumed_microbatches), cfg, blend.eod)

    def valid() -> Iterator[PackedBatch]:
        sampler = MicroBatchSampler(len(valid_ds), mbs, dp_rank, dp_size, count=cfg.data.valid_microbatches)
        return _loader(valid_ds, sampler, cfg, blend.eod)

    return DataStreams(train=train, valid=valid, eod=blend.eod)
