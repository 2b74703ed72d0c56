"""Attention for packed training batches on megatron-core, dense (GQA) and MSA.

`PackedSelfAttention` is megatron-core's SelfAttention with a forward of its own for training:
RoPE at each token's position inside its document (taken from the batch, so context-parallel
ranks rotate their tokens exactly as one rank would), and extra core-attention inputs passed as
arguments through megatron's checkpointed core-attention forward (so selective recompute re-runs
the same computation). `MSASelfAttention` adds the index branch (`indexer.*`) and hands its
projections to `MSACoreAttention`, which picks the stage: dense warmup (full causal attention,
KL on all visible tokens) or sparse (indexer top-k, attention over the selected blocks, KL on that
support). `PackedCoreAttention` is the dense, document-aware core used by `attention.type=gqa`
and by `attention.dense_layers`; `LocalCoreAttention` (`attention.type=local`) keeps only the most
recent blocks. All share every parameter name except `*.indexer.*`.

Core attentions see megatron's layouts: THD ([t, heads, d], with packed_seq_params) or
[s, b, heads, d] (each sample one document). They return [t, heads*d] / [s, b, heads*d].
Under context parallelism (packed_seq_params.qpos set) keys, values and index keys are
all-gathered over the CP group (parallel/context.py) while queries stay local.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from dataclasses import dataclass
from typing import Union

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from msa_megatron import ops
from msa_megatron.model.kl_loss import KLLossAutoScaler, LayerKLStats
from msa_megatron.model.packed import token_positions
from msa_megatron.parallel import replicas
from msa_megatron.parallel.context import gather_keys


def _is_thd(packed_seq_params) -> bool:
    return packed_seq_params is not None and packed_seq_params.qkv_format == "thd"


class PackedSelfAttention(SelfAttention):
    """SelfAttention for packed training batches (no inference cache, no output gate)."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        if inference_context is not None or inference_params is not None or key_value_states is not None:
            raise NotImplementedError("msa-megatron attention layers train and evaluate; they have no inference cache")
        query, key, value = self.get_query_key_value_tensors(hidden_states)  # [s, b, heads, d]
        freqs = self._rotary_freqs(rotary_pos_emb, packed_seq_params, query)
        if freqs is not None:
            query = apply_rotary_pos_emb(query, freqs, config=self.config)
            key = apply_rotary_pos_emb(key, freqs, config=self.config)
        thd = _is_thd(packed_seq_params)
        if thd:
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        extra = self.core_attention_inputs(hidden_states, freqs, thd)
        if self.checkpoint_core_attention and self.training:
            # The checkpoint keeps its inputs: a view would keep the whole qkv projection alive.
            value = value.contiguous()
            out = self._checkpointed_attention_forward(
                query, key, value, attention_mask, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, core_attention_extra_kwargs=extra,
            )
        else:
            out = self.core_attention(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params, **extra,
            )
        if thd:
            out = out.reshape(out.size(0), 1, -1)
        return self.linear_proj(out)

    def _rotary_freqs(self, rotary_pos_emb, packed_seq_params, query):
        """RoPE angles per token, [s, b or 1, 1, rot_dim]: the table row of each token's position."""
        if rotary_pos_emb is None:
            return None
        table = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb  # [S, 1, 1, dim]
        if not _is_thd(packed_seq_params):
            return table[: query.shape[0]]
        positions = token_positions(packed_seq_params, query.shape[0], query.device)
        return table[positions]

    def core_attention_inputs(self, hidden_states, freqs, thd: bool) -> dict:
        """Extra keyword inputs of the core attention (tensors go through the recompute checkpoint)."""
        return {}


@dataclass
class MSASelfAttentionSubmodules(SelfAttentionSubmodules):
    indexer: Union[ModuleSpec, type] = None  # MSAIndexer with its projections (local or Transformer Engine)


class MSASelfAttention(PackedSelfAttention):
    """PackedSelfAttention with the MSA index branch under `indexer.*`."""

    def __init__(self, config, submodules: MSASelfAttentionSubmodules, layer_number, attn_mask_type=AttnMaskType.causal, msa=None, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type, **kwargs)
        if not isinstance(self.core_attention, MSACoreAttention):
            raise TypeError("MSASelfAttention needs MSACoreAttention as its core_attention submodule")
        self.indexer = build_module(submodules.indexer, config=config, msa=msa, pg_collection=self.pg_collection)

    def core_attention_inputs(self, hidden_states, freqs, thd: bool) -> dict:
        index_q, index_k = self.indexer(hidden_states, freqs, thd)
        return {"index_q": index_q, "index_k": index_k}


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
        num_query_groups: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.msa = msa
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.backend_name = msa.backend if msa is not None else "auto"
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        # The model's KV groups (megatron hands a core attention a config with num_query_groups = TP
        # when TP > groups and each rank keeps a replica of one group).
        self.total_groups = num_query_groups or config.num_query_groups

    def _shape(self, docs: dict, index_head_dim: int = 1) -> ops.MSAShape:
        """docs: max_seqlen and doc_edges from `_packed`."""
        msa = self.msa
        return ops.MSAShape(
            block_size=msa.block_size if msa else 1,
            topk=msa.topk_blocks if msa else 1,
            softmax_scale=self.softmax_scale,
            index_scale=1.0 / math.sqrt(index_head_dim),
            **docs,
        )

    def _packed(self, query, key, value, packed_seq_params):
        """(q [Tq, h, d], k and v [T, g, d] over all key rows, cu_seqlens, the documents' host facts
        (max_seqlen, doc_edges: see MSAShape), qpos, output shaper)."""
        if _is_thd(packed_seq_params):
            p = packed_seq_params
            key, value = self._all_keys(key, p), self._all_keys(value, p)
            docs = dict(max_seqlen=int(p.max_seqlen_q), doc_edges=getattr(p, "cu_seqlens_host", None))
            return query, key, value, p.cu_seqlens_q, docs, getattr(p, "qpos", None), lambda o: o.reshape(o.shape[0], -1)
        s, b = query.shape[:2]
        flat = lambda t: t.transpose(0, 1).reshape(b * s, *t.shape[2:])
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
        unflat = lambda o: o.reshape(b, s, -1).transpose(0, 1).contiguous()
        return flat(query), flat(key), flat(value), cu, dict(max_seqlen=s), None, unflat

    def _all_keys(self, local, packed_seq_params):
        """Key-side tensor of all micro-batch rows: the CP all-gather when the batch is split."""
        index = getattr(packed_seq_params, "cp_gather_index", None)
        return local if index is None else gather_keys(local, index, self.cp_group)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        q, k, v, cu, docs, qpos, back = self._packed(query, key, value, packed_seq_params)
        backend = ops.resolve_backend(self.backend_name, q.device)
        o, _ = ops.dense_attention(q, k, v, cu, self._shape(docs), backend, qpos=qpos)
        return back(o)


