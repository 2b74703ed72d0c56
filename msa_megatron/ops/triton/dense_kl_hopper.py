"""Dense warm-up KL for Hopper (sm_90), written in Gluon: pass 2 of `kl.dense_kl`.

The same work and outputs as `kl._kl_dense_kernel`, which stays the CPU-tested twin and the
fallback, with 128-key blocks instead of 64. A program owns one 128-key block of one group and
walks the later query rows of its document, 64 a step. Keys are the rows of every product (each
of two consumer warpgroups owns 64 keys), so dki accumulates in registers; the teacher sums the
group's r heads' probabilities exp2(q_h.k * scale - lse_h), one [128 keys, 64 queries] product per
head.

Why a second kernel: the Triton one keeps 64 keys per Q tile (more spill), so each head's Q tile
(16 KB) streams from L2 once per 64 keys, and runs a head's product, its exp2 and the next load one
after another. Here a producer warp streams the heads' Q tiles by TMA through a ring of shared
buffers, 128 keys share each tile, and each head's product is issued before the previous head's
exp2, which then runs while the tensor cores work (heads unrolled in groups of up to four: a
product in flight across a loop edge makes ptxas serialise the products, C7514). The dqi shares
of a step sum the 128 keys in one product: half the shares of the Triton kernel for pass 3 to add.

On by default since round 11 (`kl.CONFIG["dense_hopper"]`; the GPU tests pass on it: float64 and its
Triton twin, r 1-64, d and di 64 / 128, packed documents, query subsets). With as many Q buffers as
shared memory holds (`q_buffers`, 6 at d 128, r 16) the whole dense KL is 1.5-5% faster than with the
Triton pass on an H100 (32K / 128K), mostly through the halved share sum. Round 13: the KL term's
log2 on the MUFU unit instead of libdevice's log2f, a fifth of a step's instructions: 6-7% off the
whole dense KL. Round 14: each head's lse is loaded before its product's wait (0.4% off the whole
dense KL on average: -0.8% to +0.1% over eight readings). A step still takes about 2.5x its exp2 or
tensor-core time (docs/kernel_notes.md).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from msa_megatron.ops.triton.common import LOG2_PTX
from msa_megatron.ops.triton.hopper_common import drop_ring, init_ring, rows_desc, tma_tensors_ok

LOG2E = 1.4426950408889634
_LOG2E = gl.constexpr(LOG2E)
_LN2 = gl.constexpr(0.6931471805599453)
BLOCK_KEYS = 128  # keys per program (the host's block size for this pass)
BLOCK_QUERIES = 64  # query rows per step
BLOCK_N = gl.constexpr(BLOCK_KEYS)
BLOCK_M = gl.constexpr(BLOCK_QUERIES)
NUM_WARPS = 8  # two consumer warpgroups, 64 keys each
STEP_BUFFERS = gl.constexpr(2)  # a step's qi tile, lse and positions
PRODUCER_REGS = gl.constexpr(40)

# int32 rows of a step's per-query facts in shared memory
ROW_POS = gl.constexpr(0)  # key position of the query row, -1 past the document's (or chunk's) end
ROW_ZERO = gl.constexpr(1)  # zeros (see the consumer)
ROW_FACTS = gl.constexpr(2)

SMEM_BYTES = 227 * 1024  # sm_90's shared memory for one block
MAX_Q_BUFFERS = 8


def q_buffers(d, di, r):
    """Heads' Q tiles in flight: as many as shared memory holds beside the rest (6 at d 128, r 16;
    round 11 on an H100: 4 -> 6 took 4% off the whole dense KL at 32K)."""
    steps = STEP_BUFFERS.value * (BLOCK_QUERIES * di * 2 + (r + 1 + ROW_FACTS.value) * BLOCK_QUERIES * 4)  # qi, lse, ilse, facts
    rest = BLOCK_KEYS * (d + di) * 2 + steps + BLOCK_KEYS * BLOCK_QUERIES * 2 + 2048  # K, ki, ds, barriers and padding
    return max(2, min(MAX_Q_BUFFERS, (SMEM_BYTES - rest) // (BLOCK_QUERIES * d * 2)))


def serves(q, k, qi, ki) -> bool:
    """Whether this kernel handles the call (else the Triton kernel runs): 16-bit q, k, qi, ki of
    one dtype, contiguous on 16-byte boundaries (TMA), head dims 64 or 128, offsets within int32."""
    return (tma_tensors_ok((q, k, qi, ki))
            and q.shape[-1] in (64, 128) and k.shape[-1] == q.shape[-1] and qi.shape[-1] in (64, 128)
            and ki.shape[-1] == qi.shape[-1] and q.shape[1] % k.shape[1] == 0 and q.shape[1] // k.shape[1] <= 64
            and q.shape[0] * q.shape[1] < 2**31)


@gluon.jit
def _log2(x, R: gl.constexpr):
    """log2 on the MUFU unit (common.LOG2_PTX): the KL term takes one per (key, query) of a step.
    At r 64 ptxas then parks a producer value in local memory, reloaded every step: gl.log2 there."""
    if R <= 32:
        return gl.inline_asm_elementwise(LOG2_PTX, "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)
    else:
        return gl.log2(x)


@gluon.jit
def _producer(q_desc, qi_desc, LSE, ILSE, QPOS, q_smem, qi_smem, lse_smem, ilse_smem, facts_smem,
              q_ready, q_empty, s_ready, s_empty, g, qa, qb, n_steps, stride_lh, stride_ig,
              D: gl.constexpr, DI: gl.constexpr, R: gl.constexpr, HAS_QPOS: gl.constexpr, Q_BUFFERS: gl.constexpr):
    """One warp: each step's qi tile (TMA), its lse rows (times log2 e), index lse and positions,
    then the step's r Q tiles (TMA), Q_BUFFERS tiles ahead of the consumers."""
    vec: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    m = gl.arange(0, BLOCK_M, layout=vec)
    q_bytes: gl.constexpr = BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8
    qi_bytes: gl.constexpr = BLOCK_M * DI * qi_desc.dtype.primitive_bitwidth // 8
    for step in range(n_steps):
        st = step % STEP_BUFFERS
        m0 = qa + step * BLOCK_M
        qrow = m0 + m
        ok = qrow < qb
        if HAS_QPOS:
            pos = gl.load(QPOS + qrow, mask=ok, other=-1)
        else:
            pos = gl.where(ok, qrow, -1)
        ilse = gl.load(ILSE + g * stride_ig + qrow, mask=ok, other=0.0) * _LOG2E
        mbarrier.wait(s_empty.index(st), ((step // STEP_BUFFERS) & 1) ^ 1, pred=step >= STEP_BUFFERS)
        bar = s_ready.index(st)
        mbarrier.expect(bar, qi_bytes)
        tma.async_copy_global_to_shared(qi_desc, [m0, g * DI], bar, qi_smem.index(st))
        for h in range(R):
            lse = gl.load(LSE + (g * R + h).to(gl.int64) * stride_lh + qrow, mask=ok, other=0.0) * _LOG2E
            lse_smem.index(st * R + h).store(lse)
        ilse_smem.index(st).store(ilse)
        facts_smem.index(st * ROW_FACTS + ROW_POS).store(pos)
        facts_smem.index(st * ROW_FACTS + ROW_ZERO).store(gl.zeros([BLOCK_M], gl.int32, vec))
        gl.thread_barrier()  # the warp's stores before its one arrive (the barrier's second)
        mbarrier.arrive(bar)
        for h in range(R):
            i = step * R + h
            b = i % Q_BUFFERS
            mbarrier.wait(q_empty.index(b), ((i // Q_BUFFERS) & 1) ^ 1, pred=i >= Q_BUFFERS)
            mbarrier.expect(q_ready.index(b), q_bytes)
            tma.async_copy_global_to_shared(q_desc, [m0, (g * R + h) * D], q_ready.index(b), q_smem.index(b))


@gluon.jit
def _consumer(k_smem, ki_smem, q_smem, qi_smem, lse_smem, ilse_smem, facts_smem, ds_smem, q_ready, q_empty,
              s_ready, s_empty, kv_bar, W, DKI_part, KL_part, g, r, kb, qa, qb, q0, n_steps, key_start, doc_end,
              n_rows, stride_wg, stride_wb, stride_wt, stride_dg, stride_dt, qk_scale, iqk_scale,
              DI: gl.constexpr, R: gl.constexpr, Q_BUFFERS: gl.constexpr):
    """Two warpgroups: a step's r teacher products and exp2, the student, KL terms and ds, then
    dki (registers) and the step's dqi shares (to W)."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    dki_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                         instr_shape=[16, DI, 16])
    dqi_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                         instr_shape=[16, DI // 2, 16])
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)  # one value per query row
    key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)  # one value per key

    # heads whose products are in flight together (4 at r = 4 spills a few registers: ptxas)
    HEADS_AT_ONCE: gl.constexpr = 4 if R % 4 == 0 and R >= 8 else (2 if R % 2 == 0 else 1)
    key_tok = key_start + gl.arange(0, BLOCK_N, layout=key_layout)
    key_ok = key_tok < doc_end
    dki = gl.zeros([BLOCK_N, DI], gl.float32, dki_layout)
    kl_keys = gl.zeros([BLOCK_N], gl.float32, key_layout)
    dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dqi_layout))
    dq_cols = gl.arange(0, DI, layout=gl.SliceLayout(0, dqi_layout))
    w_base = W + g.to(gl.int64) * stride_wg + kb.to(gl.int64) * stride_wb

    mbarrier.wait(kv_bar, 0)
    for step in range(n_steps):
        st = step % STEP_BUFFERS
        mbarrier.wait(s_ready.index(st), (step // STEP_BUFFERS) & 1)
        # K, ki and dS indexed by a zero the compiler cannot see: their wgmma descriptors are
        # rebuilt each step instead of hoisted out of the loop and spilled
        zero = gl.sum(facts_smem.index(st * ROW_FACTS + ROW_ZERO).load(col_layout), 0)
        k_cur = k_smem.index(zero)
        ki_cur = ki_smem.index(zero)
        ds_cur = ds_smem.index(zero)
        # Teacher: head h + 1's product is issued before head h's exp2, which then runs while the
        # tensor cores work (the loop is unrolled: no accumulator in flight across a loop edge).
        p = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        for h0 in range(0, R, HEADS_AT_ONCE):
            i = step * R + h0
            mbarrier.wait(q_ready.index(i % Q_BUFFERS), (i // Q_BUFFERS) & 1)
            tok = warpgroup_mma(k_cur, q_smem.index(i % Q_BUFFERS).permute((1, 0)),
                                gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout), use_acc=False, is_async=True)
            for u in gl.static_range(HEADS_AT_ONCE):
                # the head's lse, loaded while its product runs (after it, its latency stalled the exp2)
                lse = lse_smem.index(st * R + h0 + u).load(col_layout)
                if u + 1 < HEADS_AT_ONCE:
                    mbarrier.wait(q_ready.index((i + 1) % Q_BUFFERS), ((i + 1) // Q_BUFFERS) & 1)
                    tok_next = warpgroup_mma(k_cur, q_smem.index((i + 1) % Q_BUFFERS).permute((1, 0)),
                                             gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout), use_acc=False,
                                             is_async=True)
                    s = warpgroup_mma_wait(1, deps=(tok,))
                else:
                    s = warpgroup_mma_wait(0, deps=(tok,))
                gl.thread_barrier()  # both warpgroups are done with this head's Q tile
                mbarrier.arrive(q_empty.index(i % Q_BUFFERS))
                p += gl.exp2(s * qk_scale - lse[None, :])
                if u + 1 < HEADS_AT_ONCE:
                    tok = tok_next
                    i += 1
        # Student, KL terms, ds = P_idx - P_T; rows past the document's end have position -1.
        si_tok = warpgroup_mma(ki_cur, qi_smem.index(st).permute((1, 0)),
                               gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout), use_acc=False, is_async=True)
        pos = facts_smem.index(st * ROW_FACTS + ROW_POS).load(col_layout)
        visible = (key_tok[:, None] <= pos[None, :]) & key_ok[:, None]
        p = gl.where(visible, p * (1.0 / R), 0.0)
        s_idx = warpgroup_mma_wait(0, deps=(si_tok,))
        s_idx = s_idx * iqk_scale - ilse_smem.index(st).load(col_layout)[None, :]
        p_idx = gl.where(visible, gl.exp2(s_idx), 0.0)
        kl_keys += gl.sum(gl.where(p > 0, p * (_log2(p, R) - s_idx), 0.0), 1)
        ds_cur.store((p_idx - p).to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        # dqi shares [queries, di] sum all 128 keys (each warpgroup half of di); dki [keys, di].
        dqi_tok = warpgroup_mma(ds_cur.permute((1, 0)), ki_cur, gl.zeros([BLOCK_M, DI], gl.float32, dqi_layout),
                                use_acc=False, is_async=True)
        dki = warpgroup_mma(ds_cur, qi_smem.index(st), dki, is_async=True)
        dqi = warpgroup_mma_wait(1, deps=(dqi_tok,))
        qrow = qa + step * BLOCK_M + dq_rows
        w = w_base + (qrow - q0).to(gl.int64)[:, None] * stride_wt + dq_cols[None, :]
        gl.store(w, dqi.to(W.dtype.element_ty), mask=(qrow < qb)[:, None] & (dq_cols < DI)[None, :])
        dki = warpgroup_mma_wait(0, deps=(dki,))
        gl.thread_barrier()  # both warpgroups are done with the step's qi tile and ds
        mbarrier.arrive(s_empty.index(st))

    kl_row = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dki_layout))
    cols = gl.arange(0, DI, layout=gl.SliceLayout(0, dki_layout))
    d = DKI_part + g.to(gl.int64) * stride_dg + (key_start + kl_row).to(gl.int64)[:, None] * stride_dt + cols[None, :]
    dmask = (key_start + kl_row < doc_end)[:, None] & (cols < DI)[None, :]
    gl.store(d, gl.load(d, mask=dmask, other=0.0) + dki, mask=dmask)
    klp = KL_part + g.to(gl.int64) * n_rows + r
    gl.store(klp, gl.load(klp) + gl.sum(kl_keys, 0) * _LN2)


@gluon.jit
def _kl_dense_hopper_kernel(
    q_desc, k_desc, qi_desc, ki_desc, LSE, ILSE, QPOS, W, DKI_part, KL_part,
    row_order, row_key_start, row_doc_end, row_blk, row_q_lo, row_q_doc_end,
    q0, q1, n_rows, n_groups, stride_lh, stride_ig, stride_wg, stride_wb, stride_wt, stride_dg, stride_dt,
    qk_scale, iqk_scale,
    D: gl.constexpr, DI: gl.constexpr, R: gl.constexpr, HAS_QPOS: gl.constexpr, Q_BUFFERS: gl.constexpr,
):
    # Groups vary fastest, so every group's longest rows run in the first wave (a 1-D grid: no
    # 65535 limit on the rows).
    g = gl.program_id(0) % n_groups
    r = gl.load(row_order + gl.program_id(0) // n_groups)
    qa = gl.maximum(gl.load(row_q_lo + r), q0)
    qb = gl.minimum(gl.load(row_q_doc_end + r), q1)
    if qa < qb:
        key_start = gl.load(row_key_start + r)
        doc_end = gl.load(row_doc_end + r)
        kb = gl.load(row_blk + r)
        n_steps = gl.cdiv(qb - qa, BLOCK_M)
        dtype: gl.constexpr = q_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, D], k_desc.layout)
        ki_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, DI], ki_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS, BLOCK_M, D], q_desc.layout)
        qi_smem = gl.allocate_shared_memory(dtype, [STEP_BUFFERS, BLOCK_M, DI], qi_desc.layout)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STEP_BUFFERS * R, BLOCK_M], plain)
        ilse_smem = gl.allocate_shared_memory(gl.float32, [STEP_BUFFERS, BLOCK_M], plain)
        facts_smem = gl.allocate_shared_memory(gl.int32, [STEP_BUFFERS * ROW_FACTS, BLOCK_M], plain)
        ds_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, BLOCK_M],
                                            gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
        s_ready = gl.allocate_shared_memory(gl.int64, [STEP_BUFFERS, 1], mbarrier.MBarrierLayout())
        s_empty = gl.allocate_shared_memory(gl.int64, [STEP_BUFFERS, 1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        init_ring(q_ready, q_empty, Q_BUFFERS, 1)  # Q tiles: TMA only
        init_ring(s_ready, s_empty, STEP_BUFFERS, 2)  # a step's qi tile by TMA, the rest by the producer
        mbarrier.init(kv_bar, count=1)
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + ki_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key_start, g * D], kv_bar, k_smem.index(0))
        tma.async_copy_global_to_shared(ki_desc, [key_start, 0], kv_bar, ki_smem.index(0))
        gl.warp_specialize([
            (_consumer, (k_smem, ki_smem, q_smem, qi_smem, lse_smem, ilse_smem, facts_smem, ds_smem, q_ready, q_empty,
                         s_ready, s_empty, kv_bar, W, DKI_part, KL_part, g, r, kb, qa, qb, q0, n_steps, key_start,
                         doc_end, n_rows, stride_wg, stride_wb, stride_wt, stride_dg, stride_dt, qk_scale, iqk_scale,
                         DI, R, Q_BUFFERS)),
            (_producer, (q_desc, qi_desc, LSE, ILSE, QPOS, q_smem, qi_smem, lse_smem, ilse_smem, facts_smem,
                         q_ready, q_empty, s_ready, s_empty, g, qa, qb, n_steps, stride_lh, stride_ig,
                         D, DI, R, HAS_QPOS, Q_BUFFERS)),
        ], [1], [PRODUCER_REGS])
        drop_ring(q_ready, q_empty, Q_BUFFERS)
        drop_ring(s_ready, s_empty, STEP_BUFFERS)
        mbarrier.invalidate(kv_bar)


class HopperDenseKL:
    """Descriptors of one dense KL call (the tensors stay put over its query chunks)."""

    def __init__(self, q, k, qi, ki2, lse_heads, ilse, qpos):
        """lse_heads [Hq, T] and ilse [G, T]: the main and index lse (natural log), row-major."""
        total, hq, d = q.shape
        groups, di = qi.shape[1], qi.shape[2]
        self.r, self.d, self.di = hq // k.shape[1], d, di
        self.q_desc = rows_desc(q.view(total, hq * d), BLOCK_QUERIES, d)
        self.k_desc = rows_desc(k.view(k.shape[0], k.shape[1] * d), BLOCK_KEYS, d)
        self.qi_desc = rows_desc(qi.view(total, groups * di), BLOCK_QUERIES, di)
        self.ki_desc = rows_desc(ki2, BLOCK_KEYS, di)
        self.lse, self.ilse, self.qpos = lse_heads, ilse, qpos

    def launch(self, rows, order, w, dki_part, kl_part, q0, q1, qk_scale, iqk_scale):
        """Pass 2 over query rows [q0, q1)."""
        _kl_dense_hopper_kernel[(self.ilse.shape[0] * rows.n,)](
            self.q_desc, self.k_desc, self.qi_desc, self.ki_desc, self.lse, self.ilse,
            self.ilse if self.qpos is None else self.qpos, w, dki_part, kl_part,
            order, rows.key_start, rows.doc_end, rows.blk, rows.q_lo, rows.q_doc_end,
            q0, q1, rows.n, self.ilse.shape[0], self.lse.stride(0), self.ilse.stride(0),
            w.stride(0), w.stride(1), w.stride(2), dki_part.stride(0), dki_part.stride(1),
            qk_scale, iqk_scale,
            D=self.d, DI=self.di, R=self.r, HAS_QPOS=self.qpos is not None,
            Q_BUFFERS=q_buffers(self.d, self.di, self.r), num_warps=NUM_WARPS,
        )
