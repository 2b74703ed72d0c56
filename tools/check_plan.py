#!/usr/bin/env python
"""Check the planner against real training: peak memory and step time, predicted vs measured.

A proxy of the 109B model (its layer shapes: d 3072, 64 q / 4 kv heads of 128, experts of width
2304 + a shared one, 200K vocabulary; but 4 layers, the first with a dense FFN, and 16 experts)
trains a few steps at 32K tokens per micro-batch on the GPUs of one machine, under each layout
and attention variant. For every run: torch's peak allocated memory and the median step time
(metrics.jsonl: mem/max_allocated_gb, train/step_time_s, first steps skipped: Triton JIT) against
msa_megatron/plan.py's prediction for the same config, the ratios, tokens/s, and MSA vs GQA.

    python tools/check_plan.py --gpus 4                     # layouts tp2_ep4 and cp2_ep4, msa and gqa
    python tools/check_plan.py --gpus 4 --variants msa gqa msa_warmup --layouts tp2_ep4
    python tools/check_plan.py --gpus 1 --cpu               # a tiny CPU version (tests/test_plan.py)

Writes check_plan.json and check_plan.md under --out (default: $OUT, else outputs/check_plan).
A run that fails is reported with its error and does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train_runs import ROOT, compose, environment, launch, ratio, report_header, step_summary

GPU_PROXY = [
    "~recipe", "model=msa109b", "model.num_layers=4", "model.moe_layer_freq=[0,1,1,1]", "model.num_moe_experts=16",
    "parallel=gpu", "train.precision=bf16", "data=mock", "data.mock_min_doc=4096", "data.mock_max_doc=32768",
    "model.transformer_impl=local",  # the layer spec the planner models (Transformer Engine keeps other tensors)
    "parallel.use_distributed_optimizer=true",
]
CPU_PROXY = [
    "~recipe", "model=tiny", "model.num_layers=2", "parallel=cpu", "train.precision=fp32", "data=mock",
    "model.vocab_size=512", "attention.block_size=16", "attention.topk_blocks=2", "attention.index_head_dim=16",
    "data.mock_min_doc=64", "data.mock_max_doc=256",
]
COMMON = ["train.micro_batch_size=1", "train.log_interval=1", "train.eval_interval=0", "optim.lr_warmup_steps=1", "checkpoint.save=null",
          "checkpoint.load=null", "logging=console"]
ETP1 = "parallel.expert_tensor_parallel_size=1"
LAYOUTS = {
    "tp2_ep4": ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=4", ETP1],
    "cp2_ep4": ["parallel.context_parallel_size=2", "parallel.expert_model_parallel_size=4", ETP1],
    "tp2_ep2": ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2", ETP1],
    "ep2": ["parallel.expert_model_parallel_size=2", ETP1],
    "single": [],
}
VARIANTS = {
    "msa": ["attention=msa", "stage.warmup_tokens=0"],  # sparse from the first step
    "gqa": ["attention=gqa"],
    "msa_warmup": ["attention=msa", "stage.mode=dense"],  # the dense warmup: dense attention + dense KL
}


def overrides_for(args, layout: str, variant: str) -> list[str]:
    proxy = CPU_PROXY if args.cpu else GPU_PROXY
    dp_ranks = args.gpus // _model_parallel(LAYOUTS[layout])
    return proxy + COMMON + LAYOUTS[layout] + VARIANTS[variant] + [
        f"data.seq_length={args.seq}",
        f"train.steps={args.steps}",
        f"train.global_batch_size={dp_ranks * args.microbatches}",
        "cluster.nodes=1",
        f"cluster.gpus_per_node={args.gpus}",
    ] + args.extra


def _model_parallel(layout: list[str]) -> int:
    size = 1
    for o in layout:
        key, value = o.split("=")
        if key in ("parallel.tensor_model_parallel_size", "parallel.context_parallel_size", "parallel.pipeline_model_parallel_size"):
            size *= int(value)
    return size


def planned(overrides: list[str]) -> dict:
    """The planner's prediction for these overrides: peak allocated GiB of the logging rank's
    pipeline stage (the last) in the stage that runs, and the step time at the assumed MFU."""
    from msa_megatron.plan import GIB, make_plan

    cfg = compose(overrides)
    plan = make_plan(cfg)
    stage = list(plan.stages)[-1]  # "sparse" when the run reaches it, else "dense"
    mem = plan.stages[stage][-1]
    flops = "msa_sparse" if stage == "sparse" else "msa_warmup" if cfg.attention.type == "msa" else "dense_gqa"
    return {
        "stage": stage,
        "peak_gib": mem.peak / GIB,
        "static_gib": mem.static / GIB,
        "activations_gib": mem.activations / GIB,
        "transient_gib": mem.transient / GIB,
        "step_time_s": plan.step_time_s[stage],
        "tokens_per_step": plan.tokens_per_step,
        "flops_per_step": plan.tokens_per_step * plan.flops[cfg.data.seq_length][flops],
        "assumed_mfu": cfg.cluster.assumed_mfu,
        "peak_flops": cfg.cluster.peak_tflops_per_gpu * 1e12 * plan.layout.gpus,
    }


def measure(args, name: str, overrides: list[str], out_dir: str) -> dict:
    """Train under torchrun; median step time after the first `--skip` steps and peak memory."""
    run = launch(overrides, os.path.join(out_dir, "runs", name), gpus=args.gpus, timeout=args.timeout, cpu=args.cpu)
    if "error" in run or "stopped" in run:
        return {"error": run.get("error") or run["stopped"]}
    summary = step_summary(run["records"], args.skip)
    keys = ("step_time_s", "peak_gib", "reserved_gib", "steps_timed", "lm_loss_last")
    return {**{k: summary[k] for k in keys}, "wall_s": run["wall_s"]}


def markdown(results: list[dict], env: dict, command: str) -> str:
    lines = report_header(command, env) + [
        "| layout | variant | stage | peak GiB measured | planned | ratio | step s measured | planned (MFU) | ratio | implied MFU | tokens/s | vs gqa |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, p = r.get("measured", {}), r["planned"]
        if "error" in m:
            lines.append(f"| {r['layout']} | {r['variant']} | {p['stage']} | failed: {m['error']} | {p['peak_gib']:.2f} | | | "
                         f"{p['step_time_s']:.3f} | | | | |")
            continue
        peak = f"{m['peak_gib']:.2f}" if m.get("peak_gib") is not None else "n/a"
        lines.append(
            f"| {r['layout']} | {r['variant']} | {p['stage']} | {peak} | {p['peak_gib']:.2f} | {r['memory_ratio'] or 'n/a'} | "
            f"{m['step_time_s']:.3f} | {p['step_time_s']:.3f} ({p['assumed_mfu']:.0%}) | {r['time_ratio']} | "
            f"{r['implied_mfu']:.1%} | {r['tokens_per_s']:,.0f} | {r.get('speed_vs_gqa') or ''} |"
        )
    lines += ["", "ratio = measured / planned. implied MFU = model FLOPs per step / (step time x GPUs x peak).",
              "vs gqa = tokens/s of this variant / tokens/s of attention=gqa under the same layout."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=4, help="processes (GPUs) per run")
    ap.add_argument("--layouts", nargs="+", default=None, help=f"from {', '.join(LAYOUTS)}")
    ap.add_argument("--variants", nargs="+", default=["msa", "gqa"], help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--seq", type=int, default=None, help="tokens per micro-batch (default 32768; 256 with --cpu)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 8; 3 with --cpu)")
    ap.add_argument("--skip", type=int, default=None, help="first steps left out of the timing (default 3; 1 with --cpu)")
    ap.add_argument("--microbatches", type=int, default=2, help="micro-batches per step and data-parallel rank")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--cpu", action="store_true", help="tiny model, gloo, fp32: exercise the script without GPUs")
    ap.add_argument("--out", default=None, help="results directory (default $OUT, else outputs/check_plan)")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    args.seq = args.seq or (256 if args.cpu else 32768)
    args.steps = args.steps or (3 if args.cpu else 8)
    args.skip = args.skip if args.skip is not None else (1 if args.cpu else 3)
    args.layouts = args.layouts or {1: ["single"], 2: ["tp2_ep2"]}.get(args.gpus, ["tp2_ep4", "cp2_ep4"])
    out_dir = args.out or os.environ.get("OUT") or os.path.join(ROOT, "outputs", "check_plan")
    os.makedirs(out_dir, exist_ok=True)
    env = environment(args.cpu)
    command = "python tools/check_plan.py " + " ".join(argv if argv is not None else sys.argv[1:])

    results = []
    for layout in args.layouts:
        for variant in args.variants:
            overrides = overrides_for(args, layout, variant)
            entry = {"layout": layout, "variant": variant, "overrides": overrides, "planned": planned(overrides)}
            print(f"[check_plan] {layout} {variant}: running {args.steps} steps on {args.gpus} processes", flush=True)
            entry["measured"] = m = measure(args, f"{layout}-{variant}", overrides, out_dir)
            p = entry["planned"]
            if "error" not in m:
                entry["memory_ratio"] = ratio(m["peak_gib"], p["peak_gib"])
                entry["time_ratio"] = ratio(m["step_time_s"], p["step_time_s"])
                entry["implied_mfu"] = p["flops_per_step"] / (m["step_time_s"] * p["peak_flops"])
                entry["tokens_per_s"] = p["tokens_per_step"] / m["step_time_s"]
            print(f"[check_plan] {layout} {variant}: {json.dumps(m)}", flush=True)
            results.append(entry)
    for r in results:
        gqa = next((g for g in results if g["layout"] == r["layout"] and g["variant"] == "gqa" and "tokens_per_s" in g), None)
        if gqa and "tokens_per_s" in r and r["variant"] != "gqa":
            r["speed_vs_gqa"] = round(r["tokens_per_s"] / gqa["tokens_per_s"], 3)

    table = markdown(results, env, command)
    with open(os.path.join(out_dir, "check_plan.json"), "w") as f:
        json.dump({"command": command, "environment": env, "results": results}, f, indent=1)
    with open(os.path.join(out_dir, "check_plan.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0 if any("error" not in r["measured"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
