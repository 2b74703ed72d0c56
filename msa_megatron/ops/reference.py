"""Plain PyTorch oracle for MiniMax Sparse Attention (MSA), following ../shared/MSA.md.

Readable over fast. Every function takes packed THD tensors plus ``cu_seqlens`` (int32, [B+1])
and never lets attention, index scores or the KL cross a document boundary. Block ids are counted
from each document's start. Work is split into query chunks so that an 8K-token batch runs on a
CPU in seconds and no [T, T] tensor is ever built: a chunk only sees keys from the first document
start it touches up to its last query.

Shapes: q [T, Hq, d], k/v [T, Hkv, d], qi [T, Hkv, di], ki [T, 1, di],
topk int32 [Hkv, T, k] (selected non-local ids, then the local block, then -1),
lse fp32-or-wider [T, Hq] (natural log). Query head h belongs to group h // (Hq // Hkv).

Half-precision inputs are computed in float32 and returned in their own dtype; float64 stays
float64 (tests use it as the oracle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

DEFAULT_CHUNK = 256


# --------------------------------------------------------------------------- layout helpers


@dataclass(frozen=True)
class DocLayout:
    """Per-token document bookkeeping for a packed batch."""

    doc_id: torch.Tensor  # [T] long, which document a token belongs to
    doc_start: torch.Tensor  # [T] long, packed index of that document's first token
    pos: torch.Tensor  # [T] long, position inside the document

    @property
    def total(self) -> int:
        return self.pos.numel()


def doc_layout(cu_seqlens: torch.Tensor, total: int) -> DocLayout:
    cu = cu_seqlens.to(torch.long).cpu()
    if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or int(cu[-1]) != total:
        raise ValueError(
            f"cu_seqlens must be 1-D, start at 0 and end at the token count {total}; got {cu.tolist()}"
        )
    lengths = cu[1:] - cu[:-1]
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing; got {cu.tolist()}")
    doc_id = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    doc_start = cu[:-1][doc_id]
    pos = torch.arange(total) - doc_start
    dev = cu_seqlens.device
    return DocLayout(doc_id.to(dev), doc_start.to(dev), pos.to(dev))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Chunk:
    q: slice  # query rows [a, b)
    kv: slice  # key rows [ks, b): earliest document start of the chunk up to its last query
    visible: torch.Tensor  # [C, K] bool: same document and causal


def _chunks(layout: DocLayout, chunk: int) -> Iterator[_Chunk]:
    total = layout.total
    for a in range(0, total, chunk):
        b = min(a + chunk, total)
        ks = int(layout.doc_start[a])
        qi = torch.arange(a, b, device=layout.pos.device)
        kj = torch.arange(ks, b, device=layout.pos.device)
        visible = (layout.doc_id[qi, None] == layout.doc_id[None, kj]) & (kj[None, :] <= qi[:, None])
        yield _Chunk(slice(a, b), slice(ks, b), visible)


def _local_block(layout: DocLayout, block_size: int) -> torch.Tensor:
    return layout.pos // block_size


def num_blocks(cu_seqlens: torch.Tensor, block_size: int) -> int:
    """Largest number of KV blocks of any document in the batch."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    return max(1, int(((lengths + block_size - 1) // block_size).max()))


# --------------------------------------------------------------------------- index branch


def index_scores_chunk(qi, ki, ch: _Chunk, index_scale: float) -> torch.Tensor:
    """Token index scores [G, C, K] of one chunk, -inf where not visible."""
    cd = _compute_dtype(qi)
    s = torch.einsum("cgd,kd->gck", qi[ch.q].to(cd), ki[ch.kv, 0].to(cd)) * index_scale
    return s.masked_fill(~ch.visible, float("-inf"))


