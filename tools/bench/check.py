"""Triton ops against the float64 reference at a small size, before anything is timed."""

from __future__ import annotations

from tools.bench.common import BK, TOPK


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_case(x, shape, tri, ref, report):
    """Selection, sparse forward/backward and KL, dense (warm-up) attention and KL; errors dict."""
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

    errs = {"selection_rows_differ": (as_mask(sel) != as_mask(sel_ref)).any(-1).float().mean().item(),
            "index_lse": _rel(ilse, ref.index_lse(qi.double(), ki.double(), sel, cu, BK))}
    wanted = {}
    for support in ("sparse", "dense"):
        qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
        qd, kd, vd = [t.double().requires_grad_(True) for t in (q, k, v)]
        if support == "sparse":
            o, lse = tri.sparse_attention(qg, kg, vg, sel, cu, shape)
            o_r, lse_r = ref.sparse_attention(qd, kd, vd, sel, cu, BK)
        else:
            o, lse = tri.dense_attention(qg, kg, vg, cu, shape)
            o_r, lse_r = ref.dense_attention(qd, kd, vd, cu)
        o.backward(x["do"])
        o_r.backward(x["do"].double())
        qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        picked = (sel, ilse) if support == "sparse" else (None, None)
        kl = tri.indexer_kl(q, k, lse, qig, kig, picked[1], picked[0], cu, shape)
        kl.backward()
        args = (q.double(), k.double(), qi.double(), ki.double(), cu, picked[0], BK)
        kl_r = ref.indexer_kl(*args)
        dqi_r, dki_r = ref.indexer_kl_grads(*args)
        tag = "" if support == "sparse" else "dense "
        if support == "sparse":
            wanted = dict(o=o_r, dq=qd.grad, dk=kd.grad, dv=vd.grad, kl=kl_r, dqi=dqi_r, dki=dki_r)
        errs.update({
            tag + "o": _rel(o, o_r), tag + "lse": _rel(lse, lse_r), tag + "dq": _rel(qg.grad, qd.grad),
            tag + "dk": _rel(kg.grad, kd.grad), tag + "dv": _rel(vg.grad, vd.grad),
            tag + "kl": abs(kl.item() - kl_r.item()) / abs(kl_r.item()),
            tag + "dqi": _rel(qig.grad, dqi_r), tag + "dki": _rel(kig.grad, dki_r),
        })
    errs.update(_kl_in_backward_errors(x, shape, sel, ilse, wanted))
    ok = errs["selection_rows_differ"] < 1e-3 and all(
        v < 1e-2 for key, v in errs.items() if key != "selection_rows_differ")
    report(f"check {errs} -> {'OK' if ok else 'FAIL'}")
    return ok, errs


def _kl_in_backward_errors(x, shape, sel, ilse, wanted):
    """The training path (ops.sparse_attention_with_kl) against the same references; {} if not served."""
    import torch

    from msa_megatron import ops

    q, k, v, qi, ki, cu = x["q"], x["k"], x["v"], x["qi"], x["ki"], x["cu"]
    qg, kg, vg, qig, kig = [t.clone().requires_grad_(True) for t in (q, k, v, qi, ki)]
    fused = ops.sparse_attention_with_kl(qg, kg, vg, qig, kig, sel, ilse, cu, shape, "triton", qi.shape[1])
    if fused is None:
        return {}
    o, kl, value = fused
    torch.autograd.backward([o, kl], [x["do"], torch.ones((), device=q.device)])
    return {
        "kl-in-bwd o": _rel(o, wanted["o"]), "kl-in-bwd dq": _rel(qg.grad, wanted["dq"]),
        "kl-in-bwd dk": _rel(kg.grad, wanted["dk"]), "kl-in-bwd dv": _rel(vg.grad, wanted["dv"]),
        "kl-in-bwd kl": abs(value.item() - wanted["kl"].item()) / abs(wanted["kl"].item()),
        "kl-in-bwd dqi": _rel(qig.grad, wanted["dqi"]), "kl-in-bwd dki": _rel(kig.grad, wanted["dki"]),
    }
