"""KL(teacher || index) of MSA: the value and its gradient to qi, ki in one pass.

Teacher P_T = mean over the group's r heads of exp(scale q.k - lse) (main lse, q and k detached);
student P_idx = exp(index_scale qi.ki - index_lse). ds = P_idx - P_T on the support gives
dqi = c * sum_j ds ki_j and dki = c * sum_{i,g} ds qi, c = index_scale / (T * total_groups).

Sparse stage: KV-outer over the plan, as the attention (dki of a block accumulates in registers,
dqi goes to per-slot partials, then fixed-order sums). Dense warm-up: the student lse first (index
scores only, cheap), then one key-owner pass computes the teacher once per (query, key) and
everything that needs it (value, dki in registers, dqi shares per key block), then a fixed-order
sum of the shares. No atomics anywhere. The normaliser T is the key-row count (k.shape[0]), so
ranks holding a subset of the queries (qpos, context parallelism) sum to the whole KL.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_megatron.ops.triton.common import log2_approx, new_buffer, next_pow2, on_sm90, timed
from msa_megatron.ops.triton.plan import SparsePlan, load_tile, program_tile
from msa_megatron.ops.triton.rows import block_rows, edges_describe, key_pos, positions
from msa_megatron.ops.triton.sparse_attn import _block_ws_sum_kernel, slot_sum

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ILSE_BLOCK = 128  # query rows per program of the dense student-lse pass (index scores only)

# Launch knobs (H200, Hq 64 / Hkv 4 / d 128). Both KL kernels run the same step (_kl_step):
# *_rows = queries per step, *_query_rows its tile orientation, *_warps / *_stages as usual; kt_*:
# the sparse kernel when the attention backward built the teacher (SparseKL without q); kt_tiles
# names the plan's tile list it runs over ("kl": 128 entries a tile, "bwd": 256, fewer dki partials).
# Sparse: kl_split cuts each 128-key block into that many key slices, one program each (fewer
# registers; each slice writes its own dqi partial). Dense: dense_block = keys per program,
# dense_tma loads Q tiles with the tensor-memory accelerator (a host-side descriptor; rows of the
# dense pass are contiguous), dense_lse_heads_major reads the main lse from a [Hq, T] copy,
# dense_lse_ahead loads the next head's lse before this head's product (see _kl_step), the
# dqi-share workspace is bounded by dense_ws_mib (bf16 shares unless dense_ws_fp32), and the share
# sum runs in block segments so that each launch has about dense_dqi_programs programs (0: one
# segment; fp32 partials added in a fixed order). dense_hopper: on an sm_90 GPU, pass 2 runs the
# Gluon kernel of dense_kl_hopper.py (128-key blocks) where it serves the call (on since round 11).
CONFIG = {
    "kl_rows": 64, "kl_warps": 4, "kl_stages": 3, "kl_split": 2, "kl_query_rows": True,
    "kt_rows": 16, "kt_warps": 4, "kt_stages": 3, "kt_split": 1, "kt_query_rows": True, "kt_tiles": "bwd",
    "dense_block": 64, "dense_rows": 64, "dense_warps": 4, "dense_stages": 3, "dense_query_rows": True,
    "dense_tma": True, "dense_lse_heads_major": True, "dense_lse_ahead": True,
    "dense_ws_mib": 2048, "dense_ws_fp32": False, "dense_dqi_programs": 1024, "dense_hopper": True,
}


# --------------------------------------------------------------------------- sparse support


@triton.jit
def _kl_sparse_kernel(
    Q, K, QI, KI, LSE, ILSE, DQI_part, DKI_ws, KL_tile, QPOS, TEACHER,
    tiles, order, entry_tok, entry_slot, row_key_start, row_key_end,
    tile0, q0,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qit, stride_qig, stride_kit,
    stride_lt, stride_lh, stride_ig, stride_ps, stride_pt, stride_pg, stride_px, stride_ts, stride_tt, stride_tg,
    qk_scale, iqk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_QPOS: tl.constexpr,
    QUERY_ROWS: tl.constexpr, FROM_TEACHER: tl.constexpr,
):
    """One plan tile's key slice x (program_id 1 of SPLIT slices of BLOCK_N keys): BLOCK_M of the
    tile's queries per step, each step the same teacher/student/ds step as the dense pass.
    FROM_TEACHER: the teacher comes from TEACHER[slot, query - q0, g, key of the block] (written by
    the attention backward), so K, Q and the main lse are not read.

    dki of the slice accumulates in registers and goes to the tile's workspace rows; each (query,
    slot)'s dqi share of the slice goes to its partial (one per slice, summed by slot_sum).
    """
    t_local, t = program_tile(order, tile0)
    x = tl.program_id(1)
    g, row, e0, cnt, key_start, key_end = load_tile(tiles, t, row_key_start, row_key_end)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_i = tl.arange(0, DIP)
    i_ok = offs_i < DI
    key_tok = key_start + x * BLOCK_N + offs_n
    key_ok = key_tok < key_end
    kt = key_tok.to(tl.int64)
    if FROM_TEACHER:
        k = key_tok  # unused
    else:
        k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=key_ok[:, None] & i_ok[None, :], other=0.0)
    dki = tl.zeros([BLOCK_N, DIP], tl.float32)
    kl = tl.zeros([BLOCK_M], tl.float32)
    key_in_block = x * BLOCK_N + offs_n

    offs_m = tl.arange(0, BLOCK_M)
    for s0 in range(0, cnt, BLOCK_M):
        ok = s0 + offs_m < cnt
        tok = tl.load(entry_tok + e0 + s0 + offs_m, mask=ok, other=0)
        slot = tl.load(entry_slot + e0 + s0 + offs_m, mask=ok, other=0)
        pos = key_pos(QPOS, tok, ok, HAS_QPOS)
        toff = slot.to(tl.int64) * stride_ts + (tok.to(tl.int64) - q0) * stride_tt + g * stride_tg
        if QUERY_ROWS:
            teacher_ptr = TEACHER + toff[:, None] + key_in_block[None, :]
        else:
            teacher_ptr = TEACHER + toff[None, :] + key_in_block[:, None]
        dki_share, dqi, kl_share = _kl_step(
            Q, Q, QI, LSE, ILSE, k, ki, key_tok, key_ok, tok, 0, ok, pos, g,
            stride_qt, stride_qh, stride_qit, stride_qig, stride_lt, stride_lh, stride_ig, qk_scale, iqk_scale,
            HEAD_DIM, D, DI, DIP, R, QUERY_ROWS, False, teacher_ptr, FROM_TEACHER,
        )
        dki += dki_share
        kl += kl_share
        part = x.to(tl.int64) * stride_px + slot.to(tl.int64) * stride_ps + (tok.to(tl.int64) - q0) * stride_pt + g * stride_pg
        tl.store(DQI_part + part[:, None] + offs_i[None, :], dqi, mask=ok[:, None] & i_ok[None, :])
    ws = t_local.to(tl.int64) * (SPLIT * BLOCK_N * DIP) + (x * BLOCK_N + offs_n)[:, None] * DIP + offs_i[None, :]
    tl.store(DKI_ws + ws, dki)
    tl.store(KL_tile + t * SPLIT + x, tl.sum(kl, 0) * 0.6931471805599453)


class SparseKL:
    """The sparse-stage KL, one query chunk at a time: (value, dqi, dki) once every chunk ran.

    Grads are for a KL of weight 1, normalised by the key-row count (all tokens of the micro-batch)
    times total_groups, so ranks that hold a subset of the queries (plan.qpos) or of the groups sum
    to the whole KL. q, k, lse: the teacher's inputs, unused when each chunk gets its teacher
    (built by the attention backward, sparse_attn.sparse_backward's on_teacher).
    """

    def __init__(self, qi, ki, index_lse, topk, plan: SparsePlan, index_scale, total_groups, q=None, k=None, lse=None,
                 softmax_scale=1.0):
        self.n_keys, self.groups, self.di = ki.shape[0], qi.shape[1], qi.shape[2]
        self.qi, self.ki2 = qi, ki.reshape(self.n_keys, self.di).contiguous()
        self.index_lse = index_lse.to(torch.float32).contiguous()
        self.q, self.k, self.lse = q, k, (None if lse is None else lse.contiguous())
        self.topk, self.plan, self.total_groups = topk, plan, total_groups
        self.scales = (softmax_scale * LOG2E, index_scale * LOG2E)
        self.grad_scale = index_scale / (self.n_keys * total_groups)
        self.DIP = max(16, next_pow2(self.di))
        dev = qi.device
        self.dqi = new_buffer((qi.shape[0], self.groups, self.di), torch.float32, dev)
        self.dki = torch.zeros((self.n_keys, 1, self.di), dtype=torch.float32, device=dev)
        self.teacher_given = q is None  # each chunk gets its teacher, else computes it from q, k, lse
        self.knob = "kt_" if self.teacher_given else "kl_"
        self.tiles = plan.tiles[CONFIG["kt_tiles"] if self.teacher_given else "kl"]
        # key slices: a power of two (a power-of-two block stays power-of-two sliced), at least 16 keys each
        self.split = max(1, min(next_pow2(int(CONFIG[self.knob + "split"]) + 1) // 2, plan.block_size // 16))
        self.kl_tile = torch.zeros(max(1, plan.n_chunks * self.tiles.cap * self.split), dtype=torch.float32, device=dev)
        # [slice, slot, query row of the chunk, group, di]
        self.empty = qi.shape[0] == 0  # no queries on this rank
        self.dqi_part = None if self.empty else \
            new_buffer((self.split, topk.shape[-1], plan.chunk, self.groups, self.di), torch.float32, dev)

    def chunk(self, c: int, teacher=None):
        plan, tiles, qi, ki2 = self.plan, self.tiles, self.qi, self.ki2
        cfg = {key: CONFIG[self.knob + key] for key in ("rows", "warps", "stages", "query_rows")}
        q0, q1 = plan.chunk_bounds(c)
        t0, t1 = tiles.chunk_range(c)
        from_teacher = self.teacher_given
        if from_teacher != (teacher is not None):
            raise ValueError("SparseKL: pass a teacher to every chunk exactly when q, k, lse were not given")
        q, k, lse = (qi, ki2, self.index_lse) if from_teacher else (self.q, self.k, self.lse)
        hq, d = (self.groups, self.di) if from_teacher else (q.shape[1], q.shape[2])
        t = teacher if from_teacher else self.dqi_part
        ws = new_buffer((t1 - t0, plan.block_size, self.DIP), torch.float32, qi.device)
        dqi_part = self.dqi_part
        args = (
            q, k, qi, ki2, lse, self.index_lse, dqi_part, ws, self.kl_tile, plan.qpos_arg(self.index_lse), t,
            tiles.tiles, tiles.order, plan.entry_tok, plan.entry_slot, plan.row_key_start, plan.row_key_end,
            t0, q0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0), qi.stride(1), ki2.stride(0),
            lse.stride(0), lse.stride(1), self.index_lse.stride(0), dqi_part.stride(1), dqi_part.stride(2),
            dqi_part.stride(3), dqi_part.stride(0), t.stride(0), t.stride(1), t.stride(2), *self.scales,
        )
        with timed("KL sparse kernel (teacher given)" if from_teacher else "KL sparse kernel"):
            _kl_sparse_kernel[(t1 - t0, self.split)](
                *args, HEAD_DIM=d, D=max(16, next_pow2(d)), DI=self.di, DIP=self.DIP, R=max(1, hq // self.groups),
                BLOCK_M=cfg["rows"], BLOCK_N=plan.block_size // self.split, SPLIT=self.split,
                HAS_QPOS=plan.has_qpos, QUERY_ROWS=cfg["query_rows"], FROM_TEACHER=from_teacher,
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
        with timed("KL dki workspace sum"):
            _block_ws_sum_kernel[(plan.n_rows, 1)](
                ws, self.dki, tiles.seg_tile_first, tiles.seg_tile_count, plan.row_key_start, plan.row_key_end,
                c * self.groups * plan.n_rows, t0, plan.n_rows, self.groups, self.dki.stride(0), self.dki.stride(1),
                HEAD_DIM=self.di, D=self.DIP, BLOCK_N=plan.block_size, ALL_GROUPS=True, SKIP_SINGLE=False, num_warps=8,
            )
        slot_sum(dqi_part, self.topk, self.dqi, q0, q1, self.grad_scale, 1)

    def result(self):
        if self.empty:
            return self.kl_tile.sum(), self.dqi, self.dki
        self.dqi_part = None  # every chunk ran: free the partials before the caller's next allocations
        value = self.kl_tile.sum() / (self.n_keys * self.total_groups)
        return value, self.dqi, self.dki * self.grad_scale


def sparse_kl(q, k, lse, qi, ki, index_lse, topk, plan: SparsePlan, softmax_scale, index_scale, total_groups):
    """(KL value, dqi, dki) of the sparse stage, the teacher computed here (see SparseKL)."""
    acc = SparseKL(qi, ki, index_lse, topk, plan, index_scale, total_groups, q, k, lse, softmax_scale)
    if not acc.empty:
        for c in range(plan.n_chunks):
            acc.chunk(c)
    return acc.result()


# --------------------------------------------------------------------------- dense (warm-up) support


@triton.jit
def _kl_dense_index_lse_kernel(
    QI, KI, ILSE, QPOS,
    row_order, row_key_start, row_blk, row_q_lo, row_q_hi,
    stride_qit, stride_qig, stride_kit, stride_ig,
    iqk_scale,
    DI: tl.constexpr, DIP: tl.constexpr, BLOCK: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """Pass 1, query-owner: the student's lse over every visible key of the document."""
    g = tl.program_id(0)
    r = tl.load(row_order + tl.program_id(1))
    q_lo = tl.load(row_q_lo + r)
    q_hi = tl.load(row_q_hi + r)
    if q_lo < q_hi:
        L = tl.load(row_blk + r)
        doc_start = tl.load(row_key_start + r) - L * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_i = tl.arange(0, DIP)
        i_ok = offs_i < DI
        qrow = q_lo + offs_m
        ok = qrow < q_hi
        pos = key_pos(QPOS, qrow, ok, HAS_QPOS)
        last = tl.max(tl.where(ok, pos, 0), 0)
        qt = qrow.to(tl.int64)
        qi = tl.load(QI + qt[:, None] * stride_qit + g * stride_qig + offs_i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        # Blocks before the row's own are visible to all its queries: no mask (unused rows have
        # qi = 0, finite scores, and are not stored); the row's block takes the causal mask.
        for kb in range(0, L):
            kt = (doc_start + kb * BLOCK + offs_m).to(tl.int64)
            ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=i_ok[None, :], other=0.0)
            s = tl.dot(qi, tl.trans(ki)) * iqk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        key_tok = doc_start + L * BLOCK + offs_m
        kt = key_tok.to(tl.int64)
        ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=(key_tok <= last)[:, None] & i_ok[None, :], other=0.0)
        s = tl.dot(qi, tl.trans(ki)) * iqk_scale
        s = tl.where((key_tok[None, :] <= pos[:, None]) & ok[:, None], s, float("-inf"))
        m_new = tl.where(ok, tl.maximum(m_i, tl.max(s, 1)), 0.0)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
        l_i = tl.where(ok, l_i, 1.0)
        tl.store(ILSE + g.to(tl.int64) * stride_ig + qt, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=ok)


