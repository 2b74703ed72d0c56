"""Small helpers shared by the MSA Triton kernels: launch knobs, output poisoning, interpreter shim."""

from __future__ import annotations

import os
import statistics

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# log2 on the GPU's MUFU unit (~2^-22 relative error): tl.log2 / gl.log2 compile to libdevice's exact
# log2f, a dozen FMAs and a branch per element, where the KL terms take one per (key, query).
LOG2_PTX = tl.constexpr("lg2.approx.ftz.f32 $0, $1;")
_PTX_LOG2 = tl.constexpr(not interpreting())  # the interpreter runs no inline PTX


@triton.jit
def log2_approx(x):
    if _PTX_LOG2:
        return tl.inline_asm_elementwise(LOG2_PTX, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


def on_sm90(t: torch.Tensor) -> bool:
    """t lives on a Hopper (sm_90) GPU, where the Gluon kernels run."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def poisoning() -> bool:
    """MSA_TRITON_POISON=1: fill every output and workspace with NaN / -7 before the kernels run.

    Tests turn this on so that an element no kernel wrote shows up as NaN (or -7 in int outputs).
    Read at call time, so a test can switch it with monkeypatch.
    """
    return os.environ.get("MSA_TRITON_POISON", "0") == "1"


def new_buffer(shape, dtype, device) -> torch.Tensor:
    if poisoning():
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -7, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def query_chunk(total: int = 1 << 30) -> int:
    """Queries per pass of the sparse kernels (for `total` query rows): bounds the per-slot buffers.

    The forward keeps k partial outputs per (query, head): k * chunk * Hq * d * 2 bytes, 4 GiB for
    16384 queries at Hq 64, d 128, k 16 (the backward the same for dQ). Fewer, larger chunks cut
    the dK/dV accumulator traffic; up to 32K queries the chunk is 8192, so that short batches stay
    near the memory of dense attention. MSA_QUERY_CHUNK overrides (tests use small values).
    """
    env = os.environ.get("MSA_QUERY_CHUNK")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"MSA_QUERY_CHUNK={env!r}: must be a positive integer (queries per sparse-kernel pass)")
        return int(env)
    return 8192 if total <= 32768 else 16384


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton MSA kernels need a power-of-two block_size >= 16; got {block_size}")


def _install_interpreter_fixes() -> None:
    """Two Triton 3.6 interpreter defects that the CPU tests would otherwise hit.

    1. Scalars are 1-element arrays and `int()` of those fails under numpy >= 2.4, so a loop with a
       run-time bound (`for b in range(0, n)`) raises. Index through `.reshape(-1)[0]` instead.
    2. `tl.dot` on bfloat16 operands multiplies the raw uint16 bit patterns. Widen them to fp32.
    Compiled (GPU) kernels are untouched: this runs only under TRITON_INTERPRET=1.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if getattr(interp, "_msa_fixed", False):
        return
    patch_tensor = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    create_dot = interp.InterpreterBuilder.create_dot

    def _widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    interp._patch_lang_tensor = _patch_lang_tensor
    interp.InterpreterBuilder.create_dot = _create_dot
    interp._msa_fixed = True


if interpreting():
    _install_interpreter_fixes()


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# --------------------------------------------------------------------------- optional per-kernel timing

_PROFILE = None  # list of (name, start event, end event) while a breakdown is being recorded


class timed:
    """`with timed("name"):` records CUDA events around a launch when a breakdown is being taken.

    Off by default (a no-op); tools/bench_kernels.py turns it on to report where the time goes.
    """

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if _PROFILE is not None:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        return self

    def __exit__(self, *exc):
        if _PROFILE is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            _PROFILE.append((self.name, self.start, end))
        return False


def profile(fn, calls: int = 3):
    """Run fn `calls` times with per-kernel timing on; returns {name: ms}, each name's time summed
    over its launches in a call and the median taken over calls (one call alone can be disturbed
    by a host pause that leaves the GPU idle between a family's events)."""
    global _PROFILE
    runs = []
    try:
        for _ in range(calls):
            _PROFILE = []
            fn()
            torch.cuda.synchronize()
            out = {}
            for name, s, e in _PROFILE:
                out[name] = out.get(name, 0.0) + s.elapsed_time(e)
            runs.append(out)
    finally:
        _PROFILE = None
    return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in runs[0]}
