"""tools/bench_kernels.py on a machine without a GPU: its argument and environment errors, and the
published Kernels section re-rendered from the committed results (the timing itself is GPU-only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.paths import ROOT, readme_tool_args

TOOL = os.path.join(ROOT, "tools", "bench_kernels.py")


def run_tool(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_readme_command_without_a_gpu_is_one_line_exit_2():
    proc = run_tool(*readme_tool_args("## On GPUs", "tools/bench_kernels.py"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,named", [
    (["--autotune", "32768:nope"], "--autotune=32768:nope"),
    (["--autotune", "32768,65536"], "--autotune=32768,65536"),
    (["--contexts", "32K"], "--contexts=32K"),
    (["--kinds", "single,mixed"], "--kinds=single,mixed"),
    (["--tune-families", "fwd,kl2"], "--tune-families=fwd,kl2"),
    (["--from-json", "no/such.json"], "--from-json=no/such.json"),
    (["--ablate", "--contexts", "1000"], "--contexts=1000"),
])
def test_bad_arguments_are_one_line_exit_2(args, named):
    proc = run_tool(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr


def test_published_kernels_section_is_the_committed_results_rendered(tmp_path):
    """docs/benchmarks.md's Kernels section == docs/bench_kernels.json rendered; --docs rewrites only
    that section (the rest of the file, here a copy, is kept byte for byte)."""
    doc = tmp_path / "benchmarks.md"
    shutil.copy(os.path.join(ROOT, "docs", "benchmarks.md"), doc)
    before = doc.read_text()
    proc = run_tool("--from-json", os.path.join(ROOT, "docs", "bench_kernels.json"), "--docs", str(doc))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in before
    assert doc.read_text() == before
    with open(os.path.join(ROOT, "docs", "bench_kernels.json")) as f:
        notes = json.load(f).get("notes", [])
    assert all(note in before for note in notes)  # corrections made after a run are shown


def test_ablation_patches_still_apply_to_the_kernel_source():
    """tools/bench/ablate.py edits sparse_attn.py's text: each patch must find its target exactly once
    and change the source (else the ablation would time the unchanged kernel under a false name)."""
    from tools.bench.ablate import PATCHES

    src = open(os.path.join(ROOT, "msa_megatron", "ops", "triton", "sparse_attn.py")).read()
    for name, patches in PATCHES.items():
        for old, new in patches:
            assert src.count(old) == 1 and old != new, name
