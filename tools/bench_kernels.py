#!/usr/bin/env python
"""Benchmark the MSA Triton kernels against dense attention and naive selection (one GPU).

Shapes (BENCHMARKS.md): Hq 64, Hkv 4, d = di = 128, Bk 128, k 16, bf16; contexts 8K..128K; a
single-document batch and a packed batch (a few long documents plus many short ones). Before
timing, the ops are compared with the float64 reference at the check size. Prints every issue-11
target as met / missed by X%.

    python3 tools/bench_kernels.py --autotune 32768:select,fwd,bwd,kl,dense_kl --autotune 131072:dqi_sum \
        --contexts 32768,65536,131072 --out $OUT/kernels.json --md $OUT/kernels.md
                                   # the published run: pick launch configs, check, time all
    python3 tools/bench_kernels.py --contexts 32768 --tune     # variants + register/spill report
    python3 tools/bench_kernels.py --contexts 32768 --ablate   # the sparse backward with parts left out
    python3 tools/bench_kernels.py --from-json docs/bench_kernels.json --docs docs/benchmarks.md
                                   # re-render the "Kernels" section of docs/benchmarks.md (no GPU)

Modules: tools/bench/ (common: inputs, FLOPs, timer; baselines; check; cases; tune; ablate; report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.bench.report import markdown, write_docs  # noqa: E402
from tools.bench.tune import FAMILIES  # noqa: E402

KINDS = ("single", "packed")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--kinds", default="single,packed")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--md", default=None, help="write the Kernels markdown section here")
    ap.add_argument("--docs", default=None, help="replace the Kernels section of this markdown file")
    ap.add_argument("--from-json", default=None, help="only render markdown from a results file")
    ap.add_argument("--check-size", type=int, default=4096, help="context of the reference check (0: skip)")
    ap.add_argument("--flex", action="store_true", help="also time flex_attention with the selection as mask")
    ap.add_argument("--flex-max", type=int, default=16384)
    ap.add_argument("--flash-max", type=int, default=32768)
    ap.add_argument("--triton-dense-max", type=int, default=32768, help="largest context for the Triton dense baseline")
    ap.add_argument("--recall-queries", type=int, default=1024)
    ap.add_argument("--warmup-only", action="store_true", help="time only the dense warm-up layer and cuDNN dense")
    ap.add_argument("--tune", action="store_true", help="time launch-config variants at the first context")
    ap.add_argument("--ablate", action="store_true",
                    help="time the sparse backward with parts of its kernel left out (tools/bench/ablate.py) at the "
                         "first context")
    ap.add_argument("--autotune", action="append", default=[], metavar="N[:FAMILIES]",
                    help="before the benchmark, time variants at context N and keep the fastest (FAMILIES: "
                         "comma-separated, default --tune-families); may repeat, e.g. 32768 131072:dqi_sum")
    ap.add_argument("--tune-families", default=",".join(FAMILIES))
    return ap.parse_args()


def fail(message):
    """A user error: one line on stderr, exit code 2."""
    print(f"bench_kernels: {message}", file=sys.stderr)
    sys.exit(2)


def _contexts(value, flag):
    """Positive token counts from 'N,N,...' (flag names the argument in the error)."""
    try:
        out = [int(c) for c in value.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        fail(f"{flag}: expected comma-separated positive token counts, e.g. 32768,131072")
    return out


def _families(value, flag):
    fams = tuple(value.split(","))
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        fail(f"{flag}: unknown tuning family {','.join(unknown)} (known: {','.join(FAMILIES)})")
    return fams


def checked(args):
    """(contexts, kinds, families, [(context, families)] to autotune) from valid arguments, else fail()."""
    contexts = _contexts(args.contexts, f"--contexts={args.contexts}")
    kinds = args.kinds.split(",")
    if any(k not in KINDS for k in kinds):
        fail(f"--kinds={args.kinds}: expected a comma-separated subset of {','.join(KINDS)}")
    families = _families(args.tune_families, f"--tune-families={args.tune_families}")
    autotune = []
    for spec in args.autotune:
        n, _, fams = spec.partition(":")
        ctx = _contexts(n, f"--autotune={spec}")
        if len(ctx) != 1:
            fail(f"--autotune={spec}: one context per flag (repeat --autotune for more)")
        autotune.append((ctx[0], _families(fams, f"--autotune={spec}") if fams else families))
    if args.ablate and contexts[0] % 1024:  # its contiguous-rows variant reads 1024 rows from each chunk's start
        fail(f"--ablate: the first of --contexts={args.contexts} must be a multiple of 1024 tokens")
    return contexts, kinds, families, autotune


def main():
    args = parse_args()
    if args.from_json:
        if not os.path.isfile(args.from_json):
            fail(f"--from-json={args.from_json}: no such file")
        results = json.load(open(args.from_json))
        md = markdown(results)
        if args.docs:
            write_docs(md, args.docs)
        print(md)
        return
    contexts, kinds, families, autotune = checked(args)

    import torch

    if not torch.cuda.is_available():
        fail("no CUDA GPU visible: the kernel benchmark times GPU kernels (--from-json renders saved results on any machine)")

    from msa_megatron.ops import reference as ref
    from msa_megatron.ops import triton as tri
    from tools.bench.cases import run_case
    from tools.bench.check import check_case
    from tools.bench.common import env_info, make_inputs, mixed_lengths, shape_of
    from tools.bench.tune import chosen_configs, kernel_resources, tune

    def report(s):
        print(s, flush=True)

    results = {"env": env_info(), "rows": [], "checks": {}, "tune": []}
    report(json.dumps(results["env"]))

    def save():
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)

    if args.ablate:
        from tools.bench.ablate import ablate

        results["ablation"] = ablate(contexts[0], report)
        save()
        return
    if args.tune:
        results["tune"] = tune(contexts[0], tri, report, families=families)
        results["resources"] = kernel_resources(report)
        save()
        return
    for n, fams in autotune:
        results["tune"] += tune(n, tri, report, families=fams)
        torch.cuda.empty_cache()
    results["config"] = chosen_configs()
    if args.check_size:
        for kind in kinds:
            lengths = [args.check_size] if kind == "single" else mixed_lengths(args.check_size, seed=3)
            ok, errs = check_case(make_inputs(lengths, seed=4), shape_of(lengths), tri, ref, report)
            results["checks"][f"{kind} {args.check_size // 1024}K"] = errs
            torch.cuda.empty_cache()
            if not ok:
                report("reference check FAILED: not timing")
                save()
                sys.exit(1)
    for n in contexts:
        for kind in kinds:
            results["rows"] += run_case(n, kind, args, tri, report)
            save()
    results["resources"] = kernel_resources(lambda s: None)  # registers / spills of what ran
    save()
    md = markdown(results)
    if args.md:
        open(args.md, "w").write(md)
    if args.docs:
        write_docs(md, args.docs)
    print(md)


if __name__ == "__main__":
    main()
