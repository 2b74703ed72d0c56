"""Document-local blocks of the key rows, and the query rows that fall in each (no host sync).

Every Triton kernel that walks documents uses these "rows": row r is block `blk[r]` of one
document, covering key rows [key_start[r], min(key_start[r] + block, doc_end[r])). Rows are
numbered document by document (so the rows of one document are consecutive), with an upper bound
R = T // block + number of documents; rows past the real blocks are empty (key_start >= doc_end).

Queries may be a subset of the key rows (context parallelism: `qpos` [Tq] = each query's key row,
strictly increasing). Row r then holds the query rows [q_lo[r], q_hi[r]) whose key position lies in
the block, and q_doc_end[r] is the query-row end of its document; a kernel reads a query's key
position through `key_pos`. Without qpos the query rows are the key rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl


@dataclass
class BlockRows:
    key_start: torch.Tensor  # [R] int32, first key row of the block
    doc_end: torch.Tensor  # [R] int32, key-row end of the block's document
    blk: torch.Tensor  # [R] int32, block id inside the document (0 for empty rows)
    q_lo: torch.Tensor  # [R] int32, first query row in the block
    q_hi: torch.Tensor  # [R] int32, end of the query rows in the block
    q_doc_end: torch.Tensor  # [R] int32, end of the query rows of the block's document
    n: int  # R
    doc_row_end: torch.Tensor  # [documents] int32, first row after each document's rows

    def longest_first(self) -> torch.Tensor:
        """Row order for query-owner kernels: most key blocks to stream first."""
        return torch.argsort(self.blk, descending=True, stable=True).to(torch.int32)

    def most_queries_first(self) -> torch.Tensor:
        """Row order for key-owner kernels: most later queries first."""
        return torch.argsort(self.q_doc_end - self.q_lo, descending=True, stable=True).to(torch.int32)


@triton.jit
def count_below(A, n, x, RIGHT: tl.constexpr):
    """Per element of x: how many of the sorted A[0:n] are < x (<= x when RIGHT); binary search."""
    lo = tl.zeros(x.shape, tl.int32)
    hi = tl.zeros(x.shape, tl.int32) + n
    for _ in range(32):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(A + mid, mask=active & (mid < n), other=0)
        if RIGHT:
            go = v <= x
        else:
            go = v < x
        lo = tl.where(active & go, mid + 1, lo)
        hi = tl.where(active & ~go, mid, hi)
    return lo


@triton.jit
def _block_rows_kernel(
    CU, ROW_END, QPOS, KeyStart, DocEnd, Blk, QLo, QHi, QDocEnd,
    n_docs, n_rows, n_keys, n_q,
    BLOCK_SIZE: tl.constexpr, HAS_QPOS: tl.constexpr, B: tl.constexpr,
):
    r = tl.program_id(0) * B + tl.arange(0, B)
    ok = r < n_rows
    doc = tl.minimum(count_below(ROW_END, n_docs, r, True), n_docs - 1)
    row_base = tl.where(doc > 0, tl.load(ROW_END + doc - 1, mask=ok & (doc > 0), other=0), 0)
    blk = r - row_base
    doc_start = tl.load(CU + doc, mask=ok, other=0)
    doc_end = tl.load(CU + doc + 1, mask=ok, other=0)
    start = tl.minimum(doc_start + blk * BLOCK_SIZE, n_keys)
    empty = start >= doc_end
    block_end = tl.minimum(start + BLOCK_SIZE, doc_end)
    if HAS_QPOS:
        q_lo = count_below(QPOS, n_q, start, False)
        q_hi = tl.where(empty, q_lo, count_below(QPOS, n_q, block_end, False))
        q_doc_end = count_below(QPOS, n_q, doc_end, False)
    else:
        q_lo = start
        q_hi = tl.where(empty, start, block_end)
        q_doc_end = doc_end
    tl.store(KeyStart + r, start, mask=ok)
    tl.store(DocEnd + r, doc_end, mask=ok)
    tl.store(Blk + r, tl.where(empty, 0, blk), mask=ok)
    tl.store(QLo + r, q_lo, mask=ok)
    tl.store(QHi + r, q_hi, mask=ok)
    tl.store(QDocEnd + r, q_doc_end, mask=ok)


def block_rows(cu_seqlens: torch.Tensor, n_keys: int, block: int, qpos: Optional[torch.Tensor] = None) -> BlockRows:
    """The rows of a packed batch (one small kernel; no host sync)."""
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int32).contiguous()
    n_docs = cu.numel() - 1
    row_end = torch.cumsum((cu[1:] - cu[:-1] + block - 1) // block, 0, dtype=torch.int32)
    n_rows = n_keys // block + n_docs
    out = torch.empty((6, n_rows), dtype=torch.int32, device=dev)
    qp = positions(qpos, dev)
    if n_rows:
        _block_rows_kernel[(triton.cdiv(n_rows, 256),)](
            cu, row_end, qp if qp is not None else cu, *out,
            n_docs, n_rows, n_keys, 0 if qp is None else qp.numel(),
            BLOCK_SIZE=block, HAS_QPOS=qp is not None, B=256, num_warps=4,
        )
    return BlockRows(*out, n_rows, row_end)


def edges_describe(edges: Optional[tuple], cu_seqlens: torch.Tensor, n_rows: int) -> bool:
    """Whether `edges` (the host's copy of cu_seqlens, e.g. MSAShape.doc_edges) can stand for this
    batch's cu_seqlens over n_rows rows: as many edges, from 0 to n_rows (checked on the host only)."""
    return edges is not None and len(edges) == cu_seqlens.numel() and edges[0] == 0 and edges[-1] == n_rows


def positions(qpos: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """qpos as a contiguous int32 tensor on the device (None stays None)."""
    return None if qpos is None else qpos.to(device=device, dtype=torch.int32).contiguous()


@triton.jit
def key_pos(QPOS, qrow, ok, HAS_QPOS: tl.constexpr):
    """Key row (position in the key tensors) of query rows `qrow`."""
    if HAS_QPOS:
        return tl.load(QPOS + qrow, mask=ok, other=0)
    else:
        return qrow
