"""The Gluon (sm_90) sparse backward on a CPU: which calls it serves, and its sm_90 build.

Gluon kernels do not run under TRITON_INTERPRET, so their results are checked on the GPU against
the Triton twin and float64 (tests/test_triton_gpu.py). Here Triton compiles the kernel for sm_90
without a GPU (ptxas ships with the pinned Triton) and the build is checked for what made the
first version slow: register spills (wgmma descriptors hoisted out of the step loop) and shared
memory beyond a Hopper block's 227 KiB.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

from msa_megatron.ops.triton import sparse_bwd_hopper as hopper

HOPPER_SMEM_BYTES = 227 * 1024


def _tensors(r=16, d=128, total=256, groups=2, dtype=torch.bfloat16):
    hq = r * groups
    q = torch.zeros(total, hq, d, dtype=dtype)
    k = torch.zeros(total, groups, d, dtype=dtype)
    lse = torch.zeros(total, hq)
    dq_part = torch.zeros(16, total, hq, d, dtype=dtype)
    return [q, k, k.clone(), q.clone(), lse, lse.clone(), dq_part]


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
    if change == "offset":  # 2 bytes past a 16-byte boundary: no TMA descriptor
        t[0] = torch.zeros(t[0].numel() + 8, dtype=t[0].dtype)[1:t[0].numel() + 1].view(t[0].shape)
    if change == "strided":
        t[3] = torch.zeros(t[3].shape[0] * 2, *t[3].shape[1:], dtype=t[3].dtype)[::2]
    # the kernel's teacher offsets are int32: a teacher buffer of 2^31 elements is not its to write
    teacher = torch.empty(2**31 if change == "teacher 2^31" else 2**31 - 1, device="meta")
    assert not hopper.serves(*t, block_m, block_n, teacher)


def _nvidia_tool(name):
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    assert tool.exists(), f"{name} not found at {tool} (it ships with the pinned Triton)"
    return str(tool)


def _compile_sm90(r, d, has_qpos, with_teacher):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    def rows(n):
        layout = gl.NVMMASharedLayout.get_default_for([n, d], gl.bfloat16)
        return f"tensordesc<bf16[{n}, {d}],{layout!r}>"

    fn = hopper._sparse_bwd_hopper_kernel
    kinds = dict(q_desc=rows(r), do_desc=rows(r), k_desc=rows(128), v_desc=rows(128), dq_desc=rows(r),
                 sm_scale="fp32", qk_scale="fp32", QPOS="*i32", tiles="*i32", order="*i32", entry_tok="*i32",
                 entry_slot="*i32", row_key_start="*i32", row_key_end="*i32", seg_tile_count="*i32")
    consts = dict(H=4 * r, D=d, R=r, BLOCK_M=64, BLOCK_N=128, STAGES=hopper.STAGES, HAS_QPOS=has_qpos,
                  WITH_TEACHER=with_teacher)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = kinds.get(name, "*fp32" if name[0].isupper() else "i32")
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=hopper.NUM_WARPS))


@pytest.mark.parametrize("r,d,has_qpos,with_teacher", [(16, 128, False, True), (16, 128, False, False),
                                                       (8, 128, True, True), (64, 64, False, True)])
def test_sm90_build_has_no_spills_and_fits_shared_memory(r, d, has_qpos, with_teacher, tmp_path):
    kernel = _compile_sm90(r, d, has_qpos, with_teacher)
    assert kernel.metadata.shared <= HOPPER_SMEM_BYTES, kernel.metadata.shared
    cubin = tmp_path / "bwd.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    stack = re.search(r"STACK:(\d+)", usage)
    assert stack and int(stack.group(1)) == 0, usage
    # the producer warp hands its registers to the two consumer warpgroups
    assert "setmaxnreg.dec.sync.aligned.u32 24" in kernel.asm["ptx"].replace("\t", " ").replace("  ", " ")
    # ptxas keeps the wgmmas asynchronous: it warns "wgmma.mma_async instructions are serialized" (C7515
    # when plain instructions define an in-flight accumulator, C7514 when they read one) otherwise.
    # Round 8's dK-across-the-loop variant got C7515 and was 15% slower; round 9's next-step S
    # variant got C7514 (every wgmma then waited for alone in SASS).
    ptx = tmp_path / "bwd.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([_nvidia_tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "bwd.o")],
                            capture_output=True, text=True, check=True)
    assert "serialized" not in report.stdout + report.stderr, report.stderr


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