def index_block_scores(
    qi: torch.Tensor,
    ki: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    index_scale: Optional[float] = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Block scores S [G, T, NB]: max over visible tokens of each document-local block (-inf if none)."""
    total, groups, di = qi.shape
    index_scale = 1.0 / math.sqrt(di) if index_scale is None else index_scale
    layout = doc_layout(cu_seqlens, total)
    nb = num_blocks(cu_seqlens, block_size)
    out = torch.full((groups, total, nb), float("-inf"), dtype=_compute_dtype(qi), device=qi.device)
    key_block = layout.pos // block_size
    for ch in _chunks(layout, chunk):
        s = index_scores_chunk(qi, ki, ch, index_scale)
        idx = key_block[ch.kv].view(1, 1, -1).expand_as(s)
        blk = torch.full_like(out[:, ch.q], float("-inf"))
        out[:, ch.q] = blk.scatter_reduce(-1, idx, s, reduce="amax", include_self=True)
    return out


def select_blocks(block_scores: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """Top-k selection in the contract layout: [G, T, k] int32.

    The local block L = pos // Bk is always kept and written in the last valid slot; the other
    slots hold the top-(k-1) visible non-local blocks by raw score (ties: lower block id first),
    then -1 padding. Valid slots = min(L + 1, k).
    """
    groups, total, nb = block_scores.shape
    layout = doc_layout(cu_seqlens, total)
    local = _local_block(layout, block_size)  # [T]
    block_ids = torch.arange(nb, device=block_scores.device)
    candidate = block_scores.clone()
    not_candidate = block_ids[None, :] >= local[:, None]  # the local block and everything after it
    candidate = candidate.masked_fill(not_candidate[None], float("-inf"))
    # Stable ascending sort of the negated scores: highest score first, lower id first on ties.
    order = torch.sort(-candidate, dim=-1, stable=True).indices
    width = min(topk - 1, nb)
    picked = order[..., :width]
    n_hist = torch.clamp(local, max=topk - 1)  # visible non-local blocks taken
    slot = torch.arange(topk, device=block_scores.device)
    out = torch.full((groups, total, topk), -1, dtype=torch.long, device=block_scores.device)
    out[..., :width] = torch.where(slot[None, :width] < n_hist[:, None], picked, -1)
    out.scatter_(-1, n_hist.view(1, total, 1).expand(groups, total, 1), local.view(1, total, 1).expand(groups, total, 1))
    return out.to(torch.int32)


def _selected_mask_chunk(topk: torch.Tensor, ch: _Chunk, key_block: torch.Tensor, nb: int) -> torch.Tensor:
    """Support mask [G, C, K]: key visible and its block selected by (query, group)."""
    sel = topk[:, ch.q].to(torch.long)  # [G, C, k]
    groups, c, _ = sel.shape
    chosen = torch.zeros(groups, c, nb + 1, dtype=torch.bool, device=topk.device)
    chosen.scatter_(-1, torch.where(sel < 0, nb, sel), True)  # -1 pads land in a spare column
    kb = key_block[ch.kv].view(1, 1, -1).expand(groups, c, -1)
    return chosen.gather(-1, kb) & ch.visible


def _support_masks(topk, cu_seqlens, total, block_size, chunk):
    """Yield (chunk, support mask [G, C, K]); support = all visible tokens when topk is None."""
    layout = doc_layout(cu_seqlens, total)
    key_block = layout.pos // block_size
    nb = num_blocks(cu_seqlens, block_size)
    for ch in _chunks(layout, chunk):
        if topk is None:
            yield ch, ch.visible.unsqueeze(0)
        else:
            yield ch, _selected_mask_chunk(topk, ch, key_block, nb)


def index_lse(
    qi, ki, topk, cu_seqlens, block_size, index_scale=None, chunk=DEFAULT_CHUNK
) -> torch.Tensor:
    """Log-sum-exp of the index scores over the support: [G, T]. topk=None: all visible tokens."""
    total, groups, di = qi.shape
    index_scale = 1.0 / math.sqrt(di) if index_scale is None else index_scale
    out = torch.empty(groups, total, dtype=_compute_dtype(qi), device=qi.device)
    for ch, support in _support_masks(topk, cu_seqlens, total, block_size, chunk):
        s = index_scores_chunk(qi, ki, ch, index_scale).masked_fill(~support, float("-inf"))
        out[:, ch.q] = torch.logsumexp(s, dim=-1)
    return out


@torch.no_grad()
def msa_indexer(qi, ki, cu_seqlens, block_size, topk, index_scale=None, chunk=DEFAULT_CHUNK):
    """Indexer: (topk [G, T, k] int32, index lse over the selected support [G, T] float)."""
    scores = index_block_scores(qi, ki, cu_seqlens, block_size, index_scale, chunk)
    sel = select_blocks(scores, cu_seqlens, block_size, topk)
    return sel, index_lse(qi, ki, sel, cu_seqlens, block_size, index_scale, chunk)


# --------------------------------------------------------------------------- main branch


def _attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale, chunk):
    total, hq, d = q.shape
    groups = k.shape[1]
    r = hq // groups
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    cd = _compute_dtype(q)
    outs, lses = [], []
    for ch, support in _support_masks(topk, cu_seqlens, total, block_size, chunk):
        kc = k[ch.kv].to(cd).repeat_interleave(r, dim=1)  # [K, Hq, d]
        vc = v[ch.kv].to(cd).repeat_interleave(r, dim=1)
        s = torch.einsum("chd,khd->hck", q[ch.q].to(cd), kc) * scale
        mask = support.repeat_interleave(r, dim=0) if support.shape[0] > 1 else support
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [Hq, C]
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.einsum("hck,khd->chd", p, vc))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


def sparse_attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale=None, chunk=DEFAULT_CHUNK):
    """Exact softmax attention of each head over its group's selected blocks: (o [T, Hq, d], lse [T, Hq])."""
    return _attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale, chunk)


