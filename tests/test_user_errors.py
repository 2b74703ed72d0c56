"""Bad inputs a user can give train.py and data_prep: each is one line on stderr, exit code 2, and
leaves every existing file (a finished run, its checkpoints, the data) exactly as it was.

Most cases go through train.py's entry function in this process (`entry.main`, the code the
command line runs after Hydra composed the config); a few run the real command line to cover
Hydra's own errors and the process exit code. The Slurm launcher's cases are in test_launcher.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from msa_megatron.training import checkpoint
from tests.inproc import snapshot, train_main
from tests.paths import ROOT
from tests.tiny_data import indexed_overrides, make_dataset, make_tokenizer, documents, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run with checkpoints (the 'existing run' nothing may touch) and a dataset."""
    root = tmp_path_factory.mktemp("errors")
    run_dir = root / "run"
    assert train_main(run_dir, "train.steps=3", "checkpoint.keep_last=0", "checkpoint.save_interval=2") == 0
    data = make_dataset(root / "data")
    return {"root": root, "run": run_dir, **data}


def expect_user_error(capsys, code: int, label: str, pattern: str) -> str:
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{label}: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def fails_cleanly(capsys, world, overrides, label, pattern, extra_roots=()):
    before = snapshot(world["run"], world["root"] / "data", *extra_roots)
    code = train_main(world["run"], *overrides)
    line = expect_user_error(capsys, code, label, pattern)
    assert snapshot(world["run"], world["root"] / "data", *extra_roots) == before, "a rejected command changed files"
    return line


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["attention.block_size=100"], r"^config error: attention\.block_size=100: must be a power of two"),
        (["train.steps=0"], r"train\.steps=0: must be >= 1"),
        (["model.num_attention_heads=6", "model.num_query_groups=4"], r"model\.num_attention_heads=6"),
        (["parallel.tensor_model_parallel_size=2"], r"parallel='TP2xPP1xCP1': model-parallel size 2 must divide the world size 1"),
        (["train.global_batch_size=3", "train.micro_batch_size=2"], r"train\.global_batch_size=3: must be a multiple of micro_batch_size"),
        (["train.steps=5", "optim.lr_warmup_steps=5"], r"optim\.lr_warmup_steps=5: must be smaller than train\.steps=5"),
        (["logging.wandb.mode=sometimes"], r"logging\.wandb\.mode='sometimes': must be one of online, offline, disabled"),
        (["logging.peak_tflops_per_gpu=-1"], r"logging\.peak_tflops_per_gpu=-1\.0: must be > 0"),
        (["+train.stepz=3"], r"train\.stepz: Key 'stepz' not in 'TrainConfig'"),
        (["train.steps=many"], r"train\.steps: Value 'many'"),
        (["attention.backend=triton"], r"attention\.backend='triton' needs CUDA"),
        (["checkpoint.save=null", "checkpoint.load=null", "train.exit_interval=2"], r"train\.exit_interval=2: needs checkpoint\.save"),
        (["checkpoint.init_from=/nonexistent/dense"], r"checkpoint\.init_from='/nonexistent/dense': no such directory"),
    ],
)
def test_config_errors(capsys, world, monkeypatch, overrides, pattern):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if any("init_from" in o for o in overrides):  # a fresh run: init_from is ignored when resuming
        overrides = overrides + ["checkpoint.load=null", "checkpoint.save=null"]
    fails_cleanly(capsys, world, overrides, "config error", pattern)


def test_world_size_from_the_environment(capsys, world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    fails_cleanly(capsys, world, [], "config error", r"WORLD_SIZE='two': must be a positive integer")


@pytest.mark.parametrize(
    "name, value, pattern",
    [
        ("MSA_QUERY_CHUNK", "8k", r"MSA_QUERY_CHUNK='8k': must be a positive integer"),
        ("MSA_QUERY_CHUNK", "0", r"MSA_QUERY_CHUNK='0': must be a positive integer"),
        ("MSA_DENSE_BACKEND", "cudnn_fast", r"MSA_DENSE_BACKEND='cudnn_fast': must be one of auto, triton, cudnn_batched"),
    ],
)
def test_kernel_knobs_from_the_environment(capsys, world, monkeypatch, name, value, pattern):
    monkeypatch.setenv(name, value)
    fails_cleanly(capsys, world, [], "config error", pattern)


# ------------------------------------------------------------------------------------- data


def copy_dataset(world, tmp_path) -> str:
    prefix = str(tmp_path / "copy_text_document")
    for suffix in (".bin", ".idx", ".manifest.json"):
        shutil.copy(world["prefix"] + suffix, prefix + suffix)
    return prefix


def cut(path: str, nbytes: int) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - nbytes)


def edit_manifest(prefix: str, **changes) -> None:
    path = prefix + ".manifest.json"
    manifest = json.loads(open(path).read())
    manifest.update(changes)
    open(path, "w").write(json.dumps(manifest))


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


