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

    def longest_first(self) -> torch.Tensor:
        """Row order for query-owner kernels: most key blocks to stream first."""
        return torch.argsort(self.blk, descending=True, stable=True).to(torch.int32)

    def most_queries_first(self) -> torch.Tensor:
        """Row order for key-owner kernels: most later queries first."""
        return torch.argsort(self.q_doc_end - self.q_lo, descending=True, stable=True).to(torch.int32)


def block_rows(cu_seqlens: torch.Tensor, n_keys: int, block: int, qpos: Optional[torch.Tensor] = None) -> BlockRows:
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    n_docs = cu.numel() - 1
    nblk = (cu[1:] - cu[:-1] + block - 1) // block
    row_end = torch.cumsum(nblk, 0)
    n_rows = n_keys // block + n_docs
    rows = torch.arange(n_rows, device=dev)
    row_doc = torch.searchsorted(row_end, rows, right=True).clamp_(max=max(n_docs - 1, 0))
    blk = rows - (row_end - nblk)[row_doc]
    start = (cu[row_doc] + blk * block).clamp_(max=n_keys)
    end = cu[row_doc + 1]
    empty = start >= end
    blk = torch.where(empty, 0, blk)
    block_end = torch.minimum(start + block, end)
    if qpos is None:
        q_lo, q_hi, q_doc_end = start, torch.where(empty, start, block_end), end
    else:
        pos = qpos.to(device=dev, dtype=torch.int64)
        q_lo = torch.searchsorted(pos, start)
        q_hi = torch.where(empty, q_lo, torch.searchsorted(pos, block_end))
        q_doc_end = torch.searchsorted(pos, end)
    i32 = lambda t: t.to(torch.int32).contiguous()
    return BlockRows(i32(start), i32(end), i32(blk), i32(q_lo), i32(q_hi), i32(q_doc_end), n_rows)


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
