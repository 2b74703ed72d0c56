"""The library attention kernels PyTorch carries (cuDNN, flash), called on packed batches with lse.

Candidates, fastest first (`CANDIDATES`):
- cudnn_batched: every document is max_seqlen long (a single document, or the model's [s, b]
  layout): cuDNN SDPA on [B, H, S, d] views of the packed tensors, GQA as is.
- cudnn / cudnn_kv: cuDNN varlen attention (cu_seqlens), K/V as is or expanded to the query heads
  (a cuDNN build whose varlen path ignores GQA then still serves; dK/dV are summed back).
- flash: flash attention varlen (GQA as is).
- cudnn_docs: documents of different lengths whose edges the host knows (the data pipeline builds
  cu_seqlens on the host: no sync): each document of at least LONG_DOC tokens is one
  cudnn_batched call of batch 1, each run of shorter documents between them one flash call. cuDNN's
  varlen backward, the one call that would serve these batches, disagrees with ours in torch 2.11.

`choose` runs each candidate once per (device, dtype, head shape, batch kind) on a small batch
against our Triton kernels (values, lse and gradients) and takes the first that agrees, so a
library build with another lse layout or without a feature is skipped, not trusted. What every
candidate gave is kept in `PROBES` (the benchmark and the GPU tests print it).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings

import torch

from msa_megatron.ops.triton.rows import edges_describe

CANDIDATES = {
    "uniform": ("cudnn_batched", "cudnn", "cudnn_kv", "flash"),
    "docs": ("cudnn_docs", "cudnn", "cudnn_kv", "flash"),
    "varlen": ("cudnn", "cudnn_kv", "flash"),
}
FORCEABLE = ("auto", "triton", *dict.fromkeys(n for names in CANDIDATES.values() for n in names))  # MSA_DENSE_BACKEND
LONG_DOC = 1024  # tokens: a shorter document costs less than a call of its own (cudnn_docs)
_CALL_STATE = 3  # tensors cudnn_docs keeps per call: flash's state, or cuDNN's without its o
PROBES = {}  # (device, dtype, Hq, Hkv, d, kind) -> {candidate: errors or the exception}
_CHOSEN = {}  # same key -> candidate name, or "triton"


def batch_kind(q, cu_seqlens, max_seqlen, edges=None) -> str:
    """'uniform' when every document is max_seqlen long (known from shapes alone: no host sync),
    'docs' when `edges` (the host's copy of cu_seqlens) describes these rows, else 'varlen'."""
    if max_seqlen > 0 and q.shape[0] == (cu_seqlens.numel() - 1) * max_seqlen:
        return "uniform"
    if edges_describe(edges, cu_seqlens, q.shape[0]):
        return "docs"
    return "varlen"


def doc_segments(edges, long_doc=None):
    """cudnn_docs' calls as (first document, end document, candidate): each document of at least
    long_doc (LONG_DOC) tokens alone on cudnn_batched, each run of shorter ones together on flash."""
    long_doc = LONG_DOC if long_doc is None else long_doc
    segments, run = [], None
    for i in range(len(edges) - 1):
        if edges[i + 1] - edges[i] >= long_doc:
            if run is not None:
                segments.append((run, i, "flash"))
                run = None
            segments.append((i, i + 1, "cudnn_batched"))
        elif run is None:
            run = i
    if run is not None:
        segments.append((run, len(edges) - 1, "flash"))
    return segments


def _segment_calls(edges, cu):
    """(rows start, rows end, candidate, its cu_seqlens (device, from 0), its max_seqlen) per call;
    a run of empty documents has no rows and no call."""
    for a, b, name in doc_segments(edges):
        lengths = [edges[i + 1] - edges[i] for i in range(a, b)]
        if edges[b] > edges[a]:
            yield edges[a], edges[b], name, cu[a : b + 1] - cu[a], max(lengths)


def _forward_docs(q, k, v, cu, edges, scale):
    """cudnn_docs: each call's o and lse written into the packed outputs; the state keeps each
    call's library state, without cuDNN's o (the backward reads it back from the packed o)."""
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    state = []
    for s, e, name, cu_s, max_s in _segment_calls(edges, cu):
        o[s:e], lse[s:e], st = forward(name, q[s:e], k[s:e], v[s:e], cu_s, max_s, scale)
        state.extend(st[1:] if name == "cudnn_batched" else st)  # cuDNN's o: read back from the packed o
    return o, lse, tuple(state)


def _backward_docs(do, q, k, v, o, state, cu, edges, scale):
    grads = [torch.empty_like(t) for t in (q, k, v)]
    for call, (s, e, name, cu_s, max_s) in enumerate(_segment_calls(edges, cu)):
        st = state[call * _CALL_STATE : (call + 1) * _CALL_STATE]
        if name == "cudnn_batched":
            st = (o[s:e].view(1, e - s, o.shape[1], o.shape[2]).transpose(1, 2), *st)
        for g, part in zip(grads, backward(name, do[s:e], q[s:e], k[s:e], v[s:e], o[s:e], st, cu_s, max_s, scale)):
            g[s:e] = part
    return tuple(grads)


def forward(name, q, k, v, cu, max_seqlen, scale, edges=None):
    """(o [T, Hq, d], lse [T, Hq] fp32, state for `backward`); `edges` only for cudnn_docs."""
    total, hq, d = q.shape
    if name == "cudnn_docs":
        return _forward_docs(q, k, v, cu, edges, scale)
    if name == "cudnn_batched":
        b = cu.numel() - 1
        q4, k4, v4 = (t.view(b, max_seqlen, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, True, False, scale=scale)
        o4, lse_raw, seed, offset = out[0], out[1], out[6], out[7]
        o = o4.transpose(1, 2).reshape(total, hq, o4.shape[-1])
        lse = lse_raw.reshape(b, hq, max_seqlen).transpose(1, 2).reshape(total, hq)
        return o, lse.float(), (o4, lse_raw, seed, offset)
    if name in ("cudnn", "cudnn_kv"):
        kk, vv = (_expand(k, hq), _expand(v, hq)) if name == "cudnn_kv" else (k, v)
        out = torch.ops.aten._cudnn_attention_forward(
            q, kk, vv, None, cu, cu, max_seqlen, max_seqlen, True, 0.0, True, False, scale=scale
        )
        o, lse_raw, seed, offset = out[0], out[1], out[6], out[7]
        return o, _lse_rows(lse_raw, total, hq), (lse_raw, seed, offset)
    o, lse_raw, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, True, False, scale=scale
    )
    return o, _lse_rows(lse_raw, total, hq), (lse_raw, rng, unused)


def backward(name, do, q, k, v, o, state, cu, max_seqlen, scale, edges=None):
    """(dq, dk, dv) of the candidate's forward (no gradient into the lse)."""
    total, hq, d = q.shape
    if name == "cudnn_docs":
        return _backward_docs(do, q, k, v, o, state, cu, edges, scale)
    if name == "cudnn_batched":
        o4, lse_raw, seed, offset = state
        b = cu.numel() - 1
        q4, k4, v4, do4 = (t.view(b, max_seqlen, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v, do))
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do4, q4, k4, v4, o4, lse_raw, seed, offset, None, None, None, max_seqlen, max_seqlen, 0.0, True, scale=scale
        )
        return tuple(g.transpose(1, 2).reshape(total, g.shape[1], g.shape[-1]) for g in grads)
    if name in ("cudnn", "cudnn_kv"):
        lse_raw, seed, offset = state
        kk, vv = (_expand(k, hq), _expand(v, hq)) if name == "cudnn_kv" else (k, v)
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            do, q, kk, vv, o, lse_raw, seed, offset, None, cu, cu, max_seqlen, max_seqlen, 0.0, True, scale=scale
        )
        if name == "cudnn_kv":
            dk, dv = _fold(dk, k.shape[1]), _fold(dv, k.shape[1])
        return dq, dk, dv
    lse_raw, rng, unused = state
    return torch.ops.aten._flash_attention_backward(
        do, q, k, v, o, lse_raw, cu, cu, max_seqlen, max_seqlen, 0.0, True, rng, unused, scale=scale
    )


