"""Varlen causal GQA flash attention with lse (dense warm-up stage), forward and backward.

Tiles are document-aligned (tile j of a document starts at its position j * BLOCK), so no tile
mixes documents and only the diagonal tile needs the causal mask. Forward: one program per
(query tile, head). Backward: a key-owner program per (key tile, KV head) accumulates dK/dV over
the group's heads and later query tiles; a query-owner program per (query tile, head)
accumulates dQ. Deterministic, no atomics. Long tiles are launched first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import new_buffer, next_pow2
from msa_megatron.ops.triton.indexer import doc_rows
from msa_megatron.ops.triton.sparse_attn import attention_delta

LOG2E = 1.4426950408889634

CONFIG = {"fwd_block": 128, "fwd_warps": 8, "fwd_stages": 2, "bwd_block": 64, "bwd_warps": 4, "bwd_stages": 2}


@triton.jit
def _dense_fwd_kernel(
    Q, K, V, O, LSE,
    row_order, row_start, row_end, row_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt,
    qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
):
    h = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_start = tl.load(row_start + r)
    q_end = tl.load(row_end + r)
    L = tl.load(row_blk + r)
    if q_start < q_end:
        g = h // R
        doc_start = q_start - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        d_ok = offs_d < HEAD_DIM
        tok = q_start + offs_m
        ok = tok < q_end
        qt = tok.to(tl.int64)
        q = tl.load(Q + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        for kb in range(0, L + 1):
            key_tok = doc_start + kb * BLOCK + offs_m
            kt = key_tok.to(tl.int64)
            kmask = (key_tok < q_end)[:, None] & d_ok[None, :]
            k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + kt[:, None] * stride_vt + g * stride_vh + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if kb == L:  # diagonal tile: causal mask
                s = tl.where(key_tok[None, :] <= tok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_i = tl.where(ok, l_i, 1.0)
        o = acc / l_i[:, None]
        tl.store(O + qt[:, None] * stride_ot + h * stride_oh + offs_d[None, :], o.to(O.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
        tl.store(LSE + qt * stride_lt + h, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=ok)


@triton.jit
def _dense_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    row_order, row_start, row_end, row_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
):
    """Q, DO: [T, Hq, d]; K, V, DK, DV: [T, Hkv, d] with the same strides; LSE, DELTA [T, Hq]."""
    g = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    k_start = tl.load(row_start + r)
    doc_end = tl.load(row_end + r)
    kb = tl.load(row_blk + r)
    if k_start < doc_end:
        doc_start = k_start - kb * BLOCK
        n_tiles = (doc_end - doc_start + BLOCK - 1) // BLOCK
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        d_ok = offs_d < HEAD_DIM
        key_tok = k_start + offs_n
        key_ok = key_tok < doc_end
        kt = key_tok.to(tl.int64)
        kmask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK, D], tl.float32)
        dv = tl.zeros([BLOCK, D], tl.float32)
        for h in range(g * R, g * R + R):
            for qb in range(kb, n_tiles):
                tok = doc_start + qb * BLOCK + offs_n
                ok = tok < doc_end
                qt = tok.to(tl.int64)
                qmask = ok[:, None] & d_ok[None, :]
                q = tl.load(Q + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(DO + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
                lse = tl.load(LSE + qt * stride_lt + h, mask=ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + qt * stride_lt + h, mask=ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]
                visible = (key_tok[:, None] <= tok[None, :]) & ok[None, :]
                p_t = tl.where(visible, tl.exp2(s_t), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do)
                dp_t = tl.dot(v, tl.trans(do))
                ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                dk += tl.dot(ds_t, q)
        tl.store(DK + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dense_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    row_order, row_start, row_end, row_blk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
):
    h = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_start = tl.load(row_start + r)
    q_end = tl.load(row_end + r)
    L = tl.load(row_blk + r)
    if q_start < q_end:
        g = h // R
        doc_start = q_start - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        d_ok = offs_d < HEAD_DIM
        tok = q_start + offs_m
        ok = tok < q_end
        qt = tok.to(tl.int64)
        qmask = ok[:, None] & d_ok[None, :]
        q = tl.load(Q + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + qt * stride_lt + h, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + qt * stride_lt + h, mask=ok, other=0.0)
        dq = tl.zeros([BLOCK, D], tl.float32)
        for kb in range(0, L + 1):
            key_tok = doc_start + kb * BLOCK + offs_m
            kt = key_tok.to(tl.int64)
            kmask = (key_tok < q_end)[:, None] & d_ok[None, :]
            k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]
            visible = (key_tok[None, :] <= tok[:, None]) & ok[:, None]
            p = tl.where(visible, tl.exp2(s), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += tl.dot(ds, k)
        tl.store(DQ + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


def _rows(cu_seqlens, total, block, device):
    start, end, blk, n_rows = doc_rows(cu_seqlens.to(device), total, block)
    order = torch.argsort(blk, descending=True, stable=True).to(torch.int32)
    remaining = (end.to(torch.int64) - start + block - 1) // block
    korder = torch.argsort(remaining, descending=True, stable=True).to(torch.int32)
    return start, end, blk, n_rows, order, korder


def dense_forward(q, k, v, cu_seqlens, softmax_scale):
    total, hq, d = q.shape
    groups = k.shape[1]
    block = CONFIG["fwd_block"]
    start, end, blk, n_rows, order, _ = _rows(cu_seqlens, total, block, q.device)
    o = new_buffer((total, hq, d), q.dtype, q.device)
    lse = new_buffer((total, hq), torch.float32, q.device)
    if total:
        _dense_fwd_kernel[(hq, n_rows)](
            q, k, v, o, lse, order, start, end, blk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), lse.stride(0),
            softmax_scale * LOG2E,
            HEAD_DIM=d, D=max(16, next_pow2(d)), R=hq // groups, BLOCK=block,
            num_warps=CONFIG["fwd_warps"], num_stages=CONFIG["fwd_stages"],
        )
    return o, lse


def dense_backward(do, q, k, v, o, lse, dlse, cu_seqlens, softmax_scale):
    total, hq, d = q.shape
    groups = k.shape[1]
    do = do.contiguous()
    delta = attention_delta(o, do, dlse)
    block = CONFIG["bwd_block"]
    start, end, blk, n_rows, order, korder = _rows(cu_seqlens, total, block, q.device)
    dq = new_buffer(q.shape, q.dtype, q.device)
    dk = new_buffer(k.shape, k.dtype, k.device)
    dv = new_buffer(v.shape, v.dtype, v.device)
    if total:
        common = dict(HEAD_DIM=d, D=max(16, next_pow2(d)), R=hq // groups, BLOCK=block,
                      num_warps=CONFIG["bwd_warps"], num_stages=CONFIG["bwd_stages"])
        _dense_dkdv_kernel[(groups, n_rows)](
            q, k, v, do, lse, delta, dk, dv, korder, start, end, blk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
            softmax_scale, softmax_scale * LOG2E, **common,
        )
        _dense_dq_kernel[(hq, n_rows)](
            q, k, v, do, lse, delta, dq, order, start, end, blk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
            softmax_scale, softmax_scale * LOG2E, **common,
        )
    return dq, dk, dv


class DenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, softmax_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = dense_forward(q, k, v, cu_seqlens, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.softmax_scale = softmax_scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = dense_backward(do, q, k, v, o, lse, dlse, cu_seqlens, ctx.softmax_scale)
        return dq, dk, dv, None, None
