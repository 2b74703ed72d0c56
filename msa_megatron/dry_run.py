"""`python train.py recipe=<name> dry_run=true`: the plan of a run, printed without a GPU or cluster.

Prints a readable report (layout, parameters, memory per GPU, FLOPs per token, speed at the
assumed MFU, how the index branch splits over TP ranks, the submission command) and ends with one
JSON line. A layout that does not fit prints the report, then one line on stderr naming the
largest memory term and the key to change, and returns exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from msa_megatron.config import ConfigError, RunConfig, validate
from msa_megatron.plan import (
    GIB,
    Plan,
    StageMemory,
    advice,
    index_split,
    largest_term,
    make_plan,
    recompute_overhead,
    stage_layers,
)

EXIT_DOES_NOT_FIT = 2


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _context(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def submit_command(cfg: RunConfig, overrides: list[str]) -> str:
    """The sbatch line that runs this plan (the same Hydra overrides, minus dry_run)."""
    kept = [o for o in overrides if not o.startswith("dry_run=")]
    script = "slurm/cpt.sbatch" if cfg.stage.mode == "cpt" else "slurm/pretrain.sbatch"
    if cfg.stage.mode == "cpt" and not any(o.startswith("checkpoint.init_from=") for o in kept):
        kept.append("checkpoint.init_from=<dense GQA checkpoint directory>")
    return f"sbatch --nodes={cfg.cluster.nodes} {script} {' '.join(kept)}".rstrip()


def summary(plan: Plan, overrides: list[str]) -> dict:
    """The JSON line: every number a script may want."""
    cfg, lay, top = plan.cfg, plan.layout, plan.busiest()
    days = run_days(plan)
    return {
        "name": cfg.name,
        "gpus": lay.gpus,
        "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "cp": lay.cp, "ep": lay.ep, "etp": lay.etp, "dp": lay.dp,
                   "expert_dp": lay.expert_dp, "sequence_parallel": lay.sp, "microbatches": lay.microbatches,
                   "distributed_optimizer": cfg.parallel.use_distributed_optimizer},
        "total_params": plan.params["total"],
        "active_params": plan.params["active"],
        "active_params_without_embeddings": plan.params["active_without_embeddings"],
        "params_per_gpu": max(s.params for s in next(iter(plan.stages.values()))),
        "params_per_gpu_by_stage": [s.params for s in next(iter(plan.stages.values()))],
        "memory_per_gpu_gib": {
            "stage": top.stage,
            "attention_stage": _attention_stage_of(plan, top),
            "weights": _gib(top.weights),
            "grads": _gib(top.grads),
            "optimizer": _gib(top.optimizer),
            "optimizer_without_distributed": _gib(top.optimizer_replicated),
            "optimizer_with_distributed": _gib(top.optimizer_distributed),
            "activations": _gib(top.activations),
            "activations_per_microbatch": _gib(top.activations / max(top.inflight, 1)),
            "microbatches_in_flight": top.inflight,
            "msa_buffers": _gib(top.msa_state),
            "msa_buffers_detail": {
                "index_scores": 0.0,  # never materialised: the indexer's top-k is fused
                "topk_and_plan": _gib(top.activation_parts.get("msa_topk_plan", 0)),
                "kl_state": _gib(top.activation_parts.get("msa_kl_state", 0)),
            },
            "logits": _gib(top.logits),
            "transient": _gib(top.transient),
            "reserve": cfg.cluster.memory_reserve_gib,
            "peak_allocated": _gib(top.peak),
            "total": _gib(top.peak + plan.reserve),
        },
        "gpu_memory_gib": cfg.cluster.gpu_memory_gib,
        "fits": plan.fits,
        "index_branch_over_tp": index_split(cfg, lay),
        "flops_per_token": {str(c): {k: (round(v, 2) if isinstance(v, float) else v) for k, v in f.items()}
                            for c, f in plan.flops.items()},
        "assumed_mfu": cfg.cluster.assumed_mfu,
        "tokens_per_step": plan.tokens_per_step,
        "step_time_s": {k: round(v, 3) for k, v in plan.step_time_s.items()},
        "tokens_per_day": {k: int(plan.tokens_per_step / v * 86400) for k, v in plan.step_time_s.items()},
        "run_days": round(days, 2),
        "submit": submit_command(cfg, overrides),
    }


def _attention_stage_of(plan: Plan, mem: StageMemory) -> str:
    return next(name for name, stages in plan.stages.items() if mem in stages)


def run_days(plan: Plan) -> float:
    t = plan.cfg.train.steps
    dense = plan.warmup_steps
    return (dense * plan.step_time_s["dense"] + (t - dense) * plan.step_time_s["sparse"]) / 86400


def report(plan: Plan, overrides: list[str]) -> str:
    cfg, lay = plan.cfg, plan.layout
    m, c, p = cfg.model, cfg.cluster, cfg.parallel
    lines = []
    say = lines.append
    say(f"== dry run: {cfg.name} on {c.nodes} x {c.gpus_per_node} {c.name} ({lay.gpus} GPUs, {c.gpu_memory_gib:g} GiB each)")
    split = "/".join(str(sum(len(ch) for ch in chunks)) for chunks in stage_layers(cfg))
    say(
        f"layout     TP {lay.tp} | CP {lay.cp} | PP {lay.pp}" + (f" x {lay.vpp} virtual" if lay.vpp > 1 else "")
        + f" (layers {split}) | EP {lay.ep} | ETP {lay.etp} | DP {lay.dp} (expert DP {lay.expert_dp})"
        + f" | sequence parallel {'on' if lay.sp else 'off'} | distributed optimizer {'on' if p.use_distributed_optimizer else 'off'}"
    )
    mbs, seq = cfg.train.micro_batch_size, cfg.data.seq_length
    say(
        f"batch      micro {mbs} x {seq:,} tokens, global {cfg.train.global_batch_size} x {seq:,} = "
        f"{_tokens(plan.tokens_per_step)} tokens/step, {lay.microbatches} micro-batches per data-parallel rank"
    )
    rec = m.recompute_granularity or "none"
    if rec == "selective":
        rec += f" {list(m.recompute_modules or ['core_attn'])}"
    elif rec == "full":
        rec += f" ({m.recompute_method}, {m.recompute_num_layers} layers)"
    say(f"recompute  {rec}")
    say(f"stages     {_stages_line(plan)}")

    prm = plan.params
    say("")
    say(f"parameters total {_b(prm['total'])} | active per token {_b(prm['active'])} "
        f"({_b(prm['active_without_embeddings'])} without embedding and output layer)")
    first = next(iter(plan.stages.values()))
    say("  per GPU    " + " | ".join(f"stage {s.stage}: {_b(s.params)} ({_b(s.expert_params)} routed experts)" for s in first))

    say("")
    say("index branch and top-k over tensor parallelism")
    for line in index_split(cfg, lay):
        say(f"  {line}")

    say("")
    top = plan.busiest()
    attention_stage = _attention_stage_of(plan, top)
    say(f"memory per GPU, GiB (busiest: pipeline stage {top.stage}, {attention_stage} attention stage)")
    rows = [
        ("weights", top.weights, f"{'bf16' if cfg.train.precision == 'bf16' else 'fp32'}"),
        ("gradients", top.grads, "fp32 reduce buffer"),
        ("optimizer states", top.optimizer,
         f"Adam, {'sharded' if p.use_distributed_optimizer else 'replicated'}; "
         f"with distributed optimizer {_gib(top.optimizer_distributed)}, without {_gib(top.optimizer_replicated)}"),
        ("activations", top.activations,
         f"{top.inflight} micro-batch chunk(s) in flight x {_gib(top.activations / max(top.inflight, 1))} "
         f"(logits {_gib(top.logits)}, MSA top-k/plan/KL state {_gib(top.msa_state)})"),
        ("transient", top.transient, top.transient_kind),
        ("reserve", plan.reserve, "CUDA context, NCCL, allocator (cluster.memory_reserve_gib)"),
    ]
    for name, value, note in rows:
        say(f"  {name:<18}{value / GIB:8.2f}   {note}")
    total = top.peak + plan.reserve
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    say(f"  {'total':<18}{total / GIB:8.2f}   of {c.gpu_memory_gib:g} -> {verdict}")
    for name, stages in plan.stages.items():
        label = ("dense warmup" if name == "dense" and cfg.attention.type == "msa" else name) + ", by stage"
        say(f"  {label:<24}" + " | ".join(f"{s.stage}: {(s.peak + plan.reserve) / GIB:.1f}" for s in stages))

    say("")
    say("FLOPs per token, training (3 x forward): dense GQA | MSA dense warmup | MSA sparse | attention dense/MSA")
    for ctx, f in plan.flops.items():
        mark = "  <- this run" if ctx == seq else ""
        say(f"  {_context(ctx):>5}  {f['dense_gqa'] / 1e9:9.2f}G | {f['msa_warmup'] / 1e9:9.2f}G | "
            f"{f['msa_sparse'] / 1e9:9.2f}G | {f['attention_dense_over_msa']:6.1f}x{mark}")

    say("")
    say(f"speed at an assumed MFU of {c.assumed_mfu:.0%} ({c.peak_tflops_per_gpu:g} TFLOP/s per GPU; cluster.assumed_mfu)")
    for name in plan.stages:
        step = plan.step_time_s[name]
        dense_label = {"gqa": "dense attention", "local": "local attention"}.get(cfg.attention.type, "dense warmup")
        label = {"dense": dense_label, "sparse": "sparse"}[name]
        extra = recompute_overhead(cfg, name == "sparse")
        say(f"  {label:<16} step {step:8.2f} s | {_tokens(plan.tokens_per_step / step * 86400)} tokens/day"
            + (f" | recompute adds {extra:.0%} FLOPs" if extra else ""))
    if lay.pp > 1:
        say(f"  pipeline bubble  {(lay.pp - 1) / (lay.vpp * lay.microbatches):.1%} of a step")
    say(f"  run              {cfg.train.steps:,} steps = {_tokens(cfg.train.steps * plan.tokens_per_step)} tokens "
        f"in {run_days(plan):.1f} days")

    say("")
    say(f"submit: {submit_command(cfg, overrides)}")
    return "\n".join(lines)


def _stages_line(plan: Plan) -> str:
    cfg = plan.cfg
    if cfg.attention.type == "local":
        return "local attention throughout (the most recent attention.topk_blocks blocks, no index branch)"
    if cfg.attention.type != "msa":
        return "dense GQA attention throughout"
    if cfg.stage.mode == "dense":
        return "MSA dense attention + dense KL throughout (stage.mode=dense)"
    warm = plan.warmup_steps
    if cfg.stage.warmup_tokens == 0:
        origin = f" from {cfg.checkpoint.init_from}" if cfg.checkpoint.init_from else ""
        return f"MSA-{cfg.stage.mode.upper()}{origin}: sparse from the first step ({cfg.train.steps:,} steps)"
    start = "from scratch" if cfg.checkpoint.init_from is None and cfg.stage.mode == "pt" else f"from {cfg.checkpoint.init_from or 'a dense checkpoint (checkpoint.init_from)'}"
    return (f"MSA-{cfg.stage.mode.upper()} {start}: dense warmup {_tokens(cfg.stage.warmup_tokens)} tokens "
            f"({warm:,} steps), then sparse ({cfg.train.steps - warm:,} steps)")


def main(cfg: RunConfig, overrides: Optional[list[str]] = None, device: str = "cuda") -> int:
    """Print the plan; 0 when it fits, 2 (after one line on stderr) when it does not."""
    overrides = overrides or []
    try:
        validate(cfg, world_size=cfg.cluster.nodes * cfg.cluster.gpus_per_node)
        plan = make_plan(cfg, device=device)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    print(report(plan, overrides), flush=True)
    print(json.dumps(summary(plan, overrides)), flush=True)
    if plan.fits:
        return 0
    top = plan.busiest()
    term, size = largest_term(top)
    print(
        f"plan error: does not fit: pipeline stage {top.stage} needs {(top.peak + plan.reserve) / GIB:.1f} GiB of "
        f"cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g}; largest term: {term} {size / GIB:.1f} GiB; "
        f"change {advice(cfg, top, term)}",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_DOES_NOT_FIT