DATA_CASES = {
    "missing .bin": (lambda p, w: os.remove(p + ".bin"), r"missing .*copy_text_document\.bin"),
    "missing manifest": (lambda p, w: os.remove(p + ".manifest.json"), r"missing .*manifest\.json; data_prep writes it last"),
    ".bin 200 bytes short": (lambda p, w: cut(p + ".bin", 200), r"\.bin has \d+ bytes but its \.idx describes \d+ \(cut short"),
    ".idx bad header": (lambda p, w: overwrite(p + ".idx", 0, b"NOTANIDX"), r"\.idx is not a megatron index \(bad header\)"),
    ".idx cut short": (lambda p, w: cut(p + ".idx", 8), r"\.idx has \d+ bytes, its header describes \d+"),
    "manifest of another run": (lambda p, w: edit_manifest(p, documents=7), r"holds \d+ documents / \d+ tokens but the manifest says 7 /"),
    "manifest dtype": (lambda p, w: edit_manifest(p, dtype="int32"), r"stores uint16 tokens but the manifest says int32"),
    "unreadable manifest": (lambda p, w: open(p + ".manifest.json", "w").write("{"), r"unreadable manifest"),
    "vocab larger than the model": (lambda p, w: edit_manifest(p, vocab_size=100000), r"vocab_size=100000 > model\.vocab_size=512"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_damaged_data(capsys, world, tmp_path, case):
    prefix = copy_dataset(world, tmp_path)
    damage, pattern = DATA_CASES[case]
    damage(prefix, world)
    fails_cleanly(capsys, world, indexed_overrides(prefix, None), "config error", r"^config error: data\.blend\[0\]=.*" + pattern, [tmp_path])


def test_split_without_validation_documents(capsys, world):
    overrides = indexed_overrides(world["prefix"], None) + ["data.split='100,0,0'"]
    fails_cleanly(capsys, world, overrides, "config error", r"data\.split='100,0,0': the valid split .* gets no documents")


def test_empty_blend(capsys, world):
    fails_cleanly(capsys, world, ["data.type=indexed", "data.blend=[]"], "config error", r"data\.blend=\[\]: is empty")


def test_blend_weight_zero(capsys, world):
    overrides = ["data.type=indexed", f"data.blend=[[0,'{world['prefix']}']]"]
    fails_cleanly(capsys, world, overrides, "config error", r"data\.blend\[0\]\[0\]=0: weight must be a number > 0")


# ------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_missing(capsys, world, tmp_path):
    overrides = indexed_overrides(world["prefix"], str(tmp_path / "nowhere"))
    fails_cleanly(capsys, world, overrides, "config error", r"data\.tokenizer=.*nowhere: no tokenizer\.json file there")


def test_tokenizer_of_other_data(capsys, world, tmp_path):
    """Same vocabulary size and EOD id, other merges: only the manifest's hash can tell."""
    other = make_tokenizer(tmp_path / "tokenizer.json", documents(99, 50))
    overrides = indexed_overrides(world["prefix"], other)
    fails_cleanly(capsys, world, overrides, "config error", r"data\.tokenizer=.*: not the tokenizer data\.blend\[0\]=.* was made with \(sha256")


def test_tokenizer_with_another_eod(capsys, world, tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.BPE())
    other.add_special_tokens(["<pad>", "<|endoftext|>"])
    other.save(str(tmp_path / "tokenizer.json"))
    overrides = indexed_overrides(world["prefix"], str(tmp_path / "tokenizer.json"))
    fails_cleanly(capsys, world, overrides, "config error", r"EOD '<\|endoftext\|>' has id 1 there")


def test_tokenizer_unreadable(capsys, world, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    overrides = indexed_overrides(world["prefix"], str(tmp_path / "tokenizer.json"))
    fails_cleanly(capsys, world, overrides, "config error", r"tokenizer=.*: cannot load")


# ------------------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["data.seq_length=256"], r"iter_0000003 was trained with other settings: data\.seq_length=256 \(checkpoint: 128\)"),
        (["model.hidden_size=128", "train.seed=7"], r"model\.hidden_size=128 \(checkpoint: 64\), train\.seed=7 \(checkpoint: 1234\)"),
        (["optim.index_lr=0.01"], r"optim\.index_lr=0\.01 \(checkpoint: None\)"),
        (["train.global_batch_size=4"], r"train\.global_batch_size=4 \(checkpoint: 2\)"),
        (["stage.warmup_tokens=0"], r"stage\.warmup_tokens=0"),
        (["attention=gqa", "name=tiny-msa-msa_pt"], r"attention\.type='gqa' \(checkpoint: 'msa'\)"),
    ],
)
def test_resume_with_other_settings_is_refused(capsys, world, overrides, pattern):
    fails_cleanly(capsys, world, overrides, "checkpoint error", r"^checkpoint error: checkpoint\.load=.*" + pattern)


def copy_run(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


def test_parameter_groups_changed_without_recorded_config(capsys, world, tmp_path):
    """A checkpoint without its config (older, or hand-made): the optimizer load names the problem."""
    run = copy_run(world, tmp_path)
    for step in checkpoint.complete_steps(str(run / "checkpoints")):
        meta_path = os.path.join(checkpoint.iteration_dir(str(run / "checkpoints"), step), checkpoint.META)
        meta = json.load(open(meta_path))
        del meta["config"]
        json.dump(meta, open(meta_path, "w"))
    before = snapshot(run)
    code = train_main(run, "optim.index_lr=0.01")
    expect_user_error(capsys, code, "checkpoint error", r"does not fit this run's parameter groups .*optim\.index_lr")
    assert snapshot(run) == before


def test_untrusted_pickle_in_checkpoint_index(capsys, world, tmp_path):
    import pickle

    run = copy_run(world, tmp_path)
    newest = checkpoint.iteration_dir(str(run / "checkpoints"), 3)
    with open(os.path.join(newest, ".metadata"), "wb") as f:
        pickle.dump(os.system, f)  # would run a command if loaded with plain pickle
    before = snapshot(run)
    code = train_main(run)
    expect_user_error(capsys, code, "checkpoint error", r"\.metadata refers to posix\.system.*load only checkpoints you trust")
    assert snapshot(run) == before


def test_init_from_a_directory_that_is_no_checkpoint(capsys, world, tmp_path):
    (tmp_path / "empty").mkdir()
    overrides = [f"checkpoint.init_from={tmp_path / 'empty'}", "checkpoint.load=null", "checkpoint.save=null"]
    fails_cleanly(capsys, world, overrides, "checkpoint error", r"is not a dist_checkpointing checkpoint \(no metadata\.json\)")


def test_init_from_checkpoint_missing_tensors(capsys, world, tmp_path):
    overrides = [f"checkpoint.init_from={world['run'] / 'checkpoints'}", "checkpoint.init_allow_missing=[]", "checkpoint.load=null",
                 "checkpoint.save=null", "attention=msa", "model.hidden_size=96"]
    fails_cleanly(capsys, world, overrides, "checkpoint error", r"has shape .* in the checkpoint but")


def test_wandb_online_without_credentials(capsys, world, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    run = copy_run(world, tmp_path)
    before = snapshot(run)
    code = train_main(run, "logging=wandb", "logging.wandb.mode=online")
    expect_user_error(capsys, code, "logging error", r"logging\.wandb\.mode='online': W&B did not start .*WANDB_MODE=offline")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------- data_prep


def prep_main(*args) -> int:
    from data_prep import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args] + ["--workers", "0", "--no-progress"])
    return exit_info.value.code


@pytest.mark.parametrize(
    "make_input, extra, pattern",
    [
        (lambda d: write_jsonl(d / "empty.jsonl", []), [], r"no documents to write: the input holds no records; nothing written"),
        (lambda d: write_jsonl(d / "docs.jsonl", ["one", "two"]), ["--text-key", "body"], r"all 2 records were malformed .*--text-key='body'"),
        (lambda d: write_jsonl(d / "blank.jsonl", ["", ""]), [], r"all 2 documents were empty"),
        (lambda d: d / "missing.jsonl", [], r"no such file or directory"),
        (lambda d: write_jsonl(d / "docs.jsonl", ["x"]), ["--shard", "3/2"], r"shard='3/2': need 0 <= i < n"),
        (lambda d: write_jsonl(d / "docs.jsonl", ["x"]), ["--eod-token", "<nope>"], r"eod_token='<nope>': not in the tokenizer"),
    ],
)
def test_data_prep_bad_input(capsys, world, tmp_path, make_input, extra, pattern):
    src = make_input(tmp_path)
    out = world["root"] / "data" / "tiny"  # an existing dataset at the same prefix survives
    before = snapshot(world["root"] / "data")
    code = prep_main(src, "--tokenizer", world["tokenizer"], "--output-prefix", out, *extra)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data_prep: error")]
    assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), lines
    assert snapshot(world["root"] / "data") == before


# ------------------------------------------------------------------------------------- command line


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def assert_cli_error(proc, label, pattern):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{label}: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["trian.steps=3"], r"^config error: Could not override 'trian\.steps': not a config key$"),
        (["model=tiniest"], r"Could not find 'model/tiniest' \(available options in 'model': .*tiny"),
        (["train.steps=[1,"], r"^config error: no viable alternative"),
        (["attention.block_size=100"], r"attention\.block_size=100: must be a power of two"),
    ],
)
def test_command_line_config_errors(world, args, pattern):
    before = snapshot(world["run"])
    proc = cli(f"output_dir={world['run']}", *args)
    assert_cli_error(proc, "config error", pattern)
    assert snapshot(world["run"]) == before


@pytest.mark.slow
def test_command_line_resume_refusal(world):
    """The real process: megatron imported, the checkpoint compared, exit 2, the run untouched."""
    before = snapshot(world["run"])
    proc = cli(f"output_dir={world['run']}", "data=mock", "model.vocab_size=512", "train.eval_interval=0", "data.seq_length=64")
    assert_cli_error(proc, "checkpoint error", r"data\.seq_length=64 \(checkpoint: 128\)")
    assert snapshot(world["run"]) == before
