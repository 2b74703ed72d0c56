"""Typed configuration schema, validation with one-line errors, and the megatron-core config.

Hydra composes YAML from conf/; `load_config` merges it onto these dataclasses (type checks),
then `validate` checks the relations between values. Every error is a `ConfigError` whose one
line names the offending key and value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the key."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 16
    ffn_hidden_size: int = 128  # dense MLP width (layers without experts)
    num_moe_experts: Optional[int] = 4  # null: dense MLP everywhere
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = 64
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_aux_loss_coeff: float = 1e-2
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    # 1: every layer MoE; N: every N-th; or a 0/1 list per layer (0: dense FFN of ffn_hidden_size,
    # e.g. [0,0,0,1,...] for a model whose first 3 layers are dense), as megatron-core's moe_layer_freq.
    moe_layer_freq: Any = 1
    vocab_size: int = 512
    max_position_embeddings: int = 8192
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    qk_layernorm: bool = False
    add_qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    use_cpu_initialization: bool = False  # build weights on the CPU (TP-size-independent init; slower)
    transformer_impl: str = "auto"  # auto (Transformer Engine when importable) | local | transformer_engine
    # Activation recompute, megatron-core's keys: selective (recompute_modules, default core_attn)
    # or full (recompute_method uniform|block with recompute_num_layers).
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list] = None


@dataclass
class KLConfig:
    coeff: float = 1.0  # lambda; MSA.md default, unpublished in the paper


@dataclass
class AttentionConfig:
    type: str = "msa"  # msa | gqa (dense baseline, same names minus *.indexer.*) | local (most recent k blocks, as gqa's names)
    block_size: int = 128
    topk_blocks: int = 16  # includes the forced local block
    index_head_dim: int = 128
    index_norm: bool = True  # per-head RMSNorm on qi / ki
    index_rope: bool = True  # main branch's (partial) RoPE on qi / ki
    index_init_std: float = 0.02
    dense_layers: list = field(default_factory=list)  # 0-based layers with full attention and no index branch
    kl: KLConfig = field(default_factory=KLConfig)
    backend: str = "auto"  # auto | reference | triton
    recall_interval: int = 0  # steps between recall diagnostics (0: off)
    recall_queries: int = 1024  # queries sampled per layer for recall (0: every eligible query)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per pipeline rank (interleaved)
    num_layers_in_first_pipeline_stage: Optional[int] = None  # uneven pipeline splits (e.g. 41 layers)
    num_layers_in_last_pipeline_stage: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: Optional[bool] = None  # null: on whenever TP > 1
    use_distributed_optimizer: bool = False
    distributed_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


@dataclass
class DataConfig:
    type: str = "mock"  # mock | indexed | passkey (synthetic long-range retrieval, data/passkey.py)
    seq_length: int = 256
    # mock and passkey: document lengths
    mock_min_doc: int = 16
    mock_max_doc: int = 512
    # passkey: key-value pairs stored and asked back per document, value length in tokens
    passkey_pairs: int = 16
    passkey_digits: int = 4
    # indexed (megatron .bin/.idx): blend entries are [weight, prefix] pairs
    blend: list = field(default_factory=list)
    split: str = "98,2,0"
    cache_dir: Optional[str] = None
    tokenizer: Optional[str] = None  # tokenizer.json file or directory holding one
    pack_documents: bool = True  # cu_seqlens per document; false: megatron's plain concatenation
    reset_position_ids: bool = True
    num_workers: int = 0
    valid_microbatches: int = 4  # micro-batches per validation pass, per data-parallel rank


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: Optional[int] = None  # null: 5, or a quarter of train.steps when fewer (see warmup_steps)
    lr_decay_style: str = "cosine"
    index_lr: Optional[float] = None  # param-group override for *.indexer.* (null: same as lr)


@dataclass
class StageConfig:
    name: str = "msa_pt"
    mode: str = "pt"  # pt | cpt: dense warmup then sparse; dense: dense attention + dense KL throughout
    warmup_tokens: int = 0


@dataclass
class TrainConfig:
    steps: int = 40
    micro_batch_size: int = 1
    global_batch_size: int = 2
    precision: str = "fp32"  # fp32 | bf16
    log_interval: int = 1
    eval_interval: int = 0  # steps between validation passes (0: never; needs a validation stream)
    exit_interval: int = 0  # save and stop when the step is a multiple of this (0: off)
    seed: int = 1234


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "msa-megatron"
    entity: Optional[str] = None
    mode: str = "offline"  # online | offline | disabled
    tags: list = field(default_factory=list)


@dataclass
class LoggingConfig:
    console: bool = True
    metrics_jsonl: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops_per_gpu: Optional[float] = None  # for train/mfu; null: known GPUs' dense peak (none on CPU)


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory for checkpoints (null: never save)
    load: Optional[str] = None  # resume from the newest checkpoint here when there is one
    init_from: Optional[str] = None  # weights-only start (e.g. a dense GQA checkpoint for MSA-CPT)
    init_allow_missing: list = field(default_factory=lambda: ["*.indexer.*"])
    save_interval: int = 0  # steps between saves (0: only at the end and when exiting early)
    keep_last: int = 2  # newest checkpoints kept (0: all)


@dataclass
class ClusterConfig:
    """The machines a run is planned for (read by the dry run, `dry_run=true`; see plan.py)."""

    name: str = "h100"
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    # Not in torch's allocated bytes but on the card: CUDA context, NCCL buffers, allocator slack.
    memory_reserve_gib: float = 6.0
    peak_tflops_per_gpu: float = 989.0  # dense bf16 (H100/H200 SXM)
    assumed_mfu: float = 0.3  # model FLOPs utilisation the step time and tokens/day assume


@dataclass
class RunConfig:
    name: str = "debug"
    output_dir: str = "outputs/debug"
    dry_run: bool = False  # plan only: parameters, memory, FLOPs and fit on cluster.*; no GPU, no training
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SCHEMA_NAME = "msa_schema"


def register_hydra_schema() -> None:
    """Give Hydra every schema key with its default (as plain values: typing stays in load_config,
    whose errors are one line), so any key can be overridden from the command line."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=OmegaConf.to_container(OmegaConf.structured(RunConfig)))


