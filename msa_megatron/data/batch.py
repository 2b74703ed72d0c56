"""The packed micro-batch every data source produces and the training step consumes.

A micro-batch is `micro_batch_size` samples of `seq_length` tokens flattened into one THD pack
([1, T] with T = micro_batch_size * seq_length). `cu_seqlens` delimits documents inside the pack
(a sample edge is always a document edge), so attention, index scores and the KL never cross a
document. Positions restart at every document start.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [1, T] int64
    labels: torch.Tensor  # [1, T] int64, next token of the same document
    loss_mask: torch.Tensor  # [1, T] float32, 0 where the label would cross a document edge
    position_ids: torch.Tensor  # [1, T] int64, position inside the document
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32, document edges over the T tokens
    max_seqlen: int
    # The same edges as host ints (`to` leaves them here): dense attention picks per-document
    # library calls from them without a device sync. None where unknown.
    cu_seqlens_host: Optional[tuple] = None
    # Context parallelism (split_for_context_parallel): tokens..position_ids hold this rank's rows;
    # cu_seqlens and max_seqlen still describe the whole micro-batch.
    qpos: Optional[torch.Tensor] = None  # [T_local] int64, row of each local token in the micro-batch
    cp_gather_index: Optional[torch.Tensor] = None  # [T] int64, see parallel/context.gather_order
    # Synthetic retrieval data (data=passkey): for each row whose label is an answer token, how
    # many tokens back its content was stored; -1 elsewhere. None for other data.
    answer_distance: Optional[torch.Tensor] = None  # [1, T] int64

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if torch.is_tensor(value):
                moved[name] = value.to(device, non_blocking=True)
        return PackedBatch(**moved)

    def packed_seq_params(self):
        from msa_megatron.model.packed import PackedParams, document_positions

        rows = self.qpos if self.qpos is not None else torch.arange(self.num_tokens, device=self.tokens.device)
        return PackedParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_host=self.cu_seqlens_host,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
            positions=document_positions(self.cu_seqlens, rows),
            qpos=self.qpos,
            cp_gather_index=self.cp_gather_index,
        )

    def split_for_context_parallel(self, sample_len: int, cp_size: int, cp_rank: int) -> "PackedBatch":
        """This CP rank's tokens (chunks r and 2*CP-1-r of every sample); see parallel/context.py."""
        if cp_size == 1:
            return self
        from msa_megatron.parallel.context import gather_order, rank_rows

        dev = self.tokens.device
        rows = rank_rows(self.num_tokens, sample_len, cp_size, cp_rank, device=dev)
        per_token = ("tokens", "labels", "loss_mask", "position_ids", "answer_distance")
        local = {name: getattr(self, name)[:, rows] for name in per_token if getattr(self, name) is not None}
        return replace(self, **local, qpos=rows, cp_gather_index=gather_order(self.num_tokens, sample_len, cp_size, device=dev))


def pack_samples(
    samples: list[torch.Tensor],
    eod: int,
    split_documents: bool = True,
    reset_positions: bool = True,
    answer_distances: Optional[list[torch.Tensor]] = None,
) -> PackedBatch:
    """Build a PackedBatch from samples of seq_length + 1 token ids each (megatron's GPTDataset form).

    With ``split_documents`` every EOD token ends a document: attention stops there and the EOD
    position's label (the next document's first token) is masked out of the loss. Without it each
    sample is one sequence (megatron's plain concatenation). ``reset_positions`` restarts
    position ids at each document. ``answer_distances`` (one per sample, per token like the
    sample, -1 where the token is not an answer) become the rows' ``answer_distance`` (of their labels).
    """
    tokens, labels, masks, positions, edges = [], [], [], [], [0]
    offset = 0
    for s in samples:
        s = s.to(torch.long)
        tok, lab = s[:-1], s[1:]
        n = tok.numel()
        is_eod = tok == eod
        if split_documents:
            ends = (torch.nonzero(is_eod).flatten() + 1).tolist()
            doc_ends = [e for e in ends if e < n] + [n]
            mask = (~is_eod).to(torch.float32)
        else:
            doc_ends = [n]
            mask = torch.ones(n, dtype=torch.float32)
        starts = [0] + doc_ends[:-1]
        pos = torch.cat([torch.arange(e - b) for b, e in zip(starts, doc_ends)])
        if not reset_positions:
            pos = torch.arange(n)
        edges.extend(offset + e for e in doc_ends)
        tokens.append(tok), labels.append(lab), masks.append(mask), positions.append(pos)
        offset += n
    cu = torch.tensor(edges, dtype=torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    answers = None
    if answer_distances is not None:
        answers = torch.cat([dist.to(torch.long)[1:] for dist in answer_distances])[None]
    return PackedBatch(
        tokens=torch.cat(tokens)[None],
        labels=torch.cat(labels)[None],
        loss_mask=torch.cat(masks)[None],
        position_ids=torch.cat(positions)[None],
        cu_seqlens=cu,
        max_seqlen=max_seqlen,
        cu_seqlens_host=tuple(edges),
        answer_distance=answers,
    )
