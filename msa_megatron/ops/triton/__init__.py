"""Triton kernels for MiniMax Sparse Attention (Hopper-tuned; any GPU Triton supports).

The four entry points below are what msa_megatron.ops dispatches to with backend "triton"; their
semantics equal msa_megatron.ops.reference (see that module and ../shared/MSA.md).

Every entry point takes an optional `qpos` [Tq] (context parallelism): the queries (q, qi, o, lse,
topk, index_lse) are Tq rows, each at key row qpos[i] of k, v, ki (T rows); cu_seqlens delimits
documents over the key rows. The KL is normalised by T * total_groups.

- select_blocks(qi, ki, cu, shape) -> (topk [G, T, k] int32, index_lse [G, T] fp32), no grad.
  The returned topk tensor carries the block -> queries plan (attribute `_msa_plan`), so the
  sparse_attention and indexer_kl calls of the same layer reuse it instead of rebuilding it.
- sparse_attention(q, k, v, topk, cu, shape) -> (o, lse), differentiable in q, k, v.
- dense_attention(q, k, v, cu, shape) -> (o, lse), differentiable in q, k, v: cuDNN or flash
  varlen attention through PyTorch when it agrees with our kernels (dense_attn.py), else Triton.
- indexer_kl(q, k, lse, qi, ki, index_lse, topk, cu, shape, total_groups) -> KL scalar, whose
  backward reaches qi, ki only. topk None: dense-warm-up support (index_lse is then ignored and
  computed here). The forward pass computes the value and both gradients at once.
- sparse_attention_kl(q, k, v, qi, ki, topk, index_lse, cu, shape, total_groups, value_out) ->
  (o, lse, kl handle): sparse_attention whose backward also computes the sparse KL (value into
  value_out, gradients to qi, ki through the handle); see attention_kl.py. Needs
  kl_in_backward(heads per group).

Kernel layout: indexer.py (select + index lse), plan.py (CSR), sparse_attn.py,
dense_attn.py, kl.py. Packed THD inputs; block size a power of two >= 16.
"""

from __future__ import annotations

import math

import torch

from msa_megatron.ops.triton.attention_kl import SparseAttentionKL
from msa_megatron.ops.triton.common import check_block_size, query_chunk
from msa_megatron.ops.triton.dense_attn import DenseAttention
from msa_megatron.ops.triton.indexer import index_lse as _index_lse
from msa_megatron.ops.triton.indexer import select_topk
from msa_megatron.ops.triton.kl import IndexerKL, dense_kl, sparse_kl
from msa_megatron.ops.triton.plan import get_plan
from msa_megatron.ops.triton.rows import block_rows, positions
from msa_megatron.ops.triton.sparse_attn import CONFIG as SPARSE_CONFIG
from msa_megatron.ops.triton.sparse_attn import SparseAttention, teacher_in_backward

__all__ = ["select_blocks", "sparse_attention", "sparse_attention_kl", "kl_in_backward", "dense_attention", "indexer_kl",
           "plan_for"]


def _scale(value, dim):
    return 1.0 / math.sqrt(dim) if value is None else float(value)


def _cu(cu_seqlens, device):
    return cu_seqlens.to(device=device, dtype=torch.int32)


def plan_for(topk, cu_seqlens, block_size, n_keys=None, qpos=None):
    """The block -> queries plan of a selection (cached on the topk tensor)."""
    check_block_size(block_size)
    return get_plan(topk, _cu(cu_seqlens, topk.device), block_size, query_chunk(topk.shape[1]), n_keys, qpos)


@torch.no_grad()
def select_blocks(qi, ki, cu_seqlens, shape, qpos=None):
    check_block_size(shape.block_size)
    cu = _cu(cu_seqlens, qi.device)
    rows = block_rows(cu, ki.shape[0], shape.block_size, qpos)
    topk = select_topk(qi, ki, cu, shape.block_size, shape.topk, qpos, rows)
    plan = get_plan(topk, cu, shape.block_size, query_chunk(topk.shape[1]), ki.shape[0], qpos, rows)
    ilse = _index_lse(qi, ki, topk, plan, _scale(shape.index_scale, qi.shape[-1]))
    return topk, ilse


def sparse_attention(q, k, v, topk, cu_seqlens, shape, qpos=None):
    check_block_size(shape.block_size)
    topk = _selection(topk)
    plan = get_plan(topk, _cu(cu_seqlens, q.device), shape.block_size, query_chunk(topk.shape[1]), k.shape[0], qpos)
    return SparseAttention.apply(q, k, v, topk, plan, _scale(shape.softmax_scale, q.shape[-1]))


def kl_in_backward(heads_per_group: int) -> bool:
    """Whether sparse_attention_kl serves this layout (and the knob SPARSE_CONFIG['kl_in_backward'] is on)."""
    return bool(SPARSE_CONFIG["kl_in_backward"]) and teacher_in_backward(heads_per_group)


def sparse_attention_kl(q, k, v, qi, ki, topk, index_lse, cu_seqlens, shape, total_groups, value_out, qpos=None):
    check_block_size(shape.block_size)
    topk = _selection(topk)
    plan = get_plan(topk, _cu(cu_seqlens, q.device), shape.block_size, query_chunk(topk.shape[1]), k.shape[0], qpos)
    return SparseAttentionKL.apply(
        q, k, v, qi, ki, topk, plan, _scale(shape.softmax_scale, q.shape[-1]), index_lse,
        _scale(shape.index_scale, qi.shape[-1]), int(total_groups), value_out,
    )


def dense_attention(q, k, v, cu_seqlens, shape, qpos=None):
    """Dense causal attention: cuDNN / flash varlen when they agree with our kernels, else Triton."""
    return DenseAttention.apply(
        q, k, v, _cu(cu_seqlens, q.device), _scale(shape.softmax_scale, q.shape[-1]), int(shape.max_seqlen),
        positions(qpos, q.device), shape.doc_edges,
    )


def indexer_kl(q, k, lse, qi, ki, index_lse, topk, cu_seqlens, shape, total_groups=None, qpos=None):
    groups = qi.shape[1]
    total_groups = groups if total_groups is None else int(total_groups)
    scale = _scale(shape.softmax_scale, q.shape[-1])
    iscale = _scale(shape.index_scale, qi.shape[-1])
    cu = _cu(cu_seqlens, q.device)
    q, k, lse = q.detach().contiguous(), k.detach().contiguous(), lse.detach().float().contiguous()
    qi_c, ki_c = qi.detach().contiguous(), ki.detach().contiguous()

    if topk is None:
        compute = lambda: dense_kl(q, k, lse, qi_c, ki_c, cu, scale, iscale, total_groups, positions(qpos, q.device), shape.doc_edges)
    else:
        check_block_size(shape.block_size)
        topk = _selection(topk)
        plan = get_plan(topk, cu, shape.block_size, query_chunk(topk.shape[1]), k.shape[0], qpos)
        if index_lse is None:
            index_lse = _index_lse(qi_c, ki_c, topk, plan, iscale)
        ilse = index_lse.detach()
        compute = lambda: sparse_kl(q, k, lse, qi_c, ki_c, ilse, topk, plan, scale, iscale, total_groups)
    return IndexerKL.apply(qi, ki, compute)


def _selection(topk):
    """int32 selection; an int32 tensor is used as is, so the plan cached on it stays attached."""
    return topk if topk.dtype == torch.int32 else topk.to(torch.int32)
