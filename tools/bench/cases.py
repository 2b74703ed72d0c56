"""One benchmark case (context N, single-document or packed batch): every op timed, as rows."""

from __future__ import annotations

from tools.bench.baselines import Sdpa, flex_case, naive_select
from tools.bench.common import (
    BK, TOPK, bench, flops, graph_replay_ms, host_syncs, make_inputs, mixed_lengths, peak_gib, shape_of, slow_reps,
)

PROFILE_CALLS = 3  # the per-kernel breakdown is the median of this many calls


def run_case(n, kind, args, tri, report):
    import torch
    from torch.nn.attention import SDPBackend

    from msa_megatron import ops
    from msa_megatron.ops.triton import common, dense_attn, indexer, kl as klmod, plan as planmod, sparse_attn
    from msa_megatron.ops.triton.attention_kl import backward_with_kl
    from msa_megatron.ops.triton.common import query_chunk

    lengths = [n] if kind == "single" else mixed_lengths(n, seed=n)
    f = flops(lengths)
    x = make_inputs(lengths, seed=1)
    q, k, v, qi, ki, cu, do = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"], x["do"]
    shape = shape_of(lengths)
    scale = shape.softmax_scale
    rows = []
    slow = slow_reps(n)

    def rec(op, ms, fl=None, **extra):
        tf = fl / ms / 1e9 if (fl and ms) else None
        rows.append(dict(context=n, kind=kind, op=op, ms=ms, tflops=tf, flops=fl, **extra))
        shown = {key: val for key, val in extra.items() if not key.startswith("breakdown")}
        report(f"  {n:>6} {kind:<6} {op:<40} {ms:9.3f} ms" + (f"  {tf:7.1f} TF/s" if tf else "") + (f"  {shown}" if shown else ""))

    def attempt(label, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the run
            report(f"  {label} failed: {exc!r}"[:400])
        torch.cuda.empty_cache()

    if args.warmup_only:
        run_warmup(n, kind, x, shape, f, rec, tri)
        return rows

    # Indexer (+ top-k), the plan and the index lse.
    sel = indexer.select_topk(qi, ki, cu, BK, TOPK)
    rec("indexer select (top-k kernel)", bench(lambda: indexer.select_topk(qi, ki, cu, BK, TOPK)), f["index"])
    build_plan = lambda: planmod.build_plan(sel, cu, BK, query_chunk(sel.shape[1]), k.shape[0])
    plan = build_plan()
    rec("plan (block->queries CSR)", bench(build_plan), host_syncs=host_syncs(lambda: tri.select_blocks(qi, ki, cu, shape)))
    attempt("plan graph", lambda: rec("plan, CUDA graph replay", graph_replay_ms(build_plan)))
    rec("index lse (selected support)", bench(lambda: indexer.index_lse(qi, ki, sel, plan, shape.index_scale)))
    rec("select_blocks total", bench(lambda: tri.select_blocks(qi, ki, cu, shape)), f["index"])
    if kind == "single":
        rec("naive: block scores + torch.topk", bench(lambda: naive_select(qi, ki, n), max_reps=5), f["index"])

    # Sparse attention and KL.
    rec("sparse fwd", bench(lambda: sparse_attn.sparse_forward(q, k, v, sel, plan, scale)), f["fwd"])
    o, lse = sparse_attn.sparse_forward(q, k, v, sel, plan, scale)
    rec("sparse bwd", bench(lambda: sparse_attn.sparse_backward(do, q, k, v, o, lse, None, sel, plan, scale)), f["bwd"])
    ilse = indexer.index_lse(qi, ki, sel, plan, shape.index_scale)
    rec("KL sparse (value + dqi, dki)",
        bench(lambda: klmod.sparse_kl(q, k, lse, qi, ki, ilse, sel, plan, scale, shape.index_scale, 4)), f["kl"])
    if sparse_attn.teacher_in_backward(q.shape[1] // k.shape[1]):
        rec("sparse bwd + KL on its teacher", bench(lambda: backward_with_kl(
            do, q, k, v, o, lse, None, qi, ki, ilse, sel, plan, scale, shape.index_scale, 4)), f["bwd"] + f["kl"])
    del o, lse

    qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    one = torch.ones((), device=q.device)

    def clear():
        for t in (qg, kg, vg, qig, kig):
            t.grad = None

    def msa_layer_separate_kl():
        clear()
        s_, il_ = tri.select_blocks(qig, kig, cu, shape)
        o_, l_ = tri.sparse_attention(qg, kg, vg, s_, cu, shape)
        kl_ = tri.indexer_kl(qg, kg, l_, qig, kig, il_, s_, cu, shape)
        torch.autograd.backward([o_, kl_], [do, one])

    def msa_layer():
        """The layer as training runs it (model/attention.py): the KL built in the attention backward."""
        clear()
        s_, il_ = tri.select_blocks(qig, kig, cu, shape)
        fused = ops.sparse_attention_with_kl(qg, kg, vg, qig, kig, s_, il_, cu, shape, "triton", 4)
        if fused is None:
            return msa_layer_separate_kl()
        o_, kl_, _ = fused
        torch.autograd.backward([o_, kl_], [do, one])

    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, qi, ki, do)) / 2**30
    layer_flops = f["index"] + f["fwd"] + f["bwd"] + f["kl"]
    gib = peak_gib(msa_layer)
    ms = bench(msa_layer, max_reps=10)
    synced_ms = bench(msa_layer, max_reps=10, sync_each=True)  # the timing of rounds 1-8, for comparison
    breakdown = common.profile(msa_layer, calls=PROFILE_CALLS)
    report(f"  {n:>6} {kind:<6} MSA layer breakdown (ms): " + ", ".join(f"{key} {val:.2f}" for key, val in breakdown.items()))
    rec("MSA layer fwd+bwd", ms, layer_flops, layer_gib=round(gib + inputs, 2), host_syncs=host_syncs(msa_layer),
        ms_synced_each_call=round(synced_ms, 3),
        breakdown={key: round(val, 3) for key, val in breakdown.items()}, breakdown_calls=PROFILE_CALLS)
    rec("MSA layer fwd+bwd, KL in its own pass", bench(msa_layer_separate_kl, max_reps=10), layer_flops,
        layer_gib=round(peak_gib(msa_layer_separate_kl) + inputs, 2))
    del qg, kg, vg, qig, kig
    torch.cuda.empty_cache()
    run_warmup(n, kind, x, shape, f, rec, tri, cudnn_baseline=False)

    if kind == "single":
        sel_l, _ = tri.select_blocks(qi, ki, cu, shape)
        rec(f"recall diagnostics ({args.recall_queries} sampled queries)",
            bench(lambda: ops.selection_recall(q, k, sel_l, cu, shape, "triton", args.recall_queries), max_reps=5))
        del sel_l

    # Dense baselines.
    if n <= args.triton_dense_max:
        rec("triton dense fwd", bench(lambda: dense_attn.triton_forward(q, k, v, cu, scale), **slow), f["dense_fwd"])

        def triton_dense():
            o_, l_ = dense_attn.triton_forward(q, k, v, cu, scale)
            dense_attn.triton_backward(do, q, k, v, o_, l_, None, cu, scale)

        rec("triton dense fwd+bwd", bench(triton_dense, **slow), f["dense_fwd"] + f["dense_bwd"])
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION)] + ([("flash", SDPBackend.FLASH_ATTENTION)] if n <= args.flash_max else [])
    for name, sdp in backends:
        run = Sdpa(x, sdp)

        def timed_sdpa(name=name, run=run):
            rec(f"{name} SDPA dense fwd", bench(lambda: run(False, scale), **slow), f["dense_fwd"])
            gib = peak_gib(lambda: run(True, scale))
            rec(f"{name} SDPA dense fwd+bwd", bench(lambda: run(True, scale), **slow), f["dense_fwd"] + f["dense_bwd"],
                layer_gib=round(gib + (2 * q.numel() + 2 * k.numel()) * 2 / 2**30, 2))

        attempt(f"{name} SDPA", timed_sdpa)
        del run

    if args.flex and kind == "single" and n <= args.flex_max:
        def timed_flex():
            fa, fq, fk, fv, bm, union = flex_case(x, sel, n)
            rec("flex (selection as mask) fwd", bench(lambda: fa(fq, fk, fv, block_mask=bm, scale=scale, enable_gqa=True)),
                f["fwd"], union_blocks=round(union, 1))
            fq.requires_grad_(True), fk.requires_grad_(True), fv.requires_grad_(True)
            dof = do.transpose(0, 1).unsqueeze(0).contiguous()
            rec("flex (selection as mask) fwd+bwd",
                bench(lambda: fa(fq, fk, fv, block_mask=bm, scale=scale, enable_gqa=True).backward(dof)), f["fwd"] + f["bwd"])

        attempt("flex", timed_flex)
    del x, q, k, v, qi, ki, do, sel, plan
    torch.cuda.empty_cache()
    return rows


