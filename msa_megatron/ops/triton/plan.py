"""Block -> queries CSR ("plan") built once per layer from the top-k selection.

The sparse kernels are KV-outer: a program owns one KV block of one group and gathers the queries
that selected it. This module turns the query-major selection [G, T, k] into that block-major form,
with torch ops on the selection's device and a single host sync (for the launch grids).

Layout
- rows: every document-local KV block of the batch, numbered document by document
  (row_key_start / row_key_end give its first token and its document's end, packed indices).
- entries: the valid (query, slot) pairs of the selection, sorted by (query chunk, group, row,
  query). entry_tok = packed query index, entry_slot = its slot in topk[g, i, :].
- segments: one per (chunk, group, row), key = (chunk * G + g) * R + row; seg_start/seg_count
  index the entries.
- tiles: a segment cut into pieces of at most `queries` queries, one program each:
  tiles[t] = (g, row, first entry, count); tiles of chunk c are [chunk_tiles[c], chunk_tiles[c+1]).

Queries are processed in chunks of `chunk` tokens so that per-slot partial buffers (k per query)
stay bounded; entries of one chunk are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import timed

# Queries per program for each kernel family (any value works; these balance launch count and
# padding). Keys are the names the kernels ask for.
TILE_QUERIES = {"fwd": 128, "bwd": 256, "kl": 128, "ilse": 256}


@dataclass
class Tiles:
    queries: int
    tiles: torch.Tensor  # [n, 4] int32: g, row, entry start, entry count
    chunk_tiles: List[int]  # host: tile range of each chunk
    seg_tile_first: torch.Tensor  # [n_seg] int32: first tile of each segment
    seg_tile_count: torch.Tensor  # [n_seg] int32: tiles of each segment

    def chunk_range(self, c: int):
        return self.chunk_tiles[c], self.chunk_tiles[c + 1]


@dataclass
class SparsePlan:
    groups: int
    total: int
    topk: int
    block_size: int
    chunk: int
    n_chunks: int
    n_rows: int  # R (an upper bound: rows past the last document's blocks are empty)
    row_key_start: torch.Tensor  # [R] int32
    row_key_end: torch.Tensor  # [R] int32
    entry_tok: torch.Tensor  # [E] int32
    entry_slot: torch.Tensor  # [E] int32
    n_entries: int
    tiles: Dict[str, Tiles] = field(default_factory=dict)
    cu_seqlens: torch.Tensor = None

    def matches(self, topk: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int) -> bool:
        g, t, k = topk.shape
        return (
            (g, t, k) == (self.groups, self.total, self.topk)
            and block_size == self.block_size
            and cu_seqlens.data_ptr() == self.cu_seqlens.data_ptr()
        )

    def chunk_bounds(self, c: int):
        a = c * self.chunk
        return a, min(a + self.chunk, self.total)


def build_plan(topk: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, chunk: int) -> SparsePlan:
    groups, total, k = topk.shape
    dev = topk.device
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    n_docs = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    nblk = (lengths + block_size - 1) // block_size
    row_end = torch.cumsum(nblk, 0)
    row_base = row_end - nblk
    n_rows = total // block_size + n_docs  # >= sum(ceil(len / Bk)); no sync needed

    rows = torch.arange(n_rows, device=dev)
    row_doc = torch.searchsorted(row_end, rows, right=True).clamp_(max=max(n_docs - 1, 0))
    row_blk = rows - row_base[row_doc]
    row_key_start = (cu[row_doc] + row_blk * block_size).clamp_(max=total).to(torch.int32)
    row_key_end = cu[row_doc + 1].to(torch.int32)

    tok = torch.arange(total, device=dev)
    tok_doc = torch.searchsorted(cu[1:], tok, right=True)
    tok_row_base = row_base[tok_doc]  # [T]

    n_chunks = max(1, -(-total // chunk))
    sel = topk.to(torch.int64)
    valid = sel >= 0
    g_idx = torch.arange(groups, device=dev).view(groups, 1, 1)
    chunk_idx = (tok // chunk).view(1, total, 1)
    seg_key = (chunk_idx * groups + g_idx) * n_rows + tok_row_base.view(1, total, 1) + sel
    n_seg = n_chunks * groups * n_rows
    seg_key = torch.where(valid, seg_key, n_seg).reshape(-1)  # invalid slots sort last
    perm = torch.sort(seg_key, stable=True).indices
    counts = torch.bincount(seg_key, minlength=n_seg + 1)[:n_seg]
    seg_start = torch.cumsum(counts, 0) - counts

    sizes = sorted(set(TILE_QUERIES.values()))  # kernels asking for the same size share a tile list
    per_tiles = {}
    stats = [valid.sum().view(1)]
    for q in sizes:
        n_t = (counts + q - 1) // q
        per_tiles[q] = n_t
        stats.append(n_t.view(n_chunks, groups * n_rows).sum(1))
    host = torch.cat(stats).tolist()  # the one host sync of the plan
    n_entries = int(host[0])

    entry_tok = ((perm[:n_entries] // k) % total).to(torch.int32)
    entry_slot = (perm[:n_entries] % k).to(torch.int32)
    plan = SparsePlan(
        groups, total, k, block_size, chunk, n_chunks, n_rows, row_key_start, row_key_end,
        entry_tok, entry_slot, n_entries, cu_seqlens=cu_seqlens,
    )
    pos = 1
    by_size = {}
    for q in sizes:
        per_chunk = [int(x) for x in host[pos : pos + n_chunks]]
        pos += n_chunks
        by_size[q] = _cut_tiles(per_tiles[q], counts, seg_start, q, per_chunk, groups, n_rows)
    plan.tiles = {name: by_size[q] for name, q in TILE_QUERIES.items()}
    return plan


def _cut_tiles(n_t, counts, seg_start, q, per_chunk, groups, n_rows) -> Tiles:
    dev = counts.device
    n_tiles = sum(per_chunk)
    chunk_tiles = [0]
    for c in per_chunk:
        chunk_tiles.append(chunk_tiles[-1] + c)
    first = torch.cumsum(n_t, 0) - n_t
    seg = torch.repeat_interleave(torch.arange(n_t.numel(), device=dev), n_t, output_size=n_tiles)
    j = torch.arange(n_tiles, device=dev) - first[seg]
    e0 = seg_start[seg] + j * q
    cnt = torch.minimum(counts[seg] - j * q, torch.full_like(j, q))
    g = (seg // n_rows) % groups
    row = seg % n_rows
    tiles = torch.stack([g, row, e0, cnt], 1).to(torch.int32).contiguous()
    return Tiles(q, tiles, chunk_tiles, first.to(torch.int32), n_t.to(torch.int32))


def get_plan(topk: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, chunk: int) -> SparsePlan:
    """The plan attached to this topk tensor by select_blocks, or a fresh one (then attached).

    The plan rides on the tensor object (attribute `_msa_plan`), so the selection returned by
    select_blocks carries it to sparse_attention and indexer_kl of the same layer with no API
    change. A copied or modified-in-place selection must not keep it: in-place edits bump the
    version counter, which the cache checks.
    """
    cached = getattr(topk, "_msa_plan", None)
    if (
        cached is not None
        and cached[0] == topk._version
        and cached[1].chunk == chunk
        and cached[1].matches(topk, cu_seqlens, block_size)
    ):
        return cached[1]
    with timed("plan build"):
        plan = build_plan(topk, cu_seqlens, block_size, chunk)
    try:
        topk._msa_plan = (topk._version, plan)
    except (AttributeError, RuntimeError):
        pass
    return plan


@triton.jit
def load_tile(tiles, t, row_key_start, row_key_end):
    """Tile t of a plan: (group, KV row, first entry, entry count, the row's key range [start, end))."""
    g = tl.load(tiles + t * 4)
    row = tl.load(tiles + t * 4 + 1)
    e0 = tl.load(tiles + t * 4 + 2)
    cnt = tl.load(tiles + t * 4 + 3)
    return g, row, e0, cnt, tl.load(row_key_start + row), tl.load(row_key_end + row)
