"""The Gluon (sm_90) sparse backward and forward on a CPU: which calls they serve, and their sm_90 builds.

Gluon kernels do not run under TRITON_INTERPRET, so their results are checked on the GPU against
the Triton twins and float64 (tests/test_triton_gpu.py). Here Triton compiles the kernels for sm_90
without a GPU (ptxas ships with the pinned Triton) and each build is checked for what made earlier
versions slow: register spills (wgmma descriptors hoisted out of the step loop), wgmmas that ptxas
serialises, and shared memory beyond a Hopper block's 227 KiB.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

from msa_megatron.ops.triton import dense_kl_hopper, sparse_bwd_hopper as hopper, sparse_fwd_hopper as fwd_hopper

HOPPER_SMEM_BYTES = 227 * 1024


def _tensors(r=16, d=128, total=256, groups=2, dtype=torch.bfloat16):
    hq = r * groups
    q = torch.zeros(total, hq, d, dtype=dtype)
    k = torch.zeros(total, groups, d, dtype=dtype)
    lse = torch.zeros(total, hq)
    dq_part = torch.zeros(16, total, hq, d, dtype=dtype)
    return [q, k, k.clone(), q.clone(), lse, lse.clone(), dq_part]


def _misaligned(t):
    """t's values 2 bytes past a 16-byte boundary: no TMA descriptor."""
    return torch.zeros(t.numel() + 8, dtype=t.dtype)[1:t.numel() + 1].view(t.shape)


def _strided(t):
    """t's shape with every other row of a larger tensor (not contiguous)."""
    return torch.zeros(t.shape[0] * 2, *t.shape[1:], dtype=t.dtype)[::2]


@pytest.mark.parametrize("r,d", [(8, 128), (16, 128), (32, 64), (64, 128)])
def test_serves_the_shapes_it_was_built_for(r, d):
    assert hopper.serves(*_tensors(r, d), 64, 128)
    assert hopper.serves(*_tensors(r, d), 64, 128, torch.empty(2**31 - 1, device="meta"))


@pytest.mark.parametrize("change", ["r=4", "d=96", "fp32 dq", "fp32 q", "offset", "strided", "block 64", "rows 32",
                                    "teacher 2^31"])
def test_leaves_other_calls_to_the_triton_kernel(change):
    t = _tensors(r=4 if change == "r=4" else 16, d=96 if change == "d=96" else 128)
    block_m, block_n = (32 if change == "rows 32" else 64), (64 if change == "block 64" else 128)
    if change == "fp32 dq":
        t[6] = t[6].float()
    if change == "fp32 q":
        t[0] = t[0].float()
    if change == "offset":
        t[0] = _misaligned(t[0])
    if change == "strided":
        t[3] = _strided(t[3])
    # the kernel's teacher offsets are int32: a teacher buffer of 2^31 elements is not its to write
    teacher = torch.empty(2**31 if change == "teacher 2^31" else 2**31 - 1, device="meta")
    assert not hopper.serves(*t, block_m, block_n, teacher)


def _nvidia_tool(name):
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    assert tool.exists(), f"{name} not found at {tool} (it ships with the pinned Triton)"
    return str(tool)