def _expand(t, heads):
    """[T, Hkv, d] -> [T, heads, d], each KV head repeated for its group."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold(g, groups):
    """Gradient of _expand: sum the group's heads back into their KV head."""
    return g.view(g.shape[0], groups, -1, g.shape[-1]).sum(2, dtype=torch.float32).to(g.dtype)


def _lse_rows(lse_raw, total, hq):
    """The library's lse as [T, Hq]: cuDNN varlen gives [T, Hq, 1], flash varlen [Hq, T]."""
    if tuple(lse_raw.shape) in ((total, hq, 1), (total, hq)):
        return lse_raw.reshape(total, hq).float()
    if tuple(lse_raw.shape) == (hq, total):
        return lse_raw.t().float()
    raise RuntimeError(f"unexpected lse layout {tuple(lse_raw.shape)} for T={total}, Hq={hq}")


def _rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _probe(name, kind, q, k, reference):
    """Errors of candidate `name` against `reference` (our Triton kernels) on a small batch."""
    dev = q.device
    # docs: short runs before, between and after two long documents, neither a multiple of 64
    lengths = {"uniform": [256, 256, 256], "docs": [37, LONG_DOC + 77, 130, 1, LONG_DOC + 5, 3]}.get(kind, [37, 130, 301, 1])
    gen = torch.Generator(device=dev).manual_seed(0)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    total = sum(lengths)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=q.dtype, generator=gen)
    qs, ks, vs, dos = rnd(total, hq, d), rnd(total, hkv, d), rnd(total, hkv, d), rnd(total, hq, d)
    edges = tuple(itertools.accumulate(lengths, initial=0))
    cu = torch.tensor(edges, dtype=torch.int32, device=dev)
    scale = 1.0 / math.sqrt(d)
    o_t, lse_t, grads_t = reference(qs, ks, vs, dos, cu, scale)
    o, lse, state = forward(name, qs, ks, vs, cu, max(lengths), scale, edges)
    grads = backward(name, dos, qs, ks, vs, o, state, cu, max(lengths), scale, edges)
    errs = {"o": _rel(o, o_t), "lse_abs": (lse - lse_t).abs().max().item()}
    errs.update({g: _rel(a, b) for g, a, b in zip(("dq", "dk", "dv"), grads, grads_t)})
    return errs


