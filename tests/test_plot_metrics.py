"""tools/plot_metrics.py: a PNG of a run's metrics.jsonl with the stage switch marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import plot_metrics  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "plot_metrics.py")


def write_metrics(path, steps=8, switch=5, layers=3):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            r = {"train/step": step, "train/lm_loss": 8 - step / 4, "train/kl_loss": 1 / step, "msa/stage": int(step >= switch)}
            r.update({f"msa/kl_loss/layer_{i:02d}": i / step for i in range(1, layers + 1)})
            if step % 2 == 0:
                r.update({"msa/block_recall": 0.5, "msa/score_recall": 0.8})
            f.write(json.dumps(r) + "\n")
            if step % 4 == 0:
                f.write(json.dumps({"train/step": step, "val/lm_loss": 7.0, "val/kl_loss": 0.5}) + "\n")


def test_plot_marks_the_stage_switch(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    train, valid = plot_metrics.load(str(tmp_path / "metrics.jsonl"))
    assert plot_metrics.stage_switch_step(train) == 5 and [r["train/step"] for r in valid] == [4, 8]
    lm, kl, per_layer, recall = plot_metrics.plot(train, valid, str(tmp_path / "m.png"))
    for ax in (lm, kl, per_layer, recall):
        switch_lines = [line for line in ax.lines if line.get_label() == "sparse stage from here"]
        assert len(switch_lines) == 1 and list(switch_lines[0].get_xdata()) == [5, 5]
    assert [line.get_label() for line in per_layer.lines][:3] == ["layer 1", "layer 2", "layer 3"]
    assert list(lm.lines[1].get_xdata()) == [4, 8]  # validation points
    assert list(recall.lines[0].get_xdata()) == [2, 4, 6, 8]


def test_the_readme_command(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", switch=100)  # dense only: no switch line
    out = tmp_path / "metrics.png"
    proc = subprocess.run([sys.executable, TOOL, str(tmp_path / "metrics.jsonl"), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "stage switch at step None" in proc.stdout
    proc = subprocess.run([sys.executable, TOOL, str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"plot_metrics: {tmp_path / 'missing.jsonl'}: No such file or directory"
