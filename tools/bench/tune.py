"""Launch-config variants of each kernel at one context (single document); the fastest is kept."""

from __future__ import annotations

import itertools
import json

from tools.bench.common import BK, TOPK, bench, flops, make_inputs, shape_of


FAMILIES = ("select", "fwd", "bwd", "kl", "kl_teacher", "dense_kl", "dqi_sum")


def tune(n, tri, report, apply=True, families=FAMILIES):
    import torch

    from msa_megatron.ops.triton import common, dense_attn, indexer, kl as klmod, plan as planmod, sparse_attn
    from msa_megatron.ops.triton.attention_kl import backward_with_kl
    from msa_megatron.ops.triton.common import query_chunk

    x = make_inputs([n], seed=2)
    q, k, v, qi, ki, cu, do = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"], x["do"]
    shape = shape_of([n])
    scale, iscale = shape.softmax_scale, shape.index_scale
    f = flops([n])
    sel = indexer.select_topk(qi, ki, cu, BK, TOPK)
    plan = planmod.build_plan(sel, cu, BK, query_chunk(sel.shape[1]), k.shape[0])
    o, lse = sparse_attn.sparse_forward(q, k, v, sel, plan, scale)
    ilse = indexer.index_lse(qi, ki, sel, plan, iscale)
    _, dlse = dense_attn.DenseAttention.apply(q, k, v, cu, scale, shape.max_seqlen, None)
    out = []
    # the training path: the sparse backward with the KL on the teacher it built (dq, dk, dv, (KL, dqi, dki))
    train_bwd = lambda: backward_with_kl(do, q, k, v, o, lse, None, qi, ki, ilse, sel, plan, scale, iscale, 4)

    def variants(cfg, space, fn, fl, label, check=None):
        """Time each choice (a dict of CONFIG values, or a dict of lists = their product); keep the best.

        check(result) -> error message or None: a choice whose result disagrees is not kept.
        """
        choices = space if isinstance(space, list) else [dict(zip(space, v)) for v in itertools.product(*space.values())]
        saved = dict(cfg)
        best = None
        for choice in choices:
            cfg.update(choice)
            try:
                wrong = check(fn()) if check else None
                if wrong:
                    report(f"  tune {label:<8} {choice} WRONG: {wrong}")
                    continue
                ms = bench(fn, budget_s=0.3)
                out.append(dict(kernel=label, cfg=choice, ms=ms, tflops=fl / ms / 1e9))
                report(f"  tune {label:<8} {choice} {ms:8.3f} ms {fl / ms / 1e9:7.1f} TF/s")
                if best is None or ms < best[0]:
                    best = (ms, choice)
            except Exception as exc:  # noqa: BLE001
                report(f"  tune {label} {choice} failed: {exc!r}"[:300])
            finally:
                cfg.clear()
                cfg.update(saved)
            torch.cuda.empty_cache()
        if best is not None and apply:
            cfg.update(best[1])
            report(f"  tune {label:<8} best {best[1]}")

    if "select" in families:
        variants(indexer.CONFIG, {"select_warps": [8], "select_stages": [2, 3]},
                 lambda: indexer.select_topk(qi, ki, cu, BK, TOPK), f["index"], "select")
    if "fwd" in families:
        variants(sparse_attn.CONFIG, [
            dict(fwd_rows=64, fwd_warps=4, fwd_stages=1, fwd_prefetch=True),
            dict(fwd_rows=64, fwd_warps=4, fwd_stages=1, fwd_prefetch=False),
            dict(fwd_rows=64, fwd_warps=4, fwd_stages=2, fwd_prefetch=False),
            dict(fwd_rows=64, fwd_warps=8, fwd_stages=1, fwd_prefetch=True),
            dict(fwd_rows=128, fwd_warps=8, fwd_stages=1, fwd_prefetch=True),
        ], lambda: sparse_attn.sparse_forward(q, k, v, sel, plan, scale), f["fwd"], "fwd")
    if "bwd" in families:
        # The training path when the backward builds the KL teacher (that is what the layer runs),
        # else the plain backward; every variant's gradients are checked against the default's.
        with_kl = sparse_attn.teacher_in_backward(q.shape[1] // k.shape[1])
        if with_kl:
            bwd = train_bwd
        else:
            bwd = lambda: sparse_attn.sparse_backward(do, q, k, v, o, lse, None, sel, plan, scale)
        variants(sparse_attn.CONFIG, [
            dict(bwd_rows=rows, bwd_warps=warps, bwd_stages=stages)
            for rows, warps, stages in ((64, 8, 3), (64, 8, 2), (64, 8, 4), (32, 8, 2), (32, 8, 3), (32, 8, 4),
                                        (64, 16, 2), (64, 16, 3), (128, 16, 2), (32, 16, 3))
        ], bwd, f["bwd"] + (f["kl"] if with_kl else 0), "bwd", check=_same_as(bwd()))
    if "kl" in families:
        sparse_kl = lambda: klmod.sparse_kl(q, k, lse, qi, ki, ilse, sel, plan, scale, iscale, 4)
        keys_rows, query_rows = dict(kl_query_rows=False), dict(kl_query_rows=True)
        variants(klmod.CONFIG, [
            dict(query_rows, kl_split=2, kl_rows=64, kl_warps=4, kl_stages=3),
            dict(keys_rows, kl_split=1, kl_rows=64, kl_warps=8, kl_stages=3),
            dict(query_rows, kl_split=1, kl_rows=64, kl_warps=8, kl_stages=3),
            dict(keys_rows, kl_split=2, kl_rows=64, kl_warps=4, kl_stages=3),
        ], sparse_kl, f["kl"], "kl", check=_same_as(sparse_kl()))
    if "kl_teacher" in families and sparse_attn.teacher_in_backward(q.shape[1] // k.shape[1]):
        variants(klmod.CONFIG, [
            dict(kt_tiles=tiles, kt_split=split, kt_rows=rows, kt_warps=4, kt_stages=stages)
            for tiles in ("kl", "bwd") for split, rows in ((1, 32), (2, 32), (1, 16)) for stages in (2, 3)
        ], lambda: train_bwd()[3], f["bwd"] + f["kl"], "kl_teacher",
            check=_same_as(klmod.sparse_kl(q, k, lse, qi, ki, ilse, sel, plan, scale, iscale, 4)))
    if "dense_kl" in families or "dqi_sum" in families:
        dense_kl = lambda: klmod.dense_kl(q, k, dlse, qi, ki, cu, scale, iscale, 4)
        same_as_default = _same_as(dense_kl())
    if "dense_kl" in families:
        query_rows = dict(dense_query_rows=True, dense_stages=3)
        tiles = dict(query_rows, dense_block=64, dense_rows=64, dense_warps=4, dense_tma=True, dense_lse_heads_major=True)
        variants(klmod.CONFIG, [
            dict(tiles, dense_lse_ahead=True), dict(tiles, dense_lse_ahead=False),
            dict(tiles, dense_lse_ahead=True, dense_stages=4),
        ], dense_kl, f["dense_kl"], "dense_kl", check=same_as_default)
    if "dqi_sum" in families:
        variants(klmod.CONFIG, {"dense_dqi_programs": [0, 1024, 4096, 16384]}, dense_kl, f["dense_kl"], "dqi_sum",
                 check=same_as_default)
    if "dense_kl" in families or "dqi_sum" in families:
        report("  breakdown dense KL: " + str(common.profile(dense_kl)))
    report("  chosen: " + json.dumps(chosen_configs()))
    return out


def _same_as(want):
    """check() for a variant's result: every tensor within 1e-2 of `want` (relative), scalars (KL
    values) within 1e-4; nested tuples (the backward's (dq, dk, dv, (value, dqi, dki))) are flattened."""
    flat = lambda r: [x for part in r for x in (part if isinstance(part, tuple) else (part,))]

    def check(got):
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(flat(got), flat(want))]
        limits = [1e-4 if a.dim() == 0 else 1e-2 for a in flat(want)]
        return None if all(e < lim for e, lim in zip(errs, limits)) else f"errors {errs}"

    return check


def chosen_configs():
    from msa_megatron.ops.triton import indexer, kl as klmod, sparse_attn

    return {"select": dict(indexer.CONFIG), "attn": dict(sparse_attn.CONFIG), "kl": dict(klmod.CONFIG)}


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
