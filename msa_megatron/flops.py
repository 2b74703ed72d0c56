"""Model FLOPs per token of a RunConfig: what `train/mfu` divides by the GPU's peak.

Counted: the matrix multiplications of one token's forward pass (2 FLOPs per multiply-add) and
the attention over its context, times 3 for training (backward = 2 x forward). Not counted, as
in megatron's and PaLM's MFU: recompute, norms, softmax, routing, top-k, and the KL's teacher
pass (a second look at attention the model already paid for).

Attention per token and layer follows MSA.md's cost model, with the context N = data.seq_length
(a packed sample counts as one causal sequence) and the exact causal average of attended keys:
    dense (GQA, and the MSA dense warmup):  4 * Hq * d * mean_i(i + 1)
    MSA main (sparse stage), and the local-only baseline (attention.type=local, every stage):
                                            4 * Hq * d * mean_i(min(i + 1, k * Bk))
    MSA index scores (both stages):         2 * Hkv * di * mean_i(i + 1)
which is 2*Hq*d*N, 4*Hq*d*k*Bk and Hkv*di*N for N >> k*Bk.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

TRAINING_MULTIPLIER = 3  # forward + backward (2x forward)


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token, summed over layers, by component."""

    attention_projections: int = 0  # qkv + output projection
    index_projections: int = 0  # Wqi, Wki of the MSA layers
    attention_core: int = 0  # main branch: dense or sparse
    index_scores: int = 0  # qi . ki over the visible tokens
    mlp: int = 0  # dense MLPs, MoE experts (top-k and shared) and routers
    logits: int = 0  # output layer

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def mean_attended_keys(context: int, cap: int | None = None) -> float:
    """Mean over positions i < context of the keys a causal query sees: min(i + 1, cap)."""
    if cap is None or cap >= context:
        return (context + 1) / 2
    # positions 0..cap-1 see 1..cap keys; the rest see cap
    return (cap * (cap + 1) / 2 + (context - cap) * cap) / context


def msa_layer_numbers(cfg) -> list[int]:
    """1-based numbers of the layers with an MSA index branch."""
    if cfg.attention.type != "msa":
        return []
    dense = set(cfg.attention.dense_layers)  # 0-based
    return [n for n in range(1, cfg.model.num_layers + 1) if n - 1 not in dense]


def moe_layer_numbers(cfg) -> list[int]:
    """1-based numbers of the MoE layers (megatron-core's moe_layer_freq: every k-th from the
    first, or a 0/1 pattern per layer)."""
    m = cfg.model
    if m.num_moe_experts is None:
        return []
    freq = m.moe_layer_freq
    if isinstance(freq, int):
        return [n for n in range(1, m.num_layers + 1) if (n - 1) % freq == 0]
    return [n for n, flag in zip(range(1, m.num_layers + 1), freq) if flag]


def forward_flops_per_token(cfg, sparse: bool) -> ForwardFlops:
    """Forward FLOPs per token of the model in `cfg`, in the sparse (True) or dense-warmup stage."""
    m, a = cfg.model, cfg.attention
    h, hq, hkv, d = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    layers = m.num_layers
    context = cfg.data.seq_length
    msa_layers = len(msa_layer_numbers(cfg))
    local_layers = m.num_layers - len(set(a.dense_layers)) if a.type == "local" else 0
    moe_layers = len(moe_layer_numbers(cfg))

    projections = layers * 2 * h * (hq * d + 2 * hkv * d + hq * d)
    di = a.index_head_dim
    index_projections = msa_layers * 2 * h * (hkv * di + di)

    dense_keys = mean_attended_keys(context)
    sparse_keys = mean_attended_keys(context, a.topk_blocks * a.block_size)
    core_dense = 4 * hq * d * dense_keys
    core_sparse = 4 * hq * d * sparse_keys
    core = (layers - msa_layers - local_layers) * core_dense + local_layers * core_sparse
    core += msa_layers * (core_sparse if sparse else core_dense)
    index_scores = msa_layers * 2 * hkv * di * dense_keys

    glu = 3  # gated linear unit: gate, up, down
    mlp = (layers - moe_layers) * 2 * glu * h * m.ffn_hidden_size
    if moe_layers:
        expert = 2 * glu * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
        shared = 2 * glu * h * (m.moe_shared_expert_intermediate_size or 0)
        router = 2 * h * m.num_moe_experts
        mlp += moe_layers * (m.moe_router_topk * expert + shared + router)

    return ForwardFlops(
        attention_projections=int(projections),
        index_projections=int(index_projections),
        attention_core=int(round(core)),
        index_scores=int(round(index_scores)),
        mlp=int(mlp),
        logits=int(2 * h * m.vocab_size),
    )


def training_flops_per_token(cfg, sparse: bool) -> int:
    """Model FLOPs of one trained token (forward + backward)."""
    return TRAINING_MULTIPLIER * forward_flops_per_token(cfg, sparse).total


# Dense peak TFLOP/s per GPU of the cards we train on (no sparsity), by precision.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 494.7},  # SXM; fp32 matmuls run as TF32
    "H200": {"bf16": 989.0, "fp32": 494.7},
    "H800": {"bf16": 989.0, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def peak_flops_per_gpu(precision: str, device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else the table entry whose name the device's
    contains, else None (CPU or an unknown card: MFU is not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for card, peaks in PEAK_TFLOPS.items():
        if card in device_name.upper():
            return peaks[precision] * 1e12
    return None
