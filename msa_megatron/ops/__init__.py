"""MSA operators behind one backend switch.

The model calls only the functions below; each picks the plain PyTorch oracle
(``reference``) or the Hopper kernels (``triton``). ``auto`` means Triton on CUDA tensors and the
reference elsewhere. All tensors are packed THD (see ops/reference.py for shapes).

- ``select_blocks``   indexer + top-k: (topk [G, T, k] int32, index lse [G, T] fp32), no grad
- ``sparse_attention`` main branch over the selection: (o, lse), differentiable in q, k, v
- ``dense_attention``  causal attention inside each document: (o, lse), differentiable in q, k, v
- ``indexer_kl``       KL(teacher || index) scalar, differentiable in qi, ki only
- ``sparse_attention_with_kl`` both of the sparse stage at once, the KL computed in the attention's
  backward (training only; None where the Triton backend has no such kernel for the layout)
- ``selection_recall`` block / score recall of a selection on a deterministic sample of queries
- ``local_selection`` the local-only baseline's selection (own block + the k-1 before it), any device

Every function takes an optional ``qpos`` [Tq]: the key row of each query when a rank keeps only
some of the queries (context parallelism; see ops/reference.py). None: queries = key rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from msa_megatron.ops import reference

BACKENDS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class MSAShape:
    """Static parameters of one MSA call."""

    block_size: int
    topk: int
    softmax_scale: float
    index_scale: float
    max_seqlen: int
    # The host's copy of cu_seqlens when the caller has one (the data pipeline builds it on the host):
    # dense attention then calls cuDNN per long document without a device sync, and the dense KL
    # sizes its share buffer by the longest document. None: not known.
    doc_edges: Optional[tuple] = None


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention.backend={name!r}: must be one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if name == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError("attention.backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return name


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton():
    from msa_megatron.ops import triton as triton_ops

    return triton_ops


def _triton_kwargs(qpos):
    """qpos only when given, so a Triton backend without context-parallel support still serves CP 1."""
    return {} if qpos is None else {"qpos": qpos}


def select_blocks(qi, ki, cu_seqlens, shape: MSAShape, backend: str, qpos=None):
    if backend == "triton":
        return _triton().select_blocks(qi, ki, cu_seqlens, shape, **_triton_kwargs(qpos))
    return reference.msa_indexer(qi, ki, cu_seqlens, shape.block_size, shape.topk, shape.index_scale, qpos=qpos)


def local_selection(cu_seqlens, n_queries: int, shape: MSAShape, groups: int, qpos=None):
    """[G, Tq, k] int32 selection of the most recent blocks (plain PyTorch on any device, no host sync).
    n_queries: the query count when qpos is None (queries = key rows)."""
    return reference.local_selection(cu_seqlens, n_queries, shape.block_size, shape.topk, groups, qpos=qpos)


def sparse_attention(q, k, v, topk, cu_seqlens, shape: MSAShape, backend: str, qpos=None):
    if backend == "triton":
        return _triton().sparse_attention(q, k, v, topk, cu_seqlens, shape, **_triton_kwargs(qpos))
    return reference.sparse_attention(q, k, v, topk, cu_seqlens, shape.block_size, shape.softmax_scale, qpos=qpos)


def dense_attention(q, k, v, cu_seqlens, shape: MSAShape, backend: str, qpos=None):
    if backend == "triton":
        return _triton().dense_attention(q, k, v, cu_seqlens, shape, **_triton_kwargs(qpos))
    return reference.dense_attention(q, k, v, cu_seqlens, shape.softmax_scale, qpos=qpos)


def indexer_kl(
    q, k, lse, qi, ki, index_lse, topk, cu_seqlens, shape: MSAShape, backend: str, total_groups: Optional[int] = None, qpos=None
):
    """KL value; its backward reaches qi and ki only. topk=None: dense-warmup support.

    ``lse`` (main branch, [Tq, Hq]) and ``index_lse`` ([G, Tq], over the same support; None in the
    dense stage, where the backend computes it) let fused kernels rebuild both distributions
    without a second softmax pass; the reference ignores them. Normalised by the key-row count
    times total_groups (MSA.md step 7), so ranks holding parts of the queries or groups sum to it.
    """
    if backend == "triton":
        return _triton().indexer_kl(q, k, lse, qi, ki, index_lse, topk, cu_seqlens, shape, total_groups, **_triton_kwargs(qpos))
    return reference.indexer_kl(
        q, k, qi, ki, cu_seqlens, topk, shape.block_size, shape.softmax_scale, shape.index_scale, total_groups, qpos=qpos
    )



def sparse_attention_with_kl(q, k, v, qi, ki, topk, index_lse, cu_seqlens, shape: MSAShape, backend: str,
                             total_groups: int, qpos=None):
    """(o, kl, kl_value) where `kl` (zero) carries the KL's gradient: weight it into the loss; the
    backward then computes the KL's value into `kl_value` (NaN until then) and its gradients to
    qi, ki. Same value and gradients as sparse_attention + indexer_kl. None when the Triton
    backend has no fused kernel for this layout: call those two instead."""
    if backend == "triton" and not _triton().kl_in_backward(q.shape[1] // k.shape[1]):
        return None
    value = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
    if backend == "triton":
        o, _, kl = _triton().sparse_attention_kl(
            q, k, v, qi, ki, topk, index_lse, cu_seqlens, shape, total_groups, value, **_triton_kwargs(qpos)
        )
    else:
        o, _, kl = reference.sparse_attention_with_kl(
            q, k, v, qi, ki, topk, cu_seqlens, shape.block_size, shape.softmax_scale, shape.index_scale, total_groups,
            value, qpos=qpos,
        )
    return o, kl, value


# Bytes of fp32 scores one recall step may hold ([Hq, queries, keys]); sets its query chunk.
RECALL_CHUNK_BYTES = 1 << 30


def selection_recall(q, k, topk, cu_seqlens, shape: MSAShape, backend: str, n_queries: int, qpos=None):
    """(block recall, score recall) of the selection on `n_queries` sampled queries (MSA.md Diagnostics).

    Both backends run the same PyTorch computation on the same deterministic sample
    (reference.recall_sample), on the tensors' device; the GPU only changes the query chunk, so
    that the full-attention scores of a chunk stay within RECALL_CHUNK_BYTES. (None, None) when no
    query's document prefix holds more than k blocks. Reads its result back to the host.
    """
    chunk = reference.DEFAULT_CHUNK
    if backend == "triton":
        chunk = max(1, RECALL_CHUNK_BYTES // (4 * q.shape[1] * max(1, k.shape[0])))
    return reference.sampled_selection_recall(
        q, k, topk, cu_seqlens, shape.block_size, n_queries, shape.softmax_scale, chunk, qpos=qpos
    )
