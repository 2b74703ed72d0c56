"""Tensor parallelism beyond the KV groups: the TP ranks that share one replicated KV group.

With TP > G (e.g. 4 KV groups on TP 8) megatron-core gives every rank one KV group and a slice of
that group's query heads: ranks t*TP/G ... (t+1)*TP/G - 1 of a TP group replicate group t. The
MSA teacher (KL) averages over all heads of a group, so those replicas gather the group's query
heads (detached) for it. Their process groups are made once, by every rank, right after megatron
builds its own groups (`initialize`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_GROUP: Optional[dist.ProcessGroup] = None


def initialize(num_query_groups: int) -> None:
    """Create the replica groups of every TP group (collective over the world)."""
    global _GROUP
    tp = ps.get_tensor_model_parallel_world_size()
    _GROUP = None
    if tp <= num_query_groups:
        return
    per_group = tp // num_query_groups
    mine = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for tp_ranks in sorted({tuple(r) for r in everyone}):
        for start in range(0, tp, per_group):
            ranks = list(tp_ranks[start : start + per_group])
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                _GROUP = group


def gather_group_heads(t: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """[T, heads of this rank, ...] -> [T, all heads of its KV group, ...] (no gradient)."""
    if _GROUP is None:
        raise RuntimeError(f"TP > {num_query_groups} KV groups needs msa_megatron.parallel.replicas.initialize() first")
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(_GROUP))]
    dist.all_gather(parts, t.contiguous(), group=_GROUP)
    return torch.cat(parts, dim=1)
