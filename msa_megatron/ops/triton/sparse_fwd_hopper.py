"""Sparse attention forward for Hopper (sm_90), written in Gluon.

The same work and outputs as `sparse_attn._sparse_fwd_kernel` (each slot's o partial normalised by
its l, and its lse), which stays the CPU-tested twin and the fallback. A program owns one plan tile:
one 128-key block of one group and the queries that selected it, 64 (query, head) rows a step. A
producer warp gathers each step's Q rows by TMA (a query's r heads are one [r, d] box) STAGES steps
ahead; two consumer warpgroups take alternate steps, so one's softmax runs while the other's
products hold the tensor cores. K and V stay in shared memory; S = Q K^T and O = P V are
asynchronous wgmmas (P from registers); the O partials leave through shared memory by TMA stores
that a storer warp issues (`hopper_common.row_storer`, round 15: 1.3% off the forward with its
combine) and that finish under the warpgroup's next step.

On by default since round 10 (`CONFIG["fwd_hopper"]`): results bitwise equal to the Triton kernel
at 4K / 32K / 128K in one H100 A/B and the kernel 14-15% faster (docs/kernel_notes.md, round 9).
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
    row_storer,
    rows_desc,
    start_ring,
    tile_header,
    tma_shapes_ok,
)

LN2 = 0.6931471805599453
_LN2 = gl.constexpr(LN2)
NUM_WARPS = 4  # the default partition is consumer 0; consumer 1 and the producer warp are workers
STAGES = 4  # Q-row buffers: two steps in flight per consumer
CONSUMER_REGS = gl.constexpr(240)  # the loading warp needs few registers; the rest go to the consumers
PRODUCER_REGS = gl.constexpr(24)

# per-row facts of a step (int32 rows of BLOCK_M) and per-query ones (rows of BQ)
ROW_KPOS = gl.constexpr(0)
ROW_LPART = gl.constexpr(1)
ROW_FACTS = gl.constexpr(2)
Q_ZERO = gl.constexpr(0)
Q_FACTS = gl.constexpr(1)


def serves(q, k, v, o_part, l_part, block_m: int, block_n: int) -> bool:
    """Whether this kernel handles the call (else the Triton kernel runs): `tma_shapes_ok`, and O-partial rows, lse-partial offsets and Q rows that fit the int32 the
    kernel computes them in."""
    d = q.shape[-1]
    return (tma_shapes_ok(q, k, v, block_m, block_n, (o_part,), (l_part,))
            and max(o_part.numel() // d, l_part.numel(), q.numel() // d) < 2**31)


@gluon.jit
def _fwd_producer(q_desc, QPOS, q_smem, row_smem, qf_smem, ready, empty, entry_tok, entry_slot, e0, cnt, g, q0,
                  stride_ls, stride_lt,
                  H: gl.constexpr, D: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                  HAS_QPOS: gl.constexpr):
    """One warp: a step's Q rows by TMA, its rows' key positions and lse offsets.
    Rows past the tile's last entry repeat the last query (finite values; masked, not stored)."""
    BQ: gl.constexpr = BLOCK_M // R
    nbytes: gl.constexpr = BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8
    vec_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    q_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    m = gl.arange(0, BLOCK_M, layout=vec_layout)
    for step in range(gl.cdiv(cnt, BQ)):
        st = step % STAGES
        e = step * BQ + m // R
        ok = e < cnt
        tok = gl.load(entry_tok + e0 + gl.minimum(e, cnt - 1))
        slot = gl.load(entry_slot + e0 + gl.minimum(e, cnt - 1))
        if HAS_QPOS:
            kpos = gl.where(ok, gl.load(QPOS + tok), -1)
        else:
            kpos = gl.where(ok, tok, -1)
        lrow = slot * stride_ls + (tok - q0) * stride_lt + g * R + m % R
        mbarrier.wait(empty.index(st), ((step // STAGES) & 1) ^ 1, pred=step >= STAGES)
        bar = ready.index(st)
        mbarrier.expect(bar, nbytes)
        for i in gl.static_range(BQ):
            row = gl.load(entry_tok + e0 + gl.minimum(step * BQ + i, cnt - 1)) * H + g * R
            tma.async_copy_global_to_shared(q_desc, [row, 0], bar, q_smem.index(st).slice(i * R, R))
        row_smem.index(st * ROW_FACTS + ROW_KPOS).store(kpos)
        row_smem.index(st * ROW_FACTS + ROW_LPART).store(lrow)
        qf_smem.index(st * Q_FACTS + Q_ZERO).store(gl.zeros([BQ], gl.int32, q_layout))
        gl.thread_barrier()
        mbarrier.arrive(bar)


@gluon.jit
def _fwd_consumer(k_smem, v_smem, q_smem, row_smem, qf_smem, o_smem, ready, empty, kv_bar, o_full, o_empty, L_part,
                  cnt, key_start, key_end, qk_scale,
                  PART: gl.constexpr, D: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup: steps PART, PART + 2, ... of the tile."""
    BQ: gl.constexpr = BLOCK_M // R
    dtype: gl.constexpr = o_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    q_layout: gl.constexpr = gl.BlockedLayout([BQ], [32], [4], [0])

    key_tok = key_start + gl.arange(0, BLOCK_N, layout=key_layout)
    last_key = gl.where(key_end - key_start == BLOCK_N, key_start + BLOCK_N - 1, 2147483647)
    o_buf = o_smem.index(PART)
    mbarrier.wait(kv_bar, 0)
    for step in range(PART, gl.cdiv(cnt, BQ), 2):
        st = step % STAGES
        mbarrier.wait(ready.index(st), (step // STAGES) & 1)
        # K and V indexed by a zero the compiler cannot see (descriptors rebuilt, not hoisted and spilled)
        zero = gl.sum(qf_smem.index(st * Q_FACTS + Q_ZERO).load(q_layout), 0) // BQ
        k_cur = k_smem.index(zero)
        v_cur = v_smem.index(zero)
        s_tok = warpgroup_mma(q_smem.index(st), k_cur.permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        kpos = row_smem.index(st * ROW_FACTS + ROW_KPOS).load(row_layout)
        lrow = row_smem.index(st * ROW_FACTS + ROW_LPART).load(row_layout)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        gl.thread_barrier()  # every thread's S is done: the step's Q rows and facts go back
        mbarrier.arrive(empty.index(st))
        s = s * qk_scale
        if gl.min(kpos, 0) < last_key:  # the block's own queries, or a short last step
            visible = (key_tok[None, :] <= kpos[:, None]) & (key_tok < key_end)[None, :]
            s = gl.where(visible, s, float("-inf"))
        m = gl.max(s, 1)
        m = gl.where(m == float("-inf"), 0.0, m)
        p = gl.exp2(s - m[:, None])
        l = gl.sum(p, 1)
        o_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_cur,
                              gl.zeros([BLOCK_M, D], gl.float32, o_layout), use_acc=False, is_async=True)
        gl.store(L_part + lrow, (m + gl.log2(l)) * _LN2, mask=kpos >= 0)
        o = warpgroup_mma_wait(0, deps=(o_tok,))
        o = o / gl.convert_layout(l, gl.SliceLayout(1, o_layout))[:, None]
        # the storer warp has read this warpgroup's previous step out of o_buf
        mbarrier.wait(o_empty.index(PART), ((step // 2) & 1) ^ 1, pred=step >= 2)
        o_buf.store(o.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(o_full.index(PART))


@gluon.jit
def _sparse_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, o_desc, L_part, QPOS,
    tiles, order, entry_tok, entry_slot, row_key_start, row_key_end,
    tile0, q0, chunk, stride_ls, stride_lt, qk_scale,
    H: gl.constexpr, D: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, HAS_QPOS: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    _, g, row, e0, cnt = tile_header(tiles, order, tile0)
    if cnt > 0:  # unused tile slots have no entries
        BQ: gl.constexpr = BLOCK_M // R
        key_start = gl.load(row_key_start + row)
        key_end = gl.load(row_key_end + row)
        k_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, D], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], q_desc.layout)
        o_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], o_desc.layout)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        row_smem = gl.allocate_shared_memory(gl.int32, [STAGES * ROW_FACTS, BLOCK_M], plain)
        qf_smem = gl.allocate_shared_memory(gl.int32, [STAGES * Q_FACTS, BQ], plain)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        o_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        o_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        start_ring(ready, empty, kv_bar, k_desc, v_desc, k_smem, v_smem, key_start, g, D, STAGES)
        init_ring(o_full, o_empty, 2, 1)
        gl.warp_specialize([
            (_fwd_consumer, (k_smem, v_smem, q_smem, row_smem, qf_smem, o_smem, ready, empty, kv_bar, o_full, o_empty,
                             L_part, cnt, key_start, key_end, qk_scale, 0, D, R, BLOCK_M, BLOCK_N, STAGES)),
            (_fwd_consumer, (k_smem, v_smem, q_smem, row_smem, qf_smem, o_smem, ready, empty, kv_bar, o_full, o_empty,
                             L_part, cnt, key_start, key_end, qk_scale, 1, D, R, BLOCK_M, BLOCK_N, STAGES)),
            (_fwd_producer, (q_desc, QPOS, q_smem, row_smem, qf_smem, ready, empty, entry_tok, entry_slot, e0, cnt,
                             g, q0, stride_ls, stride_lt, H, D, R, BLOCK_M, STAGES, HAS_QPOS)),
            (row_storer, (o_desc, o_smem, o_full, o_empty, entry_tok, entry_slot, e0, cnt, g, q0, chunk, H, R, BLOCK_M)),
        ], [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
        end_ring(ready, empty, kv_bar, STAGES)
        drop_ring(o_full, o_empty, 2)


class HopperForward:
    """Descriptors of one forward call (the tensors stay put over its query chunks)."""

    def __init__(self, q, k, v, o_part, l_part):
        total, hq, d = q.shape
        groups = k.shape[1]
        self.r = hq // groups
        self.q_desc = rows_desc(q.view(total * hq, d), self.r, d)
        self.k_desc = rows_desc(k.view(k.shape[0], groups * d), 128, d)
        self.v_desc = rows_desc(v.view(v.shape[0], groups * d), 128, d)
        self.o_desc = rows_desc(o_part.view(-1, d), self.r, d)
        self.l_part = l_part
        self.hq, self.d = hq, d

    def launch(self, n_tiles, plan, tiles, t0, q0, qk_scale):
        _sparse_fwd_hopper_kernel[(n_tiles,)](
            self.q_desc, self.k_desc, self.v_desc, self.o_desc, self.l_part, plan.qpos_arg(self.l_part),
            tiles.tiles, tiles.order, plan.entry_tok, plan.entry_slot, plan.row_key_start, plan.row_key_end,
            t0, q0, plan.chunk, self.l_part.stride(0), self.l_part.stride(1), qk_scale,
            H=self.hq, D=self.d, R=self.r, BLOCK_M=64, BLOCK_N=128, STAGES=STAGES, HAS_QPOS=plan.has_qpos,
            num_warps=NUM_WARPS,
        )
