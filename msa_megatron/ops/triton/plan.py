"""Block -> queries CSR ("plan") built once per layer from the top-k selection, without a host sync.

The sparse kernels are KV-outer: a program owns one KV block of one group and gathers the queries
that selected it. This module turns the query-major selection [G, Tq, k] into that block-major form
with torch ops on the selection's device. Nothing is read back to the host, so the layer can be
captured in a CUDA graph: launch grids use per-chunk upper bounds and surplus programs find an
empty tile.

Layout
- rows: the document-local KV blocks of the key rows (rows.py); row_key_start / row_key_end give
  a block's first key row and its document's end.
- entries: the (query row, slot) pairs of the selection sorted by (query chunk, group, row, query);
  valid ones first. entry_tok = query row, entry_slot = its slot in topk[g, i, :]. A query's key
  position (for the causal mask) is qpos[query row], or the row itself when qpos is None.
- segments: one per (chunk, group, row), each a contiguous run of entries (sorted by segment key,
  int16 keys when they fit so the radix sort runs half the passes); a segment's range is read off
  the sorted keys where they change (no atomic counters: those serialised on the blocks every
  query selects).
- tiles: a segment cut into pieces of at most `queries` entries, one program each. Chunk c owns the
  tile slots [c * cap, (c + 1) * cap); tiles[t] = (g, row, first entry, count), count 0 for unused
  slots (then the row is 0 and the kernels do nothing with it).

Queries are processed in chunks of `chunk` rows so that per-slot partial buffers (k per query)
stay bounded; the entries of one chunk are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import next_pow2, timed
from msa_megatron.ops.triton.rows import count_below, block_rows, key_pos, positions

# Queries per program for each kernel family (any value works; these balance launch count and
# padding). Keys are the names the kernels ask for.
TILE_QUERIES = {"fwd": 256, "bwd": 1024, "kl": 128, "ilse": 256}
# A chunk's programs take its tiles longest first (full ones, then partial ones in this many - 1
# length classes), so a launch ends on short tiles instead of waiting on a few full ones. Tile
# slots, and the workspace rows named by them, keep segment order: every sum is unchanged.
TILE_LENGTH_CLASSES = 8
# Segment keys are sorted as int16 below this many segments (else int32).
SHORT_KEY_SEGMENTS = 1 << 16


@dataclass
class Tiles:
    queries: int
    cap: int  # tile slots per chunk (an upper bound of the tiles a chunk needs)
    tiles: torch.Tensor  # [n_chunks * cap, 4] int32: g, row, entry start, entry count
    seg_tile_first: torch.Tensor  # [n_seg] int32: slot of each segment's first tile
    seg_tile_count: torch.Tensor  # [n_seg] int32: tiles of each segment
    order: torch.Tensor  # [n_chunks * cap] int32: the tile each program of a chunk's launch takes

    def chunk_range(self, c: int):
        return c * self.cap, (c + 1) * self.cap


@dataclass
class SparsePlan:
    groups: int
    total: int  # query rows (Tq)
    n_keys: int  # key rows (T)
    topk: int
    block_size: int
    chunk: int
    n_chunks: int
    n_rows: int  # R (an upper bound: rows past the last document's blocks are empty)
    row_key_start: torch.Tensor  # [R] int32
    row_key_end: torch.Tensor  # [R] int32
    entry_tok: torch.Tensor  # [G * Tq * k] int32 (valid entries first)
    entry_slot: torch.Tensor  # [G * Tq * k] int32
    qpos: Optional[torch.Tensor] = None  # [Tq] int32 key row of each query row, or None
    _qpos_src: Optional[int] = None  # data_ptr of the qpos tensor the plan was built from
    tiles: Dict[str, Tiles] = field(default_factory=dict)
    cu_seqlens: torch.Tensor = None

    def matches(self, topk: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, qpos) -> bool:
        g, t, k = topk.shape
        same_qpos = (qpos is None and self.qpos is None) or (
            qpos is not None and self.qpos is not None and qpos.data_ptr() == self._qpos_src
        )
        return (
            (g, t, k) == (self.groups, self.total, self.topk)
            and block_size == self.block_size
            and cu_seqlens.data_ptr() == self.cu_seqlens.data_ptr()
            and same_qpos
        )

    def chunk_bounds(self, c: int):
        a = c * self.chunk
        return a, min(a + self.chunk, self.total)

    @property
    def has_qpos(self) -> bool:
        return self.qpos is not None

    def qpos_arg(self, fallback: torch.Tensor) -> torch.Tensor:
        """The qpos pointer for a kernel (any tensor when there is none: the kernel ignores it)."""
        return self.qpos if self.qpos is not None else fallback


def effective_chunk(chunk: int, total: int) -> int:
    """Query rows per pass: the configured chunk, at most the query count (at least 1)."""
    return max(1, min(chunk, total)) if total else max(1, chunk)


@triton.jit
def _plan_keys_kernel(
    TopK, CU, DocRowEnd, QPOS, SegKey,
    total, chunk, groups, n_rows, n_seg, n_docs, key_offset, stride_tg, stride_tt,
    K: tl.constexpr, KP: tl.constexpr, B: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """Segment key (chunk, group, row) - key_offset of every (group, query row, slot), in SegKey's
    dtype (int16 when the keys fit: the sort then runs half the radix passes)."""
    g = tl.program_id(1)
    i = tl.program_id(0) * B + tl.arange(0, B)
    slots = tl.arange(0, KP)
    q_ok = i < total
    ok = q_ok[:, None] & (slots < K)[None, :]
    sel = tl.load(TopK + g.to(tl.int64) * stride_tg + i.to(tl.int64)[:, None] * stride_tt + slots[None, :], mask=ok, other=-1)
    # the row of block 0 of each query's document: rows are numbered document by document
    doc = tl.minimum(count_below(CU + 1, n_docs, key_pos(QPOS, i, q_ok, HAS_QPOS), True), n_docs - 1)
    base = tl.load(DocRowEnd + doc - 1, mask=q_ok & (doc > 0), other=0)
    key = (((i // chunk) * groups + g) * n_rows + base)[:, None] + sel
    key = tl.where(ok & (sel >= 0), key, n_seg)  # invalid slots sort last
    flat = (g.to(tl.int64) * total + i)[:, None] * K + slots[None, :]
    tl.store(SegKey + flat, (key - key_offset).to(SegKey.dtype.element_ty), mask=ok)


@triton.jit
def _plan_entries_kernel(Perm, Keys, Tok, Slot, SegStart, SegEnd, n, total, key_offset,
                         K: tl.constexpr, B: tl.constexpr):
    """Sorted entry e: its query row and slot. Where the sorted key changes, a segment starts or
    ends: [SegStart, SegEnd) of each segment with entries (the others keep 0, 0). No atomics."""
    e = tl.program_id(0) * B + tl.arange(0, B)
    ok = e < n
    flat = tl.load(Perm + e, mask=ok, other=0)
    tl.store(Tok + e, ((flat // K) % total).to(tl.int32), mask=ok)
    tl.store(Slot + e, (flat % K).to(tl.int32), mask=ok)
    key = tl.load(Keys + e, mask=ok, other=0)
    first = ok & ((e == 0) | (key != tl.load(Keys + e - 1, mask=ok & (e > 0), other=0)))
    last = ok & ((e == n - 1) | (key != tl.load(Keys + e + 1, mask=ok & (e < n - 1), other=0)))
    seg = key.to(tl.int32) + key_offset
    tl.store(SegStart + seg, e, mask=first)
    tl.store(SegEnd + seg, e + 1, mask=last)


@triton.jit
def _tile_classes(cnt, Q: tl.constexpr, NCLS: tl.constexpr):
    """[B, NCLS] tiles of each segment by length class: class 0 the full tiles (Q entries), classes
    1 .. NCLS-1 the segment's last, partial tile, longer ones in lower classes."""
    n_full = cnt // Q
    rem = cnt - n_full * Q
    cls = tl.where(rem > 0, 1 + ((Q - rem) * (NCLS - 1)) // Q, -1)
    k = tl.arange(0, NCLS)[None, :]
    return tl.where(k == 0, n_full[:, None], (k == cls[:, None]).to(tl.int32))


@triton.jit
def _plan_tiles_kernel(SegStart, SegEnd, Tiles, Order, SegFirst, SegCount, per_chunk, cap, groups, n_rows,
                       Q: tl.constexpr, B: tl.constexpr, NCLS: tl.constexpr):
    """Segments [p * B, (p + 1) * B) of chunk c (program (c, p)): cut into tiles of <= Q entries,
    placed in segment order from the chunk's tile slot c * cap (unused slots stay 0), and the
    chunk's launch order (Tiles.order): full tiles first, then the partial ones by length class,
    segment order within a class; unused slots last, in place. Each program counts the tiles of
    the chunk's segments (those before its own, and all), so no separate scan launch is needed."""
    c = tl.program_id(0)
    lo = c * per_chunk + tl.program_id(1) * B
    offs = tl.arange(0, B)
    before = tl.zeros([NCLS], tl.int32)
    total = tl.zeros([NCLS], tl.int32)
    for a in range(c * per_chunk, (c + 1) * per_chunk, B):
        m = a + offs < (c + 1) * per_chunk
        n = tl.load(SegEnd + a + offs, mask=m, other=0) - tl.load(SegStart + a + offs, mask=m, other=0)
        per_class = tl.sum(_tile_classes(n, Q, NCLS), 0)
        total += per_class
        before += tl.where(a < lo, per_class, 0)
    seg = lo + offs
    ok = seg < (c + 1) * per_chunk
    e0 = tl.load(SegStart + seg, mask=ok, other=0)
    cnt = tl.load(SegEnd + seg, mask=ok, other=0) - e0
    n_t = (cnt + Q - 1) // Q
    first = c * cap + tl.sum(before, 0) + tl.cumsum(n_t, 0) - n_t
    tl.store(SegFirst + seg, first, mask=ok)
    tl.store(SegCount + seg, n_t, mask=ok)
    # launch positions: the chunk's tiles of lower classes, then this class's tiles before the segment
    classes = _tile_classes(cnt, Q, NCLS)
    pos = (c * cap + tl.cumsum(total, 0) - total + before)[None, :] + tl.cumsum(classes, 0) - classes
    partial = tl.arange(0, NCLS)[None, :] > 0
    full_pos = tl.sum(tl.where(partial, 0, pos), 1)
    part_pos = tl.sum(tl.where(partial, pos * classes, 0), 1)  # the one class holding the partial tile
    n_full = cnt // Q
    g = (seg // n_rows) % groups
    row = seg % n_rows
    for j in range(0, tl.max(n_t, 0)):
        m = ok & (j < n_t)
        t = (first + j).to(tl.int64) * 4
        tl.store(Tiles + t, g, mask=m)
        tl.store(Tiles + t + 1, row, mask=m)
        tl.store(Tiles + t + 2, e0 + j * Q, mask=m)
        tl.store(Tiles + t + 3, tl.minimum(cnt - j * Q, Q), mask=m)
        tl.store(Order + tl.where(j < n_full, full_pos + j, part_pos), first + j, mask=m)
    if tl.program_id(1) == 0:
        for u in range(c * cap + tl.sum(total, 0), (c + 1) * cap, B):
            tl.store(Order + u + offs, u + offs, mask=u + offs < (c + 1) * cap)


def build_plan(topk, cu_seqlens, block_size: int, chunk: int, n_keys: Optional[int] = None, qpos=None, rows=None) -> SparsePlan:
    """The plan of a selection (a handful of launches, no host sync). `rows`: block_rows, if known."""
    groups, total, k = topk.shape
    dev = topk.device
    n_keys = total if n_keys is None else int(n_keys)
    cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
    qp = positions(qpos, dev)
    rows = block_rows(cu, n_keys, block_size, qp) if rows is None else rows
    n_rows = rows.n
    chunk = effective_chunk(chunk, total)
    n_chunks = max(1, -(-total // chunk))
    n_seg = n_chunks * groups * n_rows

    sel = topk if topk.dtype == torch.int32 else topk.to(torch.int32)
    # Keys in [0, n_seg] (n_seg: invalid slots); shifted into int16 when they fit.
    short = n_seg < SHORT_KEY_SEGMENTS
    seg_key = torch.empty(groups * total * k, dtype=torch.int16 if short else torch.int32, device=dev)
    key_offset = 1 << 15 if short else 0
    if total:
        _plan_keys_kernel[(triton.cdiv(total, 64), groups)](
            sel, cu, rows.doc_row_end, qp if qp is not None else cu, seg_key,
            total, chunk, groups, n_rows, n_seg, cu.numel() - 1, key_offset, sel.stride(0), sel.stride(1),
            K=k, KP=next_pow2(k), B=64, HAS_QPOS=qp is not None, num_warps=4,
        )
    sorted_key, perm = torch.sort(seg_key, stable=True)
    seg_range = torch.zeros((2, n_seg + 1), dtype=torch.int32, device=dev)  # [start, end) of each segment's entries
    entry_tok = torch.empty(seg_key.numel(), dtype=torch.int32, device=dev)
    entry_slot = torch.empty_like(entry_tok)
    if seg_key.numel():
        _plan_entries_kernel[(triton.cdiv(seg_key.numel(), 1024),)](
            perm, sorted_key, entry_tok, entry_slot, *seg_range, seg_key.numel(), max(total, 1), key_offset,
            K=k, B=1024, num_warps=4,
        )
    plan = SparsePlan(
        groups, total, n_keys, k, block_size, chunk, n_chunks, n_rows, rows.key_start, rows.doc_end,
        entry_tok=entry_tok, entry_slot=entry_slot, qpos=qp,
        _qpos_src=None if qpos is None else qpos.data_ptr(), cu_seqlens=cu_seqlens,
    )
    entries_per_chunk = groups * min(chunk, max(total, 1)) * k
    sizes = sorted(set(TILE_QUERIES.values()))  # kernels asking for the same size share a tile list
    caps = [-(-entries_per_chunk // q) + min(groups * n_rows, entries_per_chunk) for q in sizes]
    tiles = torch.zeros((n_chunks * sum(caps), 4), dtype=torch.int32, device=dev).split([n_chunks * c for c in caps])
    orders = torch.empty(n_chunks * sum(caps), dtype=torch.int32, device=dev).split([n_chunks * c for c in caps])
    seg_tiles = torch.empty((len(sizes), 2, n_seg), dtype=torch.int32, device=dev)  # first, count
    per_chunk = groups * n_rows
    by_size = {}
    for q, cap, t, order, (first, count) in zip(sizes, caps, tiles, orders, seg_tiles):
        if n_seg:
            _plan_tiles_kernel[(n_chunks, triton.cdiv(per_chunk, 256))](
                *seg_range, t, order, first, count, per_chunk, cap, groups, n_rows, Q=q, B=256,
                NCLS=TILE_LENGTH_CLASSES, num_warps=4,
            )
        else:
            order.copy_(torch.arange(order.numel(), dtype=torch.int32, device=dev))
        by_size[q] = Tiles(q, cap, t, first, count, order)
    plan.tiles = {name: by_size[q] for name, q in TILE_QUERIES.items()}
    return plan


def get_plan(topk, cu_seqlens, block_size: int, chunk: int, n_keys: Optional[int] = None, qpos=None, rows=None) -> SparsePlan:
    """The plan attached to this topk tensor by select_blocks, or a fresh one (then attached).

    The plan rides on the tensor object (attribute `_msa_plan`), so the selection returned by
    select_blocks carries it to sparse_attention and indexer_kl of the same layer with no API
    change. A copied or modified-in-place selection must not keep it: in-place edits bump the
    version counter, which the cache checks.
    """
    cached = getattr(topk, "_msa_plan", None)
    if cached is not None:
        plan = cached[1]
        if (
            cached[0] == topk._version
            and plan.chunk == effective_chunk(chunk, topk.shape[1])
            and plan.matches(topk, cu_seqlens, block_size, qpos)
            and (n_keys is None or plan.n_keys == n_keys)
        ):
            return plan
    with timed("plan build"):
        plan = build_plan(topk, cu_seqlens, block_size, chunk, n_keys, qpos, rows)
    try:
        topk._msa_plan = (topk._version, plan)
    except (AttributeError, RuntimeError):
        pass
    return plan


@triton.jit
def program_tile(order, tile0):
    """(slot in this launch's tile range, tile index) of this program: see Tiles.order."""
    t = tl.load(order + tile0 + tl.program_id(0))
    return t - tile0, t


@triton.jit
def load_tile(tiles, t, row_key_start, row_key_end):
    """Tile t of a plan: (group, KV row, first entry, entry count, the row's key range [start, end)).

    An unused tile slot (count 0) gets an empty key range, so every masked load and store of the
    program is a no-op.
    """
    g = tl.load(tiles + t * 4)
    row = tl.load(tiles + t * 4 + 1)
    e0 = tl.load(tiles + t * 4 + 2)
    cnt = tl.load(tiles + t * 4 + 3)
    key_start = tl.load(row_key_start + row)
    key_end = tl.where(cnt > 0, tl.load(row_key_end + row), key_start)
    return g, row, e0, cnt, key_start, key_end
