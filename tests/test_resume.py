"""Resume and checkpoints never lose work: complete-only publishing and pruning, fallback past an
unreadable checkpoint, one metrics record per step, the LR schedule of the current config,
validation that leaves the training window alone, merged parameter groups, the agreed exit reason."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from msa_megatron.training import checkpoint
from tests.inproc import composed, records, train_main, train_records

pytestmark = pytest.mark.filterwarnings("ignore")

COMPARED = ("train/lm_loss", "train/kl_loss", "train/grad_norm", "train/lr", "msa/kl_loss/layer_01", "moe/load_balancing_loss")


def assert_same_metrics(a: list[dict], b: list[dict], keys=COMPARED):
    assert [r["train/step"] for r in a] == [r["train/step"] for r in b]
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-6), (x["train/step"], key)


def fake_checkpoint(root, name, complete=True):
    path = root / name
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if complete:
        (path / checkpoint.META).write_text("{}")
    return path


def test_prune_touches_only_complete_checkpoints_older_than_the_saved_one(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, f"iter_{step:07d}")
    fake_checkpoint(tmp_path, "iter_0000010.partial", complete=False)  # a save cut short
    fake_checkpoint(tmp_path, "iter_0000012", complete=False)  # written by an older version, half done
    fake_checkpoint(tmp_path, "iter_0000014")  # newer than the saved one (e.g. after a fallback)
    assert checkpoint.complete_steps(str(tmp_path)) == [2, 4, 6, 14]
    assert checkpoint.prune(str(tmp_path), keep=2, saved_step=6) == [2]
    assert checkpoint.prune(str(tmp_path), keep=1, saved_step=6) == [4]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000006", "iter_0000010.partial", "iter_0000012", "iter_0000014"]
    assert checkpoint.prune(str(tmp_path), keep=0, saved_step=14) == []


def test_keep_last_one_keeps_the_checkpoint_just_saved(tmp_path):
    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts, "iter_0000010.partial", complete=False)
    assert train_main(tmp_path, "train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=1") == 0
    assert sorted(os.listdir(ckpts)) == ["iter_0000004", "iter_0000010.partial", checkpoint.TRACKER]
    assert (ckpts / checkpoint.TRACKER).read_text() == "4"
    assert train_main(tmp_path, "train.steps=5", "checkpoint.keep_last=1") == 0  # and the next run resumes
    assert [r["train/step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5]


def test_unreadable_newest_checkpoint_falls_back_and_replays(tmp_path, capsys):
    common = ["train.steps=8", "checkpoint.save_interval=3", "checkpoint.keep_last=0"]
    assert train_main(tmp_path / "straight", *common) == 0
    run = tmp_path / "run"
    assert train_main(run, *common, "train.exit_interval=6") == 0
    newest = checkpoint.iteration_dir(str(run / "checkpoints"), 6)
    data_file = next(f for f in os.listdir(newest) if f.endswith(".distcp"))
    with open(os.path.join(newest, data_file), "r+b") as f:  # a copy that stopped half way
        f.truncate(os.path.getsize(os.path.join(newest, data_file)) // 2)
    (run / "checkpoints" / checkpoint.TRACKER).write_text("latest")
    capsys.readouterr()

    assert train_main(run, *common) == 0
    out = capsys.readouterr().out
    assert "says 'latest'; the newest complete checkpoint is iter_0000006" in out
    assert f"checkpoint {newest} is unreadable ({newest}/{data_file} has" in out
    assert "moved it to iter_0000006.unreadable; resuming from iter_0000003" in out
    assert "resumed from" in out and "at step 3" in out
    assert os.path.isdir(newest + checkpoint.UNREADABLE)  # kept for inspection, never deleted
    assert checkpoint.complete_steps(str(run / "checkpoints")) == [3, 6, 8]  # step 6 saved again
    # one record per step; the replaced ones are kept aside
    assert_same_metrics(train_records(run), train_records(tmp_path / "straight"))
    assert [r["train/step"] for r in records(run, "metrics.replayed.jsonl")] == [4, 5, 6]


def test_lr_schedule_follows_the_new_config(tmp_path, capsys):
    assert train_main(tmp_path / "straight", "train.steps=8", "optim.lr_warmup_steps=2") == 0
    run = tmp_path / "run"
    assert train_main(run, "train.steps=4", "optim.lr_warmup_steps=2") == 0
    capsys.readouterr()
    assert train_main(run, "train.steps=8", "optim.lr_warmup_steps=2") == 0
    assert "LR schedule follows this run's config from step 4: lr_decay_steps 4 -> 8 steps" in capsys.readouterr().out
    resumed, straight = train_records(run), train_records(tmp_path / "straight")
    assert [r["train/step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed[4:], straight[4:]):  # steps 5..8 on the 8-step schedule
        assert a["train/lr"] == pytest.approx(b["train/lr"], rel=1e-9)
    assert resumed[3]["train/lr"] == pytest.approx(3e-4)  # the first run had decayed to min_lr
    assert resumed[4]["train/lr"] > 1e-3


def test_validation_between_log_steps_leaves_training_metrics_alone(tmp_path):
    common = ["train.steps=6", "train.log_interval=2", "data.valid_microbatches=2"]
    assert train_main(tmp_path / "plain", *common) == 0
    assert train_main(tmp_path / "eval", *common, "train.eval_interval=3") == 0
    plain, with_eval = train_records(tmp_path / "plain"), train_records(tmp_path / "eval")
    assert [r["train/step"] for r in plain] == [2, 4, 6]
    assert_same_metrics(with_eval, plain, COMPARED + ("msa/kl_loss/layer_02",))
    val = [r for r in records(tmp_path / "eval") if "val/lm_loss" in r]
    assert [r["train/step"] for r in val] == [3, 6] and all(r["val/kl_loss"] > 0 for r in val)


def test_index_lr_keeps_standard_weight_decay_groups(tmp_path):
    from msa_megatron.config import load_config
    from msa_megatron.training.distributed import init_distributed, shutdown
    from msa_megatron.training.loop import Trainer

    cfg = load_config(composed(tmp_path, "optim.index_lr=0.01", "checkpoint.save=null", "checkpoint.load=null"))
    topo = init_distributed(cfg)
    try:
        trainer = Trainer(cfg, topo)
        names = {id(p): n for chunk in trainer.model for n, p in chunk.named_parameters()}
        group_of = {names[id(p)]: g for g in trainer.optimizer.param_groups for p in g["params"]}
    finally:
        shutdown()
    norms = [n for n in group_of if "norm" in n]
    assert norms and all(group_of[n]["wd_mult"] == 0.0 for n in norms), "norm weights must not decay"
    index = [n for n in group_of if ".indexer." in n]
    assert index and all(group_of[n]["max_lr"] == 0.01 for n in index)
    assert any(group_of[n]["wd_mult"] == 0.0 and group_of[n]["max_lr"] == 0.01 for n in index if "norm" in n)
    assert all(group_of[n]["wd_mult"] == 1.0 and group_of[n]["max_lr"] == 3e-3 for n in group_of if "linear_qkv" in n)


def test_short_runs_train_with_the_default_warmup(tmp_path):
    assert train_main(tmp_path, "train.steps=2") == 0
    assert [r["train/step"] for r in train_records(tmp_path)] == [1, 2]


def _signal_worker(rank: int, port: int, results):
    import torch.distributed as dist

    from msa_megatron.training.signals import ExitRequest

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    request = ExitRequest(torch.device("cpu"))
    first = request.agreed()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm signals one rank only
    results[rank] = (first, request.agreed())
    dist.destroy_process_group()


def test_every_rank_names_the_signal_another_rank_got():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_signal_worker, args=(port, results), nprocs=2)
    assert dict(results) == {0: (None, "SIGTERM to rank 1"), 1: (None, "SIGTERM to rank 1")}


def test_a_failing_validation_does_not_cost_the_checkpoint(tmp_path, monkeypatch):
    from msa_megatron.training import loop

    def broken(self, step):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(loop.Trainer, "evaluate", broken)
    with pytest.raises(RuntimeError, match="validation broke"):
        train_main(tmp_path, "train.steps=3", "train.eval_interval=3")
    assert checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [3]  # saved before validating


def test_which_changes_a_resume_may_make():
    from msa_megatron.config import load_config
    from msa_megatron.training.resume_check import config_tree, refused_changes

    saved = config_tree(load_config({"train": {"steps": 40}}))
    safe = load_config({"train": {"steps": 80, "log_interval": 5}, "logging": {"console": False}, "data": {"tokenizer": "/t"},
                        "parallel": {"tensor_model_parallel_size": 2}, "optim": {"lr": 1e-3, "min_lr": 1e-4}})
    assert refused_changes(saved, safe) == []
    changed = load_config({"train": {"steps": 40, "micro_batch_size": 2, "global_batch_size": 4}, "attention": {"kl": {"coeff": 0.5}}})
    assert [key for key, _, _ in refused_changes(saved, changed)] == ["attention.kl.coeff", "train.micro_batch_size", "train.global_batch_size"]
    del saved["attention"]["dense_layers"]  # a checkpoint older than this key: its default is assumed
    assert refused_changes(saved, load_config({"train": {"steps": 40}})) == []
    assert [k for k, _, _ in refused_changes(saved, load_config({"train": {"steps": 40}, "attention": {"dense_layers": [0]}}))] == ["attention.dense_layers"]
