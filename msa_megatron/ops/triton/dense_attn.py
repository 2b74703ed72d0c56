"""Dense causal GQA attention inside each document, with its lse (dense warm-up; attention=gqa).

The main path is the fastest library kernel PyTorch carries (cuDNN, else flash; dense_lib.py),
called on the packed tensors without padding any document, with the natural-log lse the KL needs.
The first call per device and head shape checks each candidate against this module's Triton
kernels and takes the first that agrees. MSA_DENSE_BACKEND=<candidate>|triton forces one.

The Triton kernels below are the fallback, the qpos (context-parallel) path, and the backward
when the lse itself receives a gradient (the libraries' backward cannot take one): forward and
dQ are query-owner programs per (document block, head); dK/dV a key-owner program per
(document block, KV head) over the group's heads and every later query. Deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton import dense_lib
from msa_megatron.ops.triton.common import interpreting, new_buffer, next_pow2, timed
from msa_megatron.ops.triton.rows import block_rows, key_pos, positions
from msa_megatron.ops.triton.sparse_attn import attention_delta

LOG2E = 1.4426950408889634

CONFIG = {"fwd_block": 128, "fwd_warps": 8, "fwd_stages": 2, "bwd_block": 64, "bwd_warps": 4, "bwd_stages": 2}


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _dense_fwd_kernel(
    Q, K, V, O, LSE, QPOS,
    row_order, row_key_start, row_blk, row_q_lo, row_q_hi,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt,
    qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    h = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_lo = tl.load(row_q_lo + r)
    q_hi = tl.load(row_q_hi + r)
    if q_lo < q_hi:
        L = tl.load(row_blk + r)
        g = h // R
        doc_start = tl.load(row_key_start + r) - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        d_ok = offs_d < HEAD_DIM
        qrow = q_lo + offs_m
        ok = qrow < q_hi
        pos = key_pos(QPOS, qrow, ok, HAS_QPOS)
        last = tl.max(tl.where(ok, pos, 0), 0)
        qt = qrow.to(tl.int64)
        q = tl.load(Q + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        for kb in range(0, L + 1):
            key_tok = doc_start + kb * BLOCK + offs_m
            kt = key_tok.to(tl.int64)
            kmask = (key_tok <= last)[:, None] & d_ok[None, :]
            k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + kt[:, None] * stride_vt + g * stride_vh + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if kb == L:  # diagonal block: causal mask
                s = tl.where(key_tok[None, :] <= pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(ok, m_new, 0.0)
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
    Q, K, V, DO, LSE, DELTA, DK, DV, QPOS,
    row_order, row_key_start, row_doc_end, row_q_lo, row_q_doc_end,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """Q, DO: [Tq, Hq, d]; K, V, DK, DV: [T, Hkv, d] with the same strides; LSE, DELTA [Tq, Hq].

    The key block's queries are every query row from its first one to its document's end, taken
    BLOCK at a time (not block-aligned when qpos leaves gaps), so the causal mask is always applied.
    """
    g = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    k_start = tl.load(row_key_start + r)
    doc_end = tl.load(row_doc_end + r)
    if k_start < doc_end:
        qa = tl.load(row_q_lo + r)
        qb = tl.load(row_q_doc_end + r)
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
            for m0 in range(qa, qb, BLOCK):
                qrow = m0 + offs_n
                ok = qrow < qb
                pos = key_pos(QPOS, qrow, ok, HAS_QPOS)
                qt = qrow.to(tl.int64)
                qmask = ok[:, None] & d_ok[None, :]
                q = tl.load(Q + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(DO + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
                lse = tl.load(LSE + qt * stride_lt + h, mask=ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + qt * stride_lt + h, mask=ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]
                visible = (key_tok[:, None] <= pos[None, :]) & ok[None, :]
                p_t = tl.where(visible, tl.exp2(s_t), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do)
                dp_t = tl.dot(v, tl.trans(do))
                ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                dk += tl.dot(ds_t, q)
        tl.store(DK + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dense_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, QPOS,
    row_order, row_key_start, row_blk, row_q_lo, row_q_hi,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    h = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_lo = tl.load(row_q_lo + r)
    q_hi = tl.load(row_q_hi + r)
    if q_lo < q_hi:
        L = tl.load(row_blk + r)
        g = h // R
        doc_start = tl.load(row_key_start + r) - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        d_ok = offs_d < HEAD_DIM
        qrow = q_lo + offs_m
        ok = qrow < q_hi
        pos = key_pos(QPOS, qrow, ok, HAS_QPOS)
        last = tl.max(tl.where(ok, pos, 0), 0)
        qt = qrow.to(tl.int64)
        qmask = ok[:, None] & d_ok[None, :]
        q = tl.load(Q + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + qt * stride_lt + h, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + qt * stride_lt + h, mask=ok, other=0.0)
        dq = tl.zeros([BLOCK, D], tl.float32)
        for kb in range(0, L + 1):
            key_tok = doc_start + kb * BLOCK + offs_m
            kt = key_tok.to(tl.int64)
            kmask = (key_tok <= last)[:, None] & d_ok[None, :]
            k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]
            visible = (key_tok[None, :] <= pos[:, None]) & ok[:, None]
            p = tl.where(visible, tl.exp2(s), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += tl.dot(ds, k)
        tl.store(DQ + qt[:, None] * stride_qt + h * stride_qh + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


def triton_forward(q, k, v, cu_seqlens, softmax_scale, qpos=None):
    total, hq, d = q.shape
    groups = k.shape[1]
    block = CONFIG["fwd_block"]
    rows = block_rows(cu_seqlens.to(q.device), k.shape[0], block, qpos)
    qp = positions(qpos, q.device)
    o = new_buffer((total, hq, d), q.dtype, q.device)
    lse = new_buffer((total, hq), torch.float32, q.device)
    if total:
        _dense_fwd_kernel[(hq, rows.n)](
            q, k, v, o, lse, qp if qp is not None else lse, rows.longest_first(), rows.key_start, rows.blk, rows.q_lo, rows.q_hi,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), lse.stride(0),
            softmax_scale * LOG2E,
            HEAD_DIM=d, D=max(16, next_pow2(d)), R=hq // groups, BLOCK=block, HAS_QPOS=qp is not None,
            num_warps=CONFIG["fwd_warps"], num_stages=CONFIG["fwd_stages"],
        )
    return o, lse


def triton_backward(do, q, k, v, o, lse, dlse, cu_seqlens, softmax_scale, qpos=None):
    total, hq, d = q.shape
    groups = k.shape[1]
    dq = new_buffer(q.shape, q.dtype, q.device)
    dk = torch.zeros_like(k)  # keys no query of this rank sees keep a zero gradient
    dv = torch.zeros_like(v)
    if total == 0:
        return dq, dk, dv
    do = do.contiguous()
    lse = lse.contiguous()
    delta = attention_delta(o, do, dlse)
    block = CONFIG["bwd_block"]
    rows = block_rows(cu_seqlens.to(q.device), k.shape[0], block, qpos)
    qp = positions(qpos, q.device)
    qp_arg = qp if qp is not None else lse
    common = dict(HEAD_DIM=d, D=max(16, next_pow2(d)), R=hq // groups, BLOCK=block, HAS_QPOS=qp is not None,
                  num_warps=CONFIG["bwd_warps"], num_stages=CONFIG["bwd_stages"])
    _dense_dkdv_kernel[(groups, rows.n)](
        q, k, v, do, lse, delta, dk, dv, qp_arg, rows.most_queries_first(), rows.key_start, rows.doc_end,
        rows.q_lo, rows.q_doc_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        softmax_scale, softmax_scale * LOG2E, **common,
    )
    _dense_dq_kernel[(hq, rows.n)](
        q, k, v, do, lse, delta, dq, qp_arg, rows.longest_first(), rows.key_start, rows.blk, rows.q_lo, rows.q_hi,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        softmax_scale, softmax_scale * LOG2E, **common,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------- dispatch


def _triton_reference(q, k, v, do, cu, scale):
    """Our kernels' (o, lse, (dq, dk, dv)): what a library candidate must agree with."""
    o, lse = triton_forward(q, k, v, cu, scale)
    return o, lse, triton_backward(do, q, k, v, o, lse, None, cu, scale)