def dense_attention(q, k, v, cu_seqlens, softmax_scale=None, chunk=DEFAULT_CHUNK):
    """Dense causal GQA attention inside each document: (o [T, Hq, d], lse [T, Hq])."""
    return _attention(q, k, v, None, cu_seqlens, 1, softmax_scale, chunk)


# --------------------------------------------------------------------------- KL alignment


def _teacher_and_student_logp(q, k, qi, ki, ch, support, scale, index_scale):
    """Teacher probs P_T [G, C, K] (group mean of main softmax, detached) and student log-probs."""
    cd = _compute_dtype(qi)
    hq, groups = q.shape[1], qi.shape[1]
    r = hq // groups
    with torch.no_grad():
        kc = k[ch.kv].to(cd).repeat_interleave(r, dim=1)
        s = torch.einsum("chd,khd->hck", q[ch.q].to(cd), kc) * scale
        s = s.masked_fill(~support.repeat_interleave(r, dim=0), float("-inf"))
        p_teacher = torch.softmax(s, dim=-1).view(groups, r, *s.shape[1:]).mean(dim=1)
    s_idx = index_scores_chunk(qi, ki, ch, index_scale).masked_fill(~support, float("-inf"))
    return p_teacher, torch.log_softmax(s_idx, dim=-1)


def _kl_constants(q, qi, softmax_scale, index_scale, total_groups):
    """(main scale, index scale, KL normaliser groups) with the defaults filled in."""
    return (
        1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale,
        1.0 / math.sqrt(qi.shape[-1]) if index_scale is None else index_scale,
        qi.shape[1] if total_groups is None else total_groups,
    )


def indexer_kl(
    q,
    k,
    qi,
    ki,
    cu_seqlens,
    topk=None,
    block_size=128,
    softmax_scale=None,
    index_scale=None,
    total_groups=None,
    chunk=DEFAULT_CHUNK,
) -> torch.Tensor:
    """KL(P_T || P_idx) summed over (query, group) / (T * total_groups), differentiable in qi, ki only.

    topk=None gives the dense-warmup support (all visible tokens of the document). q and k are
    used detached. total_groups defaults to the local group count; a tensor-parallel rank that
    owns a slice of the groups passes the global count so that the ranks' values sum to the KL.
    """
    total, groups = q.shape[0], qi.shape[1]
    scale, index_scale, total_groups = _kl_constants(q, qi, softmax_scale, index_scale, total_groups)
    acc = qi.new_zeros((), dtype=_compute_dtype(qi))
    for ch, support in _support_masks(topk, cu_seqlens, total, block_size, chunk):
        support = support.expand(groups, -1, -1)
        p_t, logp_idx = _teacher_and_student_logp(q.detach(), k.detach(), qi, ki, ch, support, scale, index_scale)
        # xlogy gives 0 where the teacher has no mass; masked tokens contribute nothing.
        term = torch.xlogy(p_t, p_t) - p_t * logp_idx.masked_fill(~support, 0.0)
        acc = acc + term.sum()
    return acc / (total * total_groups)


