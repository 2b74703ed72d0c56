"""Where the sparse backward kernel's time goes, without hardware counters: time copies of
sparse_attn.py with one part of the kernel left out and take differences (results wrong on purpose).

Each variant is a textual patch of the module source, imported from a temporary file (Triton
compiles from source). A patch that no longer applies fails loudly, so the list follows the kernel.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

DQ_STORE = "tl.store(DQ_part + part[:, None] + offs_d[None, :], dq.to(DQ_part.dtype.element_ty), mask=qmask)"
DQ_MMA = "dq = tl.dot(tl.trans(ds_t), k) * sm_scale"
NEVER = " & (cnt < 0)"  # a run-time false mask: the compiler keeps the work, the store writes nothing
TEACHER_STORE = "mask=key_ok[:, None] & ej_ok[None, :])"

PATCHES = {
    "as is": [],
    "no dQ store": [(DQ_STORE, DQ_STORE.replace("mask=qmask", "mask=qmask" + NEVER))],
    "no dQ product (zeros stored)": [(DQ_MMA, "dq = tl.zeros([BLOCK_M, D], tl.float32)")],
    "no dQ at all": [(DQ_MMA, "dq = tl.zeros([BLOCK_M, D], tl.float32)"),
                     (DQ_STORE, DQ_STORE.replace("mask=qmask", "mask=qmask" + NEVER))],
    # Q and dO rows of consecutive queries (L2-resident) instead of the gathered ones
    "contiguous Q/dO rows": [("        qt = tok.to(tl.int64)\n        qmask",
                              "        qt = (q0 + (e0 + e) % 1024).to(tl.int64)\n        qmask")],
    "no teacher store": [(TEACHER_STORE, TEACHER_STORE.replace("ej_ok[None, :])", "ej_ok[None, :]" + NEVER + ")"))],
}


def _patched_module(src, name, patches, folder):
    for old, new in patches:
        if old not in src:
            raise RuntimeError(f"ablation {name!r}: the kernel source changed, patch target not found: {old[:60]}")
        src = src.replace(old, new)
    path = os.path.join(folder, "sparse_attn_" + "".join(c if c.isalnum() else "_" for c in name) + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ablate(n, report):
    """[{variant, teacher, ms}] for the sparse backward (with and without the KL teacher) at context n."""
    from msa_megatron.ops.triton import indexer, plan as planmod, sparse_attn
    from msa_megatron.ops.triton.common import query_chunk
    from tools.bench.common import BK, TOPK, bench, flops, make_inputs, shape_of

    x = make_inputs([n], seed=2)
    q, k, v, qi, ki, cu, do = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"], x["do"]
    scale = shape_of([n]).softmax_scale
    sel = indexer.select_topk(qi, ki, cu, BK, TOPK)
    plan = planmod.build_plan(sel, cu, BK, query_chunk(sel.shape[1]), k.shape[0])
    o, lse = sparse_attn.sparse_forward(q, k, v, sel, plan, scale)
    fl = flops([n])["bwd"]
    src = open(sparse_attn.__file__).read()
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for name, patches in PATCHES.items():
            mod = _patched_module(src, name, patches, folder)
            for teacher in (False, True):
                hook = (lambda c, t: None) if teacher else None
                ms = bench(lambda: mod.sparse_backward(do, q, k, v, o, lse, None, sel, plan, scale, on_teacher=hook),
                           budget_s=0.5)
                out.append(dict(variant=name, teacher=teacher, ms=ms))
                report(f"  ablate bwd {name:<30} teacher={teacher!s:<5} {ms:8.3f} ms {fl / ms / 1e9:6.1f} TF/s")
    return out