def run_warmup(n, kind, x, shape, f, rec, tri, cudnn_baseline=True):
    """The dense warm-up: our dense attention (also attention=gqa), the dense KL, the whole layer.

    With cudnn_baseline, also the cuDNN SDPA baseline (for --warmup-only runs).
    """
    import torch
    from torch.nn.attention import SDPBackend

    from msa_megatron.ops.triton import common, dense_attn, dense_lib, kl as klmod

    q, k, v, qi, ki, cu, do = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"], x["do"]
    scale = shape.softmax_scale
    slow = slow_reps(n)
    report = print
    qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    one = torch.ones((), device=q.device)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, qi, ki, do)) / 2**30

    def clear():
        for t in (qg, kg, vg, qig, kig):
            t.grad = None

    def warmup_layer():
        clear()
        o_, l_ = tri.dense_attention(qg, kg, vg, cu, shape)
        kl_ = tri.indexer_kl(qg, kg, l_, qig, kig, None, None, cu, shape)
        torch.autograd.backward([o_, kl_], [do, one])

    def dense_layer():
        clear()
        o_, _ = tri.dense_attention(qg, kg, vg, cu, shape)
        o_.backward(do)

    def timed_warmup():
        backend = dense_attn.dense_backend(q, k, cu, shape.max_seqlen, edges=shape.doc_edges)
        report(f"  {n:>6} {kind:<6} dense attention runs on {backend}; library probes: {dense_lib.PROBES}")
        _, dlse = tri.dense_attention(q, k, v, cu, shape)  # the lse the layer's KL gets
        rec("KL dense warm-up", bench(lambda: klmod.dense_kl(q, k, dlse, qi, ki, cu, scale, shape.index_scale, 4, doc_edges=shape.doc_edges), **slow),
            f["dense_kl"])
        del dlse
        rec(f"dense attention fwd+bwd (ours: {backend})", bench(dense_layer, **slow), f["dense_fwd"] + f["dense_bwd"],
            layer_gib=round(peak_gib(dense_layer) + inputs, 2))
        gib = peak_gib(warmup_layer)
        ms = bench(warmup_layer, **slow)
        breakdown = common.profile(warmup_layer, calls=PROFILE_CALLS)
        rec("dense warm-up layer fwd+bwd", ms, f["dense_fwd"] + f["dense_bwd"] + f["dense_kl"], layer_gib=round(gib + inputs, 2),
            host_syncs=host_syncs(warmup_layer), breakdown={key: round(val, 3) for key, val in breakdown.items()},
            breakdown_calls=PROFILE_CALLS)

    if cudnn_baseline:  # a --warmup-only run: check the dense KL against the reference first
        check_dense_kl(tri, report)
    try:
        timed_warmup()
    except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
        report(f"  dense warm-up failed: {exc!r}"[:400])
    del qg, kg, vg, qig, kig
    torch.cuda.empty_cache()
    if cudnn_baseline:
        run = Sdpa(x, SDPBackend.CUDNN_ATTENTION)
        rec("cudnn SDPA dense fwd+bwd", bench(lambda: run(True, scale), **slow), f["dense_fwd"] + f["dense_bwd"],
            layer_gib=round(peak_gib(lambda: run(True, scale)) + (2 * q.numel() + 2 * k.numel()) * 2 / 2**30, 2))



def check_dense_kl(tri, report, n=2048):
    """Dense KL value and index gradients at n tokens (two documents) against the float64 reference."""
    import torch

    from msa_megatron.ops import reference as ref

    lengths = [n // 4, n - n // 4]
    x = make_inputs(lengths, seed=5)
    shape = shape_of(lengths)
    q, k, v, qi, ki, cu = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"]
    _, lse = tri.dense_attention(q, k, v, cu, shape)
    qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    kl = tri.indexer_kl(q, k, lse, qig, kig, None, None, cu, shape)
    kl.backward()
    args = (q.double(), k.double(), qi.double(), ki.double(), cu, None, BK)
    want = ref.indexer_kl(*args)
    dqi, dki = ref.indexer_kl_grads(*args)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    errs = dict(kl=abs(kl.item() - want.item()) / abs(want.item()), dqi=rel(qig.grad, dqi), dki=rel(kig.grad, dki))
    report(f"  dense KL check at {n}: {errs} -> {'OK' if max(errs.values()) < 1e-2 else 'FAIL'}")
    torch.cuda.empty_cache()
