#!/usr/bin/env python
"""Does MSA learn as well as dense attention? A small model, four ways, the same tokens each.

On data=passkey (long documents of Markov-chain filler with key-value pairs stored and asked back
at distances from a few tokens to the whole document; msa_megatron/data/passkey.py), a small
model trains the same number of tokens as:

    gqa      dense GQA attention throughout
    msa_pt   MSA-PT: dense warmup (dense attention + KL) for --pt-warmup of the run, then sparse
    msa_cpt  MSA-CPT: gqa's checkpoint at --cpt-at of the run, converted with checkpoint.init_from,
             then dense warmup for --cpt-warmup of the rest, then sparse
    local    the local-only baseline: the last k blocks (MSA's block budget), no index branch

and is validated every eighth of the run: LM loss overall and by position in the document, answer
accuracy by distance (val/*), and for MSA the index branch's block and score recall (msa/*).

    python tools/quality_study.py --parallel 4    # GPU: an arm per slot (6 min on 2 H200s, two arms on each), then docs/quality.md
    python tools/quality_study.py                 # one arm after another
    python tools/quality_study.py --deadline-min 9   # stop (saved) before 9 minutes; rerun to continue
    python tools/quality_study.py --cpu --results /tmp/q --doc /tmp/q.md   # tiny CPU version (tests)

Resumable: an arm whose result (<results>/<arm>.json: its overrides, the validation records and
a thinned training curve, a few KB) exists with the same settings is not run again; an arm
stopped at the deadline resumes from its checkpoint in --work/<arm>-<digest of its settings>
(outputs/quality: runs and checkpoints, never in the repository). Each finished arm re-renders
--doc and the PNGs; with --export (default $OUT) the results, PNGs and page are copied there too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from train_runs import ROOT, environment, fmt, launch

import plot_metrics
from msa_megatron.data.passkey import NUM_DIGITS

CHANCE = 1 / NUM_DIGITS  # answer accuracy of a model that knows a digit comes but not which
LEARNED_MARGIN = 0.1  # dense must beat the local-only arm (or chance) past the budget by this to count as retrieval

ARMS = ("gqa", "msa_cpt", "msa_pt", "local")
LABELS = {"gqa": "dense GQA", "msa_pt": "MSA-PT", "msa_cpt": "MSA-CPT", "local": "local only"}

# ~15M parameters: 4 layers, d 512, 8 query / 2 KV heads of 64 with QK-norm (as MiniMax-M3; without
# it the dense arms' loss jumped from 1.74 to 6.7 after the LR warm-up, with it to 2.4), dense FFN 2048. MSA with
# 32-token blocks, 4 kept: a 128-token budget, 1/64 of the 8K sequence like the 109B's 16 x 128 of
# 128K. Passkey: one value digit, 64 pairs per 2K-8K-token document (denser than the data=passkey
# default: with 16 pairs of 4 digits no arm learned anything in 52M tokens); 8 sequences per
# micro-batch (a 15M model is launch-bound at one).
GPU_STUDY = [
    "~recipe", "model=tiny", "model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
    "model.num_query_groups=2", "model.kv_channels=64", "model.ffn_hidden_size=2048", "model.num_moe_experts=null",
    "model.vocab_size=512", "model.max_position_embeddings=8192", "model.transformer_impl=local",
    "attention.block_size=32", "attention.topk_blocks=4", "attention.index_head_dim=64",
    "data=passkey", "data.seq_length=8192", "data.mock_min_doc=2048", "data.mock_max_doc=8192", "data.passkey_pairs=64",
    "data.passkey_digits=1", "data.valid_microbatches=2", "parallel=gpu", "train.precision=bf16",
    "train.micro_batch_size=8", "train.global_batch_size=8", "optim.lr=0.002", "optim.min_lr=0.0002",
    "optim.lr_warmup_steps=50", "train.log_interval=10", "logging=console", "model.qk_layernorm=true",
]
CPU_STUDY = [
    "~recipe", "model=tiny", "model.num_moe_experts=null", "model.vocab_size=512", "attention.block_size=16",
    "attention.topk_blocks=2", "attention.index_head_dim=16", "data=passkey", "data.seq_length=256",
    "data.mock_min_doc=128", "data.mock_max_doc=256", "data.passkey_pairs=6", "data.valid_microbatches=2",
    "parallel=cpu", "train.precision=fp32", "train.micro_batch_size=1", "train.global_batch_size=2",
    "optim.lr_warmup_steps=1", "train.log_interval=1", "logging=console",
]
METRICS = 2  # what validation measures: 2 = arg-max credit shared by ties; results of other versions rerun
TRAIN_POINTS = 200  # training records kept per arm (thinned evenly; recall records all kept)


def setting(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key + "="))


class Study:
    def __init__(self, args):
        self.args = args
        self.base = (CPU_STUDY if args.cpu else GPU_STUDY) + args.extra
        self.steps = args.steps
        self.cpt_at = max(1, round(self.steps * args.cpt_at))
        self.tokens_per_step = int(setting(self.base, "train.global_batch_size")) * int(setting(self.base, "data.seq_length"))
        self.budget = int(setting(self.base, "attention.block_size")) * int(setting(self.base, "attention.topk_blocks"))
        self.eval_interval = max(1, self.steps // 8)
        self.started = time.time()
        self.gqa_running = None  # an Event while this call trains gqa beside msa_cpt (--parallel)

    def run_dir(self, arm: str) -> str:
        """<work>/<arm>-<digest of its settings>: a stopped arm resumes from its own checkpoints, and
        an arm whose settings changed starts in a new directory (the old run is left as it was)."""
        digest = hashlib.sha1("\n".join(self.overrides(arm)).encode()).hexdigest()[:10]
        return os.path.join(self.args.work, f"{arm}-{digest}")

    def overrides(self, arm: str) -> list[str]:
        """The arm's train.py overrides (all but output_dir and the time-limit knobs)."""
        n, every = self.steps, self.eval_interval
        common = self.base + [f"train.eval_interval={every}", "checkpoint.keep_last=1", f"checkpoint.save_interval={max(1, n // 4)}"]
        recall = [f"attention.recall_interval={max(1, n // 16)}"]
        if arm == "gqa":  # keeps its checkpoint at the conversion point for msa_cpt
            return common + ["attention=gqa", f"train.steps={n}", "checkpoint.keep_last=0", f"checkpoint.save_interval={self.cpt_at}"]
        if arm == "local":
            return common + ["attention=local", f"train.steps={n}"]
        if arm == "msa_pt":
            warm = round(n * self.args.pt_warmup) * self.tokens_per_step
            return common + recall + ["attention=msa", "stage=msa_pt", f"stage.warmup_tokens={warm}", f"train.steps={n}"]
        rest = n - self.cpt_at
        warm = round(rest * self.args.cpt_warmup) * self.tokens_per_step
        return common + recall + ["attention=msa", "stage=msa_cpt", f"stage.warmup_tokens={warm}", f"train.steps={rest}",
                                  f"checkpoint.save_interval={max(1, rest // 2)}",
                                  f"checkpoint.init_from={self.conversion_source()}"]

    def conversion_source(self) -> str:
        """gqa's checkpoint at the conversion step: where msa_cpt starts from."""
        return os.path.join(self.run_dir("gqa"), "checkpoints", f"iter_{self.cpt_at:07d}")

    def remaining_s(self):
        if self.args.deadline_min is None:
            return self.args.timeout
        return min(self.args.timeout, self.args.deadline_min * 60 - (time.time() - self.started))

    def train(self, arm: str, overrides: list[str], device=None) -> dict:
        left = self.remaining_s()
        if left < 30:
            return {"stopped": "no time left before --deadline-min"}
        env = None if device is None else {"CUDA_VISIBLE_DEVICES": str(device)}
        return launch(overrides, self.run_dir(arm), gpus=1, timeout=left, cpu=self.args.cpu, env=env)

    def ensure_conversion_source(self, device=None) -> dict:
        """gqa's checkpoint at the conversion step: wait for it while gqa trains beside this arm
        (--parallel), else run gqa up to there if it is not in --work."""
        source = self.conversion_source()
        if self.gqa_running is not None:
            while not os.path.isdir(source) and not self.gqa_running.wait(timeout=2):
                pass
            if not os.path.isdir(source):
                return {"stopped": f"gqa ended before its step-{self.cpt_at} checkpoint (the conversion source)"}
        if os.path.isdir(source):
            return {}
        print(f"[quality] msa_cpt: training gqa to step {self.cpt_at} first (its checkpoint is the conversion source)", flush=True)
        run = self.train("gqa", self.overrides("gqa") + [f"train.exit_interval={self.cpt_at}"], device)
        if "error" in run or "stopped" in run:
            return run
        return {}

    def run_arm(self, arm: str, device=None) -> dict:
        overrides = self.overrides(arm)
        if arm == "msa_cpt":
            problem = self.ensure_conversion_source(device)
            if problem:
                return problem
        where = "" if device is None else f" on GPU {device}"
        print(f"[quality] {arm}: training {setting(overrides, 'train.steps')} steps{where}", flush=True)
        run = self.train(arm, overrides, device)
        if "error" in run or "stopped" in run:
            return run
        train = [r for r in run["records"] if "train/lm_loss" in r]
        valid = [r for r in run["records"] if "val/lm_loss" in r]
        if not train or train[-1]["train/step"] != int(setting(overrides, "train.steps")):
            return {"stopped": f"the run ended at step {train[-1]['train/step'] if train else 0}"}
        return {"arm": arm, "overrides": overrides, "steps": int(setting(overrides, "train.steps")),
                "step_offset": self.cpt_at if arm == "msa_cpt" else 0, "tokens_per_step": self.tokens_per_step,
                "budget": self.budget, "wall_s": run["wall_s"], "validation": valid, "train": thin(train)}


