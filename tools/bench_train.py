#!/usr/bin/env python
"""Whole training steps, MSA vs dense: tokens/s/GPU, MFU, peak memory, and where the time goes.

A proxy with the 109B model's attention (d 3072, 64 query / 4 KV heads of 128, RoPE on 64 dims,
Bk 128, k 16) and its MoE block made to fit one GPU (8 experts of width 2304, top-4, plus the
shared expert; 1 layer by default, vocabulary 4096) trains a few steps per case: forward,
backward and optimizer, bf16, one document per sequence (the dense baseline then runs cuDNN).
Cases: every context x attention variant x layout, the variants side by side on the same machine:

    gqa         attention=gqa, the dense baseline (fastest dense kernel)
    msa_warmup  attention=msa stage.mode=dense: MSA's dense-warmup stage (dense attention + dense KL)
    msa_sparse  attention=msa stage.warmup_tokens=0: MSA's sparse stage
    local       attention=local: the local-only baseline (not run unless asked)

Each run goes through tools/train_timing.py (train.py + clocks on attention and MLP/MoE) and its
metrics.jsonl: medians over the steps after the first --skip (JIT, autotuning) of tokens/s/GPU,
TFLOP/s/GPU and MFU (train/tflops_per_gpu, train/mfu: model FLOPs with attention counted per
MSA.md), the peak allocated/reserved memory, and the step split into attention core, the rest of
the attention block, MLP/MoE and everything else.

    python tools/bench_train.py --gpus 1                   # one GPU: 16K, 32K, 64K, 128K
    python tools/bench_train.py --gpus 4                   # 4 GPUs: TP 2 x CP 2, EP 4
    python tools/bench_train.py --cpu                      # tiny CPU version (tests/test_bench_train.py)

Results: bench_train.json and bench_train.md under --out (default outputs/bench_train), copied
to --export (default $OUT when set) after every case. A case already in bench_train.json (same
GPU) is not run again: rerun the same command to continue after a time limit (--fresh: start over).
A case the planner says does not fit the GPU's memory is reported and skipped (--force runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from train_runs import ROOT, compose, environment, fmt, launch, ratio, read_records, report_header, step_summary

TIMED_ENTRY = os.path.join(ROOT, "tools", "train_timing.py")

VARIANTS = {
    "gqa": ["attention=gqa"],
    "msa_warmup": ["attention=msa", "stage.mode=dense"],
    "msa_sparse": ["attention=msa", "stage.warmup_tokens=0"],
    "local": ["attention=local"],
}
ETP1 = "parallel.expert_tensor_parallel_size=1"
LAYOUTS = {  # name -> (GPUs, overrides)
    "single": (1, []),
    "tp2_cp2_ep4": (4, ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2",
                        "parallel.expert_model_parallel_size=4", ETP1]),
    "tp4_ep4": (4, ["parallel.tensor_model_parallel_size=4", "parallel.expert_model_parallel_size=4", ETP1]),
    "cp4_ep4": (4, ["parallel.context_parallel_size=4", "parallel.expert_model_parallel_size=4", ETP1]),
    "tp2_ep2": (2, ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2", ETP1]),
}
GPU_CONTEXTS = [16384, 32768, 65536, 131072]
# Goals of BENCHMARKS.md (one GPU): variant -> [(context or None for all, tokens/s ratio vs gqa >=)]
GOALS = {"msa_sparse": [(65536, 2.0), (131072, 4.0)], "msa_warmup": [(None, 0.75)]}


def gpu_proxy(layers: int) -> list[str]:
    return [
        "~recipe", "model=msa109b", f"model.num_layers={layers}", f"model.moe_layer_freq=[{','.join(['1'] * layers)}]",
        "model.num_moe_experts=8", "model.vocab_size=4096", "model.transformer_impl=local",
        "parallel=gpu", "train.precision=bf16", "data=mock",
    ]


def cpu_proxy(layers: int) -> list[str]:
    return [
        "~recipe", "model=tiny", f"model.num_layers={layers}", "parallel=cpu", "train.precision=fp32", "data=mock",
        "model.vocab_size=512", "attention.block_size=16", "attention.topk_blocks=2", "attention.index_head_dim=16",
    ]


COMMON = ["train.micro_batch_size=1", "train.log_interval=1", "train.eval_interval=0", "optim.lr_warmup_steps=1",
          "checkpoint.save=null", "checkpoint.load=null", "logging=console", "attention.recall_interval=0"]


def case_id(layout: str, context: int, variant: str) -> str:
    return f"{layout}-{context}-{variant}"


def overrides_for(args, layout: str, context: int, variant: str) -> list[str]:
    gpus, parallel = LAYOUTS[layout]
    model_parallel = 1
    for o in parallel:
        key, value = o.split("=")
        if key in ("parallel.tensor_model_parallel_size", "parallel.context_parallel_size"):
            model_parallel *= int(value)
    proxy = cpu_proxy(args.layers) if args.cpu else gpu_proxy(args.layers)
    return proxy + COMMON + parallel + VARIANTS[variant] + [
        f"data.seq_length={context}",
        f"data.mock_min_doc={context + 1}",  # one document per sequence
        f"data.mock_max_doc={context + 1}",
        f"model.max_position_embeddings={max(context, 8192)}",
        f"train.steps={args.steps}",
        f"train.global_batch_size={gpus // model_parallel * args.microbatches}",
        "cluster.nodes=1",
        f"cluster.gpus_per_node={gpus}",
    ] + args.extra


def planned(overrides: list[str], gpu_memory_gib) -> dict:
    """The planner's peak memory per GPU (busiest stage) and whether it fits this GPU."""
    from msa_megatron.plan import GIB, make_plan

    cfg = compose(overrides + ([f"cluster.gpu_memory_gib={gpu_memory_gib}"] if gpu_memory_gib else []))
    plan = make_plan(cfg)
    return {"peak_gib": round(plan.busiest().peak / GIB, 2), "fits": plan.fits, "gpu_memory_gib": cfg.cluster.gpu_memory_gib}


