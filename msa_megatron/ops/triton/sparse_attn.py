"""Sparse attention over the MSA selection: KV-outer forward and backward.

A program owns one KV block (of one group) and the queries that selected it (a plan tile). It
gathers those queries' r heads into one row tile (64 rows = 4 queries x 16 heads at r = 16), so
the MMAs run at full width whatever r is, and K/V of the block are read once per tile.

Forward: each (query, slot) gets a partial output normalised over its one block, plus that block's
log-sum-exp; a combine kernel merges a query's <= k partials. Backward: the program accumulates
dK/dV of its block over its queries in registers (no atomics) and writes each query's dQ share
into a per-slot buffer; two deterministic sums finish dQ and dK/dV. Queries run in chunks so the
per-slot buffers stay bounded (common.query_chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import new_buffer, next_pow2, on_sm90, timed
from msa_megatron.ops.triton.plan import SparsePlan, load_tile, program_tile
from msa_megatron.ops.triton.rows import key_pos

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Launch knobs (fastest on an H200 for Hq 64 / Hkv 4 / d 128, tools/bench_kernels.py --autotune;
# fwd_prefetch and the backward's step on an H100, round 5).
# rows = (query, head) rows per product. dq_part_fp32: keep dQ partials in fp32 (2x the buffer and
# its traffic, slightly smaller error; default bf16). fwd_prefetch: gather a forward step's query
# rows one step ahead (see the kernel). kl_in_backward: training steps of the sparse
# stage build the KL teacher in this backward (attention_kl.py) instead of a separate KL pass.
# bwd_hopper: on an sm_90 GPU, the backward runs the Gluon kernel of sparse_bwd_hopper.py where it
# serves the shapes (the Triton kernel below is its twin and the fallback). fwd_hopper: the same for
# the forward (sparse_fwd_hopper.py).
CONFIG = {
    "fwd_rows": 64, "fwd_warps": 4, "fwd_stages": 1, "fwd_prefetch": True, "fwd_hopper": True,
    "bwd_rows": 64, "bwd_warps": 8, "bwd_stages": 3, "bwd_hopper": True,
    "dq_part_fp32": False, "kl_in_backward": True,
}


# --------------------------------------------------------------------------- forward


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O_part, L_part, QPOS,
    tiles, order, entry_tok, entry_slot, row_key_start, row_key_end,
    tile0, q0,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QPOS: tl.constexpr, PREFETCH: tl.constexpr,
):
    _, t = program_tile(order, tile0)
    g, row, e0, cnt, key_start, key_end = load_tile(tiles, t, row_key_start, row_key_end)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    d_ok = offs_d < HEAD_DIM
    key_tok = key_start + offs_n
    key_ok = key_tok < key_end
    kv_mask = key_ok[:, None] & d_ok[None, :]
    kt = key_tok.to(tl.int64)
    k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kt[:, None] * stride_vt + g * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

    # Row m of a sub-tile = query (m // R), head (m % R) of the group.
    BQ: tl.constexpr = BLOCK_M // R
    offs_m = tl.arange(0, BLOCK_M)
    q_in = offs_m // R
    head = g * R + offs_m % R
    row_used = offs_m < BQ * R
    # PREFETCH: the next step's query rows are gathered before this step's products (a register
    # double buffer; the loop is not software-pipelined), so one gather is always in flight.
    if PREFETCH:
        ok, tok, slot, q = _gather_step(Q, entry_tok, entry_slot, e0, cnt, 0, q_in, row_used, head, offs_d, d_ok,
                                        stride_qt, stride_qh)
    for s0 in range(0, cnt, BQ):
        if PREFETCH:
            ok_n, tok_n, slot_n, q_n = _gather_step(Q, entry_tok, entry_slot, e0, cnt, s0 + BQ, q_in, row_used, head,
                                                    offs_d, d_ok, stride_qt, stride_qh)
        else:
            ok, tok, slot, q = _gather_step(Q, entry_tok, entry_slot, e0, cnt, s0, q_in, row_used, head, offs_d, d_ok,
                                            stride_qt, stride_qh)
        qt = tok.to(tl.int64)
        s = tl.dot(q, tl.trans(k))
        visible = (key_tok[None, :] <= key_pos(QPOS, tok, ok, HAS_QPOS)[:, None]) & key_ok[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m = tl.where(ok, tl.max(s, 1), 0.0)
        p = tl.exp2(s - m[:, None])
        l = tl.where(ok, tl.sum(p, 1), 1.0)
        o = tl.dot(p.to(v.dtype), v) / l[:, None]
        part = slot.to(tl.int64) * stride_ps + (qt - q0) * stride_pt + head * stride_ph
        tl.store(O_part + part[:, None] + offs_d[None, :], o.to(O_part.dtype.element_ty),
                 mask=ok[:, None] & d_ok[None, :])
        lpart = slot.to(tl.int64) * stride_ls + (qt - q0) * stride_lt + head
        tl.store(L_part + lpart, (m + tl.log2(l)) * 0.6931471805599453, mask=ok)
        if PREFETCH:
            ok, tok, slot, q = ok_n, tok_n, slot_n, q_n


@triton.jit
def _gather_step(Q, entry_tok, entry_slot, e0, cnt, s0, q_in, row_used, head, offs_d, d_ok, stride_qt, stride_qh):
    """(row ok, query token, slot, query rows [M, D]) of the forward step starting at tile entry s0."""
    e = s0 + q_in
    ok = row_used & (e < cnt)
    tok = tl.load(entry_tok + e0 + e, mask=ok, other=0)
    slot = tl.load(entry_slot + e0 + e, mask=ok, other=0)
    qt = tok.to(tl.int64)
    q = tl.load(Q + qt[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    return ok, tok, slot, q


@triton.jit
def _slot_index(s, WIDE: tl.constexpr):
    """A slot (or slice) index for offset arithmetic: int64 when the buffer is `wide`, else as it is
    (int32), which keeps round 15's code for every smaller buffer."""
    if WIDE:
        s = tl.cast(s, tl.int64)
    return s


