"""Random packed MSA inputs shared by the op tests (CPU, float64 unless asked otherwise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qi: torch.Tensor
    ki: torch.Tensor
    cu_seqlens: torch.Tensor
    block_size: int
    topk: int

    @property
    def lengths(self):
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def doc(self, n: int) -> "Case":
        """Document n alone, as its own one-document batch."""
        a, b = int(self.cu_seqlens[n]), int(self.cu_seqlens[n + 1])
        cu = torch.tensor([0, b - a], dtype=torch.int32)
        return Case(self.q[a:b], self.k[a:b], self.v[a:b], self.qi[a:b], self.ki[a:b], cu, self.block_size, self.topk)

    def tensors(self):
        return self.q, self.k, self.v, self.qi, self.ki


def make_case(
    lengths,
    hq=4,
    hkv=2,
    d=8,
    di=8,
    block_size=4,
    topk=3,
    dtype=torch.float64,
    seed=0,
    requires_grad=False,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return Case(rnd(total, hq, d), rnd(total, hkv, d), rnd(total, hkv, d), rnd(total, hkv, di), rnd(total, 1, di), cu, block_size, topk)


def naive_block_scores(qi, ki, cu_seqlens, block_size, index_scale):
    """Per-query Python loop: {block: max score} over visible tokens of the query's document."""
    out = {}
    cu = cu_seqlens.tolist()
    for n in range(len(cu) - 1):
        for i in range(cu[n], cu[n + 1]):
            for g in range(qi.shape[1]):
                scores = {}
                for j in range(cu[n], i + 1):
                    b = (j - cu[n]) // block_size
                    s = float((qi[i, g] * ki[j, 0]).sum()) * index_scale
                    scores[b] = max(scores.get(b, float("-inf")), s)
                out[(g, i)] = scores
    return out


def naive_attention(q, k, v, cu_seqlens, keep, scale):
    """Per-query loop softmax attention; keep(g, i, j) says whether key j is in query i's support."""
    total, hq, d = q.shape
    r = hq // k.shape[1]
    o = torch.zeros_like(q)
    lse = torch.zeros(total, hq, dtype=q.dtype)
    cu = cu_seqlens.tolist()
    for n in range(len(cu) - 1):
        for i in range(cu[n], cu[n + 1]):
            for h in range(hq):
                g = h // r
                js = [j for j in range(cu[n], i + 1) if keep(g, i, j)]
                s = torch.stack([(q[i, h] * k[j, g]).sum() * scale for j in js])
                lse[i, h] = torch.logsumexp(s, 0)
                p = torch.softmax(s, 0)
                o[i, h] = sum(p[t] * v[j, g] for t, j in enumerate(js))
    return o, lse


def triton_ops_on_rows(tri, q, k, v, qi, ki, do, cu_seqlens, shape, rows=None) -> dict:
    """Every Triton op, forward and backward, for the queries `rows` (None: all) as a context-
    parallel rank computes them: {"sel", "ilse", "sparse"/"dense": {o, lse, dq, dk, dv, kl, dqi, dki}}."""
    qs, qis, dos = (q, qi, do) if rows is None else (q[rows], qi[rows], do[rows])
    kw = {} if rows is None else {"qpos": rows}
    sel, ilse = tri.select_blocks(qis, ki, cu_seqlens, shape, **kw)
    out = {"sel": sel, "ilse": ilse}
    for name in ("sparse", "dense"):
        qg, kg, vg = qs.clone().requires_grad_(True), k.clone().requires_grad_(True), v.clone().requires_grad_(True)
        if name == "sparse":
            o, lse = tri.sparse_attention(qg, kg, vg, sel, cu_seqlens, shape, **kw)
        else:
            o, lse = tri.dense_attention(qg, kg, vg, cu_seqlens, shape, **kw)
        o.backward(dos)
        qig, kig = qis.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        support = (sel, ilse) if name == "sparse" else (None, None)
        kl = tri.indexer_kl(qs, k, lse, qig, kig, support[1], support[0], cu_seqlens, shape, **kw)
        kl.backward()
        out[name] = dict(o=o, lse=lse, dq=qg.grad, dk=kg.grad, dv=vg.grad, kl=kl, dqi=qig.grad, dki=kig.grad)
    # the training path: the KL computed in the sparse attention's backward
    qg, kg, vg, qig, kig = [t.clone().requires_grad_(True) for t in (qs, k, v, qis, ki)]
    value = torch.full((), float("nan"), device=q.device)
    o, lse, kl = tri.sparse_attention_kl(qg, kg, vg, qig, kig, sel, ilse, cu_seqlens, shape, qi.shape[1], value, **kw)
    torch.autograd.backward([o, kl], [dos, torch.ones_like(kl)])
    out["sparse_kl_in_bwd"] = dict(o=o, lse=lse, dq=qg.grad, dk=kg.grad, dv=vg.grad, kl=value, dqi=qig.grad, dki=kig.grad)
    return out
