"""tools/quality_study.py: the four arms on the same tokens (tiny CPU form), resuming, and what the
page concludes from the numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.paths import ROOT, readme_tool_args

sys.path.insert(0, os.path.join(ROOT, "tools"))
import quality_study  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "quality_study.py")
README = "## Is it worth it? Training speed and quality"  # the section whose command the tests run


def run_tool(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    paths = ["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--doc", str(tmp_path / "quality.md")]
    cmd = [sys.executable, TOOL, *readme_tool_args(README, "tools/quality_study.py"), "--steps", "4", *paths, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_four_arms_train_the_same_tokens_and_the_study_resumes(tmp_path):
    proc = run_tool(tmp_path, "--export", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {a: json.loads((tmp_path / "results" / f"{a}.json").read_text()) for a in quality_study.ARMS}
    tokens = {a: (r["steps"] + r["step_offset"]) * r["tokens_per_step"] for a, r in results.items()}
    assert len(set(tokens.values())) == 1, tokens
    # MSA-CPT starts from gqa's checkpoint at the conversion step (half the run) and trains the rest
    cpt = results["msa_cpt"]
    assert cpt["step_offset"] == 2 and cpt["steps"] == 2
    source = quality_study.setting(cpt["overrides"], "checkpoint.init_from")
    assert re.fullmatch(re.escape(str(tmp_path / "work")) + r"/gqa-[0-9a-f]{10}/checkpoints/iter_0000002", source), source
    # each arm trained in its own attention, and validated with retrieval accuracy by distance
    assert quality_study.setting(results["local"]["overrides"], "attention") == "local"
    assert quality_study.setting(results["msa_pt"]["overrides"], "stage") == "msa_pt"
    for r in results.values():
        last = r["validation"][-1]
        assert "val/lm_loss" in last and any(k.startswith("val/answer_acc/") for k in last)
    assert any("msa/block_recall" in t for t in results["msa_pt"]["train"])  # MSA arms log recall
    assert not any("msa/block_recall" in t for t in results["gqa"]["train"])
    page = (tmp_path / "quality.md").read_text()
    assert all(label in page for label in quality_study.LABELS.values()) and "Not run yet" not in page
    assert (tmp_path / "results" / "comparison.png").stat().st_size > 0
    assert (tmp_path / "export" / "quality.md").read_text() == page

    again = run_tool(tmp_path)  # every arm's result exists with the same settings: nothing trains
    assert again.returncode == 0 and again.stdout.count("done earlier") == 4, again.stdout[-2000:]
    moved = run_tool(tmp_path, "--work", str(tmp_path / "elsewhere"))  # results made with another --work still count
    assert moved.returncode == 0 and moved.stdout.count("done earlier") == 4, moved.stdout[-2000:]

    changed = run_tool(tmp_path, "--arms", "local", "--", "optim.lr=0.0005")  # other settings: that arm reruns
    assert changed.returncode == 0 and "local: training 4 steps" in changed.stdout, changed.stdout[-2000:]

    stale = tmp_path / "results" / "gqa.json"  # measured by an older validation: reruns, the others stay
    stale.write_text(json.dumps({**results["gqa"], "metrics": quality_study.METRICS - 1}))
    again = run_tool(tmp_path, "--arms", "gqa", "msa_pt")
    assert again.returncode == 0 and "gqa: training 4 steps" in again.stdout and "msa_pt: done earlier" in again.stdout
    assert json.loads(stale.read_text())["metrics"] == quality_study.METRICS


@pytest.mark.slow
def test_parallel_arms_convert_from_the_gqa_run_beside_them(tmp_path):
    """--parallel: msa_cpt waits for the gqa arm's conversion checkpoint instead of training gqa itself."""
    proc = run_tool(tmp_path, "--parallel", "2", "--arms", "gqa", "msa_cpt", "--export", "")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "training gqa to step" not in proc.stdout and proc.stdout.count(": done in") == 2, proc.stdout[-2000:]
    gqa_dirs = list((tmp_path / "work").glob("gqa-*"))
    assert len(gqa_dirs) == 1 and (gqa_dirs[0] / "checkpoints" / "iter_0000002").is_dir()
    cpt = json.loads((tmp_path / "results" / "msa_cpt.json").read_text())
    assert quality_study.setting(cpt["overrides"], "checkpoint.init_from") == str(gqa_dirs[0] / "checkpoints" / "iter_0000002")
    assert "msa_cpt" in (tmp_path / "quality.md").read_text().replace("MSA-CPT", "msa_cpt")


