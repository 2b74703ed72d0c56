"""MSA self-attention for megatron-core: a SelfAttention subclass plus custom core attentions.

`MSASelfAttention` runs the index projections (indexer.py) on the layer input and hands them to
its core attention, then lets megatron-core's SelfAttention do the rest (qkv, QK-norm, RoPE,
linear_proj). `MSACoreAttention` picks the stage: dense warmup (full causal attention, KL on all
visible tokens) or sparse (indexer top-k, attention over the selected blocks, KL on that
support). `PackedCoreAttention` is the dense, document-aware core used by `attention.type=gqa`,
so both models share every parameter name except `*.indexer.*`.

Core attentions see megatron's layouts: THD ([t, heads, d], with packed_seq_params) or
[s, b, heads, d] (each sample one document). They return [t, heads*d] / [s, b, heads*d].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from msa_megatron import ops
from msa_megatron.model.indexer import MSAIndexer
from msa_megatron.model.kl_loss import KLLossAutoScaler, LayerKLStats


def _to_thd(query, key, value, packed_seq_params):
    """(q, k, v as [t, heads, d], cu_seqlens, max_seqlen, fn mapping o [t, heads, d] back)."""
    if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
        cu = packed_seq_params.cu_seqlens_q
        return query, key, value, cu, int(packed_seq_params.max_seqlen_q), lambda o: o.reshape(o.shape[0], -1)
    s, b = query.shape[:2]
    flat = lambda t: t.transpose(0, 1).reshape(b * s, *t.shape[2:])
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
    unflat = lambda o: o.reshape(b, s, -1).transpose(0, 1).contiguous()
    return flat(query), flat(key), flat(value), cu, s, unflat


class PackedCoreAttention(MegatronModule):
    """Dense causal attention that never crosses a document edge (no parameters)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        msa=None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.msa = msa
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.backend_name = msa.backend if msa is not None else "auto"

    def _shape(self, max_seqlen: int, index_head_dim: int = 1) -> ops.MSAShape:
        msa = self.msa
        return ops.MSAShape(
            block_size=msa.block_size if msa else 1,
            topk=msa.topk_blocks if msa else 1,
            softmax_scale=self.softmax_scale,
            index_scale=1.0 / math.sqrt(index_head_dim),
            max_seqlen=max_seqlen,
        )

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        q, k, v, cu, max_seqlen, back = _to_thd(query, key, value, packed_seq_params)
        backend = ops.resolve_backend(self.backend_name, q.device)
        o, _ = ops.dense_attention(q, k, v, cu, self._shape(max_seqlen), backend)
        return back(o)


class MSACoreAttention(PackedCoreAttention):
    """Stage-switched MSA main branch + KL. Index tensors arrive through `index_qk` per call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index_qk = None  # (qi, ki), set by MSASelfAttention around each call
        self.sparse = False  # set by the training loop from consumed tokens
        self.measure_recall = False  # set by the training loop on diagnostic steps
        self.total_groups = self.config.num_query_groups
        self.stats = LayerKLStats()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if self.index_qk is None:
            raise RuntimeError("MSACoreAttention needs the index projections: build it through MSASelfAttention")
        qi, ki = self.index_qk
        q, k, v, cu, max_seqlen, back = _to_thd(query, key, value, packed_seq_params)
        if qi.dim() == 4:  # [s, b, G, di] -> the same THD flattening as q
            qi, ki = (t.transpose(0, 1).reshape(-1, *t.shape[2:]) for t in (qi, ki))
        shape = self._shape(max_seqlen, qi.shape[-1])
        backend = ops.resolve_backend(self.backend_name, q.device)

        topk = index_lse = None
        if self.sparse or self.measure_recall:
            topk, index_lse = ops.select_blocks(qi.detach(), ki.detach(), cu, shape, backend)
        if self.sparse:
            o, lse = ops.sparse_attention(q, k, v, topk, cu, shape, backend)
            kl_support, kl_index_lse = topk, index_lse
        else:
            o, lse = ops.dense_attention(q, k, v, cu, shape, backend)
            kl_support, kl_index_lse = None, None
        if self.measure_recall:
            recall = ops.selection_recall(q.detach(), k.detach(), topk, cu, shape, backend, self.msa.recall_queries)
            self.stats.record_recall(*recall)

        kl = ops.indexer_kl(
            q.detach(), k.detach(), lse.detach(), qi, ki, kl_index_lse, kl_support, cu, shape, backend, self.total_groups
        )
        self.stats.record_kl(kl)
        coeff = self.msa.kl.coeff
        if torch.is_grad_enabled() and kl.requires_grad and coeff > 0:
            o = KLLossAutoScaler.apply(o, kl * coeff)
        return back(o)


class MSASelfAttention(SelfAttention):
    """megatron-core SelfAttention with the MSA index branch under `indexer.*`."""

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal, msa=None, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type, **kwargs)
        if not isinstance(self.core_attention, MSACoreAttention):
            raise TypeError("MSASelfAttention needs MSACoreAttention as its core_attention submodule")
        self.indexer = MSAIndexer(config, msa, self.pg_collection)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        self.core_attention.index_qk = self.indexer(
            hidden_states, kwargs.get("rotary_pos_emb"), kwargs.get("packed_seq_params")
        )
        try:
            return super().forward(hidden_states, attention_mask, **kwargs)
        finally:
            self.core_attention.index_qk = None


def msa_core_attentions(model):
    """Every MSA core attention in a model (or list of model chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MSACoreAttention)]


def set_sparse_stage(model, sparse: bool) -> None:
    for m in msa_core_attentions(model):
        m.sparse = sparse


def set_measure_recall(model, on: bool) -> None:
    for m in msa_core_attentions(model):
        m.measure_recall = on