class LocalCoreAttention(PackedCoreAttention):
    """The local-only baseline (`attention.type=local`): each query attends to its own block and
    the k-1 blocks right before it, MSA's block budget without an index branch or KL. Runs on the
    same sparse-attention ops as MSA, with a selection built from positions (no parameters)."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        q, k, v, cu, docs, qpos, back = self._packed(query, key, value, packed_seq_params)
        backend = ops.resolve_backend(self.backend_name, q.device)
        shape = self._shape(docs)
        topk = ops.local_selection(cu, q.shape[0], shape, k.shape[1], qpos=qpos)
        o, _ = ops.sparse_attention(q, k, v, topk, cu, shape, backend, qpos=qpos)
        return back(o)


class MSACoreAttention(PackedCoreAttention):
    """Stage-switched MSA main branch + KL. The index projections arrive as arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sparse = False  # set by the training loop from consumed tokens
        self.measure_recall = False  # set by the training loop on diagnostic steps
        self.stats = LayerKLStats()
        tp = self.config.tensor_model_parallel_size
        self.kv_replicas = tp // self.total_groups if tp > self.total_groups else 1

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        index_q=None,
        index_k=None,
    ):
        if index_q is None or index_k is None:
            raise RuntimeError("MSACoreAttention needs index_q and index_k: build it through MSASelfAttention")
        q, k, v, cu, docs, qpos, back = self._packed(query, key, value, packed_seq_params)
        qi, ki = index_q, index_k
        if qi.dim() == 4:  # [s, b, G, di] -> the same THD flattening as q
            qi, ki = (t.transpose(0, 1).reshape(-1, *t.shape[2:]) for t in (qi, ki))
        elif _is_thd(packed_seq_params):
            ki = self._all_keys(ki, packed_seq_params)
        shape = self._shape(docs, qi.shape[-1])
        backend = ops.resolve_backend(self.backend_name, q.device)
        # In the no-grad first pass of activation recompute the KL is skipped: the recompute in
        # backward computes (and records) it, once.
        with_kl = torch.is_grad_enabled() or not self.training

        topk = index_lse = None
        if self.sparse or (self.measure_recall and with_kl):
            topk, index_lse = ops.select_blocks(qi.detach(), ki.detach(), cu, shape, backend, qpos=qpos)
        coeff = self.msa.kl.coeff
        if self.sparse and self.training and torch.is_grad_enabled() and coeff > 0 and self.kv_replicas == 1:
            # The KL's teacher is built in the attention backward (no second pass over the heads'
            # scores); its value arrives with the backward, which always runs for this step.
            fused = ops.sparse_attention_with_kl(
                q, k, v, qi, ki, topk, index_lse, cu, shape, backend, self.total_groups, qpos=qpos
            )
            if fused is not None:
                o, kl, kl_value = fused
                self._record_recall(q, k, topk, cu, shape, backend, qpos)
                self.stats.record_kl(kl_value)
                return back(KLLossAutoScaler.apply(o, kl * coeff))
        if self.sparse:
            o, lse = ops.sparse_attention(q, k, v, topk, cu, shape, backend, qpos=qpos)
        else:
            o, lse = ops.dense_attention(q, k, v, cu, shape, backend, qpos=qpos)
        if not with_kl:
            return back(o)

        teacher_q, teacher_lse = self._group_heads(q.detach()), self._group_heads(lse.detach())
        self._record_recall(teacher_q, k, topk, cu, shape, backend, qpos)
        kl = ops.indexer_kl(
            teacher_q, k.detach(), teacher_lse, qi, ki, index_lse if self.sparse else None, topk if self.sparse else None,
            cu, shape, backend, self.total_groups, qpos=qpos,
        )
        if self.kv_replicas > 1:  # every replica of the group computes its KL: count it once in all
            kl = kl / self.kv_replicas
        self.stats.record_kl(kl)
        if torch.is_grad_enabled() and kl.requires_grad and coeff > 0:
            o = KLLossAutoScaler.apply(o, kl * coeff)
        return back(o)

    def _record_recall(self, teacher_q, k, topk, cu, shape, backend, qpos):
        if self.measure_recall:
            recall = ops.selection_recall(teacher_q.detach(), k.detach(), topk, cu, shape, backend, self.msa.recall_queries,
                                          qpos=qpos)
            self.stats.record_recall(*recall)

    def _group_heads(self, t):
        """All query heads of this rank's KV group (TP > groups splits a group's heads over its
        replicas; the KL teacher averages over every head of the group)."""
        if self.kv_replicas == 1:
            return t
        return replicas.gather_group_heads(t, self.total_groups)


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
