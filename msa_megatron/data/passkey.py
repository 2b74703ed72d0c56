"""Synthetic long-range retrieval (`data=passkey`): key-value pairs hidden in long documents.

Each document is filler from a fixed sparse Markov chain (local statistics a model learns fast,
nothing long-range) with pairs stored in it and asked back later:

    ... filler ... STORE key v1 v2 v3 v4 ... filler ... ASK key v1 v2 v3 v4 ... filler ... EOD

Keys are distinct within a document and values are random digits, so the value tokens after an
ASK can only be predicted by finding the STORE of the same key. Each pair is asked once, at a
distance (ask position - store position) drawn log-uniformly from one segment length up to the
document's length, so every scale is represented, far past MSA's block budget k * Bk included.
The rows whose label is such a value carry `answer_distance` = that distance (-1 elsewhere);
validation turns them into retrieval accuracy by distance (training/evaluation.py).

Deterministic like data/mock.py: every micro-batch is a function of (seed, its index in the
global stream), split over data-parallel ranks the same way (data/mock.document_batches). The
Markov chain is the same for every seed, so training and validation share the filler's statistics.

Vocabulary (V = model.vocab_size >= 128): filler 0 .. V-84, then 16 digits, 64 keys, ASK, STORE,
and EOD = V-1.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import torch

from msa_megatron.data.batch import PackedBatch
from msa_megatron.data.mock import document_batches

NUM_KEYS = 64
NUM_DIGITS = 16
SUCCESSORS = 4  # filler tokens that may follow each filler token
CHAIN_SEED = 20240601  # the filler's Markov chain: fixed, the same "language" for every stream
MIN_VOCAB = 128
PLACEMENT_TRIES = 20  # a pair that finds no free spots in this many draws is left out


class PasskeyVocab:
    def __init__(self, vocab_size: int):
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"model.vocab_size={vocab_size}: data=passkey needs at least {MIN_VOCAB} tokens")
        self.eod = vocab_size - 1
        self.store = vocab_size - 2
        self.ask = vocab_size - 3
        self.first_key = self.ask - NUM_KEYS
        self.first_digit = self.first_key - NUM_DIGITS
        self.filler = self.first_digit  # filler tokens are 0 .. filler-1


class PasskeyDocuments:
    def __init__(self, vocab_size: int, min_doc: int, max_doc: int, pairs: int, digits: int):
        if not 2 <= min_doc <= max_doc:
            raise ValueError(f"data.mock_min_doc={min_doc}, data.mock_max_doc={max_doc}: need 2 <= min <= max")
        self.vocab = PasskeyVocab(vocab_size)
        self.eod = self.vocab.eod
        self.min_doc, self.max_doc = min_doc, max_doc
        self.pairs, self.digits = pairs, digits
        g = torch.Generator().manual_seed(CHAIN_SEED)
        self.successors = torch.randint(0, self.vocab.filler, (self.vocab.filler, SUCCESSORS), generator=g).tolist()

    @property
    def segment(self) -> int:
        return 2 + self.digits  # marker, key, value digits

    def document(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens ending with EOD, per-token answer distance: -1 except on asked value digits)."""
        n = int(torch.randint(self.min_doc, self.max_doc + 1, (1,), generator=g))
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        body = self._filler(rng, n - 1)
        distance = [-1] * n
        taken = bytearray(n - 1)
        seg, v = self.segment, self.vocab
        keys = rng.sample(range(NUM_KEYS), self.pairs)
        for key, d in zip(keys, self._distances(rng, n - 1)):
            spot = self._place(rng, taken, n - 1, d)
            if spot is None:
                continue
            store, ask = spot
            value = [v.first_digit + rng.randrange(NUM_DIGITS) for _ in range(self.digits)]
            body[store:store + seg] = [v.store, v.first_key + key, *value]
            body[ask:ask + seg] = [v.ask, v.first_key + key, *value]
            for i in range(self.digits):
                distance[ask + 2 + i] = ask - store
        return torch.tensor(body + [v.eod]), torch.tensor(distance)

    def _filler(self, rng: random.Random, n: int) -> list:
        token, out = rng.randrange(self.vocab.filler), []
        for _ in range(n):
            token = self.successors[token][rng.randrange(SUCCESSORS)]
            out.append(token)
        return out

    def _distances(self, rng: random.Random, n: int) -> list:
        """One distance per pair, log-uniform in [segment, n - segment], longest first (placed
        while the document is still empty, so long distances are not the ones left out)."""
        seg = self.segment
        if n < 2 * seg:
            return []
        lo, hi = math.log(seg), math.log(n - seg)
        return sorted((int(math.exp(rng.uniform(lo, hi))) for _ in range(self.pairs)), reverse=True)

    def _place(self, rng: random.Random, taken: bytearray, n: int, d: int):
        """(store, ask = store + d) of two free, non-overlapping segments, or None."""
        seg = self.segment
        d = min(max(d, seg), n - seg)
        for _ in range(PLACEMENT_TRIES):
            store = rng.randrange(0, n - seg - d + 1)
            ask = store + d
            if any(taken[store:store + seg]) or any(taken[ask:ask + seg]):
                continue
            taken[store:store + seg] = b"\1" * seg
            taken[ask:ask + seg] = b"\1" * seg
            return store, ask
        return None

    def sample(self, g: torch.Generator, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`length` tokens of concatenated documents (the last one cut at the sample edge) and their
        answer distances."""
        tokens, distances, n = [], [], 0
        while n < length:
            t, d = self.document(g)
            tokens.append(t)
            distances.append(d)
            n += t.numel()
        return torch.cat(tokens)[:length], torch.cat(distances)[:length]


def passkey_batches(*, vocab_size: int, min_doc: int, max_doc: int, pairs: int, digits: int, **stream) -> Iterator[PackedBatch]:
    """Endless micro-batches of passkey documents; `stream`: document_batches' keywords (seq_length,
    micro_batch_size, seed, dp_rank, dp_size, microbatches_per_step, start)."""
    return document_batches(PasskeyDocuments(vocab_size, min_doc, max_doc, pairs, digits), **stream)
