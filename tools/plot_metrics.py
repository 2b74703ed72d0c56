"""Plot a run's metrics.jsonl: LM loss, mean and per-layer KL, recall, with the stage switch marked.

    python tools/plot_metrics.py outputs/tiny-msa-msa_pt/metrics.jsonl -o metrics.png

`plot_comparison` draws several runs side by side (tools/quality_study.py): validation loss,
answer accuracy by distance, loss by position, recall.

Panels: LM loss (training, and validation when logged), mean KL over MSA layers, KL per layer,
and block / score recall when `attention.recall_interval` logged them. A dashed line marks the
first step trained in the sparse stage.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402

LAYER_KEY = re.compile(r"^msa/kl_loss/layer_(\d+)$")


def fail(message: str):
    print(f"plot_metrics: {message}", file=sys.stderr)
    sys.exit(2)


def load(path: str) -> tuple[list[dict], list[dict]]:
    """(training records, validation records), each sorted by step."""
    train, valid = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                fail(f"{path}:{number}: not a JSON record")
            if "train/lm_loss" in record:
                train.append(record)
            elif "val/lm_loss" in record:
                valid.append(record)
    if not train:
        fail(f"{path}: no training records")
    key = lambda r: r["train/step"]
    return sorted(train, key=key), sorted(valid, key=key)


def stage_switch_step(train: list[dict]):
    """The first step trained in the sparse stage (msa/stage 1) after a dense one, or None."""
    previous = None
    for r in train:
        stage = r.get("msa/stage")
        if previous == 0 and stage == 1:
            return r["train/step"]
        previous = stage
    return None


def series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["train/step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(train: list[dict], valid: list[dict], out: str, title: str = "") -> list:
    """Write the figure to `out`; returns its axes (for tests)."""
    layers = sorted({int(m.group(1)) for r in train for k in r if (m := LAYER_KEY.match(k))})
    has_recall = any("msa/block_recall" in r for r in train)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    lm, kl, per_layer, recall = axes.flat

    lm.plot(*series(train, "train/lm_loss"), label="train")
    if valid:
        lm.plot(*series(valid, "val/lm_loss"), "o-", label="validation")
    lm.set_title("LM loss")
    kl.plot(*series(train, "train/kl_loss"), label="train (mean over MSA layers)")
    if valid:
        kl.plot(*series(valid, "val/kl_loss"), "o-", label="validation")
    kl.set_title("KL loss (index branch vs main attention)")
    kl.set_yscale("log")
    for layer in layers:
        per_layer.plot(*series(train, f"msa/kl_loss/layer_{layer:02d}"), label=f"layer {layer}")
    per_layer.set_title("KL loss per layer")
    per_layer.set_yscale("log")
    if has_recall:
        recall.plot(*series(train, "msa/block_recall"), "o-", label="block recall")
        recall.plot(*series(train, "msa/score_recall"), "o-", label="score recall")
        recall.set_ylim(0, 1.05)
        recall.set_title("Top-k recall of the main attention's blocks")
    else:
        recall.set_title("Recall (not logged: attention.recall_interval=0)")

    switch = stage_switch_step(train)
    for ax in axes.flat:
        if switch is not None:
            ax.axvline(switch, color="gray", linestyle="--", linewidth=1, label="sparse stage from here")
        if ax.lines:
            ax.legend(fontsize=8, ncol=1 if len(ax.lines) < 6 else 2)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title or "msa-megatron training")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(axes.flat)


# ------------------------------------------------------------------ several runs side by side


def buckets(record: dict, prefix: str) -> tuple[list, list]:
    """(bucket [lo, hi) pairs, values) of the keys `<prefix>/<lo>-<hi>` of a record, by lo."""
    found = []
    for key, value in record.items():
        if key.startswith(prefix + "/") and value is not None:
            lo, hi = key[len(prefix) + 1:].split("-")
            found.append(((int(lo), int(hi)), value))
    found.sort()
    return [b for b, _ in found], [v for _, v in found]


def _centres(edges: list) -> list:
    """Geometric centre of each bucket (the first one, from 0, at half its upper edge)."""
    return [((lo * hi) ** 0.5) if lo > 0 else hi / 2 for lo, hi in edges]


def plot_comparison(runs: list[dict], out: str, budget=None, title: str = "") -> list:
    """Compare runs on one figure; returns its axes. Each run: {"name", "train", "valid" (records),
    "step_offset" (steps trained before this run's step 1, e.g. the dense part of a conversion),
    "tokens_per_step"}. Panels: validation LM loss over tokens, answer accuracy by distance and
    LM loss by position at the last validation, block and score recall over tokens. `budget`
    (k * Bk tokens) is marked on the distance and position axes."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    loss, accuracy, by_pos, recall = axes.flat
    tokens = lambda run, step: (step + run.get("step_offset", 0)) * run["tokens_per_step"] / 1e6
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps, values = series(run["valid"], "val/lm_loss")
        loss.plot([tokens(run, s) for s in steps], values, "o-", color=color, label=run["name"], markersize=3)
        last = run["valid"][-1] if run["valid"] else {}
        edges, acc = buckets(last, "val/answer_acc")
        if edges:
            accuracy.plot(_centres(edges), acc, "o-", color=color, label=run["name"])
        edges, pos_loss = buckets(last, "val/lm_loss_by_pos")
        if edges:
            by_pos.plot(_centres(edges), pos_loss, "o-", color=color, label=run["name"])
        for key, style in (("msa/block_recall", "o-"), ("msa/score_recall", "s--")):
            steps, values = series(run["train"], key)
            if steps:
                label = f"{run['name']} {key.split('/')[1].split('_')[0]}"
                recall.plot([tokens(run, s) for s in steps], values, style, color=color, label=label, markersize=3)
    loss.set_title("validation LM loss")
    loss.set_xlabel("tokens trained (M)")
    accuracy.set_title("answer accuracy by distance (last validation)")
    accuracy.set_xlabel("distance back to the stored value (tokens)")
    accuracy.set_ylim(-0.02, 1.02)
    by_pos.set_title("validation LM loss by position in the document (last validation)")
    by_pos.set_xlabel("position (tokens)")
    recall.set_title("index top-k recall of the main attention's blocks")
    recall.set_xlabel("tokens trained (M)")
    recall.set_ylim(0, 1.05)
    for ax in (accuracy, by_pos):
        ax.set_xscale("log", base=2)
        if budget:
            ax.axvline(budget, color="gray", linestyle="--", linewidth=1, label=f"block budget k x Bk = {budget}")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "quality study")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return list(axes.flat)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="metrics.jsonl of a run (outputs/<name>/metrics.jsonl)")
    p.add_argument("-o", "--output", default="metrics.png", help="PNG to write (default: metrics.png)")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    try:
        train, valid = load(args.metrics)
    except OSError as e:
        fail(f"{args.metrics}: {e.strerror}")
    plot(train, valid, args.output, args.title)
    print(f"plot_metrics: wrote {args.output} ({len(train)} steps, stage switch at step {stage_switch_step(train)})")


if __name__ == "__main__":
    main()
