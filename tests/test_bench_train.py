"""tools/bench_train.py (whole training steps, MSA vs dense) in its tiny CPU form, and the GPU cases' configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT, readme_tool_args

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_train  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "bench_train.py")
README = "## Is it worth it? Training speed and quality"  # the section whose command the tests run


def run_tool(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cpu_run_reports_speed_ratios_and_the_time_split(tmp_path):
    proc = run_tool(*readme_tool_args(README, "tools/bench_train.py"), "--out", str(tmp_path / "out"), "--export", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench_train.json").read_text())
    assert (tmp_path / "export" / "bench_train.json").read_text() == (tmp_path / "out" / "bench_train.json").read_text()
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"gqa", "msa_warmup", "msa_sparse"}
    gqa = results["gqa"]["measured"]["tokens_per_s_per_gpu"]
    for name, r in results.items():
        m, t = r["measured"], r["time_split"]
        assert m["steps_timed"] == 3 and m["tokens_per_s_per_gpu"] == pytest.approx(256 / m["step_time_s"], rel=1e-6)
        assert m["tflops_per_gpu"] > 0
        assert 0 < t["attention_core_s"] and t["attention_other_s"] >= 0 and t["mlp_s"] > 0 and t["rest_s"] >= 0
        assert t["attention_core_s"] == pytest.approx(t["attention_core_fwd_s"] + t["attention_core_bwd_s"])
        assert t["attention_core_bwd_s"] > 0  # the backward clock ran
        if name != "gqa":
            assert r["speed_vs_gqa"] == pytest.approx(m["tokens_per_s_per_gpu"] / gqa, abs=1e-3)
    # each run trained in its own attention: the sparse stage from step 1, the dense warmup throughout
    stage = lambda v: {json.loads(line)["msa/stage_name"] for line in open(tmp_path / "out" / "runs" / f"single-256-{v}" / "metrics.jsonl")}
    assert stage("msa_sparse") == {"sparse"} and stage("msa_warmup") == {"dense"} and stage("gqa") == {"gqa"}
    table = (tmp_path / "out" / "bench_train.md").read_text()
    assert "| single | 256 | msa_sparse |" in table and "| single | 256 | gqa |" in table

    again = run_tool("--cpu", "--out", str(tmp_path / "out"), "--export", str(tmp_path / "export"))  # resumes: nothing left to run
    assert again.returncode == 0 and again.stdout.count("done earlier") == 3, again.stdout[-2000:]
    assert json.loads((tmp_path / "out" / "bench_train.json").read_text())["results"] == report["results"]


@pytest.mark.parametrize("gpus,layout", [(1, "single"), (4, "tp2_cp2_ep4")])
def test_the_gpu_cases_are_valid_layouts_that_the_planner_fits_on_an_h100(gpus, layout):
    """What the next GPU session runs must not fail on a config error or run out of memory by plan."""
    from msa_megatron.config import validate

    class Args:
        cpu, layers, steps, microbatches, extra = False, 1, 11, 1, []

    for context in bench_train.GPU_CONTEXTS:
        for variant in ("gqa", "msa_warmup", "msa_sparse"):
            overrides = bench_train.overrides_for(Args, layout, context, variant)
            cfg = bench_train.compose(overrides)
            validate(cfg, world_size=gpus)
            assert cfg.model.hidden_size == 3072 and cfg.model.num_attention_heads == 64 and cfg.model.num_query_groups == 4
            assert (cfg.attention.block_size, cfg.attention.topk_blocks, cfg.data.seq_length) == (128, 16, context)
            plan = bench_train.planned(overrides, 79.1)  # what an H100 reports
            assert plan["fits"], (layout, context, variant, plan)
