"""Plain PyTorch oracle for MiniMax Sparse Attention (MSA), following ../shared/MSA.md.

Readable over fast. Every function takes packed THD tensors plus ``cu_seqlens`` (int32, [B+1])
and never lets attention, index scores or the KL cross a document boundary. Block ids are counted
from each document's start. Work is split into query chunks so that an 8K-token batch runs on a
CPU in seconds and no [T, T] tensor is ever built: a chunk only sees keys from the first document
start it touches up to its last query.

Shapes: q [Tq, Hq, d], k/v [T, Hkv, d], qi [Tq, Hkv, di], ki [T, 1, di],
topk int32 [Hkv, Tq, k] (selected non-local ids, then the local block, then -1),
lse fp32-or-wider [Tq, Hq] (natural log). Query head h belongs to group h // (Hq // Hkv).

Queries may be a subset of the key rows (context parallelism: a rank keeps its own queries and
sees every key): ``qpos`` [Tq] gives each query's row in the key tensors (strictly increasing);
None means Tq == T and query i is key row i. ``cu_seqlens`` always delimits the key rows.

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
    """Per-token document bookkeeping for a packed batch (keys, or queries via `query_layout`)."""

    doc_id: torch.Tensor  # [N] long, which document a token belongs to
    doc_start: torch.Tensor  # [N] long, key row of that document's first token
    pos: torch.Tensor  # [N] long, position inside the document
    row: torch.Tensor  # [N] long, the token's key row

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
    row = torch.arange(total)
    pos = row - doc_start
    dev = cu_seqlens.device
    return DocLayout(doc_id.to(dev), doc_start.to(dev), pos.to(dev), row.to(dev))


def query_layout(keys: DocLayout, qpos: Optional[torch.Tensor]) -> DocLayout:
    """The layout of the queries: the keys' own (qpos None) or the key rows qpos picks."""
    if qpos is None:
        return keys
    rows = qpos.to(device=keys.row.device, dtype=torch.long)
    if rows.dim() != 1 or (rows.numel() and (rows[0] < 0 or rows[-1] >= keys.total)) or (rows[1:] <= rows[:-1]).any():
        raise ValueError(f"qpos must be strictly increasing key rows in [0, {keys.total}); got {rows.tolist()[:8]}...")
    return DocLayout(keys.doc_id[rows], keys.doc_start[rows], keys.pos[rows], rows)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Chunk:
    q: slice  # query rows [a, b)
    kv: slice  # key rows from the chunk's earliest document start up to its last query's row
    visible: torch.Tensor  # [C, K] bool: same document and causal


def _chunks(queries: DocLayout, keys: DocLayout, chunk: int) -> Iterator[_Chunk]:
    for a in range(0, queries.total, chunk):
        b = min(a + chunk, queries.total)
        ks, ke = int(queries.doc_start[a]), int(queries.row[b - 1]) + 1
        kj = torch.arange(ks, ke, device=keys.pos.device)
        qrow = queries.row[a:b]
        visible = (queries.doc_id[a:b, None] == keys.doc_id[None, kj]) & (kj[None, :] <= qrow[:, None])
        yield _Chunk(slice(a, b), slice(ks, ke), visible)


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
    qpos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block scores S [G, Tq, NB]: max over visible tokens of each document-local block (-inf if none)."""
    total, groups, di = qi.shape
    index_scale = 1.0 / math.sqrt(di) if index_scale is None else index_scale
    keys = doc_layout(cu_seqlens, ki.shape[0])
    nb = num_blocks(cu_seqlens, block_size)
    out = torch.full((groups, total, nb), float("-inf"), dtype=_compute_dtype(qi), device=qi.device)
    key_block = keys.pos // block_size
    for ch in _chunks(query_layout(keys, qpos), keys, chunk):
        s = index_scores_chunk(qi, ki, ch, index_scale)
        idx = key_block[ch.kv].view(1, 1, -1).expand_as(s)
        blk = torch.full_like(out[:, ch.q], float("-inf"))
        out[:, ch.q] = blk.scatter_reduce(-1, idx, s, reduce="amax", include_self=True)
    return out


def select_blocks(
    block_scores: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, topk: int, qpos: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Top-k selection in the contract layout: [G, Tq, k] int32.

    The local block L = pos // Bk is always kept and written in the last valid slot; the other
    slots hold the top-(k-1) visible non-local blocks by raw score (ties: lower block id first),
    then -1 padding. Valid slots = min(L + 1, k).
    """
    groups, total, nb = block_scores.shape
    keys = doc_layout(cu_seqlens, int(cu_seqlens[-1]))
    local = _local_block(query_layout(keys, qpos), block_size)  # [Tq]
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


def _support_masks(topk, cu_seqlens, n_keys, block_size, chunk, qpos=None):
    """Yield (chunk, support mask [G, C, K]); support = all visible tokens when topk is None."""
    keys = doc_layout(cu_seqlens, n_keys)
    key_block = keys.pos // block_size
    nb = num_blocks(cu_seqlens, block_size)
    for ch in _chunks(query_layout(keys, qpos), keys, chunk):
        if topk is None:
            yield ch, ch.visible.unsqueeze(0)
        else:
            yield ch, _selected_mask_chunk(topk, ch, key_block, nb)


