"""What the Gluon (sm_90) kernels share: the checks that decide whether they serve a call, row
descriptors for TMA, barrier rings, the sparse kernels' common prologue and epilogue (a plan
tile's header; the K / V block's TMA load) and their storer warp (per-slot rows out by TMA)."""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


def tma_tensors_ok(tensors16, fp32=()) -> bool:
    """`tensors16` all of one 16-bit dtype, `fp32` float32, every one contiguous on a 16-byte
    boundary (what TMA descriptors and the kernels' flat offsets need)."""
    return (tensors16[0].dtype in (torch.bfloat16, torch.float16)
            and {t.dtype for t in tensors16} == {tensors16[0].dtype}
            and all(t.dtype == torch.float32 for t in fp32)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (*tensors16, *fp32)))


def tma_shapes_ok(q, k, v, block_m: int, block_n: int, same_dtype=(), fp32=()) -> bool:
    """What both sparse Gluon kernels need of a call: `tma_tensors_ok` for q, k, v, `same_dtype`
    and `fp32`, d 64 or 128, 128-key blocks, 64-row steps of whole queries whose r heads fill
    8-row swizzle atoms (r in 8..64)."""
    d = q.shape[-1]
    r = q.shape[1] // k.shape[1]
    return (tma_tensors_ok((q, k, v, *same_dtype), fp32)
            and d in (64, 128) and v.shape[-1] == d and block_n == 128 and block_m == 64 and r in (8, 16, 32, 64))


def rows_desc(x2d, rows: int, d: int):
    """A TMA descriptor for boxes of `rows` rows of a [n, d]-strided 16-bit tensor."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16 if x2d.dtype == torch.bfloat16
                                                  else gl.float16)
    return TensorDescriptor(x2d, list(x2d.shape), list(x2d.stride()), [rows, d], layout)


@gluon.jit
def query_value(vals, jq, j: gl.constexpr):
    """Query j's entry of a step's per-query vector (held whole by every thread: a local sum)."""
    return gl.sum(gl.where(jq == j, vals, 0), 0)


@gluon.jit
def tile_header(tiles, order, tile0):
    """(slot, group, block row, first entry, entry count) of this program's plan tile; programs take
    the chunk's tiles longest first (plan.Tiles.order)."""
    t = gl.load(order + tile0 + gl.program_id(0))
    return t, gl.load(tiles + t * 4), gl.load(tiles + t * 4 + 1), gl.load(tiles + t * 4 + 2), gl.load(tiles + t * 4 + 3)


@gluon.jit
def init_ring(ready, empty, STAGES: gl.constexpr, READY_ARRIVALS: gl.constexpr):
    """A ring of STAGES buffers' barriers: `ready` takes READY_ARRIVALS arrives (the TMA bytes'
    and, with 2, the producer's own), `empty` one (the consumers done with the buffer)."""
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=READY_ARRIVALS)
        mbarrier.init(empty.index(i), count=1)


@gluon.jit
def drop_ring(ready, empty, STAGES: gl.constexpr):
    """The barriers of init_ring, invalidated once every partition is done."""
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def start_ring(ready, empty, kv_bar, k_desc, v_desc, k_smem, v_smem, key_start, g, D: gl.constexpr,
               STAGES: gl.constexpr):
    """The step ring's barriers, and the tile's K / V block on its way by TMA (kv_bar)."""
    init_ring(ready, empty, STAGES, 2)
    mbarrier.init(kv_bar, count=1)
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [key_start, g * D], kv_bar, k_smem.index(0))
    tma.async_copy_global_to_shared(v_desc, [key_start, g * D], kv_bar, v_smem.index(0))


@gluon.jit
def end_ring(ready, empty, kv_bar, STAGES: gl.constexpr):
    """The barriers of start_ring, invalidated once every partition is done."""
    drop_ring(ready, empty, STAGES)
    mbarrier.invalidate(kv_bar)


@gluon.jit
def row_storer(desc, smem, full, empty, entry_tok, entry_slot, e0, cnt, g, q0, chunk,
               H: gl.constexpr, R: gl.constexpr, BLOCK_M: gl.constexpr):
    """One warp: each step's per-slot rows (the forward's O partials, the backward's dQ shares) from
    one of two shared buffers to their rows of the per-slot buffer, one TMA store per query. The
    consumers only fill a buffer and signal `full`; `empty` hands it back once the stores have read
    it. When the consumers issued the stores themselves, one warp's four issues and flushes in a
    row held the others at their next barrier (round 15: the backward 6% faster without)."""
    BQ: gl.constexpr = BLOCK_M // R
    q_layout: gl.constexpr = gl.BlockedLayout([BQ], [32], [1], [0])
    jq = gl.arange(0, BQ, layout=q_layout)
    for step in range(gl.cdiv(cnt, BQ)):
        b = step % 2
        ej = step * BQ + jq
        ok = ej < cnt
        tok = gl.load(entry_tok + e0 + ej, mask=ok, other=q0)
        slot = gl.load(entry_slot + e0 + ej, mask=ok, other=0)
        rows = gl.where(ok, (slot * chunk + tok - q0) * H + g * R, -1)
        mbarrier.wait(full.index(b), (step // 2) & 1)
        for j in gl.static_range(BQ):
            row_j = query_value(rows, jq, j)
            if row_j >= 0:
                tma.async_copy_shared_to_global(desc, [row_j, 0], smem.index(b).slice(j * R, R))
        tma.store_wait(0)  # the buffer has been read
        gl.thread_barrier()
        mbarrier.arrive(empty.index(b))
    tma.store_wait(0)