def _record(loss, beyond, near=0.9):
    return {"val/lm_loss": loss, "val/answer_acc": (beyond + near) / 2,
            "val/answer_acc/0-64": near, "val/answer_count/0-64": 10,
            "val/answer_acc/512-1024": beyond, "val/answer_count/512-1024": 10}


def test_retrieval_is_compared_only_when_dense_learned_it():
    learned = {"gqa": _record(1.50, 0.80), "msa_pt": _record(1.51, 0.60), "local": _record(1.52, 0.07)}
    lines = quality_study.summary_lines({}, learned, budget=512)
    assert not any("not learned" in line for line in lines)
    msa = next(line for line in lines if line.startswith("- MSA-PT"))
    assert "0.600 vs 0.800" in msa and "Falls short of dense" in msa  # 0.2 less accuracy past the budget

    # local-only cannot see past the budget: dense no better than it there means nothing was learned
    guessing = {"gqa": _record(1.50, 0.09), "msa_pt": _record(1.501, 0.10), "local": _record(1.51, 0.18)}
    lines = quality_study.summary_lines({}, guessing, budget=512)
    assert "did not learn retrieval past the budget" in lines[1]
    msa = next(line for line in lines if line.startswith("- MSA-PT"))
    assert "answer accuracy" not in msa and "Within 1% LM loss of dense" in msa
    worse = {**guessing, "msa_pt": _record(1.60, 0.10)}
    assert "Falls short of dense" in next(x for x in quality_study.summary_lines({}, worse, 512) if x.startswith("- MSA-PT"))
    better = {**guessing, "local": _record(1.47, 0.18)}  # lower loss is not reported as "within 1%"
    assert "Lower LM loss than dense by 2.0%" in next(x for x in quality_study.summary_lines({}, better, 512) if x.startswith("- local"))


def test_accuracy_within_the_budget_is_reported_for_every_arm():
    arms = {"gqa": _record(1.5, 0.07, near=0.06), "local": _record(1.5, 0.06, near=0.95)}
    first = quality_study.summary_lines({}, arms, budget=512)[0]
    assert "within the budget" in first and "dense GQA 0.060" in first and "local only 0.950" in first
    # a bucket starting at the budget counts past it, not within
    assert quality_study.accuracy_over({**arms["gqa"], "val/answer_acc/512-1024": 1.0}, 512, past=False) == 0.06


def test_settings_compare_the_conversion_source_without_the_work_directory():
    a = ["x=1", "checkpoint.init_from=/tmp/qwb/gqa-d6f793ec23/checkpoints/iter_0000700"]
    b = ["x=1", "checkpoint.init_from=outputs/quality/gqa-d6f793ec23/checkpoints/iter_0000700/"]
    assert quality_study.portable(a) == quality_study.portable(b)
    other_step = ["x=1", "checkpoint.init_from=outputs/quality/gqa-d6f793ec23/checkpoints/iter_0000600"]
    assert quality_study.portable(a) != quality_study.portable(other_step)
    assert quality_study.portable(["x=1", "y=2"]) == ["x=1", "y=2"]


def test_bad_arguments_are_one_line(tmp_path):
    proc = run_tool(tmp_path, "--cpt-at", "1.5")
    assert proc.returncode == 2 and proc.stderr.strip() == "quality_study: --cpt-at=1.5: must be in (0, 1)"
    proc = run_tool(tmp_path, "--parallel", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "quality_study: --parallel=0: must be at least 1"
    proc = subprocess.run([sys.executable, TOOL, "--parallel", "9", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.strip() == "quality_study: --parallel=9: no GPU visible (--cpu runs the tiny study)"
