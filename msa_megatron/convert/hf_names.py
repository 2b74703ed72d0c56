"""Which Hugging Face tensors make which of our parameters, for each supported architecture.

A `Rule` joins one or more Hugging Face tensors into one of our parameters (import) and splits it
back (export); joins and splits only move rows, or add / subtract 1 for MiniMax-M3's Gemma-style
norms, so round trips are bitwise (the norm fold is exact for weights in [0.5, 2], which covers
trained RMSNorm weights; outside it, one rounding of w - 1).

Our names are megatron-core's GPTModel parameter names at TP = PP = EP = 1, e.g.
`decoder.layers.3.self_attention.linear_qkv.weight`, experts as
`decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight`, the MSA index branch under
`decoder.layers.3.self_attention.indexer.*`.

MiniMax-M3 conventions (hub file names; transformers renames them on load):
- `language_model.model.layers.N.self_attn.index_q_proj` [G*di, h] (one index head per KV group,
  in group order), `index_k_proj` [di, h] (shared key), `index_q_norm`, `index_k_norm` [di].
- Every RMSNorm scales by (1 + w): exported weights are w - 1, imported ones w + 1.
- Index logits: transformers omits the 1/sqrt(di) that MiniMax's training and ours apply. Top-k
  selection is invariant to a positive scale, so nothing is folded into the weights: the KL
  scale stays where MiniMax's training has it, and the round trip stays exact.
- MoE layers: `block_sparse_moe.gate`, `.e_score_correction_bias` (zeros: our router has none),
  `.experts.E.w1/w3/w2` (gate/up/down), `.shared_experts.{gate,up,down}_proj` (zeros when we have
  no shared expert: a zero SwiGLU-OAI expert adds exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from msa_megatron.convert import layout
from msa_megatron.convert.hf_config import M3
from msa_megatron.model.specs import is_moe_layer, is_msa_layer
from msa_megatron.model.builder import padded_vocab_size


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple  # Hugging Face tensor names, in the order `join` takes them
    join: Callable  # hf tensors -> ours
    split: Callable  # ours -> hf tensors (tuple, same order)

    def shapes(self, our_shape: Sequence[int]) -> list:
        """Hugging Face shapes that make a parameter of our_shape (for checks before reading data)."""
        return [tuple(t.shape) for t in self.split(torch.empty(our_shape, device="meta"))]


def _same(name: str, hf: str) -> Rule:
    return Rule(name, (hf,), lambda t: t, lambda w: (w,))


def _gemma_norm(name: str, hf: str) -> Rule:
    return Rule(name, (hf,), lambda t: t + 1, lambda w: (w - 1,))


@dataclass(frozen=True)
class Names:
    """Hugging Face naming of one architecture."""

    model_type: str

    @property
    def m3(self) -> bool:
        return self.model_type == M3

    @property
    def base(self) -> str:
        return "language_model.model." if self.m3 else "model."

    @property
    def lm_head(self) -> str:
        return "language_model.lm_head.weight" if self.m3 else "lm_head.weight"

    @property
    def moe_prefix(self) -> str:
        return "block_sparse_moe." if self.model_type in ("mixtral", M3) else "mlp."

    def expert(self, e: int) -> tuple:
        if self.model_type in ("mixtral", M3):
            return tuple(f"experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
        return tuple(f"experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))


def _vocab(name: str, hf: str, rows: int, padded: int) -> Rule:
    """Embedding / output rows: zero rows pad the source's vocabulary to ours (model.vocab_size)."""
    pad = lambda t: torch.cat([t, t.new_zeros(padded - rows, *t.shape[1:])]) if padded > rows else t
    return Rule(name, (hf,), pad, lambda w: (w[:rows],))