def load_config(cfg: Any) -> RunConfig:
    """Merge a Hydra/OmegaConf/dict config onto the schema, type-check it, and validate it."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        run: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None
    validate(run)
    return run


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")


def validate(c: RunConfig, world_size: Optional[int] = None) -> None:
    m, a, p, d, o, s, t = c.model, c.attention, c.parallel, c.data, c.optim, c.stage, c.train
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "vocab_size"):
        _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    _require(
        m.num_attention_heads % m.num_query_groups == 0,
        "model.num_attention_heads",
        m.num_attention_heads,
        f"must be divisible by model.num_query_groups={m.num_query_groups}",
    )
    _one_of("model.transformer_impl", m.transformer_impl, ("auto", "local", "transformer_engine"))
    _require(0.0 < m.rotary_percent <= 1.0, "model.rotary_percent", m.rotary_percent, "must be in (0, 1]")
    if m.num_moe_experts is not None:
        _require(m.num_moe_experts >= 1, "model.num_moe_experts", m.num_moe_experts, "must be >= 1 or null")
        _require(
            1 <= m.moe_router_topk <= m.num_moe_experts,
            "model.moe_router_topk",
            m.moe_router_topk,
            f"must be in [1, model.num_moe_experts={m.num_moe_experts}]",
        )
        _one_of("model.moe_token_dispatcher_type", m.moe_token_dispatcher_type, ("alltoall", "allgather"))

    _one_of("attention.type", a.type, ("msa", "gqa", "local"))
    _one_of("attention.backend", a.backend, ("auto", "reference", "triton"))
    _require(a.topk_blocks >= 1, "attention.topk_blocks", a.topk_blocks, "must be >= 1 (it includes the local block)")
    _require(
        a.block_size >= 1 and a.block_size & (a.block_size - 1) == 0,
        "attention.block_size",
        a.block_size,
        "must be a power of two",
    )
    _require(a.index_head_dim >= 1, "attention.index_head_dim", a.index_head_dim, "must be >= 1")
    rotary_dim = int(m.kv_channels * m.rotary_percent)
    if a.type == "msa" and a.index_rope:
        _require(
            a.index_head_dim >= rotary_dim and rotary_dim % 2 == 0,
            "attention.index_head_dim",
            a.index_head_dim,
            f"index RoPE rotates {rotary_dim} dims (kv_channels*rotary_percent): need an even count <= index_head_dim",
        )
    _require(a.kl.coeff >= 0.0, "attention.kl.coeff", a.kl.coeff, "must be >= 0")
    _require(a.recall_interval >= 0, "attention.recall_interval", a.recall_interval, "must be >= 0")
    _require(a.recall_queries >= 0, "attention.recall_queries", a.recall_queries, "must be >= 0")

    _validate_model_extras(c)
    _validate_layout(c)
    _one_of("parallel.distributed_backend", p.distributed_backend, ("auto", "nccl", "gloo"))

    _one_of("data.type", d.type, ("mock", "indexed", "passkey"))
    _require(d.seq_length >= 2, "data.seq_length", d.seq_length, "must be >= 2")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    if d.type == "indexed":
        _require(len(d.blend) > 0, "data.blend", d.blend, "is empty: list [weight, prefix] pairs")
        for i, entry in enumerate(d.blend):
            pair = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str)
            _require(pair, f"data.blend[{i}]", entry, "must be a [weight, prefix] pair")
            w = entry[0]
            number = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            _require(number and w > 0, f"data.blend[{i}][0]", w, "weight must be a number > 0")
    if d.type == "passkey":
        from msa_megatron.data.passkey import MIN_VOCAB, NUM_KEYS

        _require(1 <= d.passkey_pairs <= NUM_KEYS, "data.passkey_pairs", d.passkey_pairs, f"must be in [1, {NUM_KEYS}]")
        _require(d.passkey_digits >= 1, "data.passkey_digits", d.passkey_digits, "must be >= 1")
        _require(m.vocab_size >= MIN_VOCAB, "model.vocab_size", m.vocab_size, f"data=passkey needs at least {MIN_VOCAB} tokens")
    if d.type in ("mock", "passkey"):
        _require(2 <= d.mock_min_doc <= d.mock_max_doc, "data.mock_min_doc", d.mock_min_doc, f"must be in [2, data.mock_max_doc={d.mock_max_doc}]")
    _require(d.valid_microbatches >= 1, "data.valid_microbatches", d.valid_microbatches, "must be >= 1")
    _require(
        d.seq_length <= m.max_position_embeddings,
        "data.seq_length",
        d.seq_length,
        f"exceeds model.max_position_embeddings={m.max_position_embeddings}",
    )

    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _require(o.index_lr is None or o.index_lr > 0, "optim.index_lr", o.index_lr, "must be > 0 or null")
    _require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0 (0 disables clipping)")
    _require(o.lr_warmup_steps is None or o.lr_warmup_steps >= 0, "optim.lr_warmup_steps", o.lr_warmup_steps, "must be >= 0 or null")
    _one_of("optim.lr_decay_style", o.lr_decay_style, ("cosine", "linear", "constant"))

    _one_of("stage.mode", s.mode, ("pt", "cpt", "dense"))
    _require(s.warmup_tokens >= 0, "stage.warmup_tokens", s.warmup_tokens, "must be >= 0")

    _require(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    _require(
        o.lr_warmup_steps is None or o.lr_warmup_steps < t.steps,
        "optim.lr_warmup_steps",
        o.lr_warmup_steps,
        f"must be smaller than train.steps={t.steps}",
    )
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    _one_of("train.precision", t.precision, ("fp32", "bf16"))
    _one_of("logging.wandb.mode", c.logging.wandb.mode, ("online", "offline", "disabled"))
    peak = c.logging.peak_tflops_per_gpu
    _require(peak is None or peak > 0, "logging.peak_tflops_per_gpu", peak, "must be > 0 or null")
    _require(t.log_interval >= 1, "train.log_interval", t.log_interval, "must be >= 1")
    _require(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0")
    _require(t.exit_interval >= 0, "train.exit_interval", t.exit_interval, "must be >= 0")
    ck = c.checkpoint
    _require(ck.save_interval >= 0, "checkpoint.save_interval", ck.save_interval, "must be >= 0")
    _require(ck.keep_last >= 0, "checkpoint.keep_last", ck.keep_last, "must be >= 0")
    if t.exit_interval:
        _require(ck.save is not None, "train.exit_interval", t.exit_interval, "needs checkpoint.save to keep the progress")
    _validate_cluster(c.cluster)
    if world_size is not None:
        _validate_world(c, world_size)


def _validate_cluster(k: ClusterConfig) -> None:
    for key in ("nodes", "gpus_per_node"):
        _require(getattr(k, key) >= 1, f"cluster.{key}", getattr(k, key), "must be >= 1")
    for key in ("gpu_memory_gib", "peak_tflops_per_gpu"):
        _require(getattr(k, key) > 0, f"cluster.{key}", getattr(k, key), "must be > 0")
    _require(0 <= k.memory_reserve_gib < k.gpu_memory_gib, "cluster.memory_reserve_gib", k.memory_reserve_gib, f"must be in [0, cluster.gpu_memory_gib={k.gpu_memory_gib})")
    _require(0 < k.assumed_mfu <= 1, "cluster.assumed_mfu", k.assumed_mfu, "must be in (0, 1]")


RECOMPUTE_MODULES = ("core_attn", "moe", "moe_act", "layernorm", "mlp", "shared_experts")


def _validate_model_extras(c: RunConfig) -> None:
    m, a = c.model, c.attention
    if isinstance(m.moe_layer_freq, (list, tuple)):
        pattern = list(m.moe_layer_freq)
        _require(
            len(pattern) == m.num_layers and all(x in (0, 1) and not isinstance(x, bool) for x in pattern),
            "model.moe_layer_freq",
            pattern,
            f"must be an int >= 1 or a list of {m.num_layers} zeros and ones (one per layer)",
        )
        _require(m.num_moe_experts is not None or not any(pattern), "model.moe_layer_freq", pattern, "marks MoE layers but model.num_moe_experts is null")
    else:
        ok = isinstance(m.moe_layer_freq, int) and not isinstance(m.moe_layer_freq, bool) and m.moe_layer_freq >= 1
        _require(ok, "model.moe_layer_freq", m.moe_layer_freq, f"must be an int >= 1 or a list of {m.num_layers} zeros and ones")
    dense = a.dense_layers
    _require(
        all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < m.num_layers for i in dense) and len(set(dense)) == len(dense),
        "attention.dense_layers",
        list(dense),
        f"must be distinct 0-based layer indices in [0, {m.num_layers})",
    )
    g = m.recompute_granularity
    _one_of("model.recompute_granularity", g, (None, "selective", "full"))
    if g == "full":
        _one_of("model.recompute_method", m.recompute_method, ("uniform", "block"))
        n = m.recompute_num_layers
        _require(n is not None and n >= 1, "model.recompute_num_layers", n, "must be >= 1 with model.recompute_granularity=full")
    else:
        _require(m.recompute_method is None, "model.recompute_method", m.recompute_method, "is only for model.recompute_granularity=full")
        _require(m.recompute_num_layers is None, "model.recompute_num_layers", m.recompute_num_layers, "is only for model.recompute_granularity=full")
    if m.recompute_modules is not None:
        bad = [x for x in m.recompute_modules if x not in RECOMPUTE_MODULES]
        _require(not bad, "model.recompute_modules", list(m.recompute_modules), f"unknown {bad}: choose from {', '.join(RECOMPUTE_MODULES)}")
        if "layernorm" in m.recompute_modules:
            _require(
                m.transformer_impl == "transformer_engine",
                "model.recompute_modules",
                list(m.recompute_modules),
                "layernorm recompute needs model.transformer_impl=transformer_engine",
            )
        if "moe_act" in m.recompute_modules:
            _require(m.moe_grouped_gemm, "model.recompute_modules", list(m.recompute_modules), "moe_act needs model.moe_grouped_gemm=true")


def _validate_layout(c: RunConfig) -> None:
    """Parallel layouts that cannot work are refused before any work, naming the key."""
    m, p, d, t = c.model, c.parallel, c.data, c.train
    tp, pp, cp, ep = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        p.expert_model_parallel_size,
    )
    for key, v in (
        ("parallel.tensor_model_parallel_size", tp),
        ("parallel.pipeline_model_parallel_size", pp),
        ("parallel.context_parallel_size", cp),
        ("parallel.expert_model_parallel_size", ep),
    ):
        _require(isinstance(v, int) and v >= 1, key, v, "must be an int >= 1")
    key = "parallel.tensor_model_parallel_size"
    groups, heads = m.num_query_groups, m.num_attention_heads
    _require(heads % tp == 0, key, tp, f"must divide model.num_attention_heads={heads}")
    _require(
        groups % tp == 0 or tp % groups == 0,
        key,
        tp,
        f"must divide model.num_query_groups={groups} or be a multiple of it (KV groups are sharded or replicated whole)",
    )
    qkv_width = (heads + 2 * groups) * m.kv_channels
    _require(qkv_width % tp == 0, key, tp, f"must divide the query/key/value projection width {qkv_width}")
    if c.attention.type == "msa" and tp > groups:
        width = groups * c.attention.index_head_dim
        _require(width % tp == 0, key, tp, f"must divide the index query width model.num_query_groups*attention.index_head_dim={width}")
    sp = p.sequence_parallel if p.sequence_parallel is not None else tp > 1
    if not sp and tp > 1 and m.num_moe_experts is not None:
        raise ConfigError(f"parallel.sequence_parallel=False: MoE with tensor_model_parallel_size={tp} needs sequence parallelism")

    _require(
        d.seq_length % (2 * cp) == 0,
        "data.seq_length",
        d.seq_length,
        f"must split into 2*parallel.context_parallel_size={2 * cp} equal chunks",
    )
    local_tokens = t.micro_batch_size * d.seq_length // cp
    if sp:
        _require(
            local_tokens % tp == 0,
            "data.seq_length",
            d.seq_length,
            f"micro_batch_size*seq_length/context_parallel_size={local_tokens} must be divisible by "
            f"parallel.tensor_model_parallel_size={tp} (sequence parallelism)",
        )

    first, last, vpp = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage, p.virtual_pipeline_model_parallel_size
    uneven = first is not None or last is not None
    if uneven:
        _require(pp > 1, "parallel.num_layers_in_first_pipeline_stage", first, "needs parallel.pipeline_model_parallel_size > 1")
        for k, v in (("first", first), ("last", last)):
            _require(v is None or v >= 0, f"parallel.num_layers_in_{k}_pipeline_stage", v, "must be >= 0")
        middle_stages = pp - (first is not None) - (last is not None)
        middle_layers = m.num_layers - (first or 0) - (last or 0)
        _require(
            middle_layers >= 0 and (middle_stages == 0 and middle_layers == 0 or middle_stages > 0 and middle_layers % middle_stages == 0),
            "parallel.pipeline_model_parallel_size",
            pp,
            f"cannot spread the {middle_layers} layers left after the first/last stages over {middle_stages} stages evenly",
        )
        _require(vpp is None, "parallel.virtual_pipeline_model_parallel_size", vpp, "is not supported with uneven first/last pipeline stages")
    else:
        _require(m.num_layers % pp == 0, "parallel.pipeline_model_parallel_size", pp, f"must divide model.num_layers={m.num_layers}")
    if vpp is not None:
        _require(isinstance(vpp, int) and vpp >= 1, "parallel.virtual_pipeline_model_parallel_size", vpp, "must be an int >= 1 or null")
        _require(pp > 1 or vpp == 1, "parallel.virtual_pipeline_model_parallel_size", vpp, "needs parallel.pipeline_model_parallel_size > 1")
        _require(
            m.num_layers % (pp * vpp) == 0,
            "parallel.virtual_pipeline_model_parallel_size",
            vpp,
            f"pipeline_model_parallel_size*virtual_pipeline_model_parallel_size={pp * vpp} must divide model.num_layers={m.num_layers}",
        )
    if m.num_moe_experts is not None:
        _require(m.num_moe_experts % ep == 0, "parallel.expert_model_parallel_size", ep, f"must divide model.num_moe_experts={m.num_moe_experts}")
    etp = p.expert_tensor_parallel_size
    _require(etp is None or (isinstance(etp, int) and etp >= 1), "parallel.expert_tensor_parallel_size", etp, "must be an int >= 1 or null (= tensor size)")
    if m.num_moe_experts is not None and etp is not None and m.moe_ffn_hidden_size:
        _require(m.moe_ffn_hidden_size % etp == 0, "parallel.expert_tensor_parallel_size", etp, f"must divide model.moe_ffn_hidden_size={m.moe_ffn_hidden_size}")


def _validate_world(c: RunConfig, world_size: int) -> None:
    """Relations between the layout and the number of ranks the job actually has."""
    p, t, m = c.parallel, c.train, c.model
    tp, pp, cp, ep = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        p.expert_model_parallel_size,
    )
    model_parallel = tp * pp * cp
    _require(
        world_size % model_parallel == 0,
        "parallel",
        f"TP{tp}xPP{pp}xCP{cp}",
        f"model-parallel size {model_parallel} must divide the world size {world_size}",
    )
    dp = world_size // model_parallel
    per_step = t.micro_batch_size * dp
    _require(
        t.global_batch_size % per_step == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must be a multiple of micro_batch_size*data_parallel={per_step}",
    )
    if m.num_moe_experts:
        etp = p.expert_tensor_parallel_size or tp
        _require(
            (dp * tp * cp) % (ep * etp) == 0,
            "parallel.expert_model_parallel_size",
            ep,
            f"expert_model_parallel_size*expert_tensor_parallel_size={ep * etp} must divide data*tensor*context parallel ranks={dp * tp * cp}",
        )
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp and vpp > 1:
        n_mb = t.global_batch_size // per_step
        _require(
            n_mb % pp == 0,
            "train.global_batch_size",
            t.global_batch_size,
            f"gives {n_mb} micro-batches per step; the interleaved pipeline needs a multiple of pipeline_model_parallel_size={pp}",
        )


def data_parallel_size(c: RunConfig, world_size: int) -> int:
    p = c.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)


def num_microbatches(c: RunConfig, world_size: int) -> int:
    return c.train.global_batch_size // (c.train.micro_batch_size * data_parallel_size(c, world_size))


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron-LM's rule: pad the vocabulary to a multiple of 128 * TP so it shards evenly."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def is_moe_layer(c: RunConfig, layer: int) -> bool:
    """Whether 0-based `layer` has a MoE FFN (megatron-core's moe_layer_freq rule)."""
    m = c.model
    if m.num_moe_experts is None:
        return False
    freq = m.moe_layer_freq
    return bool(freq[layer]) if isinstance(freq, (list, tuple)) else layer % freq == 0


def is_msa_layer(c: RunConfig, layer: int) -> bool:
    """Whether 0-based `layer` runs MSA (it owns an index branch) rather than full attention."""
    return c.attention.type == "msa" and layer not in c.attention.dense_layers


def is_local_layer(c: RunConfig, layer: int) -> bool:
    """Whether 0-based `layer` runs the local-only baseline (own block + the k-1 before it)."""
    return c.attention.type == "local" and layer not in c.attention.dense_layers


def warmup_steps(c: RunConfig) -> int:
    """LR warmup steps: optim.lr_warmup_steps, or by default 5 (a quarter of a run shorter than 20)."""
    o = c.optim
    return o.lr_warmup_steps if o.lr_warmup_steps is not None else min(5, c.train.steps // 4)


def tokens_per_step(c: RunConfig) -> int:
    return c.train.global_batch_size * c.data.seq_length


def to_transformer_config(c: RunConfig, *, use_cpu_initialization: bool):
    """The megatron-core TransformerConfig for this run."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = c.model, c.parallel
    bf16 = c.train.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tp = p.tensor_model_parallel_size
    sequence_parallel = p.sequence_parallel if p.sequence_parallel is not None else tp > 1
    moe = m.num_moe_experts is not None
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        num_moe_experts=m.num_moe_experts,
        moe_router_topk=m.moe_router_topk if moe else 2,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size if moe else None,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size if moe else None,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff if moe else 0.0,
        moe_router_load_balancing_type="aux_loss",
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_grouped_gemm=m.moe_grouped_gemm,
        moe_layer_freq=list(m.moe_layer_freq) if isinstance(m.moe_layer_freq, (list, tuple)) else m.moe_layer_freq,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        recompute_modules=list(m.recompute_modules) if m.recompute_modules is not None else None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=p.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        calculate_per_token_loss=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        rotary_interleaved=False,
        deterministic_mode=False,
    )
