"""KL(teacher || index) of MSA: the value and its gradient to qi, ki in one pass.

Teacher P_T = mean over the group's r heads of exp(scale q.k - lse) (main lse, q and k detached);
student P_idx = exp(index_scale qi.ki - index_lse). ds = P_idx - P_T on the support gives
dqi = c * sum_j ds ki_j and dki = c * sum_{i,g} ds qi, c = index_scale / (T * total_groups).

Sparse stage: KV-outer over the plan, as the attention (dki of a block accumulates in registers,
dqi goes to per-slot partials, then fixed-order sums). Dense warm-up: a query-owner pass streams
all visible keys (online index lse, dqi, KL value), then a key-owner pass computes dki with that
lse. No atomics anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import new_buffer, next_pow2, timed
from msa_megatron.ops.triton.indexer import doc_rows
from msa_megatron.ops.triton.plan import SparsePlan, load_tile
from msa_megatron.ops.triton.sparse_attn import _block_ws_sum_kernel, slot_sum

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Launch knobs (fastest on an H200 at Hq 64 / Hkv 4 / d 128; kl_rows = queries per step).
CONFIG = {
    "kl_rows": 64, "kl_warps": 8, "kl_stages": 3,
    "dense_block": 128, "dense_warps": 8, "dense_stages": 2,
}


# --------------------------------------------------------------------------- sparse support


@triton.jit
def _kl_sparse_kernel(
    Q, K, QI, KI, LSE, ILSE, DQI_part, DKI_ws, KL_tile,
    tiles, entry_tok, entry_slot, row_key_start, row_key_end,
    tile0, q0,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qit, stride_qig, stride_kit,
    stride_lt, stride_ig, stride_ps, stride_pt, stride_pg,
    qk_scale, iqk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One plan tile: a KV block of group g and BLOCK_M of its queries per step, keys as rows.

    The teacher sums the r heads' probabilities one head at a time (keeps the tile [keys, queries]
    so the student product, dki and dqi use the same layout). A run-2 variant that packed
    (query, head) rows like the attention and averaged heads with an extra product was slower.
    """
    t_local = tl.program_id(0)
    t = tile0 + t_local
    g, row, e0, cnt, key_start, key_end = load_tile(tiles, t, row_key_start, row_key_end)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_i = tl.arange(0, DIP)
    d_ok = offs_d < HEAD_DIM
    i_ok = offs_i < DI
    key_tok = key_start + offs_n
    key_ok = key_tok < key_end
    kt = key_tok.to(tl.int64)
    k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=key_ok[:, None] & i_ok[None, :], other=0.0)
    dki = tl.zeros([BLOCK_N, DIP], tl.float32)
    kl = tl.zeros([BLOCK_M], tl.float32)

    offs_m = tl.arange(0, BLOCK_M)
    for s0 in range(0, cnt, BLOCK_M):
        ok = s0 + offs_m < cnt
        tok = tl.load(entry_tok + e0 + s0 + offs_m, mask=ok, other=0)
        slot = tl.load(entry_slot + e0 + s0 + offs_m, mask=ok, other=0)
        qt = tok.to(tl.int64)
        qi = tl.load(QI + qt[:, None] * stride_qit + g * stride_qig + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
        ilse = tl.load(ILSE + g.to(tl.int64) * stride_ig + qt, mask=ok, other=0.0) * 1.4426950408889634
        visible = (key_tok[:, None] <= tok[None, :]) & key_ok[:, None] & ok[None, :]
        s_idx = tl.dot(ki, tl.trans(qi)) * iqk_scale - ilse[None, :]  # log2 P_idx, [N, M]
        p_idx = tl.where(visible, tl.exp2(s_idx), 0.0)
        p_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for h in range(R):
            head = g * R + h
            qh = tl.load(Q + qt[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + qt * stride_lt + head, mask=ok, other=0.0) * 1.4426950408889634
            s = tl.dot(k, tl.trans(qh)) * qk_scale - lse[None, :]
            p_t += tl.where(visible, tl.exp2(s), 0.0)
        p_t = p_t * (1.0 / R)
        # KL terms in log2 units: P_T (log2 P_T - log2 P_idx); P_T = 0 contributes nothing.
        kl += tl.sum(tl.where(visible & (p_t > 0), p_t * (tl.log2(p_t) - s_idx), 0.0), 0)
        ds = (p_idx - p_t).to(qi.dtype)
        dki += tl.dot(ds, qi)
        dqi = tl.dot(tl.trans(ds), ki)
        part = slot.to(tl.int64) * stride_ps + (qt - q0) * stride_pt + g * stride_pg
        tl.store(DQI_part + part[:, None] + offs_i[None, :], dqi, mask=ok[:, None] & i_ok[None, :])
    ws = t_local.to(tl.int64) * BLOCK_N * DIP + offs_n[:, None] * DIP + offs_i[None, :]
    tl.store(DKI_ws + ws, dki)
    tl.store(KL_tile + t, tl.sum(kl, 0) * 0.6931471805599453)


def sparse_kl(q, k, lse, qi, ki, index_lse, topk, plan: SparsePlan, softmax_scale, index_scale, total_groups):
    """(KL value, dqi, dki) of the sparse stage; grads are for a KL of weight 1."""
    total, hq, d = q.shape
    groups, di = qi.shape[1], qi.shape[2]
    r = hq // groups
    nslot = topk.shape[-1]
    D, DIP = max(16, next_pow2(d)), max(16, next_pow2(di))
    ki2 = ki.reshape(total, di).contiguous()
    index_lse = index_lse.to(torch.float32).contiguous()
    lse = lse.contiguous()
    grad_scale = index_scale / (total * total_groups)
    dqi = new_buffer((total, groups, di), torch.float32, q.device)
    dki = torch.zeros((total, 1, di), dtype=torch.float32, device=q.device)
    chunk = min(plan.chunk, total)
    dqi_part = new_buffer((nslot, chunk, groups, di), torch.float32, q.device)
    tiles = plan.tiles["kl"]
    kl_tile = torch.zeros(max(1, tiles.chunk_tiles[-1]), dtype=torch.float32, device=q.device)
    cfg = CONFIG
    for c in range(plan.n_chunks):
        q0, q1 = plan.chunk_bounds(c)
        t0, t1 = tiles.chunk_range(c)
        if t1 > t0:
            ws = new_buffer((t1 - t0, plan.block_size, DIP), torch.float32, q.device)
            args = (
                q, k, qi, ki2, lse, index_lse, dqi_part, ws, kl_tile,
                tiles.tiles, plan.entry_tok, plan.entry_slot, plan.row_key_start, plan.row_key_end,
                t0, q0,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0), qi.stride(1), ki2.stride(0),
                lse.stride(0), index_lse.stride(0), dqi_part.stride(0), dqi_part.stride(1), dqi_part.stride(2),
                softmax_scale * LOG2E, index_scale * LOG2E,
            )
            with timed("KL sparse kernel"):
                _kl_sparse_kernel[(t1 - t0,)](
                    *args, HEAD_DIM=d, D=D, DI=di, DIP=DIP, R=r, BLOCK_M=cfg["kl_rows"], BLOCK_N=plan.block_size,
                    num_warps=cfg["kl_warps"], num_stages=cfg["kl_stages"],
                )
            with timed("KL dki workspace sum"):
                _block_ws_sum_kernel[(plan.n_rows, 1)](
                    ws, dki, tiles.seg_tile_first, tiles.seg_tile_count, plan.row_key_start, plan.row_key_end,
                    c * groups * plan.n_rows, t0, plan.n_rows, groups, dki.stride(0), dki.stride(1),
                    HEAD_DIM=di, D=DIP, BLOCK_N=plan.block_size, ALL_GROUPS=True, SKIP_SINGLE=False, num_warps=8,
                )
        slot_sum(dqi_part, topk, dqi, q0, q1, grad_scale, 1)
    value = kl_tile.sum() / (total * total_groups)
    return value, dqi, dki * grad_scale


# --------------------------------------------------------------------------- dense (warm-up) support


@triton.jit
def _kl_dense_query_kernel(
    Q, K, QI, KI, LSE, ILSE, DQI, KL_row,
    row_order, row_start, row_end, row_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qit, stride_qig, stride_kit,
    stride_lt, stride_ig, stride_dt, stride_dg,
    qk_scale, iqk_scale, grad_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Query-owner pass: online index lse, dqi and the KL of each (query, group) row."""
    g = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_start = tl.load(row_start + r)
    q_end = tl.load(row_end + r)
    L = tl.load(row_blk + r)
    if q_start < q_end:
        doc_start = q_start - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        offs_i = tl.arange(0, DIP)
        d_ok = offs_d < HEAD_DIM
        i_ok = offs_i < DI
        tok = q_start + offs_m
        ok = tok < q_end
        qt = tok.to(tl.int64)
        qi = tl.load(QI + qt[:, None] * stride_qit + g * stride_qig + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc_s = tl.zeros([BLOCK, DIP], tl.float32)  # sum_j exp(s_j - m) ki_j (student, online)
        acc_t = tl.zeros([BLOCK, DIP], tl.float32)  # sum_j P_T ki_j
        kl_a = tl.zeros([BLOCK], tl.float32)  # sum_j P_T (log2 P_T - s_j)
        pt_sum = tl.zeros([BLOCK], tl.float32)
        for kb in range(0, L + 1):
            key_tok = doc_start + kb * BLOCK + offs_m
            kt = key_tok.to(tl.int64)
            key_ok = key_tok < q_end
            ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=key_ok[:, None] & i_ok[None, :], other=0.0)
            kg = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            visible = (key_tok[None, :] <= tok[:, None]) & ok[:, None]
            s = tl.where(visible, tl.dot(qi, tl.trans(ki)) * iqk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(ok, m_new, 0.0)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_s = acc_s * alpha[:, None] + tl.dot(p.to(ki.dtype), ki)
            m_i = m_new
            p_t = tl.zeros([BLOCK, BLOCK], tl.float32)
            for h in range(R):
                head = g * R + h
                qh = tl.load(Q + qt[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(LSE + qt * stride_lt + head, mask=ok, other=0.0) * 1.4426950408889634
                sh = tl.dot(qh, tl.trans(kg)) * qk_scale - lse[:, None]
                p_t += tl.where(visible, tl.exp2(sh), 0.0)
            p_t = p_t * (1.0 / R)
            acc_t += tl.dot(p_t.to(ki.dtype), ki)
            kl_a += tl.sum(tl.where(visible & (p_t > 0), p_t * (tl.log2(p_t) - s), 0.0), 1)
            pt_sum += tl.sum(p_t, 1)
        l_i = tl.where(ok, l_i, 1.0)
        lse_idx = m_i + tl.log2(l_i)  # log2 units
        dqi = (acc_s / l_i[:, None] - acc_t) * grad_scale
        tl.store(DQI + qt[:, None] * stride_dt + g * stride_dg + offs_i[None, :], dqi, mask=ok[:, None] & i_ok[None, :])
        tl.store(ILSE + g.to(tl.int64) * stride_ig + qt, lse_idx * 0.6931471805599453, mask=ok)
        tl.store(KL_row + g.to(tl.int64) * stride_ig + qt, (kl_a + lse_idx * pt_sum) * 0.6931471805599453, mask=ok)


@triton.jit
def _kl_dense_key_kernel(
    Q, K, QI, KI, LSE, ILSE, DKI,
    row_order, row_start, row_end, row_blk, n_groups,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qit, stride_qig, stride_kit,
    stride_lt, stride_ig, stride_dkt,
    qk_scale, iqk_scale, grad_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Key-owner pass: dki of one key tile over every later query of the document, all groups."""
    r = tl.load(row_order + tl.program_id(0))
    k_start = tl.load(row_start + r)
    doc_end = tl.load(row_end + r)
    kb = tl.load(row_blk + r)
    if k_start < doc_end:
        doc_start = k_start - kb * BLOCK
        n_tiles = (doc_end - doc_start + BLOCK - 1) // BLOCK
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        offs_i = tl.arange(0, DIP)
        d_ok = offs_d < HEAD_DIM
        i_ok = offs_i < DI
        key_tok = k_start + offs_n
        key_ok = key_tok < doc_end
        kt = key_tok.to(tl.int64)
        ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=key_ok[:, None] & i_ok[None, :], other=0.0)
        dki = tl.zeros([BLOCK, DIP], tl.float32)
        for g in range(0, n_groups):
            kg = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            for qb in range(kb, n_tiles):
                tok = doc_start + qb * BLOCK + offs_n
                ok = tok < doc_end
                qt = tok.to(tl.int64)
                qi = tl.load(QI + qt[:, None] * stride_qit + g * stride_qig + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
                ilse = tl.load(ILSE + tl.cast(g, tl.int64) * stride_ig + qt, mask=ok, other=0.0) * 1.4426950408889634
                visible = (key_tok[:, None] <= tok[None, :]) & ok[None, :] & key_ok[:, None]
                p_idx = tl.where(visible, tl.exp2(tl.dot(ki, tl.trans(qi)) * iqk_scale - ilse[None, :]), 0.0)
                p_t = tl.zeros([BLOCK, BLOCK], tl.float32)
                for h in range(R):
                    head = g * R + h
                    qh = tl.load(Q + qt[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
                    lse = tl.load(LSE + qt * stride_lt + head, mask=ok, other=0.0) * 1.4426950408889634
                    p_t += tl.where(visible, tl.exp2(tl.dot(kg, tl.trans(qh)) * qk_scale - lse[None, :]), 0.0)
                ds = (p_idx - p_t * (1.0 / R)).to(qi.dtype)
                dki += tl.dot(ds, qi)
        tl.store(DKI + kt[:, None] * stride_dkt + offs_i[None, :], dki * grad_scale, mask=key_ok[:, None] & i_ok[None, :])


def dense_kl(q, k, lse, qi, ki, cu_seqlens, softmax_scale, index_scale, total_groups):
    """(KL value, dqi, dki) with the support = every visible token of the document."""
    total, hq, d = q.shape
    groups, di = qi.shape[1], qi.shape[2]
    r = hq // groups
    D, DIP = max(16, next_pow2(d)), max(16, next_pow2(di))
    ki2 = ki.reshape(total, di).contiguous()
    lse = lse.contiguous()
    grad_scale = index_scale / (total * total_groups)
    block = CONFIG["dense_block"]
    start, end, blk, n_rows = doc_rows(cu_seqlens.to(q.device), total, block)
    dqi = new_buffer((total, groups, di), torch.float32, q.device)
    dki = new_buffer((total, 1, di), torch.float32, q.device)
    ilse = new_buffer((groups, total), torch.float32, q.device)
    kl_row = new_buffer((groups, total), torch.float32, q.device)
    if total == 0:
        return torch.zeros((), device=q.device), dqi, dki
    order = torch.argsort(blk, descending=True, stable=True).to(torch.int32)
    common = dict(HEAD_DIM=d, D=D, DI=di, DIP=DIP, R=r, BLOCK=block,
                  num_warps=CONFIG["dense_warps"], num_stages=CONFIG["dense_stages"])
    _kl_dense_query_kernel[(groups, n_rows)](
        q, k, qi, ki2, lse, ilse, dqi, kl_row, order, start, end, blk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0), qi.stride(1), ki2.stride(0),
        lse.stride(0), ilse.stride(0), dqi.stride(0), dqi.stride(1),
        softmax_scale * LOG2E, index_scale * LOG2E, grad_scale, **common,
    )
    remaining = (end.to(torch.int64) - start + block - 1) // block  # query tiles at or after the key tile
    korder = torch.argsort(remaining, descending=True, stable=True).to(torch.int32)
    _kl_dense_key_kernel[(n_rows,)](
        q, k, qi, ki2, lse, ilse, dki, korder, start, end, blk, groups,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0), qi.stride(1), ki2.stride(0),
        lse.stride(0), ilse.stride(0), dki.stride(0),
        softmax_scale * LOG2E, index_scale * LOG2E, grad_scale, **common,
    )
    value = kl_row.sum() / (total * total_groups)
    return value, dqi, dki


class IndexerKL(torch.autograd.Function):
    """Forward returns the KL value; the same pass already produced dqi, dki (kept for backward)."""

    @staticmethod
    def forward(ctx, qi, ki, compute):
        value, dqi, dki = compute()
        ctx.save_for_backward(dqi, dki)
        ctx.dtypes = (qi.dtype, ki.dtype)
        ctx.ki_shape = ki.shape
        return value

    @staticmethod
    def backward(ctx, grad):
        dqi, dki = ctx.saved_tensors
        return (dqi * grad).to(ctx.dtypes[0]), (dki * grad).reshape(ctx.ki_shape).to(ctx.dtypes[1]), None
