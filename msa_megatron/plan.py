"""What a run needs before it runs: parameters per rank, memory per GPU, FLOPs, speed, fit.

Plain arithmetic on the RunConfig (no torch, no GPU, no process group); the dry run
(`python train.py ... dry_run=true`, msa_megatron/dry_run.py) prints it.

- Parameters per rank are exact: they follow the modules the builder creates (megatron-core's GPT
  layers with our attention, index branch and MoE specs), split the way megatron-core splits them;
  tests/test_plan.py builds real models for every parallel kind and compares.
- Memory per GPU is an estimate of torch's peak allocated bytes on the busiest pipeline stage, for
  the local layer spec (model.transformer_impl=local, or auto without Transformer Engine):
  static: weights (bf16 2 B), the fp32 gradient buffer (4 B, grad_reduce_in_fp32), Adam (fp32 master
  copy + two moments, 12 B; fp32 runs keep no master copy, 8 B), sharded by the distributed
  optimizer over data x context ranks (dense parameters) and expert-data ranks (routed experts);
  activations: the tensors each layer keeps for backward (itemised in `layer_activations`, for the
  Triton kernels on a GPU) times the micro-batches a stage holds under megatron's 1F1B schedule
  (interleaved with virtual stages), after the configured recompute;
  transient: the largest working set of one step (cross-entropy over the vocabulary, the sparse
  kernels' per-slot partials, the MoE all-to-all, a recomputed chunk).
  Routing is assumed balanced. The card also needs `cluster.memory_reserve_gib` that torch does not
  count (CUDA context, NCCL, allocator slack).
- FLOPs per token come from msa_megatron/flops.py (MSA.md's cost model, also behind train/mfu).
  Step time = FLOPs of a step / (GPUs x peak x cluster.assumed_mfu); recompute and the pipeline
  bubble are reported, and are what the assumed MFU must absorb.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from msa_megatron import flops
from msa_megatron.config import ConfigError, RunConfig, is_moe_layer, is_msa_layer, padded_vocab_size

GIB = 2**30
CONTEXTS = (32768, 131072, 1048576)  # FLOPs are also reported at these contexts
DEFAULT_RECOMPUTE_MODULES = ("core_attn",)  # megatron-core's default for selective recompute


def sparse_query_chunk(queries: int) -> int:
    """Queries per pass of the sparse kernels (ops/triton/common.query_chunk): 8192 up to 32K."""
    return min(queries, 8192 if queries <= 32768 else 16384)


# ------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int
    pp: int
    vpp: int  # model chunks per pipeline rank (1: not interleaved)
    cp: int
    ep: int
    etp: int
    dp: int
    sp: bool
    microbatches: int  # per step and data-parallel rank

    @property
    def expert_dp(self) -> int:
        return self.gpus // (self.pp * self.ep * self.etp)


def num_gpus(cfg: RunConfig) -> int:
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


def layout_of(cfg: RunConfig, gpus: Optional[int] = None) -> Layout:
    p, t = cfg.parallel, cfg.train
    gpus = gpus or num_gpus(cfg)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = gpus // (tp * pp * cp)
    return Layout(
        gpus=gpus,
        tp=tp,
        pp=pp,
        vpp=p.virtual_pipeline_model_parallel_size or 1,
        cp=cp,
        ep=p.expert_model_parallel_size,
        etp=p.expert_tensor_parallel_size or tp,
        dp=dp,
        sp=p.sequence_parallel if p.sequence_parallel is not None else tp > 1,
        microbatches=max(t.global_batch_size // (t.micro_batch_size * max(dp, 1)), 1),
    )


def stage_layers(cfg: RunConfig) -> list[list[list[int]]]:
    """0-based layers of every model chunk: [pipeline rank][virtual stage] -> layers (megatron's split)."""
    p, layers = cfg.parallel, cfg.model.num_layers
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        n = layers // (pp * vpp)
        return [[list(range((v * pp + r) * n, (v * pp + r + 1) * n)) for v in range(vpp)] for r in range(pp)]
    middle = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    counts = [rest // middle if middle else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    starts = [sum(counts[:r]) for r in range(pp)]
    return [[list(range(s, s + n))] for s, n in zip(starts, counts)]


# --------------------------------------------------------------------------------- parameters


def _divide(n: int, by: int, key: str, what: str) -> int:
    if n % by:
        raise ConfigError(f"{key}={by}: must divide {what}={n}")
    return n // by


def layer_params(cfg: RunConfig, layer: int, lay: Layout) -> Counter:
    """Parameters of 0-based `layer` on one rank, by part. `routed_experts` are expert parameters
    (replicated over the expert-data-parallel ranks); every other part is dense."""
    m, a = cfg.model, cfg.attention
    h, d, heads, groups = m.hidden_size, m.kv_channels, m.num_attention_heads, m.num_query_groups
    tp_key = "parallel.tensor_model_parallel_size"
    parts = Counter()
    parts["norms"] = 2 * h  # input_layernorm, pre_mlp_layernorm
    qkv = _divide((heads + 2 * groups) * d, lay.tp, tp_key, "the query/key/value width") * h
    proj = _divide(heads * d, lay.tp, tp_key, "num_attention_heads*kv_channels") * h
    parts["attention"] = qkv + proj + (2 * d if m.qk_layernorm else 0)
    if is_msa_layer(cfg, layer):
        di = a.index_head_dim
        index_q = _divide(groups * di, lay.tp, tp_key, "num_query_groups*index_head_dim") * h  # column-parallel
        index_k = di * h  # replicated on every TP rank
        parts["index_branch"] = index_q + index_k + (2 * di if a.index_norm else 0)
    if is_moe_layer(cfg, layer):
        experts = m.num_moe_experts
        width = m.moe_ffn_hidden_size or m.ffn_hidden_size
        parts["router"] = experts * h
        local = _divide(experts, lay.ep, "parallel.expert_model_parallel_size", "model.num_moe_experts")
        parts["routed_experts"] = local * 3 * _divide(width, lay.etp, "parallel.expert_tensor_parallel_size", "the expert width") * h
        shared = m.moe_shared_expert_intermediate_size
        if shared:
            parts["shared_expert"] = 3 * _divide(shared, lay.tp, tp_key, "model.moe_shared_expert_intermediate_size") * h
    else:
        parts["dense_ffn"] = 3 * _divide(m.ffn_hidden_size, lay.tp, tp_key, "model.ffn_hidden_size") * h  # gated: fc1 2x
    return parts


def stage_params(cfg: RunConfig, lay: Layout, pp_rank: int) -> Counter:
    """Parameters on one rank of pipeline stage `pp_rank` (all its model chunks), by part."""
    m = cfg.model
    parts = Counter()
    for chunk in stage_layers(cfg)[pp_rank]:
        for layer in chunk:
            parts.update(layer_params(cfg, layer, lay))
    vocab = padded_vocab_size(m.vocab_size, lay.tp) // lay.tp * m.hidden_size
    if pp_rank == 0:
        parts["embedding"] = vocab
    if pp_rank == lay.pp - 1:
        parts["final_norm"] = m.hidden_size
        if m.untie_embeddings_and_output_weights or lay.pp > 1:  # tied + PP: the last stage keeps a copy
            parts["output_layer"] = vocab
    return parts


EXPERT_PARTS = ("routed_experts",)


def expert_count(parts: Counter) -> int:
    return sum(parts[p] for p in EXPERT_PARTS)


def model_params(cfg: RunConfig) -> dict:
    """Unique parameters of the whole model: total, active per token, and their parts."""
    m = cfg.model
    one = dataclasses.replace(layout_of(cfg, gpus=1), tp=1, pp=1, vpp=1, cp=1, ep=1, etp=1, dp=1)
    parts = Counter()
    for layer in range(m.num_layers):
        parts.update(layer_params(cfg, layer, one))
    vocab = padded_vocab_size(m.vocab_size, 1) * m.hidden_size
    parts["embedding"] = vocab
    parts["final_norm"] = m.hidden_size
    if m.untie_embeddings_and_output_weights:
        parts["output_layer"] = vocab
    total = sum(parts.values())
    idle = 0  # routed experts a token does not use
    if m.num_moe_experts:
        width = m.moe_ffn_hidden_size or m.ffn_hidden_size
        moe_layers = sum(is_moe_layer(cfg, layer) for layer in range(m.num_layers))
        idle = moe_layers * (m.num_moe_experts - m.moe_router_topk) * 3 * width * m.hidden_size
    embeddings = parts["embedding"] + parts["output_layer"]
    return {
        "total": total,
        "active": total - idle,
        "active_without_embeddings": total - idle - embeddings,
        "parts": dict(parts),
    }


# ------------------------------------------------------------------------------------- memory


@dataclass
class Tokens:
    """Token counts of one micro-batch on one rank."""

    local: int  # this CP rank's tokens (queries)
    keys: int  # key rows its attention sees (the whole micro-batch under CP)
    seq_shard: int  # rows of the residual stream under sequence parallelism


def micro_batch_tokens(cfg: RunConfig, lay: Layout) -> Tokens:
    total = cfg.train.micro_batch_size * cfg.data.seq_length
    local = total // lay.cp
    return Tokens(local=local, keys=total, seq_shard=local // lay.tp if lay.sp else local)


def _recompute_modules(cfg: RunConfig) -> set:
    m = cfg.model
    if m.recompute_granularity != "selective":
        return set()
    return set(m.recompute_modules if m.recompute_modules is not None else DEFAULT_RECOMPUTE_MODULES)


def _precision_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.train.precision == "bf16" else 4


def _norm_bytes(device: str) -> int:
    """Bytes an RMSNorm keeps per normalised element: an fp32 copy of its input (plus, off the GPU
    where torch has no fused kernel, an fp32 copy of the normalised values)."""
    return 4 if device == "cuda" else 8


def layer_activations(cfg: RunConfig, lay: Layout, layer: int, sparse: bool, device: str = "cuda") -> Counter:
    """Bytes one layer keeps for backward for one micro-batch on one rank, by part (no full recompute).

    The terms follow the code: each RMSNorm keeps an fp32 copy of its input and a per-row fp32
    scale; linear layers keep their input (the sequence shard under sequence parallelism); RoPE its
    cos and sin; the Triton attention q, k, v, o and the log-sum-exp, the sparse stage the top-k and
    its block plan, the fused KL its index gradients; a gated MLP 5 bytes per hidden unit and token
    in bf16 besides its input, a routed expert 6 (the routing weight is applied inside) per routed
    token, plus the router's probabilities and indices. Selective recompute (model.recompute_modules)
    replaces a module's terms by the input it keeps.
    """
    m, a = cfg.model, cfg.attention
    b = _precision_bytes(cfg)
    nb = _norm_bytes(device)
    h, d, heads, groups = m.hidden_size, m.kv_channels, m.num_attention_heads, m.num_query_groups
    tok = micro_batch_tokens(cfg, lay)
    t, tk, ts = tok.local, tok.keys, tok.seq_shard
    heads_l = heads // lay.tp
    groups_l = max(groups // lay.tp, 1)
    rot = int(d * m.rotary_percent)
    msa = is_msa_layer(cfg, layer)
    recompute = _recompute_modules(cfg)

    def norm(rows, width):
        return rows * (width * nb + 4)

    out = Counter()
    # attention block
    if "layernorm" in recompute:
        out["norms"] += ts * h * b  # input kept, normalised output rebuilt
    else:
        out["norms"] += norm(ts, h)
        out["attention"] += ts * h * b  # linear_qkv input
    rope_calls = 2 + (2 if msa and a.index_rope else 0)
    out["attention"] += rope_calls * 2 * t * rot * b  # cos and sin per call
    out["attention"] += 2 * t * heads_l * d * b  # q (after RoPE), o (= linear_proj input)
    if m.qk_layernorm:
        out["norms"] += norm(t * (heads_l + groups_l), d)
    di = a.index_head_dim
    if msa:
        if lay.sp and lay.tp > 1:
            out["index_branch"] += t * h * b  # the index key projection's gathered input
        if a.index_norm:
            out["index_branch"] += norm(t * (groups_l + 1), di)
    if "core_attn" in recompute:
        # the checkpoint keeps its inputs: q (counted above), k (after RoPE) and v (made
        # contiguous, so the qkv projection output is freed), and qi, ki
        out["attention"] += 2 * t * groups_l * d * b
        if msa:
            out["index_branch"] += t * (groups_l + 1) * di * b
    else:
        out["attention"] += 2 * tk * groups_l * d * b + t * heads_l * 4  # k, v (all key rows), lse
        if not (sparse and msa) and device == "cuda" and lay.cp == 1:
            out["attention"] += t * heads_l * 4  # the library kernel's own lse (cuDNN / flash; CP runs Triton)
        if msa:
            out["msa_kl_state"] += (t * groups_l + tk) * di * 4  # the fused KL's index gradients (fp32)
            if sparse:
                out["msa_topk_plan"] += 3 * groups_l * t * a.topk_blocks * 4  # top-k + plan entries (int32)

    # FFN block
    if "layernorm" in recompute:
        out["norms"] += ts * h * b
    else:
        out["norms"] += norm(ts, h)
        out["ffn"] += ts * h * b  # FFN input (shared by router, experts, shared expert)
    if is_moe_layer(cfg, layer):
        if "moe" not in recompute:
            experts, topk = m.num_moe_experts, m.moe_router_topk
            width_l = (m.moe_ffn_hidden_size or m.ffn_hidden_size) // lay.etp
            routed = ts * topk * lay.etp  # (token, expert) pairs this rank computes, routing balanced
            per_pair = h * b + ((4 if "moe_act" in recompute else 6) * width_l + 1) * b
            router = ts * (experts * 4 + topk * (4 + 8) + topk * 3 * 8)  # logits, probs, top-k, dispatch indices
            out["ffn"] += routed * per_pair + router
            shared = m.moe_shared_expert_intermediate_size
            if shared and "shared_experts" not in recompute:
                out["ffn"] += t * (shared // lay.tp) * 5 * b
    elif "mlp" not in recompute:
        out["ffn"] += t * (m.ffn_hidden_size // lay.tp) * 5 * b
    return out


def _layer_transient(cfg: RunConfig, lay: Layout, layer: int, sparse: bool) -> int:
    """Largest working set of one layer's forward/backward beyond what it keeps."""
    m, a = cfg.model, cfg.attention
    b = _precision_bytes(cfg)
    tok = micro_batch_tokens(cfg, lay)
    t, tk = tok.local, tok.keys
    heads_l = m.num_attention_heads // lay.tp
    groups_l = max(m.num_query_groups // lay.tp, 1)
    d = m.kv_channels
    # attention backward: dq, dk/dv (fp32 accumulators over all key rows), and for the sparse
    # kernels the per-slot partials of a query chunk
    attention = t * heads_l * d * b + tk * groups_l * d * (8 + 2 * b)
    if sparse and is_msa_layer(cfg, layer):
        attention += a.topk_blocks * sparse_query_chunk(t) * heads_l * (d * b + 4)
    moe = 0
    if is_moe_layer(cfg, layer):
        routed = tok.seq_shard * m.moe_router_topk * lay.etp
        moe = 2 * routed * m.hidden_size * b  # all-to-all send and receive buffers
    return max(attention, moe)


def last_stage_activations(cfg: RunConfig, lay: Layout, device: str = "cuda") -> Counter:
    """What the last pipeline stage keeps per micro-batch besides its layers: the final norm's and
    the output layer's inputs, and the cross entropy's fp32 softmax over this rank's vocabulary
    slice (every local token: the output layer gathers the sequence shards)."""
    m = cfg.model
    tok = micro_batch_tokens(cfg, lay)
    vocab_l = padded_vocab_size(m.vocab_size, lay.tp) // lay.tp
    return Counter(
        logits=tok.local * vocab_l * 4 + tok.local * 9,  # + labels (int64) and their mask
        norms=tok.seq_shard * (m.hidden_size * _norm_bytes(device) + 4),
        output_layer=tok.seq_shard * m.hidden_size * _precision_bytes(cfg),
    )


def microbatch_activations(cfg: RunConfig, lay: Layout, pp_rank: int, sparse: bool, device: str = "cuda") -> Counter:
    """Bytes autograd keeps for one micro-batch on a rank of stage `pp_rank` (all its chunks, no
    pipeline buffers): what tests/test_plan.py measures on real models."""
    out = Counter()
    for layers in stage_layers(cfg)[pp_rank]:
        out.update(chunk_activations(cfg, lay, layers, sparse, device)[0])
    if pp_rank == 0:
        out["embedding"] += micro_batch_tokens(cfg, lay).local * 8  # token ids
    if pp_rank == lay.pp - 1:
        out.update(last_stage_activations(cfg, lay, device))
    return out


def inflight_chunks(lay: Layout, pp_rank: int) -> list[int]:
    """Model-chunk index of every micro-batch whose activations stage `pp_rank` holds at its peak:
    megatron's warm-up forwards + 1 (get_pp_rank_microbatches); interleaved, the k-th forward runs
    chunk (k // pp) % vpp."""
    total = lay.microbatches * lay.vpp
    if lay.pp == 1:
        return [0]
    warmup = lay.pp - pp_rank - 1 if lay.vpp == 1 else (lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp
    return [(k // lay.pp) % lay.vpp for k in range(min(warmup + 1, total))]


def chunk_activations(cfg: RunConfig, lay: Layout, layers: list[int], sparse: bool, device: str) -> tuple[Counter, int]:
    """(bytes a model chunk keeps per micro-batch by part, bytes of the largest span that full
    recompute rebuilds in backward). Full recompute keeps only each span's input: uniform spans of
    model.recompute_num_layers layers, or (block) the first recompute_num_layers layers one by one."""
    m = cfg.model
    acts = [layer_activations(cfg, lay, layer, sparse, device) for layer in layers]
    kept = Counter()
    if m.recompute_granularity != "full":
        for a in acts:
            kept.update(a)
        return kept, 0
    n = m.recompute_num_layers
    if m.recompute_method == "uniform":
        spans, rest = [acts[i : i + n] for i in range(0, len(acts), n)], []
    else:
        spans, rest = [[a] for a in acts[:n]], acts[n:]
    tok = micro_batch_tokens(cfg, lay)
    rope_table = tok.local * int(m.kv_channels * m.rotary_percent) * 4  # fp32 angles, shared by the spans
    kept["recompute_inputs"] = len(spans) * tok.seq_shard * m.hidden_size * _precision_bytes(cfg) + rope_table
    for a in rest:
        kept.update(a)
    span = max((sum(sum(a.values()) for a in s) for s in spans), default=0)
    return kept, span


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    stage: int
    params: int
    expert_params: int
    weights: int
    grads: int
    optimizer: int  # as configured (sharded with the distributed optimizer)
    optimizer_replicated: int  # without the distributed optimizer
    optimizer_distributed: int  # with it
    activations: int  # kept for backward, every micro-batch in flight (incl. msa_state and logits)
    msa_state: int  # top-k, block plan, KL index gradients of the micro-batches in flight
    logits: int  # the fp32 softmax kept by the cross entropy (last stage)
    transient: int
    transient_kind: str
    optimizer_step: int  # temporaries of the Adam step (after backward, activations freed)
    inflight: int  # micro-batch x model-chunk activations held at the peak
    activation_parts: dict = field(default_factory=dict)

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        return self.static + max(self.activations + self.transient, self.optimizer_step)


def stage_memory(cfg: RunConfig, lay: Layout, pp_rank: int, sparse: bool, device: str = "cuda") -> StageMemory:
    parts = stage_params(cfg, lay, pp_rank)
    n = sum(parts.values())
    n_expert = expert_count(parts)
    n_dense = n - n_expert
    b = _precision_bytes(cfg)
    adam = 12 if b == 2 else 8  # fp32 master copy (bf16 only) + two moments
    replicated = n * adam
    distributed = math.ceil(n_dense * adam / (lay.dp * lay.cp)) + math.ceil(n_expert * adam / lay.expert_dp)
    optimizer = distributed if cfg.parallel.use_distributed_optimizer else replicated

    m = cfg.model
    ts = micro_batch_tokens(cfg, lay).seq_shard
    chunks = stage_layers(cfg)[pp_rank]
    kept, span = [], 0
    for layers in chunks:
        chunk, chunk_span = chunk_activations(cfg, lay, layers, sparse, device)
        if lay.pp > 1:
            chunk["pipeline_buffers"] += 2 * ts * m.hidden_size * b  # received input, sent output
        kept.append(chunk)
        span = max(span, chunk_span)
    held = inflight_chunks(lay, pp_rank)
    activation_parts = Counter()
    for c in held:
        activation_parts.update(kept[c])
    transient = max((_layer_transient(cfg, lay, layer, sparse) for layers in chunks for layer in layers), default=0)
    kind = "a layer's working set (attention backward, MoE all-to-all)"
    logits = 0
    if pp_rank == lay.pp - 1:
        extras = last_stage_activations(cfg, lay, device)
        activation_parts.update(extras)
        logits = extras["logits"]
        bf16_logits = logits // 2  # the output layer's logits (forward) and their gradient (backward)
        if bf16_logits > transient:
            transient, kind = bf16_logits, "logits and cross entropy"
    if span:
        transient += span
        kind += " + one recomputed span"
    # torch's multi-tensor Adam holds a temporary of the moments' size (fp32, its parameter shard)
    shard = distributed if cfg.parallel.use_distributed_optimizer else replicated
    return StageMemory(
        stage=pp_rank,
        params=n,
        expert_params=n_expert,
        weights=n * b,
        grads=n * 4,
        optimizer=optimizer,
        optimizer_replicated=replicated,
        optimizer_distributed=distributed,
        activations=sum(activation_parts.values()),
        msa_state=activation_parts.get("msa_topk_plan", 0) + activation_parts.get("msa_kl_state", 0),
        logits=logits,
        transient=transient,
        transient_kind=kind,
        optimizer_step=shard // adam * 4,
        inflight=len(held),
        activation_parts=dict(activation_parts),
    )


# -------------------------------------------------------------------------------------- FLOPs


def with_context(cfg: RunConfig, context: int) -> RunConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_length=context))


def training_flops(cfg: RunConfig, context: int) -> dict:
    """Training FLOPs per token (forward + backward) at `context`: dense GQA, MSA in the dense
    warmup, MSA sparse; and the attention-only ratio dense / MSA sparse (MSA.md's cost model)."""
    at = with_context(cfg, context)
    gqa = dataclasses.replace(at, attention=dataclasses.replace(at.attention, type="gqa"))
    dense = flops.forward_flops_per_token(gqa, sparse=False)
    sparse = flops.forward_flops_per_token(at, sparse=True)
    warm = flops.forward_flops_per_token(at, sparse=False)
    attention_ratio = dense.attention_core / max(sparse.attention_core + sparse.index_scores, 1)
    k = flops.TRAINING_MULTIPLIER
    return {
        "dense_gqa": k * dense.total,
        "msa_warmup": k * warm.total,
        "msa_sparse": k * sparse.total,
        "attention_dense_over_msa": attention_ratio,
    }


def recompute_overhead(cfg: RunConfig, sparse: bool) -> float:
    """FLOPs that activation recompute adds, as a fraction of the model FLOPs (which MFU counts)."""
    m = cfg.model
    fwd = flops.forward_flops_per_token(cfg, sparse=sparse)
    if m.recompute_granularity == "full":
        layers = [chunk for chunks in stage_layers(cfg) for chunk in chunks]
        done = sum(len(c) if m.recompute_method == "uniform" else min(m.recompute_num_layers, len(c)) for c in layers)
        extra = done / m.num_layers * (fwd.total - fwd.logits)
    else:
        modules = _recompute_modules(cfg)
        extra = (fwd.attention_core + fwd.index_scores if "core_attn" in modules else 0) + (
            fwd.mlp if {"moe", "mlp"} & modules else 0
        )
    return extra / (flops.TRAINING_MULTIPLIER * fwd.total)


# --------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    cfg: RunConfig
    layout: Layout
    params: dict
    stages: dict  # stage name ("sparse" / "dense") -> list[StageMemory] per pipeline rank
    flops: dict  # context -> training_flops
    step_time_s: dict  # stage name -> seconds
    tokens_per_step: int
    warmup_steps: int

    def busiest(self) -> StageMemory:
        return max((s for stages in self.stages.values() for s in stages), key=lambda s: s.peak)

    @property
    def reserve(self) -> int:
        return int(self.cfg.cluster.memory_reserve_gib * GIB)

    @property
    def fits(self) -> bool:
        return self.busiest().peak + self.reserve <= self.cfg.cluster.gpu_memory_gib * GIB


def stage_names(cfg: RunConfig) -> list[str]:
    """The attention stages a run goes through: dense warmup and/or sparse (gqa: dense only)."""
    if cfg.attention.type != "msa" or cfg.stage.mode == "dense":
        return ["dense"]
    if cfg.stage.warmup_tokens >= cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_length:
        return ["dense"]
    return ["dense", "sparse"] if cfg.stage.warmup_tokens > 0 else ["sparse"]


def make_plan(cfg: RunConfig, device: str = "cuda") -> Plan:
    lay = layout_of(cfg)
    stages = {
        name: [stage_memory(cfg, lay, r, sparse=name == "sparse", device=device) for r in range(lay.pp)]
        for name in stage_names(cfg)
    }
    contexts = sorted({cfg.data.seq_length, *CONTEXTS})
    per_token = {c: training_flops(cfg, c) for c in contexts}
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    rate = lay.gpus * cfg.cluster.peak_tflops_per_gpu * 1e12 * cfg.cluster.assumed_mfu
    here = per_token[cfg.data.seq_length]
    key = {"dense": "msa_warmup" if cfg.attention.type == "msa" else "dense_gqa", "sparse": "msa_sparse"}
    step = {name: tokens * here[key[name]] / rate for name in ("dense", "sparse")}
    if cfg.attention.type == "local":  # its one stage attends k blocks, like the sparse stage
        step["dense"] = tokens * flops.training_flops_per_token(cfg, sparse=False) / rate
    warmup_steps = cfg.train.steps  # steps in the dense stage (all of them for gqa and stage.mode=dense)
    if cfg.attention.type == "msa" and cfg.stage.mode != "dense":
        warmup_steps = min(math.ceil(cfg.stage.warmup_tokens / tokens), cfg.train.steps)
    return Plan(cfg, lay, model_params(cfg), stages, per_token, step, tokens, warmup_steps)


def index_split(cfg: RunConfig, lay: Layout) -> list[str]:
    """How the index branch and the top-k selection are spread over the TP ranks (report lines)."""
    m, a = cfg.model, cfg.attention
    if a.type != "msa":
        return [f"no index branch (attention.type={a.type})"]
    groups, tp, di = m.num_query_groups, lay.tp, a.index_head_dim
    heads_per_group = m.num_attention_heads // groups
    t = micro_batch_tokens(cfg, lay).local
    if tp <= groups:
        own = groups // tp
        lines = [
            f"TP {tp} over {groups} KV groups: each rank owns {own} KV group(s) with their {own * heads_per_group} query heads "
            f"and {own} index query head(s) ({own * di} of the {groups * di} Wqi columns, column-parallel)",
        ]
        replicas = 1
    else:
        replicas = tp // groups
        lines = [
            f"TP {tp} over {groups} KV groups: each group is replicated on {replicas} ranks; a rank holds "
            f"{m.num_attention_heads // tp} of its group's {heads_per_group} query heads and computes "
            f"{groups * di // tp} of the {groups * di} Wqi columns, all-gathered so it keeps its group's index head",
        ]
        own = 1
    lines.append(
        f"index key Wki ({m.hidden_size}x{di}) and the index norms are replicated on every TP rank; "
        "their gradients are summed over TP"
    )
    topk_bytes = own * t * a.topk_blocks * 4
    redo = f", computed {replicas}x (once per replica)" if replicas > 1 else ", no communication"
    lines.append(
        f"top-k per rank: {own} group(s) x {t:,} queries x {a.topk_blocks} blocks of {a.block_size} = "
        f"{topk_bytes / 2**20:,.1f} MiB int32{redo}; index scores are never materialised (fused top-k)"
    )
    return lines


# ------------------------------------------------------------------------------ advice on fit


def largest_term(mem: StageMemory) -> tuple[str, int]:
    logits_transient = mem.transient if mem.transient_kind.startswith("logits") else 0
    terms = {
        "weights": mem.weights,
        "gradients": mem.grads,
        "optimizer states": mem.optimizer,
        "activations": mem.activations - mem.logits,
        "logits": mem.logits + logits_transient,
        "transient working set": mem.transient - logits_transient,
    }
    name = max(terms, key=terms.get)
    return name, terms[name]


def advice(cfg: RunConfig, mem: StageMemory, term: str) -> str:
    """The key to change first for the largest memory term."""
    p, m = cfg.parallel, cfg.model
    expert_heavy = mem.expert_params * 2 > mem.params
    if term in ("weights", "gradients"):
        return "parallel.expert_model_parallel_size" if expert_heavy else "parallel.pipeline_model_parallel_size"
    if term == "optimizer states":
        if not p.use_distributed_optimizer:
            return "parallel.use_distributed_optimizer=true"
        return "parallel.expert_model_parallel_size" if expert_heavy else "parallel.pipeline_model_parallel_size"
    if term == "logits":
        return "parallel.tensor_model_parallel_size or parallel.context_parallel_size"
    if term == "activations":
        if m.recompute_granularity != "full":
            return "parallel.context_parallel_size or model.recompute_granularity=full"
        return "parallel.context_parallel_size or parallel.tensor_model_parallel_size"
    return "parallel.tensor_model_parallel_size or parallel.context_parallel_size"
