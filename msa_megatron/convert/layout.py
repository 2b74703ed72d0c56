"""megatron-core's fused tensor layouts, and their exact inverses.

- `linear_qkv`: rows grouped by KV group g: [the r = Hq/G query heads of g, k_g, v_g], d rows each
  (bias the same way). Hugging Face keeps q, k, v apart with query head h in group h // r.
- SwiGLU `linear_fc1`: [gate; up] along the output rows.
Splitting and joining only move rows, so a round trip is bitwise.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [Hq*d, ...], k / v [G*d, ...] -> megatron's [G * (r+2) * d, ...]."""
    tail = q.shape[1:]
    qg = q.reshape(groups, -1, *tail)
    kg, vg = k.reshape(groups, -1, *tail), v.reshape(groups, -1, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """The inverse of fuse_qkv: (q, k, v), contiguous."""
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * head_dim, *tail)
    q, k, v = torch.split(per_group, [heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()
