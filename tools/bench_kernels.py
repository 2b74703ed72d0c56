#!/usr/bin/env python
"""Benchmark the MSA Triton kernels against dense attention and naive selection (one GPU).

Shapes (BENCHMARKS.md): Hq 64, Hkv 4, d = di = 128, Bk 128, k 16, bf16; contexts 8K..128K; a
single-document batch and a packed batch (a few long documents plus many short ones).
Before timing, each case at the check size is compared with the float64 reference.

    python3 tools/bench_kernels.py --autotune 32768 --flex --flex-max 8192 --out $OUT/kernels.json
                                   # the published run: pick launch configs at 32K, check, time all
    python3 tools/bench_kernels.py --contexts 32768 --tune     # variants + register/spill report
    python3 tools/bench_kernels.py --from-json docs/bench_kernels.json --docs docs/benchmarks.md
                                   # re-render the "Kernels" section of docs/benchmarks.md (no GPU)

FLOPs follow MSA.md: nnz = attended (query, key) pairs; fwd 4 d Hq nnz, bwd 10 d Hq nnz,
indexer 2 di Hkv causal_pairs, KL 2 (d Hq + 3 di Hkv) nnz; dense causal fwd 4 d Hq pairs, bwd 2.5x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HQ, HKV, D, DI, BK, TOPK = 64, 4, 128, 128, 128, 16


# --------------------------------------------------------------------------- helpers


def bench(fn, min_reps=3, max_reps=30, budget_s=1.5):
    """Median ms over CUDA-event-timed calls after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    t0 = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t0 < budget_s):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def mixed_lengths(n, seed=0):
    """A few long documents (1/2, 1/8, 1/8 of the tokens) and many short ones (64..2048 tokens)."""
    rng = random.Random(seed)
    longs = [n // 2, n // 8, n // 8]
    rest = n - sum(longs)
    shorts = []
    while rest > 0:
        length = min(rest, rng.randint(64, 2048))
        shorts.append(length)
        rest -= length
    docs = longs + shorts
    rng.shuffle(docs)
    return docs


def pair_counts(lengths):
    causal = sum(n * (n + 1) // 2 for n in lengths)
    nnz = 0
    for n in lengths:
        for p in range(0, n, BK):  # per query block: positions p..p+Bk-1
            blk = p // BK
            hist = min(blk, TOPK - 1) * BK
            m = min(BK, n - p)
            nnz += m * hist + m * (m + 1) // 2
    return causal, nnz


def env_info():
    import torch
    import triton

    info = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        info["driver"] = f"unknown ({exc})"
    return info


# --------------------------------------------------------------------------- inputs and baselines


def make_inputs(lengths, seed=0):
    import torch

    dev = torch.device("cuda")
    total = sum(lengths)
    g = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=dev)
    return dict(q=rnd(total, HQ, D), k=rnd(total, HKV, D), v=rnd(total, HKV, D), qi=rnd(total, HKV, DI),
                ki=rnd(total, 1, DI), do=rnd(total, HQ, D), cu=cu, lengths=lengths)


def naive_select(qi, ki, n, chunk=4096):
    """Materialized [G, T, NB] block scores (chunked bf16 matmul + block max) then torch.topk."""
    import torch

    nb = (n + BK - 1) // BK
    scores = torch.full((HKV, n, nb), float("-inf"), device=qi.device, dtype=torch.float32)
    ki2 = ki[:, 0]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        kend = (b + BK - 1) // BK * BK
        s = torch.einsum("cgd,kd->gck", qi[a:b], ki2[: min(kend, n)])
        if s.shape[-1] < kend:
            s = torch.nn.functional.pad(s, (0, kend - s.shape[-1]), value=float("-inf"))
        qpos = torch.arange(a, b, device=qi.device)
        kpos = torch.arange(kend, device=qi.device)
        s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
        scores[:, a:b, : kend // BK] = s.view(HKV, b - a, kend // BK, BK).amax(-1).float()
    local = torch.arange(n, device=qi.device) // BK
    cand = scores.masked_fill(torch.arange(nb, device=qi.device)[None, None, :] >= local[None, :, None], float("-inf"))
    return torch.topk(cand, TOPK - 1, dim=-1, sorted=False).indices


def flex_case(x, sel, n):
    """flex_attention with the selection as mask: BlockMask = union of each 128-query tile's picks."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nb = (n + BK - 1) // BK
    r = HQ // HKV
    chosen = torch.zeros(HKV, n, nb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, torch.where(sel < 0, nb, sel).long(), True)
    chosen = chosen[..., :nb].contiguous()
    union = chosen.view(HKV, nb, BK, nb).any(2)  # [G, q-block, kv-block]
    union = union.repeat_interleave(r, 0).unsqueeze(0)  # [1, Hq, QB, KB]
    num = union.sum(-1).to(torch.int32)
    idx = torch.argsort(union.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return chosen[h // r, q_idx, kv_idx // BK] & (kv_idx <= q_idx)

    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BK, mask_mod=mask_mod, seq_lengths=(n, n))
    fa = torch.compile(flex_attention, dynamic=False)
    q = x["q"].transpose(0, 1).unsqueeze(0).contiguous()
    k = x["k"].transpose(0, 1).unsqueeze(0).contiguous()
    v = x["v"].transpose(0, 1).unsqueeze(0).contiguous()
    return fa, q, k, v, bm, float(union.sum().item()) / (HKV * nb)


# --------------------------------------------------------------------------- correctness check


def check_case(x, shape, tri, ref, report):
    """Triton vs the float64 reference at this size (selection, forward, grads, KL)."""
    import torch

    q, k, v, qi, ki, cu = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"]
    sel, ilse = tri.select_blocks(qi, ki, cu, shape)
    scores = ref.index_block_scores(qi.double(), ki.double(), cu, BK)
    sel_ref = ref.select_blocks(scores, cu, BK, TOPK)
    nb = scores.shape[-1]

    def as_mask(s):
        m = torch.zeros(s.shape[0], s.shape[1], nb + 1, dtype=torch.bool, device=s.device)
        m.scatter_(-1, torch.where(s < 0, nb, s).long(), True)
        return m[..., :nb]

    rows_differ = (as_mask(sel) != as_mask(sel_ref)).any(-1).float().mean().item()
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o, lse = tri.sparse_attention(qg, kg, vg, sel, cu, shape)
    o.backward(x["do"])
    qd, kd, vd = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_r, lse_r = ref.sparse_attention(qd, kd, vd, sel, cu, BK)
    o_r.backward(x["do"].double())
    qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    kl = tri.indexer_kl(q, k, lse, qig, kig, ilse, sel, cu, shape)
    kl.backward()
    args = (q.double(), k.double(), qi.double(), ki.double(), cu, sel, BK)
    kl_r = ref.indexer_kl(*args)
    dqi_r, dki_r = ref.indexer_kl_grads(*args)
    errs = {
        "selection_rows_differ": rows_differ,
        "index_lse": rel(ilse, ref.index_lse(qi.double(), ki.double(), sel, cu, BK)),
        "o": rel(o, o_r), "lse": rel(lse, lse_r),
        "dq": rel(qg.grad, qd.grad), "dk": rel(kg.grad, kd.grad), "dv": rel(vg.grad, vd.grad),
        "kl": abs(kl.item() - kl_r.item()) / abs(kl_r.item()),
        "dqi": rel(qig.grad, dqi_r), "dki": rel(kig.grad, dki_r),
    }
    ok = rows_differ < 1e-3 and all(v < 1e-2 for key, v in errs.items() if key != "selection_rows_differ")
    report(f"check {errs} -> {'OK' if ok else 'FAIL'}")
    return ok, errs


# --------------------------------------------------------------------------- one case


def run_case(n, kind, args, tri, report):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from msa_megatron.ops import MSAShape
    from msa_megatron.ops.triton import common, dense_attn, indexer, kl as klmod, plan as planmod, sparse_attn
    from msa_megatron.ops.triton.common import query_chunk

    lengths = [n] if kind == "single" else mixed_lengths(n, seed=n)
    causal, nnz = pair_counts(lengths)
    x = make_inputs(lengths, seed=1)
    q, k, v, qi, ki, cu, do = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"], x["do"]
    scale = 1 / math.sqrt(D)
    shape = MSAShape(BK, TOPK, scale, 1 / math.sqrt(DI), max(lengths))
    rows = []

    def rec(op, ms, flops=None, **extra):
        tf = flops / ms / 1e9 if (flops and ms) else None
        rows.append(dict(context=n, kind=kind, op=op, ms=ms, tflops=tf, flops=flops, **extra))
        shown = {k: v for k, v in extra.items() if k != "breakdown"}
        report(f"  {n:>6} {kind:<6} {op:<34} {ms:9.3f} ms" + (f"  {tf:7.1f} TF/s" if tf else "") + (f"  {shown}" if shown else ""))

    # Indexer (+ top-k), the plan and the index lse.
    idx_flops = 2 * DI * HKV * causal
    sel = indexer.select_topk(qi, ki, cu, BK, TOPK)
    rec("indexer select (top-k kernel)", bench(lambda: indexer.select_topk(qi, ki, cu, BK, TOPK)), idx_flops)
    plan = planmod.build_plan(sel, cu, BK, query_chunk())
    rec("plan (block->queries CSR)", bench(lambda: planmod.build_plan(sel, cu, BK, query_chunk())))
    rec("index lse (selected support)", bench(lambda: indexer.index_lse(qi, ki, sel, plan, shape.index_scale)))
    rec("select_blocks total", bench(lambda: tri.select_blocks(qi, ki, cu, shape)), idx_flops)
    if kind == "single":
        rec("naive: block scores + torch.topk", bench(lambda: naive_select(qi, ki, n), max_reps=5), idx_flops)

    # Sparse attention.
    fwd_flops, bwd_flops = 4 * D * HQ * nnz, 10 * D * HQ * nnz
    rec("sparse fwd", bench(lambda: sparse_attn.sparse_forward(q, k, v, sel, plan, scale)), fwd_flops)
    o, lse = sparse_attn.sparse_forward(q, k, v, sel, plan, scale)
    rec("sparse bwd", bench(lambda: sparse_attn.sparse_backward(do, q, k, v, o, lse, None, sel, plan, scale)), bwd_flops)
    ilse = indexer.index_lse(qi, ki, sel, plan, shape.index_scale)
    kl_flops = 2 * (D * HQ + 3 * DI * HKV) * nnz
    rec("KL sparse (value + dqi, dki)",
        bench(lambda: klmod.sparse_kl(q, k, lse, qi, ki, ilse, sel, plan, scale, shape.index_scale, HKV)), kl_flops)
    del o

    # Whole MSA layer, forward + backward through autograd.
    qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    one = torch.ones((), device=q.device)

    def layer():
        for t in (qg, kg, vg, qig, kig):
            t.grad = None
        s_, il_ = tri.select_blocks(qig, kig, cu, shape)
        o_, l_ = tri.sparse_attention(qg, kg, vg, s_, cu, shape)
        kl_ = tri.indexer_kl(qg, kg, l_, qig, kig, il_, s_, cu, shape)
        torch.autograd.backward([o_, kl_], [do, one])

    layer_flops = idx_flops + fwd_flops + bwd_flops + kl_flops
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer()
    torch.cuda.synchronize()
    msa_peak = torch.cuda.max_memory_allocated()
    msa_ms = bench(layer, max_reps=10)
    breakdown = common.profile(layer)
    report(f"  {n:>6} {kind:<6} layer breakdown (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items()))
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, qi, ki, do))
    rec("MSA layer fwd+bwd", msa_ms, layer_flops, layer_gib=round((msa_peak - base + inputs) / 2**30, 2),
        peak_gib=round(msa_peak / 2**30, 2), breakdown={k: round(v, 3) for k, v in breakdown.items()})
    del qg, kg, vg, qig, kig
    torch.cuda.empty_cache()

    # Dense-warm-up KL (support = all visible tokens) with our dense attention's lse.
    _, dlse = dense_attn.dense_forward(q, k, v, cu, scale)
    dkl_flops = 2 * (D * HQ + 3 * DI * HKV) * causal
    rec("KL dense warm-up", bench(lambda: klmod.dense_kl(q, k, dlse, qi, ki, cu, scale, shape.index_scale, HKV),
                                  min_reps=1, max_reps=3), dkl_flops)
    del dlse

    # Dense baselines.
    dfwd, dbwd = 4 * D * HQ * causal, 10 * D * HQ * causal
    slow = dict(min_reps=1 if n >= 65536 else 3, max_reps=3 if n >= 65536 else 10)
    rec("triton dense fwd", bench(lambda: dense_attn.dense_forward(q, k, v, cu, scale), **slow), dfwd)
    if n <= args.triton_dense_bwd_max:
        qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def tdense():
            o_, _ = tri.dense_attention(qg, kg, vg, cu, shape)
            o_.backward(do)

        rec("triton dense fwd+bwd", bench(tdense, **slow), dfwd + dbwd)
        del qg, kg, vg
    docs = [(int(a), int(b)) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    qh = q.transpose(0, 1).unsqueeze(0).contiguous()
    kh = k.transpose(0, 1).unsqueeze(0).contiguous()
    vh = v.transpose(0, 1).unsqueeze(0).contiguous()
    doh = do.transpose(0, 1).unsqueeze(0).contiguous()
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION)]
    if n <= args.flash_max:
        backends.append(("flash", SDPBackend.FLASH_ATTENTION))
    for name, backend in backends:
        def sdpa(bwd, name=name, backend=backend):
            with sdpa_kernel(backend):
                for a, b in docs:  # one call per document (a single call for the single-document batch)
                    qq = qh[:, :, a:b].detach().requires_grad_(bwd)
                    o_ = F.scaled_dot_product_attention(qq, kh[:, :, a:b], vh[:, :, a:b], is_causal=True,
                                                        enable_gqa=True, scale=scale)
                    if bwd:
                        o_.backward(doh[:, :, a:b])
        try:
            rec(f"{name} SDPA dense fwd", bench(lambda: sdpa(False), **slow), dfwd)
            if name == "cudnn":
                kh.requires_grad_(True), vh.requires_grad_(True)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                sdpa(True)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
                ms = bench(lambda: sdpa(True), **slow)
                inputs = sum(t.numel() * t.element_size() for t in (qh, kh, vh, doh))
                rec(f"{name} SDPA dense fwd+bwd", ms, dfwd + dbwd, layer_gib=round((peak - base + inputs) / 2**30, 2),
                    peak_gib=round(peak / 2**30, 2))
                kh.requires_grad_(False), vh.requires_grad_(False)
                kh.grad = vh.grad = None
            else:
                kh.requires_grad_(True), vh.requires_grad_(True)
                rec(f"{name} SDPA dense fwd+bwd", bench(lambda: sdpa(True), **slow), dfwd + dbwd)
                kh.requires_grad_(False), vh.requires_grad_(False)
                kh.grad = vh.grad = None
        except Exception as exc:  # noqa: BLE001
            report(f"  {name} SDPA failed: {exc!r}"[:300])
    del qh, kh, vh, doh

    if args.flex and kind == "single" and n <= args.flex_max:
        try:
            fa, fq, fk, fv, bm, union = flex_case(x, sel, n)
            rec("flex (selection as mask) fwd", bench(lambda: fa(fq, fk, fv, block_mask=bm, scale=scale, enable_gqa=True)),
                fwd_flops, union_blocks=round(union, 1))
            fq.requires_grad_(True), fk.requires_grad_(True), fv.requires_grad_(True)
            dof = do.transpose(0, 1).unsqueeze(0).contiguous()

            def flex_fb():
                fa(fq, fk, fv, block_mask=bm, scale=scale, enable_gqa=True).backward(dof)

            rec("flex (selection as mask) fwd+bwd", bench(flex_fb), fwd_flops + bwd_flops)
            del fq, fk, fv, bm
        except Exception as exc:  # noqa: BLE001
            report(f"  flex failed: {exc!r}"[:300])
    del x, q, k, v, qi, ki, do, sel, plan
    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- tuning (variants)


def tune(n, tri, report, apply=True):
    """Time launch-config variants of each kernel at one context (single document); keep the best."""
    import itertools
    import math as _m

    import torch

    from msa_megatron.ops import MSAShape
    from msa_megatron.ops.triton import common, indexer, kl as klmod, plan as planmod, sparse_attn
    from msa_megatron.ops.triton.common import query_chunk

    x = make_inputs([n], seed=2)
    q, k, v, qi, ki, cu, do = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"], x["do"]
    scale = 1 / _m.sqrt(D)
    _, nnz = pair_counts([n])
    causal = n * (n + 1) // 2
    sel = indexer.select_topk(qi, ki, cu, BK, TOPK)
    plan = planmod.build_plan(sel, cu, BK, query_chunk())
    o, lse = sparse_attn.sparse_forward(q, k, v, sel, plan, scale)
    ilse = indexer.index_lse(qi, ki, sel, plan, 1 / _m.sqrt(DI))
    out = []

    def variants(cfg, space, fn, flops, label):
        saved = dict(cfg)
        best = None
        for values in itertools.product(*space.values()):
            choice = dict(zip(space.keys(), values))
            cfg.update(choice)
            try:
                ms = bench(fn, budget_s=0.3)
                out.append(dict(kernel=label, cfg=choice, ms=ms, tflops=flops / ms / 1e9))
                report(f"  tune {label:<8} {choice} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF/s")
                if best is None or ms < best[0]:
                    best = (ms, choice)
            except Exception as exc:  # noqa: BLE001
                report(f"  tune {label} {values} failed: {exc!r}"[:300])
        cfg.clear()
        cfg.update(saved)
        if best is not None and apply:
            cfg.update(best[1])
            report(f"  tune {label:<8} best {best[1]}")

    variants(indexer.CONFIG, {"select_warps": [8], "select_stages": [2, 3]},
             lambda: indexer.select_topk(qi, ki, cu, BK, TOPK), 2 * DI * HKV * causal, "select")
    variants(sparse_attn.CONFIG, {"fwd_rows": [32, 64], "fwd_warps": [2, 4], "fwd_stages": [1, 2]},
             lambda: sparse_attn.sparse_forward(q, k, v, sel, plan, scale), 4 * D * HQ * nnz, "fwd")
    variants(sparse_attn.CONFIG, {"bwd_rows": [32, 64], "bwd_warps": [4, 8], "bwd_stages": [2, 3]},
             lambda: sparse_attn.sparse_backward(do, q, k, v, o, lse, None, sel, plan, scale), 10 * D * HQ * nnz, "bwd")
    kl_fn = lambda: klmod.sparse_kl(q, k, lse, qi, ki, ilse, sel, plan, scale, 1 / _m.sqrt(DI), HKV)
    kl_flops = 2 * (D * HQ + 3 * DI * HKV) * nnz
    variants(klmod.CONFIG, {"kl_rows": [32, 64], "kl_warps": [4, 8], "kl_stages": [1, 2, 3]}, kl_fn, kl_flops, "kl")
    report("  breakdown fwd: " + str(common.profile(lambda: sparse_attn.sparse_forward(q, k, v, sel, plan, scale))))
    report("  breakdown bwd: " + str(common.profile(
        lambda: sparse_attn.sparse_backward(do, q, k, v, o, lse, None, sel, plan, scale))))
    report("  breakdown kl: " + str(common.profile(kl_fn)))
    report("  chosen: " + json.dumps({"select": indexer.CONFIG, "attn": sparse_attn.CONFIG, "kl": klmod.CONFIG}))
    return out


def kernel_resources(report):
    """Registers / spills / shared memory of every compiled MSA kernel variant (Triton internals)."""
    from msa_megatron.ops.triton import dense_attn, indexer, kl as klmod, sparse_attn

    out = []
    for mod in (indexer, sparse_attn, klmod, dense_attn):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not name.startswith("_") or caches is None:
                continue
            try:
                for dev_cache in caches.values():
                    for ck in dev_cache[0].values():
                        ck._init_handles()
                        md = ck.metadata
                        rec = dict(kernel=name, regs=ck.n_regs, spills=ck.n_spills, shared=getattr(md, "shared", None),
                                   warps=getattr(md, "num_warps", None), stages=getattr(md, "num_stages", None))
                        out.append(rec)
                        report(f"  resources {rec}")
            except Exception as exc:  # noqa: BLE001
                report(f"  resources {name}: {exc!r}"[:200])
    return out


# --------------------------------------------------------------------------- report


def markdown(results):
    env = results["env"]
    lines = [
        "## Kernels",
        "",
        f"MSA Triton kernels vs dense attention on one GPU: {env['gpu']}, driver {env.get('driver')}, "
        f"torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}.",
        f"Command: `python3 {env['command']}` ($OUT = the device tool's output folder). Shapes: Hq {HQ}, Hkv {HKV}, d = di = {D}, Bk {BK}, k {TOPK}, bf16. "
        "Median of CUDA-event-timed calls after a warm-up; TF/s = useful FLOPs (MSA.md conventions) / time. "
        "`packed` = documents of N/2, N/8, N/8 tokens plus short ones of 64..2048 tokens "
        "(dense SDPA baselines then run one call per document).",
        "",
    ]
    checks = results.get("checks", {})
    if checks:
        lines.append("Correctness before timing (relative error vs the float64 reference; selection = fraction of "
                     "(query, group) rows whose set differs, near-ties only):")
        lines.append("")
        for key, errs in checks.items():
            lines.append(f"- {key}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        lines.append("")
    rows = results["rows"]
    ctxs = sorted({r["context"] for r in rows})
    kinds = [k for k in ("single", "packed") if any(r["kind"] == k for r in rows)]
    ops = []
    for r in rows:
        if r["op"] not in ops:
            ops.append(r["op"])
    for kind in kinds:
        lines.append(f"### {kind} batch: ms (useful TF/s)")
        lines.append("")
        lines.append("| op | " + " | ".join(f"{c // 1024}K" for c in ctxs) + " |")
        lines.append("|---|" + "---|" * len(ctxs))
        for op in ops:
            cells = []
            for c in ctxs:
                hit = [r for r in rows if r["kind"] == kind and r["context"] == c and r["op"] == op]
                if not hit:
                    cells.append("-")
                    continue
                r = hit[0]
                cell = f"{r['ms']:.2f}" + (f" ({r['tflops']:.0f})" if r.get("tflops") else "")
                cells.append(cell)
            if any(c != "-" for c in cells):
                lines.append(f"| {op} | " + " | ".join(cells) + " |")
        lines.append("")
        # Ratios and memory.
        lines.append("| ratio | " + " | ".join(f"{c // 1024}K" for c in ctxs) + " |")
        lines.append("|---|" + "---|" * len(ctxs))

        def get(c, op, key="ms"):
            hit = [r for r in rows if r["kind"] == kind and r["context"] == c and r["op"] == op]
            return hit[0].get(key) if hit else None

        def ratio_row(label, num, den, key="ms"):
            cells = []
            for c in ctxs:
                a, b = get(c, num, key), get(c, den, key)
                cells.append(f"{a / b:.2f}x" if a and b else "-")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        ratio_row("cuDNN dense fwd+bwd / MSA layer fwd+bwd", "cudnn SDPA dense fwd+bwd", "MSA layer fwd+bwd")
        ratio_row("naive select / select_blocks", "naive: block scores + torch.topk", "select_blocks total")
        ratio_row("MSA layer memory / dense layer memory", "MSA layer fwd+bwd", "cudnn SDPA dense fwd+bwd", "layer_gib")
        lines.append("")
        parts = {c: get(c, "MSA layer fwd+bwd", "breakdown") or {} for c in ctxs}
        names = []
        for c in ctxs:
            names += [k for k in parts[c] if k not in names]
        if names:
            lines.append(f"Where the MSA layer's time goes ({kind}; ms per kernel family, one profiled call):")
            lines.append("")
            lines.append("| kernel | " + " | ".join(f"{c // 1024}K" for c in ctxs) + " |")
            lines.append("|---|" + "---|" * len(ctxs))
            for name in names:
                lines.append(f"| {name} | " + " | ".join(f"{parts[c][name]:.2f}" if name in parts[c] else "-" for c in ctxs) + " |")
            lines.append("")
    targets = target_lines(rows)
    if targets:
        lines += ["### Targets (single-document batch)", "", "| target | measured | met |", "|---|---|---|"] + targets + [""]
    if results.get("config"):
        lines.append("Launch configs (picked by `--autotune` on this GPU): `" + json.dumps(results["config"]) + "`")
        lines.append("")
    return "\n".join(lines) + "\n"


def target_lines(rows):
    """BENCHMARKS.md / issue targets against the single-document rows."""

    def get(c, op, key="ms"):
        hit = [r for r in rows if r["kind"] == "single" and r["context"] == c and r["op"] == op]
        return hit[0].get(key) if hit else None

    out = []

    def add(label, value, goal, fmt, higher=True):
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        out.append(f"| {label} | {fmt.format(value)} | {'yes' if met else 'no'} |")

    for c in (65536, 131072):
        add(f"sparse fwd >= 450 useful TF/s at {c // 1024}K", get(c, "sparse fwd", "tflops"), 450, "{:.0f} TF/s")
        add(f"sparse bwd >= 350 useful TF/s at {c // 1024}K", get(c, "sparse bwd", "tflops"), 350, "{:.0f} TF/s")
    naive, ours = get(131072, "naive: block scores + torch.topk"), get(131072, "select_blocks total")
    if naive and ours:
        add("indexer + top-k >= 10x faster than block scores + torch.topk at 128K", naive / ours, 10, "{:.1f}x")
    for c, goal in ((32768, 3), (65536, 6), (131072, 12)):
        dense, msa = get(c, "cudnn SDPA dense fwd+bwd"), get(c, "MSA layer fwd+bwd")
        if dense and msa:
            add(f"MSA layer fwd+bwd >= {goal}x faster than cuDNN dense at {c // 1024}K", dense / msa, goal, "{:.2f}x")
    dm, mm = get(131072, "cudnn SDPA dense fwd+bwd", "layer_gib"), get(131072, "MSA layer fwd+bwd", "layer_gib")
    if dm and mm:
        add("MSA layer memory <= 1.5x dense at 128K (BENCHMARKS.md: 1.2x)", mm / dm, 1.2, "{:.2f}x", higher=False)
    return out


def write_docs(md, path):
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    start = text.find("## Kernels")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + md
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + md + (text[nxt + 1 :] if nxt >= 0 else "")
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--kinds", default="single,packed")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--md", default=None, help="write the Kernels markdown section here")
    ap.add_argument("--docs", default=None, help="replace the Kernels section of this markdown file")
    ap.add_argument("--from-json", default=None, help="only render markdown from a results file")
    ap.add_argument("--check-size", type=int, default=4096, help="context of the reference check (0: skip)")
    ap.add_argument("--flex", action="store_true", help="also time flex_attention with the selection as mask")
    ap.add_argument("--flex-max", type=int, default=16384)
    ap.add_argument("--flash-max", type=int, default=32768)
    ap.add_argument("--triton-dense-bwd-max", type=int, default=32768)
    ap.add_argument("--tune", action="store_true", help="time launch-config variants at the first context")
    ap.add_argument("--autotune", type=int, default=0,
                    help="before the benchmark, time variants at this context and keep the fastest")
    args = ap.parse_args()

    if args.from_json:
        results = json.load(open(args.from_json))
        md = markdown(results)
        if args.docs:
            write_docs(md, args.docs)
        print(md)
        return

    import torch

    from msa_megatron.ops import MSAShape
    from msa_megatron.ops import reference as ref
    from msa_megatron.ops import triton as tri

    log = []

    def report(s):
        print(s, flush=True)
        log.append(s)

    results = {"env": env_info(), "rows": [], "checks": {}, "tune": []}
    report(json.dumps(results["env"]))
    contexts = [int(c) for c in args.contexts.split(",")]
    kinds = args.kinds.split(",")
    if args.tune:
        results["tune"] = tune(contexts[0], tri, report)
        results["resources"] = kernel_resources(report)
    else:
        if args.autotune:
            from msa_megatron.ops.triton import indexer, kl as klmod, sparse_attn

            results["tune"] = tune(args.autotune, tri, report)
            results["config"] = {"select": dict(indexer.CONFIG), "attn": dict(sparse_attn.CONFIG), "kl": dict(klmod.CONFIG)}
            torch.cuda.empty_cache()
        if args.check_size:
            for kind in kinds:
                lengths = [args.check_size] if kind == "single" else mixed_lengths(args.check_size, seed=3)
                x = make_inputs(lengths, seed=4)
                shape = MSAShape(BK, TOPK, 1 / math.sqrt(D), 1 / math.sqrt(DI), max(lengths))
                ok, errs = check_case(x, shape, tri, ref, report)
                results["checks"][f"{kind} {args.check_size // 1024}K"] = errs
                if not ok:
                    report("reference check FAILED: not timing")
                    sys.exit(1)
                del x
                torch.cuda.empty_cache()
        for n in contexts:
            for kind in kinds:
                results["rows"] += run_case(n, kind, args, tri, report)
                if args.out:
                    json.dump(results, open(args.out, "w"), indent=1)
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)
    if not args.tune:
        md = markdown(results)
        if args.md:
            open(args.md, "w").write(md)
        if args.docs:
            write_docs(md, args.docs)
        print(md)


if __name__ == "__main__":
    main()