def indexer_kl_grads(
    q,
    k,
    qi,
    ki,
    cu_seqlens,
    topk=None,
    block_size=128,
    softmax_scale=None,
    index_scale=None,
    total_groups=None,
    coeff=1.0,
    chunk=DEFAULT_CHUNK,
):
    """Closed-form gradient of coeff * indexer_kl w.r.t. (qi, ki): ds = P_idx - P_T on the support.

    This is the formula the fused KL-backward kernels implement (MSA.md step 7).
    """
    total, groups = q.shape[0], qi.shape[1]
    scale, index_scale, total_groups = _kl_constants(q, qi, softmax_scale, index_scale, total_groups)
    cd = _compute_dtype(qi)
    grad_scale = coeff * index_scale / (total * total_groups)
    dqi = torch.zeros(qi.shape, dtype=cd, device=qi.device)
    dki = torch.zeros(ki.shape, dtype=cd, device=ki.device)
    with torch.no_grad():
        for ch, support in _support_masks(topk, cu_seqlens, total, block_size, chunk):
            support = support.expand(groups, -1, -1)
            p_t, logp_idx = _teacher_and_student_logp(q, k, qi, ki, ch, support, scale, index_scale)
            ds = (torch.exp(logp_idx) - p_t) * grad_scale  # [G, C, K]
            dqi[ch.q] += torch.einsum("gck,kd->cgd", ds, ki[ch.kv, 0].to(cd))
            dki[ch.kv, 0] += torch.einsum("gck,cgd->kd", ds, qi[ch.q].to(cd))
    return dqi.to(qi.dtype), dki.to(ki.dtype)


# --------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def selection_recall(q, k, topk, cu_seqlens, block_size, softmax_scale=None, chunk=DEFAULT_CHUNK):
    """Paper section 5 recall of the index selection against the main branch's own top-k.

    For every (query, group) whose document prefix has more than k blocks (below that both sets
    are "all visible blocks"), I* = the k blocks with the largest group-mean full-attention mass
    (ties: lower id), I^ = the selection; block recall = |I* & I^| / k, score recall =
    mass(I* & I^) / mass(I*). Returns the means over those (query, group) pairs as floats, or
    (None, None) when no query qualifies.
    """
    total, hq, d = q.shape
    groups, _, kk = topk.shape
    r = hq // groups
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    layout = doc_layout(cu_seqlens, total)
    key_block = layout.pos // block_size
    nb = num_blocks(cu_seqlens, block_size)
    cd = _compute_dtype(q)
    block_hits = score_hits = 0.0
    count = 0
    for ch in _chunks(layout, chunk):
        eligible = (layout.pos[ch.q] // block_size) + 1 > kk  # [C]
        if not eligible.any():
            continue
        kc = k[ch.kv].to(cd).repeat_interleave(r, dim=1)
        s = torch.einsum("chd,khd->hck", q[ch.q].to(cd), kc) * scale
        p = torch.softmax(s.masked_fill(~ch.visible, float("-inf")), dim=-1)
        p = p.view(groups, r, *p.shape[1:]).mean(1)  # [G, C, K]
        mass = torch.zeros(groups, p.shape[1], nb, dtype=cd, device=q.device)
        mass.scatter_add_(-1, key_block[ch.kv].view(1, 1, -1).expand_as(p), p)
        best = torch.sort(-mass, dim=-1, stable=True).indices[..., :kk]
        sel = topk[:, ch.q].to(torch.long)
        chosen = torch.zeros(groups, p.shape[1], nb + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(sel < 0, nb, sel), True)
        in_both = chosen.gather(-1, best)  # [G, C, k]
        best_mass = mass.gather(-1, best)
        e = eligible.view(1, -1).expand(groups, -1)
        block_hits += (in_both.sum(-1).to(cd) / kk)[e].sum().item()
        score = (best_mass * in_both).sum(-1) / best_mass.sum(-1).clamp_min(1e-30)
        score_hits += score[e].sum().item()
        count += int(e.sum())
    if count == 0:
        return None, None
    return block_hits / count, score_hits / count
