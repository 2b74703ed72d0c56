"""Indexer: block scores on tensor cores with a streaming top-k, then the index lse.

select: one program per (group, query block of a document). Its 128 query rows share the local
block L, so every earlier block is fully visible: the program streams blocks 0..L-1 of the index
keys, takes each block's max score per row, and keeps a running top-(k-1) per row in registers.
A candidate is one int64 key, (order-preserving score bits << 32) | (2^31 - 1 - block id), so a
single min finds the entry to evict and equal scores keep the lower block id. Nothing [T, T] or
[T, T/Bk] is written. Ranking uses raw dot products (the positive scale does not change order).

index lse: after the selection, a KV-outer pass over the plan computes each (query, slot)'s
log-sum-exp over its block, then a log-sum-exp over the slots. This touches only the k selected
blocks per query, instead of spending an exp on every visible score in the select pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import new_buffer, next_pow2, timed
from msa_megatron.ops.triton.plan import SparsePlan, load_tile
from msa_megatron.ops.triton.rows import block_rows, key_pos

LOG2E = 1.4426950408889634

CONFIG = {"select_warps": 8, "select_stages": 2, "ilse_rows": 64, "ilse_warps": 4}


@triton.jit
def _select_topk_kernel(
    QI, KI, TopK,
    row_order, row_key_start, row_blk, row_q_lo, row_q_hi,
    stride_qit, stride_qig, stride_kit, stride_tg, stride_tt,
    NSEL: tl.constexpr, KP: tl.constexpr, DI: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Query rows of one (group, document block); they share the local block L."""
    g = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_lo = tl.load(row_q_lo + r)
    q_hi = tl.load(row_q_hi + r)
    L = tl.load(row_blk + r)
    if q_lo < q_hi:
        doc_start = tl.load(row_key_start + r) - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, DP)
        d_ok = offs_d < DI
        tok = q_lo + offs_m  # query rows
        row_ok = tok < q_hi
        qi = tl.load(QI + tok.to(tl.int64)[:, None] * stride_qit + g * stride_qig + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        cols = tl.arange(0, KP)
        # Empty slots: the smallest keys, distinct, lowest column first (so they fill in order).
        # Columns >= k-1 are disabled: the largest keys, never evicted, never written.
        empty = (-9223372036854775807 - 1) + cols.to(tl.int64)
        disabled = 9223372036854775807 - cols.to(tl.int64)
        init = tl.where(cols < NSEL - 1, empty, disabled)
        keys = tl.zeros([BLOCK, KP], tl.int64) + init[None, :]
        for b in range(0, L):
            kt = (doc_start + b * BLOCK + offs_m).to(tl.int64)
            ki = tl.load(KI + kt[:, None] * stride_kit + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            s = tl.dot(qi, tl.trans(ki))
            best = tl.max(s, 1) + 0.0  # + 0.0 turns -0.0 into +0.0 so equal scores tie
            bits = best.to(tl.int32, bitcast=True)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            cand = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - b)
            kmin = tl.min(keys, 1)
            evict = (keys == kmin[:, None]) & (cand > kmin)[:, None]
            keys = tl.where(evict, cand[:, None], keys)
        ids = (0x7FFFFFFF - (keys & 0x7FFFFFFF)).to(tl.int32)
        n_hist = tl.minimum(L, NSEL - 1)
        out = tl.where(cols[None, :] < n_hist, ids, tl.where(cols[None, :] == n_hist, L, -1))
        tl.store(TopK + g.to(tl.int64) * stride_tg + tok.to(tl.int64)[:, None] * stride_tt + cols[None, :], out,
                 mask=row_ok[:, None] & (cols < NSEL)[None, :])


def select_topk(qi, ki, cu_seqlens, block_size: int, topk: int, qpos=None, rows=None):
    """[G, Tq, k] int32 selection of the query rows qi (key rows given by qpos; None: qi rows = key rows).

    `rows`: block_rows of this batch, when the caller has them already.
    """
    total, groups, di = qi.shape
    qi = qi.contiguous()
    ki = ki.reshape(ki.shape[0], di).contiguous()
    if rows is None:
        rows = block_rows(cu_seqlens.to(qi.device), ki.shape[0], block_size, qpos)
    out = new_buffer((groups, total, topk), torch.int32, qi.device)
    if total == 0:
        return out
    with timed("select top-k kernel"):
        _select_topk_kernel[(groups, rows.n)](
            qi, ki, out, rows.longest_first(), rows.key_start, rows.blk, rows.q_lo, rows.q_hi,
            qi.stride(0), qi.stride(1), ki.stride(0), out.stride(0), out.stride(1),
            NSEL=topk, KP=next_pow2(topk), DI=di, DP=max(16, next_pow2(di)), BLOCK=block_size,
            num_warps=CONFIG["select_warps"], num_stages=CONFIG["select_stages"],
        )
    return out


@triton.jit
def _index_lse_part_kernel(
    QI, KI, L_part, QPOS,
    tiles, entry_tok, entry_slot, row_key_start, row_key_end,
    stride_qit, stride_qig, stride_kit, stride_lg, stride_lt,
    scale_log2,
    DI: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """L_part[g, i, slot] = logsumexp over the visible keys of the slot's block of the index scores."""
    t = tl.program_id(0)
    g, row, e0, cnt, key_start, key_end = load_tile(tiles, t, row_key_start, row_key_end)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < DI
    key_tok = key_start + offs_n
    key_ok = key_tok < key_end
    ki = tl.load(KI + key_tok.to(tl.int64)[:, None] * stride_kit + offs_d[None, :],
                 mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    offs_m = tl.arange(0, BLOCK_M)
    for s0 in range(0, cnt, BLOCK_M):
        ok = s0 + offs_m < cnt
        tok = tl.load(entry_tok + e0 + s0 + offs_m, mask=ok, other=0)
        slot = tl.load(entry_slot + e0 + s0 + offs_m, mask=ok, other=0)
        qi = tl.load(QI + tok.to(tl.int64)[:, None] * stride_qit + g * stride_qig + offs_d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qi, tl.trans(ki))
        visible = (key_tok[None, :] <= key_pos(QPOS, tok, ok, HAS_QPOS)[:, None]) & key_ok[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m = tl.where(ok, tl.max(s, 1), 0.0)
        l = tl.where(ok, tl.sum(tl.exp2(s - m[:, None]), 1), 1.0)
        lse = (m + tl.log2(l)) * 0.6931471805599453
        tl.store(L_part + g.to(tl.int64) * stride_lg + tok.to(tl.int64) * stride_lt + slot, lse, mask=ok)


def index_lse(qi, ki, topk, plan: SparsePlan, index_scale: float):
    """[G, Tq] fp32: log-sum-exp of index_scale * qi.ki over each (query, group)'s selected support."""
    total, groups, di = qi.shape
    qi = qi.contiguous()
    ki = ki.reshape(ki.shape[0], di).contiguous()
    part = new_buffer(topk.shape, torch.float32, qi.device)
    tiles = plan.tiles["ilse"]
    n = plan.n_chunks * tiles.cap
    if total and n:
        with timed("index lse kernel"):
            _index_lse_part_kernel[(n,)](
                qi, ki, part, plan.qpos_arg(part), tiles.tiles, plan.entry_tok, plan.entry_slot,
                plan.row_key_start, plan.row_key_end,
                qi.stride(0), qi.stride(1), ki.stride(0), part.stride(0), part.stride(1),
                index_scale * LOG2E,
                DI=di, DP=max(16, next_pow2(di)), BLOCK_M=CONFIG["ilse_rows"], BLOCK_N=plan.block_size,
                HAS_QPOS=plan.has_qpos, num_warps=CONFIG["ilse_warps"],
            )
    part = torch.where(topk >= 0, part, float("-inf"))
    return torch.logsumexp(part, dim=-1)
