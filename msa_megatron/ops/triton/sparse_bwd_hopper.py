"""Sparse attention backward for Hopper (sm_90), written in Gluon.

The same computation as `sparse_attn._sparse_bwd_kernel`, which stays the CPU-tested twin (Gluon
does not run under TRITON_INTERPRET); the GPU tests compare the two. A program owns one plan tile:
one 128-key block of one group and the queries that selected it, taken 64 (query, head) rows a
step. Keys are the rows of every product, so dK/dV accumulate in registers.

Why a second kernel: the Triton one gathers each step's Q/dO rows through registers, holds K and V
in registers and runs loads, products and elementwise work one after another (255 registers a
thread, spills, a CTA barrier at every layout change: docs/kernel_notes.md, round 5). Here a
query's r heads are one contiguous [r, d] box of Q and dO, so a producer warp brings a step's rows
into shared memory by TMA ahead of their use (a three-step ring), with their lse and delta and the step's
per-query facts; K and V stay in shared memory; the five products are asynchronous wgmmas of two
consumer warpgroups; dQ leaves through shared memory while dK's product still runs, by TMA stores
that a third warp issues (`hopper_common.row_storer`). H100, 128K: 72.4 -> 47.8 ms for the kernel
(round 7), -> ~46.5 ms with the overlapped dQ stores (round 8), then 6% less with the storer warp
(round 15; docs/kernel_notes.md).
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

from msa_megatron.ops.triton.hopper_common import (
    drop_ring,
    end_ring,
    init_ring,
    query_value,
    row_storer,
    rows_desc,
    start_ring,
    tile_header,
    tma_shapes_ok,
)

LOG2E = 1.4426950408889634
_LOG2E = gl.constexpr(LOG2E)
NUM_WARPS = 8  # two warpgroups, each owning 64 of the block's 128 keys
STAGES = 3  # query-row buffers: a step's rows are released half-way through the next step (below)
PRODUCER_REGS = gl.constexpr(24)  # the loading warp needs few registers; the rest go to the consumers


def serves(q, k, v, do, lse, delta, dq_part, block_m: int, block_n: int, teacher=None) -> bool:
    """Whether this kernel handles the call (else the Triton kernel runs): `tma_shapes_ok`, and row
    and teacher offsets that fit the int32 the kernel computes them in."""
    d = q.shape[-1]
    return (tma_shapes_ok(q, k, v, block_m, block_n, (do, dq_part), (lse, delta))
            and max(dq_part.numel() // d, q.numel() // d, 0 if teacher is None else teacher.numel()) < 2**31)


# Per-step facts the producer leaves in shared memory for the consumers (one int32 row of BQ each).
META_KPOS = gl.constexpr(0)
META_TEACHER = gl.constexpr(1)
META_ZERO = gl.constexpr(2)
META_ROWS = gl.constexpr(3)


@gluon.jit
def _producer(q_desc, do_desc, LSE, DELTA, QPOS, q_smem, do_smem, lse_smem, delta_smem, meta_smem, ready, empty,
              entry_tok, entry_slot, e0, cnt, g, q0, stride_ts, stride_tt, stride_tg,
              H: gl.constexpr, D: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
              HAS_QPOS: gl.constexpr):
    """One warp: everything a step reads besides K and V, STAGES steps ahead of the consumers.

    Step s's rows are query (s * BQ + j)'s r heads: one [r, d] box of Q and dO each by TMA; their
    lse (times log2 e) and delta by plain loads (64-byte pieces: too small for TMA's 128-byte
    aligned destinations); and per query its key position (-1 past the tile's last entry) and its
    teacher offset. Rows past the last entry repeat the last query (finite values that the mask
    zeroes), so every step expects the same bytes.
    """
    BQ: gl.constexpr = BLOCK_M // R
    nbytes: gl.constexpr = 2 * BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8
    vec_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    q_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    m = gl.arange(0, BLOCK_M, layout=vec_layout)
    j = gl.arange(0, BQ, layout=q_layout)
    for step in range(gl.cdiv(cnt, BQ)):
        st = step % STAGES
        rows = gl.load(entry_tok + e0 + gl.minimum(step * BQ + m // R, cnt - 1)) * H + g * R + m % R
        lse = gl.load(LSE + rows) * _LOG2E
        delta = gl.load(DELTA + rows)
        ej = step * BQ + j
        ok = ej < cnt
        tok = gl.load(entry_tok + e0 + ej, mask=ok, other=q0)
        slot = gl.load(entry_slot + e0 + ej, mask=ok, other=0)
        if HAS_QPOS:
            kpos = gl.load(QPOS + tok, mask=ok, other=-1)
        else:
            kpos = gl.where(ok, tok, -1)
        teacher = slot * stride_ts + (tok - q0) * stride_tt + g * stride_tg
        # the consumers released this buffer (its previous step is done); the first round is free
        mbarrier.wait(empty.index(st), ((step // STAGES) & 1) ^ 1, pred=step >= STAGES)
        bar = ready.index(st)
        mbarrier.expect(bar, nbytes)
        for i in gl.static_range(BQ):
            row = gl.load(entry_tok + e0 + gl.minimum(step * BQ + i, cnt - 1)) * H + g * R
            tma.async_copy_global_to_shared(q_desc, [row, 0], bar, q_smem.index(st).slice(i * R, R))
            tma.async_copy_global_to_shared(do_desc, [row, 0], bar, do_smem.index(st).slice(i * R, R))
        lse_smem.index(st).store(lse)
        delta_smem.index(st).store(delta)
        meta_smem.index(st * META_ROWS + META_KPOS).store(kpos)
        meta_smem.index(st * META_ROWS + META_TEACHER).store(teacher)
        meta_smem.index(st * META_ROWS + META_ZERO).store(gl.zeros([BQ], gl.int32, q_layout))
        gl.thread_barrier()  # the warp's stores before its one arrive (the barrier's second)
        mbarrier.arrive(bar)


@gluon.jit
def _consumer(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, meta_smem, ds_smem, dq_smem, ready, empty,
              kv_bar, dq_full, dq_empty, DK_ws, DV_ws, DK_acc, DV_acc, TEACHER, seg_tile_count,
              g, row, slot, cnt, key_start, key_end, seg0, n_rows, stride_at, stride_ag, sm_scale, qk_scale,
              D: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, WITH_TEACHER: gl.constexpr):
    """Two warpgroups: the five products of every step, dQ shares to the storer, dK/dV at the end."""
    BQ: gl.constexpr = BLOCK_M // R
    dtype: gl.constexpr = dq_smem.dtype
    # S^T / dP^T [keys, rows] and dK / dV [keys, d]: each warpgroup owns 64 keys. dQ [rows, d]:
    # each warpgroup owns half of d.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                        instr_shape=[16, D, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, D // 2, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)  # one value per (query, head) row
    key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)  # one value per key
    # a step's per-query values, every thread holding all of them (scalars by a local sum)
    q_layout: gl.constexpr = gl.BlockedLayout([BQ], [32], [8], [0])

    key_tok = key_start + gl.arange(0, BLOCK_N, layout=key_layout)
    jq = gl.arange(0, BQ, layout=q_layout)
    # blocks cut short by their document's end are masked on every step
    last_key = gl.where(key_end - key_start == BLOCK_N, key_start + BLOCK_N - 1, 2147483647)
    dk = gl.zeros([BLOCK_N, D], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, kv_layout)

    mbarrier.wait(kv_bar, 0)
    for step in range(gl.cdiv(cnt, BQ)):
        st = step % STAGES
        mbarrier.wait(ready.index(st), (step // STAGES) & 1)
        qs = q_smem.index(st)
        dos = do_smem.index(st)
        # K, V and dS buffers indexed by a zero the compiler cannot see: their wgmma descriptors
        # are rebuilt each step instead of hoisted out of the loop and spilled
        zero = gl.sum(meta_smem.index(st * META_ROWS + META_ZERO).load(q_layout), 0) // BQ
        k_cur = k_smem.index(zero)
        v_cur = v_smem.index(zero)
        ds_cur = ds_smem.index(zero)
        s_tok = warpgroup_mma(k_cur, qs.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_cur, dos.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout),
                               use_acc=False, is_async=True)
        kpos_q = meta_smem.index(st * META_ROWS + META_KPOS).load(q_layout)
        # loaded while S runs (round 14's sampling: loaded after the wait, it stalled the FFMA below;
        # alone, the change measured even in round 15)
        lse = lse_smem.index(st).load(col_layout)

        s = warpgroup_mma_wait(1, deps=(s_tok,))
        s = s * qk_scale - lse[None, :]
        # No mask when every entry is valid (position >= 0) and past the block's last key: all
        # steps but the block's own queries and a tile's short last step.
        if gl.min(kpos_q, 0) >= last_key:
            p = gl.exp2(s)
        else:
            q_in = gl.arange(0, BLOCK_M, layout=col_layout) // R
            kpos = gl.full([BLOCK_M], -1, gl.int32, col_layout)
            for j in gl.static_range(BQ):
                kpos = gl.where(q_in == j, query_value(kpos_q, jq, j), kpos)
            visible = (key_tok[:, None] <= kpos[None, :]) & (key_tok < key_end)[:, None]
            p = gl.where(visible, gl.exp2(s), 0.0)
        if WITH_TEACHER:
            # column m of p is query m // R, head m % R: the mean over heads is a reshape + sum,
            # stored from the layout the sum leaves (no trip through shared memory)
            teach = gl.sum(gl.reshape(p, [BLOCK_N, BQ, R]), 2) * (1.0 / R)
            t_layout: gl.constexpr = teach.type.layout
            t_keys = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, t_layout))
            toff = meta_smem.index(st * META_ROWS + META_TEACHER).load(gl.SliceLayout(0, t_layout)) - key_start
            t_ok = meta_smem.index(st * META_ROWS + META_KPOS).load(gl.SliceLayout(0, t_layout)) >= 0
            gl.store(TEACHER + toff[None, :] + t_keys[:, None], teach,
                     mask=(t_keys < key_end)[:, None] & t_ok[None, :])
        dp = warpgroup_mma_wait(0, deps=(dp_tok,))
        ds = (p * (dp - delta_smem.index(st).load(col_layout)[None, :])).to(dtype)
        dv = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), dos, dv, is_async=True)
        # dS^T goes through shared memory: dK and dQ read it there (no register operands to hold
        # while their products run), and dQ needs the other warpgroup's keys too.
        ds_cur.store(ds)
        fence_async_shared()
        gl.thread_barrier()
        # Every thread has waited for the previous step's dK, the last reader of its Q rows: that
        # step's buffers go back to the producer.
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=step > 0)
        # dQ is issued before dK so that its shares leave (below) while dK still runs.
        dq_tok = warpgroup_mma(ds_cur.permute((1, 0)), k_cur,
                               gl.zeros([BLOCK_M, D], gl.float32, dq_layout), use_acc=False, is_async=True)
        dk = warpgroup_mma(ds_cur, qs, dk, is_async=True)
        dv, dq = warpgroup_mma_wait(1, deps=(dv, dq_tok))
        # dQ shares: registers -> one of two shared buffers (the storer warp read it two steps ago)
        # -> the storer's TMA stores
        mbarrier.wait(dq_empty.index(step % 2), ((step // 2) & 1) ^ 1, pred=step >= 2)
        dq_smem.index(step % 2).store((dq * sm_scale).to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(dq_full.index(step % 2))
        dk = warpgroup_mma_wait(0, deps=(dk,))

    # dK / dV of this tile: straight into the accumulators when the tile is its block's only one in
    # this launch, else into the workspace that _block_ws_sum_kernel adds in a fixed order.
    kl = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, kv_layout))
    kv_mask = (key_start + kl < key_end)[:, None] & (dd < D)[None, :]
    if gl.load(seg_tile_count + seg0 + g * n_rows + row) == 1:
        acc = (key_start + kl).to(gl.int64)[:, None] * stride_at + g * stride_ag + dd[None, :]
        gl.store(DK_acc + acc, gl.load(DK_acc + acc, mask=kv_mask, other=0.0) + dk * sm_scale, mask=kv_mask)
        gl.store(DV_acc + acc, gl.load(DV_acc + acc, mask=kv_mask, other=0.0) + dv, mask=kv_mask)
    else:
        ws = slot.to(gl.int64) * BLOCK_N * D + kl[:, None] * D + dd[None, :]
        gl.store(DK_ws + ws, dk * sm_scale)
        gl.store(DV_ws + ws, dv)


@gluon.jit
def _sparse_bwd_hopper_kernel(
    q_desc, do_desc, k_desc, v_desc, dq_desc, LSE, DELTA,
    DK_ws, DV_ws, DK_acc, DV_acc, QPOS, TEACHER,
    tiles, order, entry_tok, entry_slot, row_key_start, row_key_end, seg_tile_count,
    tile0, q0, seg0, n_rows, chunk,
    stride_at, stride_ag, stride_ts, stride_tt, stride_tg,
    sm_scale, qk_scale,
    H: gl.constexpr, D: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, HAS_QPOS: gl.constexpr, WITH_TEACHER: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    t, g, row, e0, cnt = tile_header(tiles, order, tile0)
    if cnt > 0:  # unused tile slots have no entries
        key_start = gl.load(row_key_start + row)
        key_end = gl.load(row_key_end + row)
        k_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, D], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], do_desc.layout)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], plain)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], plain)
        meta_smem = gl.allocate_shared_memory(gl.int32, [STAGES * META_ROWS, BLOCK_M // R], plain)
        ds_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, BLOCK_M],
                                            gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
        dq_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], dq_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        start_ring(ready, empty, kv_bar, k_desc, v_desc, k_smem, v_smem, key_start, g, D, STAGES)
        init_ring(dq_full, dq_empty, 2, 1)

        gl.warp_specialize([
            (_consumer, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, meta_smem, ds_smem, dq_smem, ready,
                         empty, kv_bar, dq_full, dq_empty, DK_ws, DV_ws, DK_acc, DV_acc, TEACHER, seg_tile_count,
                         g, row, t - tile0, cnt, key_start, key_end, seg0, n_rows, stride_at, stride_ag, sm_scale,
                         qk_scale,
                         D, R, BLOCK_M, BLOCK_N, STAGES, WITH_TEACHER)),
            (_producer, (q_desc, do_desc, LSE, DELTA, QPOS, q_smem, do_smem, lse_smem, delta_smem, meta_smem, ready,
                         empty, entry_tok, entry_slot, e0, cnt, g, q0, stride_ts, stride_tt, stride_tg,
                         H, D, R, BLOCK_M, STAGES, HAS_QPOS)),
            (row_storer, (dq_desc, dq_smem, dq_full, dq_empty, entry_tok, entry_slot, e0, cnt, g, q0, chunk,
                          H, R, BLOCK_M)),
        ], [1, 1], [PRODUCER_REGS, PRODUCER_REGS])
        end_ring(ready, empty, kv_bar, STAGES)
        drop_ring(dq_full, dq_empty, 2)


class HopperBackward:
    """Descriptors of one backward call (the tensors stay put over its query chunks)."""

    def __init__(self, q, k, v, do, lse, delta, dq_part):
        total, hq, d = q.shape
        groups = k.shape[1]
        self.r = hq // groups
        self.q_desc = rows_desc(q.view(total * hq, d), self.r, d)
        self.do_desc = rows_desc(do.view(total * hq, d), self.r, d)
        self.k_desc = rows_desc(k.view(k.shape[0], groups * d), 128, d)
        self.v_desc = rows_desc(v.view(v.shape[0], groups * d), 128, d)
        self.dq_desc = rows_desc(dq_part.view(-1, d), self.r, d)
        self.lse, self.delta = lse, delta
        self.hq, self.d = hq, d

    def launch(self, n_tiles, dk_ws, dv_ws, dk_acc, dv_acc, teacher, plan, tiles, t0, q0, seg0, softmax_scale,
               with_teacher):
        _sparse_bwd_hopper_kernel[(n_tiles,)](
            self.q_desc, self.do_desc, self.k_desc, self.v_desc, self.dq_desc, self.lse, self.delta,
            dk_ws, dv_ws, dk_acc, dv_acc, plan.qpos_arg(self.lse), teacher,
            tiles.tiles, tiles.order, plan.entry_tok, plan.entry_slot, plan.row_key_start, plan.row_key_end,
            tiles.seg_tile_count,
            t0, q0, seg0, plan.n_rows, plan.chunk,
            dk_acc.stride(0), dk_acc.stride(1), teacher.stride(0), teacher.stride(1), teacher.stride(2),
            softmax_scale, softmax_scale * LOG2E,
            H=self.hq, D=self.d, R=self.r, BLOCK_M=64, BLOCK_N=128, STAGES=STAGES,
            HAS_QPOS=plan.has_qpos, WITH_TEACHER=with_teacher, num_warps=NUM_WARPS,
        )
