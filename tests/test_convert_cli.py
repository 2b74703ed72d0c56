"""The README's conversion commands, run as a user runs them (tiny sources in place of the real paths),
and a short MSA-CPT run from an imported Hugging Face model."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.convert_cases import readme_commands, source_checkpoints
from tests.paths import ROOT
from tests.runs import _free_port
from tests.test_model import single_process_world  # noqa: F401  (fixture: one-process world for in-process conversion)

pytestmark = pytest.mark.slow

WARMUP_STEPS, STEPS, TOKENS_PER_STEP = 8, 10, 2 * 256
# Small MSA shapes so that 256-token documents go sparse after the warmup.
TRAIN_ARGS = ["data=mock", "data.seq_length=256", "data.mock_max_doc=256", f"train.steps={STEPS}", "optim.lr_warmup_steps=1",
              f"stage.warmup_tokens={WARMUP_STEPS * TOKENS_PER_STEP}", "attention.block_size=16", "attention.topk_blocks=2",
              "attention.index_head_dim=16", "attention.backend=reference", "optim.index_lr=0.1", "optim.lr=1e-4", "optim.min_lr=1e-5"]


def _convert_main():
    """tools/convert.py's main(argv), to run its README commands in this process (seconds, not a new interpreter each)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_cli", os.path.join(ROOT, "tools", "convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(command: str, tmp_path, sources, extra=(), capsys=None, nproc=1):
    """One README command with its example paths replaced by the test's (train.py in a new process)."""
    for example, real in (("/models/Qwen3-30B-A3B", sources / "hf"), ("/runs/zero/checkpoint-1000", sources / "zero2"),
                          ("/runs/megatron/checkpoints", sources / "megatron_dist_tp2ep2"),
                          ("checkpoints/", f"{tmp_path}/checkpoints/"), ("exported/", f"{tmp_path}/exported/"),
                          ("outputs/", f"{tmp_path}/outputs/")):
        command = command.replace(example, str(real))
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python"
    if argv[1] == "tools/convert.py":
        capsys.readouterr()
        assert _convert_main()(argv[2:]) == 0, capsys.readouterr().err[-3000:]
        return capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSA_OUTPUT_ROOT": f"{tmp_path}/outputs", "PYTHONPATH": ROOT}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"] if nproc > 1 else [])
    proc = subprocess.run([*launcher, *argv[1:], *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "train/lm_loss" in line]


def test_readme_conversion_commands(tmp_path_factory, tmp_path, capsys):
    sources = source_checkpoints(tmp_path_factory)
    imports = readme_commands("tools/convert.py import-")
    assert len(imports) == 3
    out = _run(imports[0], tmp_path, sources, capsys=capsys)
    assert f"mapped: {len(load_file(sources / 'hf' / 'model.safetensors'))} source tensors -> 26 parameters (float32)" in out
    assert "dropped: nothing" in out and "created fresh at checkpoint.init_from: *.indexer.* (8 tensors" in out
    assert f"recipe=qwen3-moe stage=msa_cpt checkpoint.init_from={tmp_path}/checkpoints/qwen3-moe" in out
    for command in imports[1:]:
        assert "imported" in _run(command, tmp_path, sources, capsys=capsys)

    # MSA-CPT from the import: dense warmup, then sparse at the configured token count
    (train_cmd,) = readme_commands("recipe=qwen3-moe stage=msa_cpt")
    _run(train_cmd, tmp_path, sources, TRAIN_ARGS)
    records = _metrics(f"{tmp_path}/outputs/qwen3-moe-msa-msa_cpt")
    assert [r["msa/stage_name"] for r in records] == ["dense"] * WARMUP_STEPS + ["sparse"] * (STEPS - WARMUP_STEPS)
    kl = [r["train/kl_loss"] for r in records[:WARMUP_STEPS]]
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3, kl
    # The dense model from the same import on the same data, loaded at TP2 x EP2 (dist_checkpointing
    # reshards the import): its first LM loss is the warmup's.
    dense_cmd = train_cmd.replace("stage=msa_cpt", "attention=gqa")
    one_step = [a for a in TRAIN_ARGS if not a.startswith(("train.steps", "optim.lr_warmup_steps"))]
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2", "parallel.expert_tensor_parallel_size=1"]
    _run(dense_cmd, tmp_path, sources, [*one_step, "train.steps=1", "optim.lr_warmup_steps=0", *layout], nproc=2)
    dense = _metrics(f"{tmp_path}/outputs/qwen3-moe-gqa-msa_pt")
    assert dense[0]["train/lm_loss"] == pytest.approx(records[0]["train/lm_loss"], rel=1e-5)

    exports = readme_commands("tools/convert.py export-hf")
    assert len(exports) == 2
    _run(exports[0], tmp_path, sources, capsys=capsys)
    m3 = load_file(f"{tmp_path}/exported/qwen3-moe-msa/model.safetensors")
    assert "language_model.model.layers.1.self_attn.index_k_norm.weight" in m3
    _run(exports[1], tmp_path, sources, capsys=capsys)
    a, b = load_file(sources / "hf" / "model.safetensors"), load_file(f"{tmp_path}/exported/qwen3-moe/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert readme_commands(".venv/bin/python") == imports[:1] + [train_cmd] + imports[1:] + exports  # every command ran


def test_cli_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), "import-hf", str(tmp_path / "none"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"convert error: {tmp_path / 'none'}: no such directory"
    assert not os.path.exists(tmp_path / "out")