def index_lse(
    qi, ki, topk, cu_seqlens, block_size, index_scale=None, chunk=DEFAULT_CHUNK, qpos=None
) -> torch.Tensor:
    """Log-sum-exp of the index scores over the support: [G, Tq]. topk=None: all visible tokens."""
    total, groups, di = qi.shape
    index_scale = 1.0 / math.sqrt(di) if index_scale is None else index_scale
    out = torch.empty(groups, total, dtype=_compute_dtype(qi), device=qi.device)
    for ch, support in _support_masks(topk, cu_seqlens, ki.shape[0], block_size, chunk, qpos):
        s = index_scores_chunk(qi, ki, ch, index_scale).masked_fill(~support, float("-inf"))
        out[:, ch.q] = torch.logsumexp(s, dim=-1)
    return out


@torch.no_grad()
def msa_indexer(qi, ki, cu_seqlens, block_size, topk, index_scale=None, chunk=DEFAULT_CHUNK, qpos=None):
    """Indexer: (topk [G, Tq, k] int32, index lse over the selected support [G, Tq] float)."""
    scores = index_block_scores(qi, ki, cu_seqlens, block_size, index_scale, chunk, qpos)
    sel = select_blocks(scores, cu_seqlens, block_size, topk, qpos)
    return sel, index_lse(qi, ki, sel, cu_seqlens, block_size, index_scale, chunk, qpos)


def local_selection(cu_seqlens, n_keys: int, block_size: int, topk: int, groups: int, qpos=None) -> torch.Tensor:
    """The local-only baseline's selection in the contract layout [G, Tq, k] int32: every query
    keeps its own block L and the k-1 blocks right before it (L-k+1 .. L, those that exist), the
    same block budget as MSA without an index branch. Built from positions on the device of
    cu_seqlens, without a host sync; the same for every group."""
    cu = cu_seqlens.to(torch.long)
    rows = torch.arange(n_keys, device=cu.device) if qpos is None else qpos.to(device=cu.device, dtype=torch.long)
    pos = rows - cu[torch.searchsorted(cu, rows, right=True) - 1]
    local = pos // block_size
    valid = torch.clamp(local + 1, max=topk)  # slots in use: min(L + 1, k)
    slot = torch.arange(topk, device=cu.device)
    ids = local[:, None] - valid[:, None] + 1 + slot[None, :]  # ascending, L in the last valid slot
    sel = torch.where(slot[None, :] < valid[:, None], ids, -1).to(torch.int32)
    return sel.unsqueeze(0).expand(groups, -1, -1).contiguous()


# --------------------------------------------------------------------------- main branch


def _attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale, chunk, qpos):
    total, hq, d = q.shape
    groups = k.shape[1]
    r = hq // groups
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    cd = _compute_dtype(q)
    outs, lses = [], []
    for ch, support in _support_masks(topk, cu_seqlens, k.shape[0], block_size, chunk, qpos):
        kc = k[ch.kv].to(cd).repeat_interleave(r, dim=1)  # [K, Hq, d]
        vc = v[ch.kv].to(cd).repeat_interleave(r, dim=1)
        s = torch.einsum("chd,khd->hck", q[ch.q].to(cd), kc) * scale
        mask = support.repeat_interleave(r, dim=0) if support.shape[0] > 1 else support
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [Hq, C]
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.einsum("hck,khd->chd", p, vc))
        lses.append(lse.transpose(0, 1))
    if not outs:  # no queries
        return q.new_zeros(q.shape), torch.zeros(0, hq, dtype=cd, device=q.device)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


def sparse_attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale=None, chunk=DEFAULT_CHUNK, qpos=None):
    """Exact softmax attention of each head over its group's selected blocks: (o [Tq, Hq, d], lse [Tq, Hq])."""
    return _attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale, chunk, qpos)


def dense_attention(q, k, v, cu_seqlens, softmax_scale=None, chunk=DEFAULT_CHUNK, qpos=None):
    """Dense causal GQA attention inside each document: (o [Tq, Hq, d], lse [Tq, Hq])."""
    return _attention(q, k, v, None, cu_seqlens, 1, softmax_scale, chunk, qpos)


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
    qpos=None,
) -> torch.Tensor:
    """KL(P_T || P_idx) summed over (query, group) / (T * total_groups), differentiable in qi, ki only.

    topk=None gives the dense-warmup support (all visible tokens of the document). q and k are
    used detached. T is the number of key rows (all tokens of the micro-batch, also when qpos
    keeps a subset of the queries) and total_groups defaults to the local group count: ranks that
    own a slice of the queries (context parallel) or of the groups (tensor parallel) pass the global
    count, so that the ranks' values sum to the KL.
    """
    total, groups = k.shape[0], qi.shape[1]
    scale, index_scale, total_groups = _kl_constants(q, qi, softmax_scale, index_scale, total_groups)
    acc = qi.new_zeros((), dtype=_compute_dtype(qi))
    for ch, support in _support_masks(topk, cu_seqlens, total, block_size, chunk, qpos):
        support = support.expand(groups, -1, -1)
        p_t, logp_idx = _teacher_and_student_logp(q.detach(), k.detach(), qi, ki, ch, support, scale, index_scale)
        # xlogy gives 0 where the teacher has no mass; masked tokens contribute nothing.
        term = torch.xlogy(p_t, p_t) - p_t * logp_idx.masked_fill(~support, 0.0)
        acc = acc + term.sum()
    return acc / (total * total_groups)