def _compile_sm90(fn, kinds, consts, num_warps):
    """Triton's sm_90 build of a Gluon kernel, without a GPU: pointer arguments 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = kinds.get(name, "*fp32" if name[0].isupper() else "i32")
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def _row_desc(n, d):
    from triton.experimental.gluon import language as gl

    return f"tensordesc<bf16[{n}, {d}],{gl.NVMMASharedLayout.get_default_for([n, d], gl.bfloat16)!r}>"



def _build_bwd(r, d, has_qpos, with_teacher):
    kinds = dict(q_desc=_row_desc(r, d), do_desc=_row_desc(r, d), k_desc=_row_desc(128, d), v_desc=_row_desc(128, d),
                 dq_desc=_row_desc(r, d), sm_scale="fp32", qk_scale="fp32", QPOS="*i32", tiles="*i32", order="*i32",
                 entry_tok="*i32", entry_slot="*i32", row_key_start="*i32", row_key_end="*i32",
                 seg_tile_count="*i32")
    consts = dict(H=4 * r, D=d, R=r, BLOCK_M=64, BLOCK_N=128, STAGES=hopper.STAGES, HAS_QPOS=has_qpos,
                  WITH_TEACHER=with_teacher)
    return _compile_sm90(hopper._sparse_bwd_hopper_kernel, kinds, consts, hopper.NUM_WARPS)


def _build_fwd(r, d, has_qpos):
    kinds = dict(q_desc=_row_desc(r, d), k_desc=_row_desc(128, d), v_desc=_row_desc(128, d), o_desc=_row_desc(r, d),
                 qk_scale="fp32", QPOS="*i32", tiles="*i32", order="*i32", entry_tok="*i32", entry_slot="*i32",
                 row_key_start="*i32", row_key_end="*i32")
    consts = dict(H=4 * r, D=d, R=r, BLOCK_M=64, BLOCK_N=128, STAGES=fwd_hopper.STAGES, HAS_QPOS=has_qpos)
    return _compile_sm90(fwd_hopper._sparse_fwd_hopper_kernel, kinds, consts, fwd_hopper.NUM_WARPS)


def _build_dense_kl(r, d, di, has_qpos):
    kinds = dict(q_desc=_row_desc(64, d), k_desc=_row_desc(128, d), qi_desc=_row_desc(64, di), ki_desc=_row_desc(128, di),
                 W="*bf16", QPOS="*i32", row_order="*i32", row_key_start="*i32", row_doc_end="*i32", row_blk="*i32",
                 row_q_lo="*i32", row_q_doc_end="*i32", qk_scale="fp32", iqk_scale="fp32")
    consts = dict(D=d, DI=di, R=r, HAS_QPOS=has_qpos, Q_BUFFERS=dense_kl_hopper.q_buffers(d, di, r))
    return _compile_sm90(dense_kl_hopper._kl_dense_hopper_kernel, kinds, consts, dense_kl_hopper.NUM_WARPS)


BUILDS = {
    "bwd r16 d128": lambda: _build_bwd(16, 128, False, True),
    "bwd r16 d128 no teacher": lambda: _build_bwd(16, 128, False, False),
    "bwd r8 d128 qpos": lambda: _build_bwd(8, 128, True, True),
    "bwd r64 d64": lambda: _build_bwd(64, 64, False, True),
    "fwd r16 d128": lambda: _build_fwd(16, 128, False),
    "fwd r8 d128 qpos": lambda: _build_fwd(8, 128, True),
    "fwd r64 d64": lambda: _build_fwd(64, 64, False),
    "dense kl r16 d128": lambda: _build_dense_kl(16, 128, 128, False),
    "dense kl r8 d128 qpos": lambda: _build_dense_kl(8, 128, 128, True),
    "dense kl r4 d64 di64": lambda: _build_dense_kl(4, 64, 64, False),
    "dense kl r64 d128": lambda: _build_dense_kl(64, 128, 128, False),
}


@pytest.mark.parametrize("build", list(BUILDS))
def test_sm90_build_has_no_spills_and_fits_shared_memory(build, tmp_path):
    kernel = BUILDS[build]()
    assert kernel.metadata.shared <= HOPPER_SMEM_BYTES, kernel.metadata.shared
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    stack = re.search(r"STACK:(\d+)", usage)
    assert stack and int(stack.group(1)) == 0, usage
    # the producer warp hands its registers to the consumer warpgroups
    assert "setmaxnreg.dec.sync.aligned.u32 24" in kernel.asm["ptx"].replace("\t", " ").replace("  ", " ")
    # ptxas keeps the wgmmas asynchronous: it warns "wgmma.mma_async instructions are serialized" (C7515
    # when plain instructions define an in-flight accumulator, C7514 when they read one) otherwise.
    # Round 8's dK-across-the-loop variant got C7515 and was 15% slower; round 9's next-step S
    # variant got C7514 (every wgmma then waited for alone in SASS).
    ptx = tmp_path / "k.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([_nvidia_tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True, check=True)
    assert "serialized" not in report.stdout + report.stderr, report.stderr


def test_dense_kl_takes_its_log2_on_the_mufu_unit():
    """The KL term's log2 (one per key and query) is lg2.approx: libdevice's exact log2f cost the
    pass 6-7% on an H100 (round 13)."""
    ptx = BUILDS["dense kl r16 d128"]().asm["ptx"]
    assert "lg2.approx.ftz.f32" in ptx and "__nv_log2f" not in ptx


def test_dense_kl_loads_each_heads_lse_while_its_product_runs():
    """Between a teacher product's wait and its exp2 there is no shared-memory load: the head's lse
    rows were loaded before the wait (loaded after it, their latency was the consumers' largest
    single stall in Nsight Compute's sampling, round 14)."""
    lines = BUILDS["dense kl r16 d128"]().asm["ptx"].splitlines()
    loads_before_exp2 = []
    for i, line in enumerate(lines):
        if "wgmma.wait_group" in line:
            tail = lines[i + 1:]
            end = next((j for j, later in enumerate(tail) if "ex2.approx" in later or "wgmma.wait_group" in later), None)
            if end is not None and "ex2.approx" in tail[end]:
                loads_before_exp2.append(sum("ld.shared" in later for later in tail[:end]))
    # r 16 unrolls four heads per loop turn; the student's index lse is still loaded after its wait
    assert loads_before_exp2.count(0) >= 4, loads_before_exp2


@pytest.mark.parametrize("build", [name for name in BUILDS if not name.startswith("dense kl")])
def test_sparse_kernels_leave_their_tma_stores_to_a_worker_warp(build):
    """Every TMA store of the sparse kernels (O partials, dQ shares) is issued by a 24-register worker
    warp, not by the consumer warpgroups: when one consumer warp issued them, its four issues and
    flushes in a row held the others at their next barrier (round 15: the backward 6% and the
    forward 1.3% faster without)."""
    lines = BUILDS[build]().asm["ptx"].splitlines()
    stores = [i for i, line in enumerate(lines) if "cp.async.bulk.tensor" in line and "global.shared" in line]
    assert stores, build
    for i in stores:
        # the register count set last before the store: the partition that runs it
        regs = next(line for line in reversed(lines[:i]) if "setmaxnreg" in line)
        assert regs.split()[-1].rstrip(";") == "24", (build, regs)


@pytest.mark.parametrize("with_qpos", [False, True])
def test_launch_passes_every_kernel_argument(with_qpos, monkeypatch):
    """HopperBackward.launch against the kernel's signature (a recorder stands in for the launch):
    every parameter bound once, qpos and HAS_QPOS taken from the plan."""
    from types import SimpleNamespace

    q, k, v, do, lse, delta, dq_part = _tensors()
    ints = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    qpos = ints(q.shape[0])
    plan = SimpleNamespace(entry_tok=ints(8), entry_slot=ints(8), row_key_start=ints(4), row_key_end=ints(4),
                           n_rows=4, chunk=q.shape[0], has_qpos=with_qpos,
                           qpos_arg=lambda fallback: qpos if with_qpos else fallback)
    tiles = SimpleNamespace(tiles=ints(16), order=ints(16), seg_tile_count=ints(8))
    calls = []
    kernel_fn = hopper._sparse_bwd_hopper_kernel.fn
    recorder = type("Recorder", (), {"__getitem__": lambda self, grid: lambda *a, **kw: calls.append((grid, a, kw))})
    monkeypatch.setattr(hopper, "_sparse_bwd_hopper_kernel", recorder())
    ws, acc, teacher = torch.zeros(1), torch.zeros(q.shape[0], 2, 128), torch.zeros(16, q.shape[0], 2, 128)
    hopper.HopperBackward(q, k, v, do, lse, delta, dq_part).launch(3, ws, ws, acc, acc, teacher, plan, tiles, 0, 0, 0,
                                                                   0.1, True)
    (grid, args, kwargs), = calls
    assert grid == (3,) and kwargs.pop("num_warps") == hopper.NUM_WARPS
    bound = inspect.signature(kernel_fn).bind(*args, **kwargs).arguments
    assert bound["QPOS"] is (qpos if with_qpos else lse) and bound["HAS_QPOS"] is with_qpos
    assert bound["LSE"] is lse and bound["TEACHER"] is teacher and bound["R"] == 16 and bound["WITH_TEACHER"]


def _fwd_tensors(r=16, d=128, total=256, groups=2, dtype=torch.bfloat16):
    hq = r * groups
    q = torch.zeros(total, hq, d, dtype=dtype)
    k = torch.zeros(total, groups, d, dtype=dtype)
    return [q, k, k.clone(), torch.zeros(16, total, hq, d, dtype=dtype), torch.zeros(16, total, hq)]


@pytest.mark.parametrize("r,d", [(8, 128), (16, 128), (32, 64), (64, 128)])
def test_forward_serves_the_shapes_it_was_built_for(r, d):
    assert fwd_hopper.serves(*_fwd_tensors(r, d), 64, 128)


@pytest.mark.parametrize("change", ["r=4", "d=96", "fp32 o_part", "fp64 lse", "offset", "strided", "block 64",
                                    "rows 32", "lse 2^31"])
def test_forward_leaves_other_calls_to_the_triton_kernel(change):
    t = _fwd_tensors(r=4 if change == "r=4" else 16, d=96 if change == "d=96" else 128)
    block_m, block_n = (32 if change == "rows 32" else 64), (64 if change == "block 64" else 128)
    if change == "fp32 o_part":
        t[3] = t[3].float()
    if change == "fp64 lse":
        t[4] = t[4].double()
    if change == "offset":
        t[0] = _misaligned(t[0])
    if change == "strided":
        t[1] = _strided(t[1])
    if change == "lse 2^31":  # the kernel's lse-partial offsets are int32
        t[4] = torch.empty(2**31, device="meta")
    assert not fwd_hopper.serves(*t, block_m, block_n)


@pytest.mark.parametrize("with_qpos", [False, True])
def test_forward_launch_passes_every_kernel_argument(with_qpos, monkeypatch):
    """HopperForward.launch against the kernel's signature (a recorder stands in for the launch)."""
    from types import SimpleNamespace

    q, k, v, o_part, l_part = _fwd_tensors()
    ints = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    qpos = ints(q.shape[0])
    plan = SimpleNamespace(entry_tok=ints(8), entry_slot=ints(8), row_key_start=ints(4), row_key_end=ints(4),
                           chunk=q.shape[0], has_qpos=with_qpos,
                           qpos_arg=lambda fallback: qpos if with_qpos else fallback)
    tiles = SimpleNamespace(tiles=ints(16), order=ints(16))
    calls = []
    kernel_fn = fwd_hopper._sparse_fwd_hopper_kernel.fn
    recorder = type("Recorder", (), {"__getitem__": lambda self, grid: lambda *a, **kw: calls.append((grid, a, kw))})
    monkeypatch.setattr(fwd_hopper, "_sparse_fwd_hopper_kernel", recorder())
    fwd_hopper.HopperForward(q, k, v, o_part, l_part).launch(3, plan, tiles, 2, 5, 0.1)
    (grid, args, kwargs), = calls
    assert grid == (3,) and kwargs.pop("num_warps") == fwd_hopper.NUM_WARPS
    bound = inspect.signature(kernel_fn).bind(*args, **kwargs).arguments
    assert bound["QPOS"] is (qpos if with_qpos else l_part) and bound["HAS_QPOS"] is with_qpos
    assert bound["L_part"] is l_part and bound["R"] == 16 and bound["H"] == 32 and bound["D"] == 128
    assert (bound["tile0"], bound["q0"], bound["chunk"]) == (2, 5, q.shape[0])
    assert (bound["stride_ls"], bound["stride_lt"]) == l_part.stride()[:2]


def _dense_kl_tensors(r=16, d=128, di=128, total=256, groups=2, dtype=torch.bfloat16):
    q = torch.zeros(total, r * groups, d, dtype=dtype)
    k = torch.zeros(total, groups, d, dtype=dtype)
    return [q, k, torch.zeros(total, groups, di, dtype=dtype), torch.zeros(total, di, dtype=dtype)]


@pytest.mark.parametrize("r,d,di", [(1, 128, 128), (16, 128, 128), (12, 64, 64), (64, 128, 64)])
def test_dense_kl_serves_the_shapes_it_was_built_for(r, d, di):
    assert dense_kl_hopper.serves(*_dense_kl_tensors(r, d, di))


@pytest.mark.parametrize("change", ["d=96", "di=32", "r=65", "fp32 qi", "offset", "strided"])
def test_dense_kl_leaves_other_calls_to_the_triton_kernel(change):
    t = _dense_kl_tensors(r=65 if change == "r=65" else 16, d=96 if change == "d=96" else 128,
                          di=32 if change == "di=32" else 128)
    if change == "fp32 qi":
        t[2] = t[2].float()
    if change == "offset":
        t[0] = _misaligned(t[0])
    if change == "strided":
        t[1] = _strided(t[1])
    assert not dense_kl_hopper.serves(*t)


@pytest.mark.parametrize("with_qpos", [False, True])
def test_dense_kl_launch_passes_every_kernel_argument(with_qpos, monkeypatch):
    """HopperDenseKL.launch against the kernel's signature (a recorder stands in for the launch):
    the share buffer's strides reach the kernel as (group, block, query)."""
    from types import SimpleNamespace

    q, k, qi, ki = _dense_kl_tensors()
    ints = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    lse_heads, ilse, qpos = torch.zeros(32, 256), torch.zeros(2, 256), ints(256)
    rows = SimpleNamespace(n=5, key_start=ints(5), doc_end=ints(5), blk=ints(5), q_lo=ints(5), q_doc_end=ints(5))
    w, dki_part, kl_part = torch.zeros(2, 3, 64, 128), torch.zeros(2, 256, 128), torch.zeros(2, 5)
    calls = []
    kernel_fn = dense_kl_hopper._kl_dense_hopper_kernel.fn
    recorder = type("Recorder", (), {"__getitem__": lambda self, grid: lambda *a, **kw: calls.append((grid, a, kw))})
    monkeypatch.setattr(dense_kl_hopper, "_kl_dense_hopper_kernel", recorder())
    launcher = dense_kl_hopper.HopperDenseKL(q, k, qi, ki, lse_heads, ilse, qpos if with_qpos else None)
    launcher.launch(rows, ints(5), w, dki_part, kl_part, 64, 128, 0.5, 0.25)
    (grid, args, kwargs), = calls
    assert grid == (5 * 2,) and kwargs.pop("num_warps") == dense_kl_hopper.NUM_WARPS  # (row, group), group fastest
    bound = inspect.signature(kernel_fn).bind(*args, **kwargs).arguments
    assert bound["HAS_QPOS"] is with_qpos and (bound["QPOS"] is qpos) == with_qpos
    assert bound["LSE"] is lse_heads and bound["ILSE"] is ilse and bound["W"] is w and bound["R"] == 16
    assert (bound["stride_lh"], bound["stride_ig"]) == (256, 256)
    assert (bound["stride_wg"], bound["stride_wb"], bound["stride_wt"]) == (3 * 64 * 128, 64 * 128, 128)
    assert (bound["stride_dg"], bound["stride_dt"]) == dki_part.stride()[:2]
    assert (bound["q0"], bound["q1"], bound["n_rows"], bound["qk_scale"], bound["iqk_scale"]) == (64, 128, 5, 0.5, 0.25)
    assert bound["n_groups"] == 2