def _agrees(errs) -> bool:
    return errs["o"] < 2e-2 and errs["lse_abs"] < 1e-2 and all(errs[g] < 3e-2 for g in ("dq", "dk", "dv"))


def forced_backend() -> str:
    """MSA_DENSE_BACKEND: 'auto' (probe), 'triton' or a candidate name; anything else is refused."""
    forced = os.environ.get("MSA_DENSE_BACKEND", "auto")
    if forced not in FORCEABLE:
        raise ValueError(f"MSA_DENSE_BACKEND={forced!r}: must be one of {', '.join(FORCEABLE)}")
    return forced


def choose(q, k, kind, reference) -> str:
    """The library candidate for these tensors and batch kind, or 'triton' (see module docstring).

    MSA_DENSE_BACKEND=<candidate> forces one (no check); `reference(q, k, v, do, cu, scale)` returns
    (o, lse, (dq, dk, dv)) from our kernels.
    """
    forced = forced_backend()
    if forced != "auto":
        return forced if forced == "triton" or forced in CANDIDATES[kind] else "triton"
    key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2], kind)
    if key not in _CHOSEN:
        _CHOSEN[key] = "triton"
        PROBES[key] = {}
        for name in CANDIDATES[kind]:
            try:
                errs = _probe(name, kind, q, k, reference)
            except Exception as exc:  # noqa: BLE001 - a library build without this path
                PROBES[key][name] = f"{type(exc).__name__}: {str(exc)[:160]}"
                continue
            PROBES[key][name] = errs
            if _agrees(errs):
                _CHOSEN[key] = name
                break
        if _CHOSEN[key] == "triton":
            warnings.warn(f"dense attention ({kind} batches): no library kernel agreed with ours, using Triton: {PROBES[key]}")
    return _CHOSEN[key]