@triton.jit
def _head_lse(LSE, head, qt, ok, stride_lt, stride_lh):
    """One head's main lse of the step's queries, log2 units."""
    return tl.load(LSE + qt * stride_lt + head * stride_lh, mask=ok, other=0.0) * 1.4426950408889634


@triton.jit
def _head_scores(Q, Q_desc, lse, head, qt, m0, ok, k, stride_qt, stride_qh, qk_scale,
                 HEAD_DIM: tl.constexpr, D: tl.constexpr, QUERY_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """log2 of one head's main-softmax probabilities on the step's tile ([queries, keys] when
    QUERY_ROWS, else [keys, queries]); q and k are detached inputs, lse the head's (_head_lse)."""
    if USE_TMA:
        qh = Q_desc.load([m0, head * HEAD_DIM])
    else:
        offs_d = tl.arange(0, D)
        qh = tl.load(Q + qt[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                     mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if QUERY_ROWS:
        return tl.dot(qh, tl.trans(k)) * qk_scale - lse[:, None]
    else:
        return tl.dot(k, tl.trans(qh)) * qk_scale - lse[None, :]


@triton.jit
def _kl_step(
    Q, Q_desc, QI, LSE, ILSE, k, ki, key_tok, key_ok, qrow, m0, ok, pos, g,
    stride_qt, stride_qh, stride_qit, stride_qig, stride_lt, stride_lh, stride_ig,
    qk_scale, iqk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, R: tl.constexpr,
    QUERY_ROWS: tl.constexpr, USE_TMA: tl.constexpr, teacher_ptr, FROM_TEACHER: tl.constexpr,
    LSE_AHEAD: tl.constexpr = False,
):
    """One (key tile, query tile) step: (dki share [N, DI], dqi share [M, DI], KL terms [M], log2).

    The teacher sums the r heads' probabilities in one tile; QUERY_ROWS picks its orientation
    ([queries, keys]: Q_h is the streamed left operand; [keys, queries]: K is). With USE_TMA the
    query rows are m0 + arange (contiguous) and Q_h comes through the descriptor. Both exact.
    FROM_TEACHER: the teacher was already built (by the attention backward) and is loaded through
    teacher_ptr, a pointer tile of the step's orientation; Q and LSE are then unused.
    """
    offs_i = tl.arange(0, DIP)
    qt = qrow.to(tl.int64)
    qi = tl.load(QI + qt[:, None] * stride_qit + g * stride_qig + offs_i[None, :], mask=ok[:, None] & (offs_i < DI)[None, :], other=0.0)
    ilse = tl.load(ILSE + g.to(tl.int64) * stride_ig + qt, mask=ok, other=0.0) * 1.4426950408889634
    if QUERY_ROWS:
        p_t = tl.zeros([qrow.shape[0], key_tok.shape[0]], tl.float32)
        visible = (key_tok[None, :] <= pos[:, None]) & key_ok[None, :] & ok[:, None]
    else:
        p_t = tl.zeros([key_tok.shape[0], qrow.shape[0]], tl.float32)
        visible = (key_tok[:, None] <= pos[None, :]) & key_ok[:, None] & ok[None, :]
    if FROM_TEACHER:
        p_t = tl.load(teacher_ptr, mask=visible, other=0.0)
    else:
        # LSE_AHEAD: the next head's lse is loaded before this head's product (its latency was
        # exposed: 1-2 warps per scheduler, nothing else to run while a load is in flight).
        if LSE_AHEAD:
            lse_h = _head_lse(LSE, g * R, qt, ok, stride_lt, stride_lh)
        for h in range(R):
            if LSE_AHEAD:
                lse_n = _head_lse(LSE, g * R + (h + 1) % R, qt, ok, stride_lt, stride_lh)  # wraps: a spare load
            else:
                lse_h = _head_lse(LSE, g * R + h, qt, ok, stride_lt, stride_lh)
            p_t += tl.exp2(_head_scores(Q, Q_desc, lse_h, g * R + h, qt, m0, ok, k, stride_qt, stride_qh,
                                        qk_scale, HEAD_DIM, D, QUERY_ROWS, USE_TMA))
            if LSE_AHEAD:
                lse_h = lse_n
        p_t = tl.where(visible, p_t * (1.0 / R), 0.0)
    if QUERY_ROWS:
        s_idx = tl.dot(qi, tl.trans(ki)) * iqk_scale - ilse[:, None]  # log2 P_idx
        p_idx = tl.where(visible, tl.exp2(s_idx), 0.0)
        kl = tl.sum(tl.where(p_t > 0, p_t * (log2_approx(p_t) - s_idx), 0.0), 1)
        ds = (p_idx - p_t).to(qi.dtype)
        return tl.dot(tl.trans(ds), qi), tl.dot(ds, ki), kl
    else:
        s_idx = tl.dot(ki, tl.trans(qi)) * iqk_scale - ilse[None, :]  # log2 P_idx
        p_idx = tl.where(visible, tl.exp2(s_idx), 0.0)
        kl = tl.sum(tl.where(p_t > 0, p_t * (log2_approx(p_t) - s_idx), 0.0), 0)
        ds = (p_idx - p_t).to(qi.dtype)
        return tl.dot(ds, qi), tl.dot(tl.trans(ds), ki), kl


@triton.jit
def _kl_dense_kernel(
    Q, Q_desc, K, QI, KI, LSE, ILSE, QPOS, W, DKI_part, KL_part,
    row_order, row_key_start, row_doc_end, row_blk, row_q_lo, row_q_doc_end,
    q0, q1, n_rows, n_groups,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qit, stride_qig, stride_kit,
    stride_lt, stride_lh, stride_ig, stride_wg, stride_wt, stride_wb, stride_dg, stride_dt,
    qk_scale, iqk_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_QPOS: tl.constexpr, QUERY_ROWS: tl.constexpr,
    USE_TMA: tl.constexpr, LSE_AHEAD: tl.constexpr,
):
    """Pass 2, key-owner: one key block of group g against every later query row in [q0, q1).

    The teacher of each (key, query) pair is computed once (_kl_step), then the student, the
    KL terms and ds = P_idx - P_T. dki of the block accumulates in registers; each query's dqi
    share of this block goes to W[g, block, query - q0] for the fixed-order sum of pass 3.
    """
    g = tl.program_id(0) % n_groups  # groups vary fastest (as in the Gluon pass)
    r = tl.load(row_order + tl.program_id(0) // n_groups)
    key_start = tl.load(row_key_start + r)
    doc_end = tl.load(row_doc_end + r)
    qa = tl.maximum(tl.load(row_q_lo + r), q0)
    qb = tl.minimum(tl.load(row_q_doc_end + r), q1)
    if qa < qb:
        kb = tl.load(row_blk + r)
        offs_n = tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_i = tl.arange(0, DIP)
        i_ok = offs_i < DI
        key_tok = key_start + offs_n
        key_ok = key_tok < doc_end
        kt = key_tok.to(tl.int64)
        k = tl.load(K + kt[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        ki = tl.load(KI + kt[:, None] * stride_kit + offs_i[None, :], mask=key_ok[:, None] & i_ok[None, :], other=0.0)
        dki = tl.zeros([BLOCK_N, DIP], tl.float32)
        kl = tl.zeros([BLOCK_M], tl.float32)
        for m0 in range(qa, qb, BLOCK_M):
            qrow = m0 + offs_m
            ok = qrow < qb
            pos = key_pos(QPOS, qrow, ok, HAS_QPOS)
            dki_share, dqi, kl_share = _kl_step(
                Q, Q_desc, QI, LSE, ILSE, k, ki, key_tok, key_ok, qrow, m0, ok, pos, g,
                stride_qt, stride_qh, stride_qit, stride_qig, stride_lt, stride_lh, stride_ig, qk_scale, iqk_scale,
                HEAD_DIM, D, DI, DIP, R, QUERY_ROWS, USE_TMA, Q, False, LSE_AHEAD,
            )
            dki += dki_share
            kl += kl_share
            qt = qrow.to(tl.int64)
            w = W + g.to(tl.int64) * stride_wg + (qt - q0)[:, None] * stride_wt + kb.to(tl.int64) * stride_wb + offs_i[None, :]
            tl.store(w, dqi.to(W.dtype.element_ty), mask=ok[:, None] & i_ok[None, :])
        d = DKI_part + g.to(tl.int64) * stride_dg + kt[:, None] * stride_dt + offs_i[None, :]
        dmask = key_ok[:, None] & i_ok[None, :]
        tl.store(d, tl.load(d, mask=dmask, other=0.0) + dki, mask=dmask)
        klp = KL_part + g.to(tl.int64) * n_rows + r
        tl.store(klp, tl.load(klp) + tl.sum(kl, 0) * 0.6931471805599453)


@triton.jit
def _kl_dense_dqi_kernel(
    W, OUT, QBLK, q0, q1, out_scale, seg,
    stride_wg, stride_wt, stride_wb, stride_os, stride_ot, stride_og,
    DI: tl.constexpr, DIP: tl.constexpr, ROWS: tl.constexpr,
):
    """Pass 3: OUT[s, i, g] = out_scale * sum of W[g, b, i - q0] over blocks b <= L(i) of segment
    s = [s * seg, (s + 1) * seg) (fixed order). One segment: OUT is dqi itself (rows from q0)."""
    g = tl.program_id(1)
    s = tl.program_id(2)
    qrow = q0 + tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = qrow < q1
    offs_i = tl.arange(0, DIP)
    i_ok = offs_i < DI
    L = tl.load(QBLK + qrow, mask=ok, other=-1)
    qt = qrow.to(tl.int64)
    acc = tl.zeros([ROWS, DIP], tl.float32)
    w = W + g.to(tl.int64) * stride_wg + (qt - q0)[:, None] * stride_wt + offs_i[None, :]
    for b in range(s * seg, tl.minimum(tl.max(L, 0) + 1, (s + 1) * seg)):
        acc += tl.load(w + b * stride_wb, mask=(b <= L)[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
    out = OUT + s.to(tl.int64) * stride_os + (qt - q0)[:, None] * stride_ot + g * stride_og + offs_i[None, :]
    tl.store(out, acc * out_scale, mask=ok[:, None] & i_ok[None, :])


def _dense_dqi_sum(w, dqi_rows, qblk, q0, q1, grad_scale, n_blocks, rows=64):
    """dqi of query rows [q0, q1) from the chunk's shares w: one pass, or block segments (enough
    for about CONFIG["dense_dqi_programs"] programs) summed into fp32 partials that are then added
    in segment order."""
    groups, di = dqi_rows.shape[1], dqi_rows.shape[2]
    programs = triton.cdiv(q1 - q0, rows) * groups
    split = max(1, min(-(-int(CONFIG["dense_dqi_programs"]) // programs), n_blocks))
    seg = -(-n_blocks // split)
    split = -(-n_blocks // seg)
    # [segment, query row, group, di]: one segment writes dqi itself
    out = dqi_rows.unsqueeze(0) if split == 1 else torch.empty((split, q1 - q0, groups, di), dtype=torch.float32, device=w.device)
    _kl_dense_dqi_kernel[(triton.cdiv(q1 - q0, rows), groups, split)](
        w, out, qblk, q0, q1, grad_scale, seg,
        w.stride(0), w.stride(2), w.stride(1), out.stride(0), out.stride(1), out.stride(2),
        DI=di, DIP=max(16, next_pow2(di)), ROWS=rows, num_warps=4,
    )
    if split > 1:
        torch.sum(out, dim=0, out=dqi_rows)


def _hopper_dense(q, k, qi, ki2):
    """The Gluon pass-2 module where it serves this call on an sm_90 GPU (knob dense_hopper), else None."""
    if not (CONFIG["dense_hopper"] and on_sm90(q)):
        return None
    from msa_megatron.ops.triton import dense_kl_hopper

    return dense_kl_hopper if dense_kl_hopper.serves(q, k, qi, ki2) else None


def _q_descriptor(q, block_m):
    """A TMA descriptor over q as [T, Hq * d] with [block_m, d] tiles, or None where TMA cannot
    serve (a head dim that is not a power of two, strides or base not 16-byte aligned)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    total, hq, d = q.shape
    if d != next_pow2(d) or q.stride(2) != 1 or q.stride(1) != d or total == 0:
        return None
    if q.data_ptr() % 16 or (q.stride(0) * q.element_size()) % 16:
        return None
    return TensorDescriptor(q, [total, hq * d], [q.stride(0), 1], [block_m, d])


def _share_blocks(doc_edges, cu, n_keys, block):
    """Key blocks a query can have shares from: those of the longest document where the host's
    edges describe these keys (packed batches: fewer, so each chunk of pass 2 takes more queries
    and its launch has more programs), else of all n_keys."""
    if edges_describe(doc_edges, cu, n_keys):
        longest = max((b - a for a, b in zip(doc_edges, doc_edges[1:])), default=0)
    else:
        longest = n_keys
    return max(1, -(-longest // block))


def _dense_query_chunks(n_q, groups, n_blocks, di, itemsize, block, by_row):
    """[(q0, q1, blocks)]: the query rows of each pass 2 and the key blocks their shares can come
    from, each chunk's share buffer [G, blocks, rows, di] within CONFIG["dense_ws_mib"] (at least
    dense_rows rows). by_row (query row = position): row q has shares from its document's first
    q // block + 1 blocks at most, so a long document's early chunks take more rows (fewer
    launches, each with more programs)."""
    step = CONFIG["dense_rows"]
    budget = (int(CONFIG["dense_ws_mib"]) << 20) // max(1, groups * di * itemsize)  # rows x blocks
    blocks_of = lambda q1: min(n_blocks, (q1 - 1) // block + 1) if by_row else n_blocks  # noqa: E731
    chunks, q0 = [], 0
    while q0 < n_q:
        lo, hi = 1, -(-(n_q - q0) // step)  # steps of `step` rows: the most within the budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            q1 = min(q0 + mid * step, n_q)
            lo, hi = (mid, hi) if (q1 - q0) * blocks_of(q1) <= budget else (lo, mid - 1)
        q1 = min(q0 + lo * step, n_q)
        chunks.append((q0, q1, blocks_of(q1)))
        q0 = q1
    return chunks


def dense_kl(q, k, lse, qi, ki, cu_seqlens, softmax_scale, index_scale, total_groups, qpos=None, doc_edges=None):
    """(KL value, dqi, dki) with the support = every visible token of the document.

    Three passes, the teacher computed once per (query, key): (1) student lse per query
    (query-owner, index scores only); (2) key-owner teacher + student + dki + per-block dqi shares;
    (3) dqi = fixed-order sum of the shares. Queries run in chunks that bound the share buffer.
    doc_edges: the host's copy of cu_seqlens where known (bigger chunks: see _share_blocks).
    """
    total, hq, d = q.shape
    n_keys = k.shape[0]
    groups, di = qi.shape[1], qi.shape[2]
    r = hq // groups
    D, DIP = max(16, next_pow2(d)), max(16, next_pow2(di))
    dev = q.device
    ki2 = ki.reshape(n_keys, di).contiguous()
    lse = lse.contiguous()
    grad_scale = index_scale / (n_keys * total_groups)
    hopper = _hopper_dense(q, k, qi, ki2)
    block = hopper.BLOCK_KEYS if hopper else CONFIG["dense_block"]
    cu = cu_seqlens.to(dev)
    rows = block_rows(cu, n_keys, block, qpos)
    qp = positions(qpos, dev)
    dqi = new_buffer((total, groups, di), torch.float32, dev)
    dki_part = torch.zeros((groups, n_keys, DIP), dtype=torch.float32, device=dev)
    kl_part = torch.zeros((groups, rows.n), dtype=torch.float32, device=dev)
    if total == 0:
        return kl_part.sum(), dqi, dki_part.sum(0)[:, :di].reshape(n_keys, 1, di)
    ilse = new_buffer((groups, total), torch.float32, dev)
    qp_arg = qp if qp is not None else ilse
    with timed("KL dense index lse"):
        lse_rows = block_rows(cu, n_keys, ILSE_BLOCK, qpos)
        _kl_dense_index_lse_kernel[(groups, lse_rows.n)](
            qi, ki2, ilse, qp_arg, lse_rows.longest_first(), lse_rows.key_start, lse_rows.blk, lse_rows.q_lo, lse_rows.q_hi,
            qi.stride(0), qi.stride(1), ki2.stride(0), ilse.stride(0), index_scale * LOG2E,
            DI=di, DIP=DIP, BLOCK=ILSE_BLOCK, HAS_QPOS=qp is not None, num_warps=8, num_stages=2,
        )
    # Each query's block inside its document (pass 3 sums blocks 0..L).
    pos = torch.arange(total, device=dev) if qp is None else qp.to(torch.int64)
    cu64 = cu.to(torch.int64)
    qblk = ((pos - cu64[torch.searchsorted(cu64[1:], pos, right=True)]) // block).to(torch.int32)
    ws_dtype = torch.float32 if CONFIG["dense_ws_fp32"] else qi.dtype
    chunks = _dense_query_chunks(total, groups, _share_blocks(doc_edges, cu, n_keys, block), di,
                                 torch.finfo(ws_dtype).bits // 8, block, by_row=qp is None)
    # Shares block-major ([G, block, query, di]): a key block's program writes, and pass 3 reads,
    # consecutive queries' rows contiguously. One buffer, viewed per chunk.
    ws = new_buffer((max(groups * b * (q1 - q0) * di for q0, q1, b in chunks),), ws_dtype, dev)
    order = rows.most_queries_first()
    q_desc = _q_descriptor(q, CONFIG["dense_rows"]) if CONFIG["dense_tma"] and not hopper else None
    # Heads-major lse ([Hq, T] viewed as [T, Hq]): a head's lse of a query tile is one contiguous load.
    lse_k = lse.t().contiguous().t() if CONFIG["dense_lse_heads_major"] or hopper else lse
    launch = hopper.HopperDenseKL(q, k, qi, ki2, lse_k.t(), ilse, qp) if hopper else None
    for q0, q1, n_blocks in chunks:
        w = ws[: groups * n_blocks * (q1 - q0) * di].view(groups, n_blocks, q1 - q0, di)
        with timed("KL dense kernel"):
            if launch:
                launch.launch(rows, order, w, dki_part, kl_part, q0, q1, softmax_scale * LOG2E, index_scale * LOG2E)
            else:
                _kl_dense_kernel[(groups * rows.n,)](
                    q, q if q_desc is None else q_desc, k, qi, ki2, lse_k, ilse, qp_arg, w, dki_part, kl_part,
                    order, rows.key_start, rows.doc_end, rows.blk, rows.q_lo, rows.q_doc_end,
                    q0, q1, rows.n, groups,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), qi.stride(0), qi.stride(1), ki2.stride(0),
                    lse_k.stride(0), lse_k.stride(1), ilse.stride(0), w.stride(0), w.stride(2), w.stride(1), dki_part.stride(0), dki_part.stride(1),
                    softmax_scale * LOG2E, index_scale * LOG2E,
                    HEAD_DIM=d, D=D, DI=di, DIP=DIP, R=r, BLOCK_N=block, BLOCK_M=CONFIG["dense_rows"],
                    HAS_QPOS=qp is not None, QUERY_ROWS=CONFIG["dense_query_rows"],
                    USE_TMA=q_desc is not None, LSE_AHEAD=CONFIG["dense_lse_ahead"],
                    num_warps=CONFIG["dense_warps"], num_stages=CONFIG["dense_stages"],
                )
        with timed("KL dense dqi sum"):
            _dense_dqi_sum(w, dqi[q0:q1], qblk, q0, q1, grad_scale, n_blocks)
    value = kl_part.sum() / (n_keys * total_groups)
    dki = dki_part.sum(0)[:, :di].reshape(n_keys, 1, di) * grad_scale
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