@triton.jit
def _sparse_combine_kernel(
    O_part, L_part, TopK, O, LSE,
    q0, q1, n_slot,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    stride_kg, stride_kt, stride_ot, stride_oh, stride_lset,
    KP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    ROWS: tl.constexpr, WIDE: tl.constexpr,
):
    """o = sum_s w_s o_s, w_s = exp(lse_s - lse), over the valid slots of (query, group).

    A program takes ROWS (query, head) rows: ROWS // RP queries x the group's heads. The slot
    loop is a run-time loop so the 16 partial tiles are streamed, not all held in registers.
    WIDE (o_part spanning 2^31 elements or more): 64-bit slot offsets, else int32 ones (`wide`).
    """
    g = tl.program_id(1)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, KP)
    i = q0 + tl.program_id(0) * (ROWS // RP) + offs_r // RP
    ok = (i < q1) & (offs_r % RP < R)
    head = g * R + offs_r % RP
    il = (i - q0).to(tl.int64)
    sel = TopK + g.to(tl.int64) * stride_kg + i.to(tl.int64) * stride_kt
    dmask = (offs_d < HEAD_DIM)[None, :]
    # All slots' lse at once: [KP, ROWS].
    slot_ok = (offs_s[:, None] < n_slot) & ok[None, :]
    valid2 = slot_ok & (tl.load(sel[None, :] + offs_s[:, None], mask=slot_ok, other=-1) >= 0)
    lp = tl.load(L_part + _slot_index(offs_s, WIDE)[:, None] * stride_ls + il[None, :] * stride_lt + head[None, :],
                 mask=valid2, other=float("-inf"))
    m = tl.where(ok, tl.max(lp, 0), 0.0)
    den = tl.where(ok, tl.sum(tl.exp(lp - m[None, :]), 0), 1.0)
    lse = m + tl.log(den)
    acc = tl.zeros([ROWS, D], tl.float32)
    for s in range(0, n_slot):
        valid = ok & (tl.load(sel + s, mask=ok, other=-1) >= 0)
        sw = _slot_index(s, WIDE)
        w = tl.exp(tl.load(L_part + sw * stride_ls + il * stride_lt + head, mask=valid, other=float("-inf")) - lse)
        op = tl.load(O_part + sw * stride_ps + il[:, None] * stride_pt + head[:, None] * stride_ph + offs_d[None, :],
                     mask=valid[:, None] & dmask, other=0.0)
        acc += w[:, None] * op.to(tl.float32)
    it = i.to(tl.int64)
    tl.store(O + it[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=ok[:, None] & dmask)
    tl.store(LSE + it * stride_lset + head, lse, mask=ok)


def wide(part) -> bool:
    """Whether a per-slot buffer needs 64-bit offsets: its last element lies 2^31 or more elements
    past its first (e.g. k 17 at the 16384-query chunk with 64 heads). Others keep int32 offsets:
    the 64-bit kernels were 1% (combine) and 23-25% (dq sum) slower on an H100 (round 17: each
    16-byte load finished before the next was issued)."""
    return sum((n - 1) * st for n, st in zip(part.shape, part.stride())) >= 2**31


def _rows_per_program(r: int, d: int) -> int:
    """(query, head) rows per combine / slot-sum program: about 8K elements of [rows, d]."""
    return max(next_pow2(r), min(64, 8192 // max(16, next_pow2(d))))


def sparse_forward(q, k, v, topk, plan: SparsePlan, softmax_scale: float):
    total, hq, d = q.shape
    groups = k.shape[1]
    r = hq // groups
    nslot = topk.shape[-1]
    D = max(16, next_pow2(d))
    o = new_buffer((total, hq, d), q.dtype, q.device)
    lse = new_buffer((total, hq), torch.float32, q.device)
    if total == 0:
        return o, lse
    chunk = plan.chunk
    o_part = new_buffer((nslot, chunk, hq, d), q.dtype, q.device)
    l_part = new_buffer((nslot, chunk, hq), torch.float32, q.device)
    cfg = CONFIG
    block_m = max(cfg["fwd_rows"], next_pow2(r))
    tiles = plan.tiles["fwd"]
    hopper = _hopper_forward(q, k, v, o_part, l_part, block_m, plan.block_size)
    for c in range(plan.n_chunks):
        q0, q1 = plan.chunk_bounds(c)
        t0, t1 = tiles.chunk_range(c)
        if q1 > q0:
            with timed("sparse fwd kernel"):
                if hopper is not None:
                    hopper.launch(t1 - t0, plan, tiles, t0, q0, softmax_scale * LOG2E)
                else:
                    _sparse_fwd_kernel[(t1 - t0,)](
                        q, k, v, o_part, l_part, plan.qpos_arg(lse),
                        tiles.tiles, tiles.order, plan.entry_tok, plan.entry_slot, plan.row_key_start,
                        plan.row_key_end, t0, q0,
                        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                        o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
                        softmax_scale * LOG2E,
                        HEAD_DIM=d, D=D, R=r, BLOCK_M=block_m, BLOCK_N=plan.block_size, HAS_QPOS=plan.has_qpos,
                        PREFETCH=cfg["fwd_prefetch"], num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
                    )
        combine(o_part, l_part, topk, o, lse, q0, q1, r)
    return o, lse


def combine(o_part, l_part, topk, o, lse, q0, q1, r):
    """o[q0:q1], lse[q0:q1] from the slot partials o_part [k, chunk, H, d], l_part [k, chunk, H]."""
    d = o.shape[-1]
    rows = _rows_per_program(r, d)
    with timed("sparse fwd combine"):
        _sparse_combine_kernel[(triton.cdiv(q1 - q0, rows // next_pow2(r)), topk.shape[0])](
            o_part, l_part, topk, o, lse,
            q0, q1, topk.shape[-1],
            o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
            topk.stride(0), topk.stride(1), o.stride(0), o.stride(1), lse.stride(0),
            KP=next_pow2(topk.shape[-1]), HEAD_DIM=d, D=max(16, next_pow2(d)), R=r, RP=next_pow2(r), ROWS=rows,
            WIDE=wide(o_part), num_warps=4,
        )


# --------------------------------------------------------------------------- backward


@triton.jit
def _attn_delta_kernel(O, DO, DLSE, DELTA, n_rows, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(o * do) - dlse, rows = (token, head) pairs of contiguous [T, Hq, d] tensors."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = rows < n_rows
    ptr = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


def attention_delta(o, do, dlse):
    total, hq, d = o.shape
    delta = torch.empty((total, hq), dtype=torch.float32, device=o.device)
    n = total * hq
    block = 64
    has = dlse is not None
    with timed("bwd delta"):
        _attn_delta_kernel[(triton.cdiv(n, block),)](
            o, do, dlse.contiguous() if has else delta, delta, n,
            HEAD_DIM=d, D=max(16, next_pow2(d)), BLOCK=block, HAS_DLSE=has, num_warps=4,
        )
    return delta


@triton.jit
def _sparse_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ_part, DK_ws, DV_ws, DK_acc, DV_acc, QPOS, TEACHER,
    tiles, order, entry_tok, entry_slot, row_key_start, row_key_end, seg_tile_count,
    tile0, q0, seg0, n_rows,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lt, stride_ps, stride_pt, stride_ph, stride_at, stride_ag, stride_ts, stride_tt, stride_tg,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QPOS: tl.constexpr, WITH_TEACHER: tl.constexpr,
):
    """Keys are the rows of every product here (S^T = K Q^T), so dK/dV accumulate in place.

    A block whose queries (in this chunk) fit one tile adds its dK/dV straight into the fp32
    accumulators (it is their only writer in this launch); otherwise the tile's share goes to a
    workspace that _block_ws_sum_kernel adds in a fixed order.

    WITH_TEACHER (R a power of two, BLOCK_M = BQ * R): the step's probabilities are also the KL
    teacher's: their mean over each query's r heads goes to TEACHER[slot, query - q0, g, key], so
    the KL needs no second pass over the main scores.
    """
    tl_local, t = program_tile(order, tile0)
    g, row, e0, cnt, key_start, key_end = load_tile(tiles, t, row_key_start, row_key_end)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    d_ok = offs_d < HEAD_DIM
    key_tok = key_start + offs_n
    key_ok = key_tok < key_end
    kv_mask = key_ok[:, None] & d_ok[None, :]
    kt = key_tok.to(tl.int64)
    k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kt[:, None] * stride_vt + g * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    BQ: tl.constexpr = BLOCK_M // R
    offs_m = tl.arange(0, BLOCK_M)
    q_in = offs_m // R
    head = g * R + offs_m % R
    row_used = offs_m < BQ * R
    for s0 in range(0, cnt, BQ):
        e = s0 + q_in
        ok = row_used & (e < cnt)
        tok = tl.load(entry_tok + e0 + e, mask=ok, other=0)
        slot = tl.load(entry_slot + e0 + e, mask=ok, other=0)
        qt = tok.to(tl.int64)
        qmask = ok[:, None] & d_ok[None, :]
        q = tl.load(Q + qt[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + qt[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + qt * stride_lt + head, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + qt * stride_lt + head, mask=ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q))  # [N, M]
        visible = (key_tok[:, None] <= key_pos(QPOS, tok, ok, HAS_QPOS)[None, :]) & key_ok[:, None] & ok[None, :]
        p_t = tl.where(visible, tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        if WITH_TEACHER:
            # column m of p_t is query m // R, head m % R: the mean over heads is a reshape + sum
            teach = tl.sum(tl.reshape(p_t, [BLOCK_N, BQ, R]), 2) * (1.0 / R)
            j = tl.arange(0, BQ)
            ej_ok = s0 + j < cnt
            tj = tl.load(entry_tok + e0 + s0 + j, mask=ej_ok, other=q0).to(tl.int64)
            sj = tl.load(entry_slot + e0 + s0 + j, mask=ej_ok, other=0).to(tl.int64)
            toff = sj * stride_ts + (tj - q0) * stride_tt + g * stride_tg
            tl.store(TEACHER + toff[None, :] + offs_n[:, None], teach, mask=key_ok[:, None] & ej_ok[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        dq = tl.dot(tl.trans(ds_t), k) * sm_scale
        part = slot.to(tl.int64) * stride_ps + (qt - q0) * stride_pt + head * stride_ph
        tl.store(DQ_part + part[:, None] + offs_d[None, :], dq.to(DQ_part.dtype.element_ty), mask=qmask)
    if tl.load(seg_tile_count + seg0 + g * n_rows + row) == 1:
        acc = kt[:, None] * stride_at + g * stride_ag + offs_d[None, :]
        tl.store(DK_acc + acc, tl.load(DK_acc + acc, mask=kv_mask, other=0.0) + dk * sm_scale, mask=kv_mask)
        tl.store(DV_acc + acc, tl.load(DV_acc + acc, mask=kv_mask, other=0.0) + dv, mask=kv_mask)
    else:
        ws = tl_local.to(tl.int64) * BLOCK_N * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK_ws + ws, dk * sm_scale)
        tl.store(DV_ws + ws, dv)


@triton.jit
def _slot_sum_kernel(
    Part, TopK, Out, q0, q1, n_slot, n_slice, scale,
    stride_px, stride_ps, stride_pt, stride_ph, stride_kg, stride_kt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, ROWS: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Out[i, head] = scale * sum over the valid slots s and the slices x of Part[x, s, i - q0, head]
    (fixed order).

    Rows as in the combine kernel: ROWS // RP queries x the heads of group program_id(1). WIDE as
    in the combine kernel.
    """
    g = tl.program_id(1)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    i = q0 + tl.program_id(0) * (ROWS // RP) + offs_r // RP
    ok = (i < q1) & (offs_r % RP < R)
    head = g * R + offs_r % RP
    il = (i - q0).to(tl.int64)
    sel = TopK + g.to(tl.int64) * stride_kg + i.to(tl.int64) * stride_kt
    dmask = (offs_d < HEAD_DIM)[None, :]
    acc = tl.zeros([ROWS, D], tl.float32)
    for s in range(0, n_slot):
        valid = ok & (tl.load(sel + s, mask=ok, other=-1) >= 0)
        for x in range(0, n_slice):
            acc += tl.load(Part + _slot_index(x, WIDE) * stride_px + _slot_index(s, WIDE) * stride_ps
                           + il[:, None] * stride_pt + head[:, None] * stride_ph + offs_d[None, :],
                           mask=valid[:, None] & dmask, other=0.0).to(tl.float32)
    it = i.to(tl.int64)
    tl.store(Out + it[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             (acc * scale).to(Out.dtype.element_ty), mask=ok[:, None] & dmask)


def slot_sum(part, topk, out, q0, q1, scale, r):
    """out[q0:q1] = scale * (sum of part over each (query, group)'s valid slots); part [k, chunk, H, d],
    or [slices, k, chunk, H, d] (summed over the slices too)."""
    d = out.shape[-1]
    rows = _rows_per_program(r, d)
    part = part.unsqueeze(0) if part.dim() == 4 else part
    with timed("slot sum (dq / dqi)"):
        _slot_sum_kernel[(triton.cdiv(q1 - q0, rows // next_pow2(r)), topk.shape[0])](
            part, topk, out, q0, q1, topk.shape[-1], part.shape[0], scale,
            part.stride(0), part.stride(1), part.stride(2), part.stride(3), topk.stride(0), topk.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=d, D=max(16, next_pow2(d)), R=r, RP=next_pow2(r), ROWS=rows, WIDE=wide(part), num_warps=4,
        )


@triton.jit
def _block_ws_sum_kernel(
    WS, Out, seg_tile_first, seg_tile_count, row_key_start, row_key_end,
    seg0, tile0, n_rows, n_groups,
    stride_ot, stride_og,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, ALL_GROUPS: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
):
    """Out[keys of row, g] += sum of the row's tile partials (fixed order; no atomics).

    One program per (row, g); with ALL_GROUPS the program sums the partials of every group into
    Out[keys, 0] (the index key is shared by all groups). SKIP_SINGLE: segments of one tile were
    already added by the tile itself.
    """
    row = tl.program_id(0)
    g = tl.program_id(1)
    key_start = tl.load(row_key_start + row)
    key_end = tl.load(row_key_end + row)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    any_tile = 0
    g_lo = g
    g_hi = g + 1
    if ALL_GROUPS:
        g_lo = 0
        g_hi = n_groups
    for gg in range(g_lo, g_hi):
        seg = seg0 + gg * n_rows + row
        first = tl.load(seg_tile_first + seg) - tile0
        n = tl.load(seg_tile_count + seg)
        if SKIP_SINGLE:
            n = tl.where(n == 1, 0, n)
        any_tile += n
        for j in range(0, n):
            acc += tl.load(WS + (first + j).to(tl.int64) * BLOCK_N * D + offs_n[:, None] * D + offs_d[None, :])
    if any_tile > 0:
        key_tok = key_start + offs_n
        mask = (key_tok < key_end)[:, None] & (offs_d < HEAD_DIM)[None, :]
        ptr = Out + key_tok.to(tl.int64)[:, None] * stride_ot + g * stride_og + offs_d[None, :]
        acc += tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, acc, mask=mask)


def _on_hopper(knob: str, q) -> bool:
    """The Gluon kernel behind `knob` is on and q lives on an sm_90 GPU."""
    return bool(CONFIG[knob]) and on_sm90(q)


def _hopper_forward(q, k, v, o_part, l_part, block_m: int, block_n: int):
    """The Gluon forward's launcher for this call, or None where the Triton kernel runs."""
    if not _on_hopper("fwd_hopper", q):
        return None
    from msa_megatron.ops.triton import sparse_fwd_hopper

    if not sparse_fwd_hopper.serves(q, k, v, o_part, l_part, block_m, block_n):
        return None
    return sparse_fwd_hopper.HopperForward(q, k, v, o_part, l_part)


def _hopper_backward(q, k, v, do, lse, delta, dq_part, block_m: int, block_n: int, teacher):
    """The Gluon backward's launcher for this call, or None where the Triton kernel runs."""
    if not _on_hopper("bwd_hopper", q):
        return None
    from msa_megatron.ops.triton import sparse_bwd_hopper

    if not sparse_bwd_hopper.serves(q, k, v, do, lse, delta, dq_part, block_m, block_n, teacher):
        return None
    return sparse_bwd_hopper.HopperBackward(q, k, v, do, lse, delta, dq_part)


def teacher_in_backward(r: int) -> bool:
    """The backward can hand the KL its teacher when a step's rows are whole queries' r heads."""
    return r & (r - 1) == 0 and max(CONFIG["bwd_rows"], r) % r == 0


def sparse_backward(do, q, k, v, o, lse, dlse, topk, plan: SparsePlan, softmax_scale: float, on_teacher=None):
    """(dq, dk, dv). on_teacher(c, teacher): called after query chunk c's kernel with the KL
    teacher of its entries, [k, chunk, G, Bk] fp32 (mean over heads; 0 where not visible); the
    buffer is reused by the next chunk. Needs teacher_in_backward(r)."""
    total, hq, d = q.shape
    groups = k.shape[1]
    r = hq // groups
    nslot = topk.shape[-1]
    D = max(16, next_pow2(d))
    dk_acc = torch.zeros((k.shape[0], groups, d), dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros((k.shape[0], groups, d), dtype=torch.float32, device=q.device)
    if total == 0:
        return torch.zeros_like(q), dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    do = do.contiguous()
    delta = attention_delta(o, do, dlse)
    dq = new_buffer((total, hq, d), q.dtype, q.device)
    chunk = plan.chunk
    dq_part = new_buffer((nslot, chunk, hq, d), torch.float32 if CONFIG["dq_part_fp32"] else q.dtype, q.device)
    cfg = CONFIG
    block_m = max(cfg["bwd_rows"], next_pow2(r))
    tiles = plan.tiles["bwd"]
    bn = plan.block_size
    with_teacher = on_teacher is not None
    if with_teacher and not teacher_in_backward(r):
        raise ValueError(f"the backward cannot build the KL teacher for {r} heads per group")
    teacher = new_buffer((nslot, chunk, groups, bn), torch.float32, q.device) if with_teacher else dq_part
    hopper = _hopper_backward(q, k, v, do, lse, delta, dq_part, block_m, bn, teacher if with_teacher else None)
    for c in range(plan.n_chunks):
        q0, q1 = plan.chunk_bounds(c)
        t0, t1 = tiles.chunk_range(c)
        if q1 > q0:
            dk_ws = new_buffer((t1 - t0, bn, D), torch.float32, q.device)
            dv_ws = new_buffer((t1 - t0, bn, D), torch.float32, q.device)
            seg0 = c * groups * plan.n_rows
            with timed("sparse bwd kernel"):
                if hopper is not None:
                    hopper.launch(t1 - t0, dk_ws, dv_ws, dk_acc, dv_acc, teacher, plan, tiles, t0, q0, seg0,
                                  softmax_scale, with_teacher)
                else:
                    _sparse_bwd_kernel[(t1 - t0,)](
                        q, k, v, do, lse, delta, dq_part, dk_ws, dv_ws, dk_acc, dv_acc, plan.qpos_arg(lse), teacher,
                        tiles.tiles, tiles.order, plan.entry_tok, plan.entry_slot, plan.row_key_start,
                        plan.row_key_end, tiles.seg_tile_count,
                        t0, q0, seg0, plan.n_rows,
                        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                        do.stride(0), do.stride(1), lse.stride(0),
                        dq_part.stride(0), dq_part.stride(1), dq_part.stride(2), dk_acc.stride(0), dk_acc.stride(1),
                        teacher.stride(0), teacher.stride(1), teacher.stride(2),
                        softmax_scale, softmax_scale * LOG2E,
                        HEAD_DIM=d, D=D, R=r, BLOCK_M=block_m, BLOCK_N=bn, HAS_QPOS=plan.has_qpos,
                        WITH_TEACHER=with_teacher, num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"],
                    )
            for ws, acc in ((dk_ws, dk_acc), (dv_ws, dv_acc)):
                with timed("bwd dK/dV workspace sum"):
                    _block_ws_sum_kernel[(plan.n_rows, groups)](
                        ws, acc, tiles.seg_tile_first, tiles.seg_tile_count, plan.row_key_start, plan.row_key_end,
                        seg0, t0, plan.n_rows, groups, acc.stride(0), acc.stride(1),
                        HEAD_DIM=d, D=D, BLOCK_N=bn, ALL_GROUPS=False, SKIP_SINGLE=True, num_warps=8,
                    )
            del dk_ws, dv_ws, ws  # freed before the next chunk's (and the KL's) workspaces are allocated
            if with_teacher:
                on_teacher(c, teacher)
        slot_sum(dq_part, topk, dq, q0, q1, 1.0, r)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, topk, plan, softmax_scale):
        ctx.set_materialize_grads(False)  # an unused lse gives dlse None: no extra pass
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        topk = topk.contiguous()
        o, lse = sparse_forward(q, k, v, topk, plan, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, topk)
        ctx.plan = plan
        ctx.softmax_scale = softmax_scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, topk = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = sparse_backward(do, q, k, v, o, lse, dlse, topk, ctx.plan, ctx.softmax_scale)
        return dq, dk, dv, None, None, None
