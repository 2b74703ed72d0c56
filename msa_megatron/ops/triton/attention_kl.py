"""Sparse attention whose backward also computes the MSA KL of the layer.

The KL teacher is the mean over a group's r heads of the main branch's probabilities on the
selected blocks: exactly what the attention backward recomputes for dS. Built there
(sparse_attn's WITH_TEACHER), the KL no longer recomputes the r heads' scores, which are nearly
all of the standalone sparse KL's work; what is left is the index branch's part (student, KL
terms, dqi, dki) on the stored teacher (kl.SparseKL with a teacher per query chunk).

The price: the KL value exists only once the backward ran. The forward returns a zero scalar
whose gradient brings the KL's weight into this op's backward, which then writes the value into
`value_out` (a plain tensor the caller logs). So it serves training steps whose loss carries the
KL; evaluation and the first pass of activation recompute use the separate ops.
"""

from __future__ import annotations

import torch

from msa_megatron.ops.triton.kl import SparseKL
from msa_megatron.ops.triton.sparse_attn import sparse_backward, sparse_forward


def backward_with_kl(do, q, k, v, o, lse, dlse, qi, ki, index_lse, topk, plan, softmax_scale, index_scale, total_groups):
    """(dq, dk, dv, (KL value, dqi, dki)): the sparse backward, each query chunk's teacher handed to
    the KL on the way (KL gradients for a weight of 1)."""
    kl = SparseKL(qi, ki, index_lse, topk, plan, index_scale, total_groups)
    dq, dk, dv = sparse_backward(do, q, k, v, o, lse, dlse, topk, plan, softmax_scale, on_teacher=kl.chunk)
    return dq, dk, dv, kl.result()


class SparseAttentionKL(torch.autograd.Function):
    """(o, lse, kl handle) forward; backward: dq, dk, dv and, if the handle got a gradient, dqi, dki."""

    @staticmethod
    def forward(ctx, q, k, v, qi, ki, topk, plan, softmax_scale, index_lse, index_scale, total_groups, value_out):
        ctx.set_materialize_grads(False)
        q, k, v, topk = q.contiguous(), k.contiguous(), v.contiguous(), topk.contiguous()
        o, lse = sparse_forward(q, k, v, topk, plan, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, topk, qi.detach(), ki.detach(), index_lse.detach())
        ctx.plan, ctx.softmax_scale, ctx.index_scale = plan, softmax_scale, index_scale
        ctx.total_groups, ctx.value_out = total_groups, value_out
        return o, lse, torch.zeros((), dtype=torch.float32, device=q.device)

    @staticmethod
    def backward(ctx, do, dlse, dkl):
        q, k, v, o, lse, topk, qi, ki, index_lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        if dkl is None:  # the KL is not in the loss: the plain backward
            dq, dk, dv = sparse_backward(do, q, k, v, o, lse, dlse, topk, ctx.plan, ctx.softmax_scale)
            return dq, dk, dv, None, None, None, None, None, None, None, None, None
        dq, dk, dv, (value, dqi, dki) = backward_with_kl(
            do, q, k, v, o, lse, dlse, qi.contiguous(), ki.contiguous(), index_lse, topk, ctx.plan, ctx.softmax_scale,
            ctx.index_scale, ctx.total_groups,
        )
        ctx.value_out.copy_(value)
        dqi = (dqi * dkl).to(qi.dtype)
        dki = (dki * dkl).reshape(ki.shape).to(ki.dtype)
        return dq, dk, dv, dqi, dki, None, None, None, None, None, None, None
