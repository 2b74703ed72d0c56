"""Synthetic packed data for tests and smoke runs: learnable, document-structured, deterministic.

Each document repeats a short motif drawn from a fixed sparse Markov chain, so a model can learn
both local statistics (bigram table) and long-range copying (the repeats), and the loss falls
visibly within a few dozen steps. Documents end with EOD and have random lengths, so packs mix
short and long documents. Every micro-batch is a pure function of (seed, its index in the global
stream); a step's global batch is split over data-parallel ranks in contiguous slices, so
tensor-parallel peers see identical data, a resumed run continues the stream, and a run with a
different data-parallel size trains on the same samples.
"""

from __future__ import annotations

from typing import Iterator

import torch

from msa_megatron.data.batch import PackedBatch, pack_samples


class MockDocuments:
    def __init__(self, vocab_size: int, min_doc: int, max_doc: int, seed: int, successors: int = 4):
        if not 2 <= min_doc <= max_doc:
            raise ValueError(f"data.mock_min_doc={min_doc}, data.mock_max_doc={max_doc}: need 2 <= min <= max")
        self.eod = vocab_size - 1
        self.min_doc, self.max_doc = min_doc, max_doc
        g = torch.Generator().manual_seed(seed)
        # Sparse Markov chain over the non-EOD tokens: each token has a few likely successors.
        self.successors = torch.randint(0, vocab_size - 1, (vocab_size - 1, successors), generator=g)

    def document(self, g: torch.Generator) -> torch.Tensor:
        length = int(torch.randint(self.min_doc, self.max_doc + 1, (1,), generator=g))
        motif_len = int(torch.randint(8, 65, (1,), generator=g))
        motif = torch.empty(motif_len, dtype=torch.long)
        motif[0] = torch.randint(0, self.successors.shape[0], (1,), generator=g)
        pick = torch.randint(0, self.successors.shape[1], (motif_len,), generator=g)
        for t in range(1, motif_len):
            motif[t] = self.successors[motif[t - 1], pick[t]]
        body = motif.repeat(length // motif_len + 1)[: length - 1]
        return torch.cat([body, torch.tensor([self.eod])])

    def sample(self, g: torch.Generator, length: int) -> tuple[torch.Tensor, None]:
        """`length` tokens of concatenated documents (the last one cut at the sample edge); no answers."""
        parts, n = [], 0
        while n < length:
            doc = self.document(g)
            parts.append(doc)
            n += doc.numel()
        return torch.cat(parts)[:length], None


def document_batches(
    docs,
    *,
    seq_length: int,
    micro_batch_size: int,
    seed: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    microbatches_per_step: int = 1,
    start: int = 0,
) -> Iterator[PackedBatch]:
    """Endless micro-batches of one data-parallel rank from a synthetic document source (`docs.sample(g,
    length)` -> (tokens, answer distances or None)), from its local micro-batch `start` on."""
    n = start
    while True:
        step, i = divmod(n, microbatches_per_step)
        global_index = (step * dp_size + dp_rank) * microbatches_per_step + i
        g = torch.Generator().manual_seed(hash((seed, global_index)) & 0x7FFFFFFF)
        samples = [docs.sample(g, seq_length + 1) for _ in range(micro_batch_size)]
        answers = [a for _, a in samples] if samples[0][1] is not None else None
        yield pack_samples([t for t, _ in samples], eod=docs.eod, answer_distances=answers)
        n += 1


def mock_batches(*, vocab_size: int, min_doc: int, max_doc: int, **stream) -> Iterator[PackedBatch]:
    """Endless micro-batches of random documents; `stream`: document_batches' keywords (seq_length,
    micro_batch_size, seed, dp_rank, dp_size, microbatches_per_step, start)."""
    return document_batches(MockDocuments(vocab_size, min_doc, max_doc, stream["seed"]), **stream)