def dense_backend(q, k, cu_seqlens, max_seqlen, qpos=None, edges=None) -> str:
    """The kernel family the dense attention of this batch runs on (see the module docstring);
    `edges`: the host's copy of cu_seqlens, when the caller has one."""
    if qpos is not None or interpreting() or q.device.type != "cuda" or q.shape[0] == 0:
        return "triton"
    return dense_lib.choose(q, k, dense_lib.batch_kind(q, cu_seqlens, max_seqlen, edges), _triton_reference)


class DenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, softmax_scale, max_seqlen, qpos, edges=None):
        ctx.set_materialize_grads(False)  # an unused lse gives dlse None: the library backward serves
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        name = dense_backend(q, k, cu_seqlens, max_seqlen, qpos, edges)
        state = ()
        with timed(f"dense attention fwd ({name})"):
            if name == "triton":
                o, lse = triton_forward(q, k, v, cu_seqlens, softmax_scale, qpos)
            else:
                o, lse, state = dense_lib.forward(name, q, k, v, cu_seqlens, max_seqlen, softmax_scale, edges)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, *([] if qpos is None else [qpos]), *state)
        ctx.meta = (name, softmax_scale, max_seqlen, qpos is not None, len(state), edges)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        name, scale, max_seqlen, has_qpos, n_state, edges = ctx.meta
        saved = ctx.saved_tensors
        q, k, v, o, lse, cu = saved[:6]
        qpos = saved[6] if has_qpos else None
        state = saved[len(saved) - n_state :] if n_state else ()
        do = torch.zeros_like(o) if do is None else do.contiguous()
        if name != "triton" and dlse is None:
            with timed(f"dense attention bwd ({name})"):
                dq, dk, dv = dense_lib.backward(name, do, q, k, v, o, state, cu, max_seqlen, scale, edges)
        else:
            with timed("dense attention bwd (triton)"):
                dq, dk, dv = triton_backward(do, q, k, v, o, lse, dlse, cu, scale, qpos)
        return dq, dk, dv, None, None, None, None, None