def time_split(run_dir: str, skip: int) -> dict:
    """Seconds of attention core, the rest of the attention block, MLP/MoE and the rest in the
    median timed step (by step time) of module_times.jsonl: one step, so the parts add up."""
    rows = read_records(run_dir, "module_times.jsonl")
    rows = sorted(rows[skip:] or rows[-1:], key=lambda r: r["step_s"])
    if not rows:
        return {}
    r = rows[len(rows) // 2]
    return {
        "step": r["train/step"],
        "step_s": r["step_s"],
        "attention_core_s": r["attention_core_s"],
        "attention_core_fwd_s": r["attention_core_fwd_s"],
        "attention_core_bwd_s": r["attention_core_bwd_s"],
        "attention_other_s": r["attention_s"] - r["attention_core_s"],  # projections, RoPE, index projections
        "mlp_s": r["mlp_s"],
        "rest_s": r["step_s"] - r["attention_s"] - r["mlp_s"],  # embedding, norms, logits, loss, optimizer, grad reduce
    }


def run_case(args, layout: str, context: int, variant: str, out_dir: str, gpu_memory_gib) -> dict:
    overrides = overrides_for(args, layout, context, variant)
    entry = {"layout": layout, "context": context, "variant": variant, "gpus": LAYOUTS[layout][0], "overrides": overrides}
    if not args.cpu:
        entry["planned"] = planned(overrides, gpu_memory_gib)
        if not entry["planned"]["fits"] and not args.force:
            entry["skipped"] = f"planned {entry['planned']['peak_gib']} GiB per GPU does not fit {gpu_memory_gib} GiB (--force runs it)"
            return entry
    run_dir = os.path.join(out_dir, "runs", case_id(layout, context, variant))
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-run case starts over: its steps are not resumed
    run = launch(overrides, run_dir, gpus=entry["gpus"], timeout=args.timeout, cpu=args.cpu, entry=TIMED_ENTRY)
    if "error" in run or "stopped" in run:
        entry["error"] = run.get("error") or run["stopped"]
        return entry
    entry["measured"] = {**step_summary(run["records"], args.skip), "wall_s": run["wall_s"]}
    entry["time_split"] = time_split(run_dir, args.skip)
    return entry


def add_ratios(results: list[dict]) -> None:
    """tokens/s of each variant over attention=gqa's, same layout and context."""
    for r in results:
        base = next((g for g in results if g["variant"] == "gqa" and g["layout"] == r["layout"] and g["context"] == r["context"]
                     and "measured" in g), None)
        if base and "measured" in r and r["variant"] != "gqa":
            r["speed_vs_gqa"] = ratio(r["measured"]["tokens_per_s_per_gpu"], base["measured"]["tokens_per_s_per_gpu"])
            r["memory_vs_gqa"] = ratio(r["measured"]["peak_gib"], base["measured"]["peak_gib"])


def goal_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if r["layout"] != "single" or "speed_vs_gqa" not in r:
            continue
        for context, goal in GOALS.get(r["variant"], []):
            if context in (None, r["context"]):
                got = r["speed_vs_gqa"]
                status = "met" if got >= goal else f"missed by {(goal - got) / goal:.0%}"
                lines.append(f"- {r['variant']} >= {goal}x gqa tokens/s at {_k(r['context'])} on one GPU: {got:.2f}x, {status}")
    return lines


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def markdown(results: list[dict], env: dict, command: str) -> str:
    lines = report_header(command, env) + [
        "| layout | context | attention | tokens/s/GPU | vs gqa | TFLOP/s/GPU | MFU | peak GiB (vs gqa) | reserved GiB | step ms "
        "| attention core ms (fwd / bwd) | other attention ms | MLP/MoE ms | rest ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['layout']} | {_k(r['context'])} | {r['variant']} |"
        if "measured" not in r:
            why = r.get("skipped") or f"failed: {r.get('error')}"
            lines.append(head + f" {why} |" + " |" * 10)
            continue
        m, t = r["measured"], r.get("time_split") or {}
        step = t.get("step_s")
        share = lambda key: "n/a" if key not in t else f"{t[key] * 1e3:.1f} ({t[key] / step:.0%})"
        core = "n/a" if "attention_core_s" not in t else (
            f"{share('attention_core_s')} ({t['attention_core_fwd_s'] * 1e3:.1f} / {t['attention_core_bwd_s'] * 1e3:.1f})")
        mem_ratio = f" ({r['memory_vs_gqa']:.2f}x)" if r.get("memory_vs_gqa") else ""
        lines.append(
            head + f" {fmt(m['tokens_per_s_per_gpu'], ',.0f')} | {fmt(r.get('speed_vs_gqa'), '.2f', '')}"
            f"{'x' if r.get('speed_vs_gqa') else ''} | {fmt(m['tflops_per_gpu'], '.1f')} | {fmt(m['mfu'], '.1%')} | "
            f"{fmt(m['peak_gib'], '.2f')}{mem_ratio} | {fmt(m['reserved_gib'], '.2f')} | {m['step_time_s'] * 1e3:.1f} | "
            f"{core} | {share('attention_other_s')} | {share('mlp_s')} | {share('rest_s')} |"
        )
    lines += [
        "",
        "Medians over the timed steps (time split: the median step). vs gqa: tokens/s (memory) of this variant over attention=gqa's, same layout and "
        "context. Time split (ms per step, share of the step; tools/train_timing.py): attention core = the attention "
        "kernels with MSA's top-k and KL, other attention = projections, RoPE, index projections; rest = embedding, "
        "norms, logits and loss, optimizer step, gradient reduction.",
    ]
    goals = goal_lines(results) if "gpu" in env else []
    if goals:
        lines += ["", "Goals (BENCHMARKS.md):", *goals]
    return "\n".join(lines)


def load_previous(path: str, env: dict, fresh: bool) -> list[dict]:
    """Finished cases of an earlier call on the same kind of GPU (the protocol compares only those)."""
    if fresh or not os.path.exists(path):
        return []
    with open(path) as f:
        previous = json.load(f)
    if previous.get("environment", {}).get("gpu") != env.get("gpu"):
        os.replace(path, path.replace(".json", ".replaced.json"))
        print(f"[bench_train] {path} holds results of another device ({previous.get('environment', {}).get('gpu')}): "
              "moved aside, starting over", flush=True)
        return []
    return [r for r in previous.get("results", []) if "measured" in r or "skipped" in r]


def save(out_dir: str, export: str, results: list[dict], env: dict, command: str) -> str:
    add_ratios(results)
    table = markdown(results, env, command)
    for directory in filter(None, {out_dir, export}):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "bench_train.json"), "w") as f:
            json.dump({"command": command, "environment": env, "results": results}, f, indent=1)
        with open(os.path.join(directory, "bench_train.md"), "w") as f:
            f.write(table + "\n")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=1, help="1 (layout single) or 4 (tp2_cp2_ep4); --layouts picks others")
    ap.add_argument("--layouts", nargs="+", default=None, help=f"from {', '.join(LAYOUTS)}")
    ap.add_argument("--contexts", nargs="+", type=int, default=None, help="tokens per sequence (default 16K 32K 64K 128K; 256 with --cpu)")
    ap.add_argument("--variants", nargs="+", default=["gqa", "msa_warmup", "msa_sparse"], help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--layers", type=int, default=1, help="transformer layers of the proxy (each: attention + MoE)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per case (default 11; 4 with --cpu; an odd "
                    "number of timed steps makes every median the same step)")
    ap.add_argument("--skip", type=int, default=None, help="first steps left out of the medians (default 4; 1 with --cpu)")
    ap.add_argument("--microbatches", type=int, default=1, help="micro-batches per step and data-parallel rank")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per case")
    ap.add_argument("--cpu", action="store_true", help="tiny model, gloo, fp32: exercise the tool without GPUs")
    ap.add_argument("--out", default=None, help="work and results directory (default outputs/bench_train)")
    ap.add_argument("--export", default=os.environ.get("OUT"), help="also copy the results here after every case (default $OUT)")
    ap.add_argument("--fresh", action="store_true", help="ignore the results of earlier calls")
    ap.add_argument("--force", action="store_true", help="run cases the planner says do not fit")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every case")
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.cpu else 11)
    args.skip = args.skip if args.skip is not None else (1 if args.cpu else 4)
    args.contexts = args.contexts or ([256] if args.cpu else GPU_CONTEXTS)
    args.layouts = args.layouts or ({1: ["single"], 4: ["tp2_cp2_ep4"]}.get(args.gpus) or [n for n, (g, _) in LAYOUTS.items() if g == args.gpus])
    bad = [n for n in args.layouts if n not in LAYOUTS] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        print(f"bench_train: unknown layout or variant {bad}", file=sys.stderr)
        return 2
    out_dir = args.out or os.path.join(ROOT, "outputs", "bench_train")
    env = environment(args.cpu)
    command = "python tools/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = load_previous(os.path.join(out_dir, "bench_train.json"), env, args.fresh)
    done = {case_id(r["layout"], r["context"], r["variant"]) for r in results}
    for layout in args.layouts:
        for context in sorted(args.contexts):
            for variant in args.variants:
                if case_id(layout, context, variant) in done:
                    print(f"[bench_train] {case_id(layout, context, variant)}: done earlier", flush=True)
                    continue
                print(f"[bench_train] {case_id(layout, context, variant)}: {args.steps} steps on {LAYOUTS[layout][0]} process(es)", flush=True)
                entry = run_case(args, layout, context, variant, out_dir, env.get("gpu_memory_gib"))
                results = [r for r in results if case_id(r["layout"], r["context"], r["variant"]) != case_id(layout, context, variant)]
                results.append(entry)
                results.sort(key=lambda r: (r["layout"], r["context"], list(VARIANTS).index(r["variant"])))
                print(f"[bench_train] {case_id(layout, context, variant)}: "
                      + json.dumps({k: entry[k] for k in ("measured", "time_split", "skipped", "error") if k in entry}), flush=True)
                save(out_dir, args.export, results, env, command)
    print(save(out_dir, args.export, results, env, command))
    return 0 if any("measured" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