def tensor_rules(model_type: str, cfg, vocab_rows: int) -> list:
    """Every parameter of our model for cfg (a RunConfig) with the Hugging Face tensors it comes from;
    vocab_rows: the Hugging Face embedding's rows (ours are padded to model.vocab_size)."""
    n, m = Names(model_type), cfg.model
    norm = _gemma_norm if n.m3 else _same
    padded = padded_vocab_size(m.vocab_size, 1)
    rules = [_vocab("embedding.word_embeddings.weight", n.base + "embed_tokens.weight", vocab_rows, padded)]
    for i in range(m.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"{n.base}layers.{i}."
        rules += _attention(ours + "self_attention.", hf + "self_attn.", m, norm)
        if is_msa_layer(cfg, i):
            rules += _indexer(ours + "self_attention.indexer.", hf + "self_attn.", norm)
        rules.append(norm(ours + "input_layernorm.weight", hf + "input_layernorm.weight"))
        rules.append(norm(ours + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"))
        if is_moe_layer(cfg, i):
            rules += _moe(ours + "mlp.", hf + n.moe_prefix, n, m)
        else:
            rules.append(_gated_mlp(ours + "mlp.linear_fc1.weight", hf + "mlp."))
            rules.append(_same(ours + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight"))
    rules.append(norm("decoder.final_layernorm.weight", n.base + "norm.weight"))
    if m.untie_embeddings_and_output_weights:
        rules.append(_vocab("output_layer.weight", n.lm_head, vocab_rows, padded))
    return rules


def _attention(ours: str, hf: str, m, norm) -> list:
    heads, groups, d = m.num_attention_heads, m.num_query_groups, m.kv_channels
    qkv = tuple(f"{hf}{p}_proj.weight" for p in "qkv")
    rules = [
        Rule(ours + "linear_qkv.weight", qkv, lambda q, k, v: layout.fuse_qkv(q, k, v, groups), lambda w: layout.split_qkv(w, heads, groups, d)),
        _same(ours + "linear_proj.weight", hf + "o_proj.weight"),
    ]
    if getattr(m, "add_qkv_bias", False):
        bias = tuple(f"{hf}{p}_proj.bias" for p in "qkv")
        rules.append(Rule(ours + "linear_qkv.bias", bias, lambda q, k, v: layout.fuse_qkv(q, k, v, groups), lambda w: layout.split_qkv(w, heads, groups, d)))
    if m.qk_layernorm:
        rules.append(norm(ours + "q_layernorm.weight", hf + "q_norm.weight"))
        rules.append(norm(ours + "k_layernorm.weight", hf + "k_norm.weight"))
    return rules


def _indexer(ours: str, hf: str, norm) -> list:
    return [
        _same(ours + "linear_q.weight", hf + "index_q_proj.weight"),
        _same(ours + "linear_k.weight", hf + "index_k_proj.weight"),
        norm(ours + "q_norm_weight", hf + "index_q_norm.weight"),
        norm(ours + "k_norm_weight", hf + "index_k_norm.weight"),
    ]


def _gated_mlp(ours: str, hf: str) -> Rule:
    return Rule(ours, (hf + "gate_proj.weight", hf + "up_proj.weight"), layout.fuse_gate_up, layout.split_gate_up)


def _moe(ours: str, hf: str, n: Names, m) -> list:
    rules = [_same(ours + "router.weight", hf + "gate.weight")]
    for e in range(m.num_moe_experts):
        gate, up, down = (hf + x for x in n.expert(e))
        expert = f"{ours}experts.local_experts.{e}."
        rules.append(Rule(expert + "linear_fc1.weight", (gate, up), layout.fuse_gate_up, layout.split_gate_up))
        rules.append(_same(expert + "linear_fc2.weight", down))
    if m.moe_shared_expert_intermediate_size:
        rules.append(_gated_mlp(ours + "shared_experts.linear_fc1.weight", hf + "shared_experts."))
        rules.append(_same(ours + "shared_experts.linear_fc2.weight", hf + "shared_experts.down_proj.weight"))
    return rules


def m3_constant_tensors(cfg) -> dict:
    """MiniMax-M3 tensors our model has no counterpart for, as the values that make them inert."""
    n, m = Names(M3), cfg.model
    out = {}
    if m.num_moe_experts is None:
        return out
    for i in range(m.num_layers):
        if not is_moe_layer(cfg, i):
            continue
        hf = f"{n.base}layers.{i}.{n.moe_prefix}"
        out[hf + "e_score_correction_bias"] = torch.zeros(m.num_moe_experts)
        if not m.moe_shared_expert_intermediate_size:
            out[hf + "shared_experts.gate_proj.weight"] = torch.zeros(1, m.hidden_size)
            out[hf + "shared_experts.up_proj.weight"] = torch.zeros(1, m.hidden_size)
            out[hf + "shared_experts.down_proj.weight"] = torch.zeros(m.hidden_size, 1)
    return out


# Tensors an importer may leave behind without changing what the model computes.
def droppable(name: str, tensor_is_zero: Callable[[], bool]) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True  # recomputed from rotary_base
    if name.endswith(("e_score_correction_bias", "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight")):
        return tensor_is_zero()  # our exporter's inert MiniMax-M3 tensors
    return False