def portable(overrides: list[str]) -> list[str]:
    """The settings without where --work was: msa_cpt's conversion source is compared as
    <gqa run>/checkpoints/<iteration>, so results made on another machine still count."""
    out = []
    for o in overrides:
        if o.startswith("checkpoint.init_from="):
            o = "checkpoint.init_from=" + "/".join(o.split("=", 1)[1].rstrip("/").split("/")[-3:])
        out.append(o)
    return out


def thin(train: list[dict]) -> list[dict]:
    """At most TRAIN_POINTS training records (evenly spread, the last kept), plus every record with
    recall; only the keys the report uses."""
    keep = ("train/step", "train/lm_loss", "train/kl_loss", "msa/stage", "msa/block_recall", "msa/score_recall",
            "train/tokens_per_sec_per_gpu", "train/step_time_s", "mem/max_allocated_gb")
    stride = max(1, len(train) // TRAIN_POINTS)
    picked = [r for i, r in enumerate(train) if i % stride == 0 or i == len(train) - 1 or "msa/block_recall" in r]
    return [{k: r[k] for k in keep if k in r} for r in picked]


# ------------------------------------------------------------------------------------ the page


def accuracy_over(record: dict, budget: int, past: bool = True):
    """Answer accuracy over the distance buckets that start at or past the block budget (past=False:
    the buckets below it, which the local-only arm sees as well as dense)."""
    hits = total = 0
    for key, acc in record.items():
        if key.startswith("val/answer_acc/"):
            lo = int(key.rsplit("/", 1)[1].split("-")[0])
            count = record.get(key.replace("answer_acc", "answer_count"), 0)
            if (lo >= budget) == past:
                hits, total = hits + acc * count, total + count
    return hits / total if total else None



def render(results: dict, env: dict, command: str, budget: int, png: str, doc_dir: str) -> str:
    arms = [a for a in ARMS if a in results]
    last = {a: results[a]["validation"][-1] if results[a]["validation"] else {} for a in arms}
    ran = sorted({results[a].get("command", command) for a in arms})
    env = next((results[a]["environment"] for a in arms if results[a].get("environment")), env)
    lines = [
        "# Quality study: MSA vs dense attention on long-range retrieval",
        "",
        f"Page rendered by `{command}` from the arms' results (`{os.path.basename(os.path.dirname(png))}/<arm>.json`: "
        "settings, validation records, training curve). The arms ran with " + ", ".join(f"`{c}`" for c in ran) + ". "
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "Every arm trains the same number of tokens on data=passkey: long documents of Markov-chain filler with "
        "key-value pairs stored and asked back at log-uniform distances (msa_megatron/data/passkey.py). "
        f"MSA keeps {budget} tokens per query (k x Bk); `local only` attends the same budget of most recent blocks. "
        "Answer accuracy: the stored value's tokens are the arg-max prediction after the ASK (teacher forcing).",
        "",
        "## Last validation",
        "",
        "| arm | tokens | val LM loss | answer accuracy | answers past the budget | answer loss | val KL | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        r, v = results[a], last[a]
        tokens = (r["steps"] + r["step_offset"]) * r["tokens_per_step"]
        lines.append(f"| {LABELS[a]} | {tokens / 1e6:.1f}M | {fmt(v.get('val/lm_loss'), '.4f')} | {fmt(v.get('val/answer_acc'))} | "
                     f"{fmt(accuracy_over(v, budget))} | {fmt(v.get('val/answer_loss'))} | {fmt(v.get('val/kl_loss'), '.4f')} | "
                     f"{r['wall_s']:.0f} |")
    for title, prefix in (("Answer accuracy by distance (tokens back to the stored value)", "val/answer_acc"),
                          ("Validation LM loss by position in the document", "val/lm_loss_by_pos")):
        edges = sorted({e for a in arms for e in plot_metrics.buckets(last[a], prefix)[0]})
        if not edges:
            continue
        lines += ["", f"## {title}", "", "| arm | " + " | ".join(f"{lo}-{hi}" for lo, hi in edges) + " |",
                  "|---|" + "---|" * len(edges)]
        for a in arms:
            got = dict(zip(*plot_metrics.buckets(last[a], prefix)))
            lines.append(f"| {LABELS[a]} | " + " | ".join(fmt(got.get(e)) for e in edges) + " |")
        if prefix == "val/answer_acc":
            counts = dict(zip(*plot_metrics.buckets(last[arms[0]], "val/answer_count")))
            lines.append("| answers per bucket | " + " | ".join(str(int(counts.get(e, 0))) for e in edges) + " |")
            lines.append(f"| chance (1/{NUM_DIGITS}) | " + " | ".join(f"{CHANCE:.3f}" for _ in edges) + " |")
    recall_arms = [a for a in arms if any("msa/block_recall" in r for r in results[a]["train"])]
    if recall_arms:
        lines += ["", "## Index branch recall (MSA.md diagnostics, sampled queries)", "",
                  "| arm | block recall, last | score recall, last | block recall, mean over the sparse stage | score recall, mean |",
                  "|---|---|---|---|---|"]
        for a in recall_arms:
            rec = [r for r in results[a]["train"] if "msa/block_recall" in r]
            sparse = [r for r in rec if r.get("msa/stage") == 1] or rec
            mean = lambda key: sum(r[key] for r in sparse) / len(sparse)
            lines.append(f"| {LABELS[a]} | {fmt(rec[-1]['msa/block_recall'])} | {fmt(rec[-1]['msa/score_recall'])} | "
                         f"{fmt(mean('msa/block_recall'))} | {fmt(mean('msa/score_recall'))} |")
    notes = sorted({n for a in arms for n in results[a].get("notes", [])})
    if notes:
        lines += ["", "## Notes on these results", "", *(f"- {n}" for n in notes)]
    lines += ["", "## What the numbers show", "", *summary_lines(results, last, budget)]
    lines += ["", f"![validation loss, accuracy by distance, loss by position, recall]({os.path.relpath(png, doc_dir)})"]
    missing = [a for a in ARMS if a not in results]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (rerun the command to continue)."]
    return "\n".join(lines) + "\n"


def retrieval_learned(last: dict, budget: int):
    """(learned?, dense's accuracy past the budget, the floor it is compared with). The floor is the
    local-only arm's accuracy past the budget (it cannot see that far back) when it ran, else chance."""
    dense = accuracy_over(last["gqa"], budget)
    floor = accuracy_over(last["local"], budget) if "local" in last else None
    floor = CHANCE if floor is None else max(floor, CHANCE)
    return dense is not None and dense > floor + LEARNED_MARGIN, dense, floor


def summary_lines(results: dict, last: dict, budget: int) -> list[str]:
    """Plain comparisons against dense GQA, generated from the table above. Retrieval accuracy is
    compared only when dense attention learned the task (see retrieval_learned)."""
    if "gqa" not in last:
        return ["- dense GQA has not run yet: nothing to compare against."]
    base = last["gqa"]
    learned, dense_acc, floor = retrieval_learned(last, budget)
    near = [(LABELS[a], accuracy_over(last[a], budget, past=False)) for a in ARMS if a in last]
    out = ["- Answer accuracy within the budget (distances below " + str(budget) + ", which every arm can see): "
           + ", ".join(f"{name} {fmt(acc)}" for name, acc in near) + f" (chance {fmt(CHANCE)})."]
    if not learned:
        out.append(f"- **Dense GQA did not learn retrieval past the budget**: past the {budget}-token budget it answers "
                   f"{fmt(dense_acc)} of the value tokens, not {LEARNED_MARGIN} or more above {fmt(floor)} (the local-only "
                   f"arm, which cannot see that far back, or chance = 1/{NUM_DIGITS}). The accuracy columns past the budget "
                   "then measure guessing, not long-range attention, and say nothing about MSA vs dense there.")
    for a in (x for x in ARMS if x in last and x != "gqa"):
        v = last[a]
        loss, base_loss = v.get("val/lm_loss"), base.get("val/lm_loss")
        acc, base_acc = accuracy_over(v, budget), accuracy_over(base, budget)
        parts = []
        if loss is not None and base_loss:
            parts.append(f"validation LM loss {loss:.4f} vs {base_loss:.4f} ({(loss - base_loss) / base_loss:+.1%})")
        if learned and acc is not None and base_acc is not None:
            parts.append(f"answer accuracy past the {budget}-token budget {acc:.3f} vs {base_acc:.3f} ({acc - base_acc:+.3f})")
        verdict = ""
        if loss is not None and base_loss:
            change = (loss - base_loss) / base_loss
            short = change > 0.01 or (learned and acc is not None and acc < base_acc - 0.05)
            verdict = " Falls short of dense." if short else (
                f" Lower LM loss than dense by {-change:.1%}." if change < -0.01 else
                " Within 1% loss and 0.05 retrieval accuracy of dense." if learned else " Within 1% LM loss of dense.")
        out.append(f"- {LABELS[a]} vs dense GQA: " + "; ".join(parts) + "." + verdict)
    return out


def write_outputs(study: Study, results: dict, env: dict, command: str) -> None:
    args = study.args
    os.makedirs(args.results, exist_ok=True)
    png = os.path.join(args.results, "comparison.png")
    runs = [{"name": LABELS[a], "train": results[a]["train"], "valid": results[a]["validation"],
             "step_offset": results[a]["step_offset"], "tokens_per_step": results[a]["tokens_per_step"]}
            for a in ARMS if a in results]
    if runs:
        plot_metrics.plot_comparison(runs, png, budget=study.budget, title="quality study: " + ", ".join(r["name"] for r in runs))
        for a in results:
            if results[a]["train"]:
                plot_metrics.plot(results[a]["train"], results[a]["validation"], os.path.join(args.results, f"{a}.png"), LABELS[a])
    doc_dir = os.path.dirname(os.path.abspath(args.doc))
    with open(args.doc, "w") as f:
        f.write(render(results, env, command, study.budget, png, doc_dir))
    if args.export:
        shutil.copytree(args.results, os.path.join(args.export, os.path.basename(args.results.rstrip("/"))), dirs_exist_ok=True)
        shutil.copy(args.doc, args.export)


def load_results(directory: str) -> dict:
    out = {}
    for arm in ARMS:
        path = os.path.join(directory, f"{arm}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[arm] = json.load(f)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--steps", type=int, default=None, help="training steps of a full arm (default 1400; 8 with --cpu)")
    ap.add_argument("--cpt-at", type=float, default=0.5, help="fraction of the run trained dense before the MSA-CPT conversion")
    ap.add_argument("--pt-warmup", type=float, default=0.2, help="MSA-PT: fraction of the run in the dense warmup")
    ap.add_argument("--cpt-warmup", type=float, default=0.2, help="MSA-CPT: fraction of its MSA part in the dense warmup")
    ap.add_argument("--deadline-min", type=float, default=None, help="stop (with a checkpoint) before this many minutes")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per arm at most")
    ap.add_argument("--parallel", type=int, default=1, help="arms trained at once, slot i on GPU i (i mod the GPU count)")
    ap.add_argument("--cpu", action="store_true", help="tiny model on CPU: exercise the study in seconds")
    ap.add_argument("--work", default=None, help="runs and checkpoints (default outputs/quality, outputs/quality_cpu with --cpu)")
    ap.add_argument("--results", default=None, help="arm results and PNGs (default docs/quality; outputs/quality_cpu/results with --cpu)")
    ap.add_argument("--doc", default=None, help="the page (default docs/quality.md; outputs/quality_cpu/quality.md with --cpu)")
    ap.add_argument("--export", default=os.environ.get("OUT"), help="also copy results and page here (default $OUT)")
    ap.add_argument("--render-only", action="store_true", help="only re-render the page and plots from the results")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every arm (part of each arm's settings)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (8 if args.cpu else 1400)
    scratch = os.path.join(ROOT, "outputs", "quality_cpu" if args.cpu else "quality")
    args.work = args.work or scratch
    args.results = args.results or (os.path.join(scratch, "results") if args.cpu else os.path.join(ROOT, "docs", "quality"))
    args.doc = args.doc or (os.path.join(scratch, "quality.md") if args.cpu else os.path.join(ROOT, "docs", "quality.md"))
    if not 0 < args.cpt_at < 1:
        print(f"quality_study: --cpt-at={args.cpt_at}: must be in (0, 1)", file=sys.stderr)
        return 2
    if args.parallel < 1:
        print(f"quality_study: --parallel={args.parallel}: must be at least 1", file=sys.stderr)
        return 2
    if not args.cpu and not args.render_only:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            print(f"quality_study: --parallel={args.parallel}: no GPU visible (--cpu runs the tiny study)", file=sys.stderr)
            return 2
        if args.parallel > gpus:  # the study's 15M model leaves most of a GPU idle: arms share
            print(f"[quality] --parallel={args.parallel} on {gpus} GPU(s): arm slot i runs on GPU i % {gpus}", flush=True)
        args.gpus = gpus
    env = environment(args.cpu)
    study = Study(args)
    command = "python tools/quality_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = load_results(args.results)
    pending = []
    for arm in [] if args.render_only else args.arms:
        if arm in results and portable(results[arm]["overrides"]) == portable(study.overrides(arm)) and results[arm].get("metrics") == METRICS:
            print(f"[quality] {arm}: done earlier ({args.results}/{arm}.json)", flush=True)
            continue
        results.pop(arm, None)  # other settings or an older validation: run it again
        pending.append(arm)
    stopped = []  # arms that failed or stopped
    lock = threading.Lock()

    def finish(arm: str, outcome: dict) -> str:
        """Record an arm's outcome: "done", "error" or "stopped" (time limit)."""
        if "error" in outcome or "stopped" in outcome:
            why = f"failed: {outcome['error']} (log: {study.run_dir(arm)}/log.txt)" if "error" in outcome else (
                f"stopped: {outcome['stopped']}; rerun the same command to continue")
            print(f"[quality] {arm} {why}", flush=True)
            stopped.append(arm)
            return "error" if "error" in outcome else "stopped"
        outcome["environment"], outcome["command"], outcome["metrics"] = env, command, METRICS
        with lock:
            with open(_mkdir_file(args.results, arm), "w") as f:
                json.dump(outcome, f, indent=None, separators=(",", ":"))
            results[arm] = outcome
            print(f"[quality] {arm}: done in {outcome['wall_s']:.0f} s", flush=True)
            write_outputs(study, results, env, command)
        return "done"

    todo = [] if args.render_only else pending
    if args.parallel > 1 and len(todo) > 1:
        run_parallel(study, todo, args.parallel, finish)
    else:
        for arm in todo:
            if finish(arm, study.run_arm(arm)) == "stopped":
                break  # out of time: the next arms would stop too
    write_outputs(study, results, env, command)
    done = all(a in results for a in args.arms)
    print(f"[quality] {'all arms done' if done else 'not finished'}: {args.doc}", flush=True)
    return 0 if done else (3 if stopped else 1)


def run_parallel(study: Study, arms: list, slots: int, finish) -> None:
    """Train up to `slots` arms at once, slot i on GPU i mod the GPU count (none with --cpu);
    msa_cpt goes last and, while gqa trains beside it, waits for gqa's conversion checkpoint
    instead of training gqa itself."""
    order = sorted(arms, key=lambda a: a == "msa_cpt")
    free = list(range(slots))
    free_lock = threading.Lock()
    if "gqa" in order and "msa_cpt" in order:
        study.gqa_running = threading.Event()

    def work(arm):
        with free_lock:
            slot = free.pop(0)
        try:
            finish(arm, study.run_arm(arm, None if study.args.cpu else slot % study.args.gpus))
        except Exception as e:  # noqa: BLE001 - one arm's crash must not hide the others' results
            finish(arm, {"error": f"{type(e).__name__}: {e}"})
        finally:
            if arm == "gqa" and study.gqa_running is not None:
                study.gqa_running.set()
            with free_lock:
                free.append(slot)

    with ThreadPoolExecutor(max_workers=slots) as pool:
        list(pool.map(work, order))


def _mkdir_file(directory: str, arm: str) -> str:
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{arm}.json")


if __name__ == "__main__":
    sys.exit(main())