class _RevealInBackward(torch.autograd.Function):
    """Identity in gradient; the forward hides the value (0) and the backward writes it to `out`."""

    @staticmethod
    def forward(ctx, value, out):
        ctx.value, ctx.out = value.detach(), out
        return torch.zeros_like(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.out.copy_(ctx.value)
        return grad, None


def sparse_attention_with_kl(q, k, v, qi, ki, topk, cu_seqlens, block_size, softmax_scale, index_scale, total_groups,
                             value_out, qpos=None):
    """Twin of the Triton op whose attention backward computes the KL: (o, lse, kl handle).

    Same gradients as sparse_attention + indexer_kl; the handle is 0 and its backward writes the
    KL value into value_out (the fused kernel only knows it then).
    """
    o, lse = sparse_attention(q, k, v, topk, cu_seqlens, block_size, softmax_scale, qpos=qpos)
    kl = indexer_kl(q, k, qi, ki, cu_seqlens, topk, block_size, softmax_scale, index_scale, total_groups, qpos=qpos)
    return o, lse, _RevealInBackward.apply(kl, value_out)


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
    qpos=None,
):
    """Closed-form gradient of coeff * indexer_kl w.r.t. (qi, ki): ds = P_idx - P_T on the support.

    This is the formula the fused KL-backward kernels implement (MSA.md step 7).
    """
    total, groups = k.shape[0], qi.shape[1]
    scale, index_scale, total_groups = _kl_constants(q, qi, softmax_scale, index_scale, total_groups)
    cd = _compute_dtype(qi)
    grad_scale = coeff * index_scale / (total * total_groups)
    dqi = torch.zeros(qi.shape, dtype=cd, device=qi.device)
    dki = torch.zeros(ki.shape, dtype=cd, device=ki.device)
    with torch.no_grad():
        for ch, support in _support_masks(topk, cu_seqlens, total, block_size, chunk, qpos):
            support = support.expand(groups, -1, -1)
            p_t, logp_idx = _teacher_and_student_logp(q, k, qi, ki, ch, support, scale, index_scale)
            ds = (torch.exp(logp_idx) - p_t) * grad_scale  # [G, C, K]
            dqi[ch.q] += torch.einsum("gck,kd->cgd", ds, ki[ch.kv, 0].to(cd))
            dki[ch.kv, 0] += torch.einsum("gck,cgd->kd", ds, qi[ch.q].to(cd))
    return dqi.to(qi.dtype), dki.to(ki.dtype)


# --------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def selection_recall(q, k, topk, cu_seqlens, block_size, softmax_scale=None, chunk=DEFAULT_CHUNK, qpos=None):
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
    keys = doc_layout(cu_seqlens, k.shape[0])
    queries = query_layout(keys, qpos)
    key_block = keys.pos // block_size
    nb = num_blocks(cu_seqlens, block_size)
    cd = _compute_dtype(q)
    block_hits = score_hits = 0.0
    count = 0
    for ch in _chunks(queries, keys, chunk):
        eligible = (queries.pos[ch.q] // block_size) + 1 > kk  # [C]
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


def recall_sample(cu_seqlens, n_keys: int, block_size: int, topk: int, n_queries: int, qpos=None) -> torch.Tensor:
    """Query rows the recall diagnostics look at: n_queries spread evenly over the eligible rows.

    Eligible = the document prefix holds more than topk blocks (selection_recall's rule). Evenly
    spread over their order, so the sample is deterministic and the same on every backend;
    n_queries <= 0 keeps every eligible row. Returns a long tensor on the device of cu_seqlens.
    """
    keys = doc_layout(cu_seqlens, n_keys)
    queries = query_layout(keys, qpos)
    rows = torch.nonzero((queries.pos // block_size) + 1 > topk).squeeze(1)
    if 0 < n_queries < rows.numel():
        rows = rows[(torch.arange(n_queries, device=rows.device) * rows.numel()) // n_queries]
    return rows


@torch.no_grad()
def sampled_selection_recall(
    q, k, topk, cu_seqlens, block_size, n_queries, softmax_scale=None, chunk=DEFAULT_CHUNK, qpos=None
):
    """selection_recall on the recall_sample rows only: (block recall, score recall) or (None, None)."""
    rows = recall_sample(cu_seqlens, k.shape[0], block_size, topk.shape[-1], n_queries, qpos)
    if rows.numel() == 0:
        return None, None
    rows = rows.to(q.device)
    key_rows = rows if qpos is None else qpos.to(q.device, torch.long)[rows]
    return selection_recall(q[rows], k, topk[:, rows], cu_seqlens, block_size, softmax_scale, chunk, qpos=key_rows)
