"""Checkpoints on megatron-core dist_checkpointing (torch_dist): save, resume, init from weights.

Layout under `checkpoint.save`:
    iter_0000100/                   a complete checkpoint (reshardable across TP/PP/EP/DP)
    iter_0000100/msa_meta.json      our metadata: resolved config, step, consumed tokens, stage,
                                    W&B run id, code version (written last)
    iter_0000200.partial/           a save in progress (or cut short by a crash): never resumed
    latest_checkpointed_iteration.txt   megatron's tracker: the newest complete step

Publishing: every rank writes into `iter_N.partial/`, rank 0 adds msa_meta.json, renames the
directory to `iter_N/` and only then updates the tracker and prunes. Pruning removes only complete
checkpoints older than the one just saved, beyond `checkpoint.keep_last`; nothing newer, nothing
incomplete.

- resume (`checkpoint.load`, by default the save directory): the newest complete checkpoint:
  model, optimizer, step and consumed tokens (so the stage and the data position follow). The LR
  schedule follows the current config from that step on (a change is logged). A checkpoint whose
  files are missing or cut short is moved aside to `iter_N.unreadable/` with one line, and the
  next older complete one is used.
- init (`checkpoint.init_from`): weights only, into a fresh run. Keys the model has but the
  checkpoint lacks must match `checkpoint.init_allow_missing` (default `*.indexer.*`: converting
  a dense GQA checkpoint to MSA); anything else missing, or a checkpoint tensor the model does not
  have, is an error that lists the keys.

Trust: torch's distributed checkpoint stores its index (`.metadata`) as a pickle, which can run
code when loaded. Before any load, that file is read with an unpickler that only accepts the
classes torch's checkpoint metadata is made of (see `read_storage_index`); megatron-core loads the
tensors and objects themselves with `torch.load(weights_only=True)`. Load only checkpoints you trust.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.transformer.module import Float16Module

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's states are saved in model-parameter shapes, so they load at any
# layout (megatron-core's default format for it cannot be saved in 0.19.2).
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
META = "msa_meta.json"
PARTIAL = ".partial"
UNREADABLE = ".unreadable"
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the path and the keys."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint's files are missing, cut short or not what torch wrote."""


@dataclass
class TrainState:
    step: int = 0
    consumed_tokens: int = 0


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def complete_steps(root: Optional[str]) -> list[int]:
    """Steps of the published checkpoints under root (with msa_meta.json), oldest first."""
    if not root or not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = _ITER.match(name)
        if match and os.path.isfile(os.path.join(root, name, META)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(root: Optional[str]) -> Optional[int]:
    """Step of the newest complete checkpoint under root, or None when there is none."""
    steps = complete_steps(root)
    return steps[-1] if steps else None


def read_meta(root: str, step: int) -> dict:
    path = os.path.join(iteration_dir(root, step), META)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UnreadableCheckpoint(f"{path}: unreadable ({e})") from None


def _chunk_key(i: int, n: int) -> str:
    """State-dict key of model chunk i of n (megatron-LM's convention: "model", or "model0".."model{n-1}")."""
    return "model" if n == 1 else f"model{i}"


def model_state_dicts(chunks) -> dict:
    """{chunk key: sharded state dict} of DDP-wrapped model chunks. Tensor keys are global layer
    names, so a checkpoint written with one pipeline layout loads into another."""
    return {_chunk_key(i, len(chunks)): c.module.sharded_state_dict() for i, c in enumerate(chunks)}


def _rank0() -> bool:
    return dist.get_rank() == 0


def _code_version() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save(trainer, state: TrainState, wandb_run_id: Optional[str] = None) -> str:
    """Write a full checkpoint for `state.step` and publish it when complete (collective)."""
    cfg = trainer.cfg
    root = cfg.checkpoint.save
    final = iteration_dir(root, state.step)
    partial = final + PARTIAL
    if _rank0():
        if os.path.exists(partial):  # left by a save of this step that did not finish
            shutil.rmtree(partial)
        os.makedirs(partial)
    dist.barrier()
    model_sd = model_state_dicts(trainer.model)
    sharded = {
        **model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT),
        "scheduler": trainer.scheduler.state_dict(),
        "train_state": asdict(state),
    }
    dist_checkpointing.save(sharded, partial)
    dist.barrier()
    if _rank0():
        from omegaconf import OmegaConf

        from msa_megatron.training.metrics import read_wandb_run_id

        meta = {
            **asdict(state),
            "stage": trainer.stage_name(state.consumed_tokens),
            # the logging rank owns the W&B run; with pipeline stages that is not rank 0
            "wandb_run_id": wandb_run_id or read_wandb_run_id(cfg.output_dir),
            "code_version": _code_version(),
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        }
        with open(os.path.join(partial, META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        _publish(partial, final)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(state.step))
        os.replace(tmp, os.path.join(root, TRACKER))  # the tracker only ever names a complete checkpoint
        prune(root, keep=cfg.checkpoint.keep_last, saved_step=state.step)
    dist.barrier()
    return final


def _publish(partial: str, final: str) -> None:
    """Rename the finished directory into place (replacing an older copy of the same step)."""
    if os.path.exists(final):  # e.g. the unreadable copy a fallback resume stepped over
        old = final + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(partial, final)
        shutil.rmtree(old)
    else:
        os.rename(partial, final)


def prune(root: str, keep: int, saved_step: int) -> list[int]:
    """Delete complete checkpoints older than `saved_step` beyond the newest `keep` (counting the
    saved one); keep <= 0 keeps everything. Returns the deleted steps."""
    if keep <= 0:
        return []
    older = [s for s in complete_steps(root) if s < saved_step]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for step in doomed:
        shutil.rmtree(iteration_dir(root, step))
    return doomed


def resume(trainer, root: str, say: Callable[[str], None] = print) -> tuple[TrainState, dict]:
    """Load everything from the newest readable complete checkpoint under root (collective).

    Returns the train state and the checkpoint's metadata."""
    steps = complete_steps(root)
    if not steps:
        raise CheckpointError(f"checkpoint.load={root!r}: no complete checkpoint there")
    _note_tracker(root, steps[-1], say)
    for step in reversed(steps):
        path = iteration_dir(root, step)
        try:
            meta = read_meta(root, step)
            check_storage_files(path)
        except UnreadableCheckpoint as e:
            older = [s for s in steps if s < step]
            dist.barrier()
            if _rank0():
                os.rename(path, path + UNREADABLE)
            dist.barrier()
            then = f"resuming from {os.path.basename(iteration_dir(root, older[-1]))}" if older else "no older checkpoint"
            say(f"checkpoint {path} is unreadable ({e}); moved it to {os.path.basename(path)}{UNREADABLE}; {then}")
            continue
        state = _load_training_state(trainer, path, root)
        return state, meta
    raise CheckpointError(f"checkpoint.load={root!r}: no readable checkpoint left (see the lines above)")


def _note_tracker(root: str, newest: int, say) -> None:
    tracker = os.path.join(root, TRACKER)
    try:
        text = open(tracker).read().strip()
    except OSError:
        return
    if text != str(newest):
        say(f"{tracker} says {text!r}; the newest complete checkpoint is iter_{newest:07d}")


def _load_training_state(trainer, path: str, root: str) -> TrainState:
    _check_optimizer_kind(path, trainer.cfg.parallel.use_distributed_optimizer)
    model_sd = model_state_dicts(trainer.model)
    _allocate_optimizer_state(trainer.optimizer)
    sharded = {**model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT)}
    old_schedule = dict(trainer.scheduler.state_dict())
    try:
        loaded = _load(sharded, path, "checkpoint.load", root, strict=StrictHandling.RAISE_ALL)
        for key, chunk in zip(model_sd, trainer.model):
            chunk.module.load_state_dict(loaded[key])
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    except (ValueError, KeyError, IndexError) as e:  # megatron's merge of mismatched optimizer groups
        reason = " ".join(str(e).split())
        raise CheckpointError(
            f"checkpoint.load={root!r}: the optimizer state of {os.path.basename(path)} does not fit this run's "
            f"parameter groups ({reason}); optim.* settings that change the groups (e.g. optim.index_lr) cannot change on resume"
        ) from None
    _unshare_adam_steps(trainer.optimizer)
    saved_schedule = loaded["scheduler"]
    trainer.scheduler.load_state_dict(saved_schedule)  # the current config's schedule at the saved step
    change = describe_schedule_change(saved_schedule, old_schedule, trainer.cfg.train.global_batch_size)
    if change:
        trainer._say(f"LR schedule follows this run's config from step {loaded['train_state']['step']}: {change}")
    return TrainState(**loaded["train_state"])


def describe_schedule_change(saved: dict, current: dict, global_batch_size: int) -> str:
    """'lr_decay_steps 40 -> 60, ...' for the schedule settings that differ ('' when none)."""
    in_steps = {"lr_warmup_steps", "lr_decay_steps", "wd_incr_steps"}  # megatron counts samples
    changes = []
    for key in ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd"):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key in in_steps:
            old, new = old // global_batch_size, new // global_batch_size
        changes.append(f"{key} {old} -> {new}" + (" steps" if key in in_steps else ""))
    return ", ".join(changes)


def _check_optimizer_kind(path: str, distributed: bool) -> None:
    """The optimizer state of one optimizer kind cannot be loaded into the other."""
    meta = os.path.join(path, META)
    if not os.path.exists(meta):
        return
    with open(meta) as f:
        saved = json.load(f).get("config", {}).get("parallel", {}).get("use_distributed_optimizer")
    if saved is not None and bool(saved) != bool(distributed):
        raise CheckpointError(
            f"parallel.use_distributed_optimizer={distributed}: {path} was saved with {bool(saved)}; resume with the same "
            "setting (the two optimizers store their state differently)"
        )


def _torch_adams(optimizer):
    """The torch.optim.Adam instances inside megatron's (chained, distributed) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):
            yield opt, inner


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.19.2's DistributedOptimizer.load_state_dict hands every parameter the same
    `step` tensor, which torch's Adam then increments once per parameter per step (wrong bias
    correction after a resume): give each parameter its own copy."""
    for _, adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _allocate_optimizer_state(optimizer) -> None:
    """Make megatron-core 0.19.2's DistributedOptimizer load over torch.optim.Adam (no Apex/TE).

    1. It reads Adam's per-parameter `step` while building the state dict to load into, and torch
       creates that state only at the first step: a zero-gradient step allocates it. Everything it
       touches (main params, moments, step) is then overwritten by the checkpoint, and the model
       weights are loaded after it.
    2. Its loader skips Adam's `step` tensor (restored from the param groups instead) but the setter
       then looks it up: the setter is told to leave it alone.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(setter, "_msa_skips_step", False):

        def set_states(self, model_param, tensors):
            return setter(self, model_param, {"step": None, **tensors})

        set_states._msa_skips_step = True
        DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    for opt, inner in _torch_adams(optimizer):
        if isinstance(opt, DistributedOptimizer) and not inner.state:
            for group in inner.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
            inner.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- trust and files

_METADATA_MODULES = ("torch.distributed.checkpoint.",)
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch", "bfloat16"),
    ("torch", "float16"),
    ("torch", "float64"),
    ("torch", "int64"),
    ("torch", "int32"),
    ("torch", "uint8"),
    ("torch", "int8"),
    ("torch", "bool"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "preserve_format"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name back to torch.strided etc.
}


class _StorageIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_METADATA_MODULES):  # its dataclasses and enums, not its functions
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which torch's checkpoint metadata never holds")


def read_storage_index(path: str):
    """torch's `.metadata` of a checkpoint directory, read without running foreign code."""
    index = os.path.join(path, ".metadata")
    try:
        with open(index, "rb") as f:
            return _StorageIndexUnpickler(f).load()
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{index} is missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{index} {e}: not loading it (load only checkpoints you trust)") from None
    except (EOFError, ValueError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise UnreadableCheckpoint(f"{index} is damaged ({type(e).__name__}: {e})") from None


def check_storage_files(path: str) -> None:
    """Every data file the checkpoint's index names exists and is long enough."""
    index = read_storage_index(path)
    needed: dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if name is None:
            continue
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UnreadableCheckpoint(f"{file} is missing")
        size = os.path.getsize(file)
        if size < end:
            raise UnreadableCheckpoint(f"{file} has {size} bytes, the index needs {end}")


# ---------------------------------------------------------------------------------- weights only


def init_weights(models, root: str, allow_missing: list) -> list:
    """Load weights into `models` (unwrapped model chunks, or one model, before the optimizer is
    built) from a checkpoint directory or its parent with a tracker; returns the keys that keep
    their fresh initialisation. Collective: every rank calls it."""
    models = models if isinstance(models, (list, tuple)) else [models]
    path = _resolve_weights_dir(root)
    read_storage_index(path)  # refuse foreign pickles before megatron reads the index
    model_sds = [m.sharded_state_dict() for m in models]
    available = set(load_sharded_metadata(path))
    wanted, fresh, model_keys = [{} for _ in models], [], set()
    for i, sd in enumerate(model_sds):
        for name, entry in sd.items():
            key = _checkpoint_id(entry)
            if key is not None:
                model_keys.add(key)
            if key is not None and key not in available:
                fresh.append(key)  # keeps its initialisation, if the allow-list permits
            else:
                wanted[i][name] = entry
    not_allowed = [k for k in fresh if not _allowed(k, allow_missing)]
    if not_allowed:
        raise CheckpointError(
            f"{path} lacks {len(not_allowed)} model tensors outside checkpoint.init_allow_missing={list(allow_missing)}: "
            + ", ".join(sorted(not_allowed)[:8])
            + (" ..." if len(not_allowed) > 8 else "")
        )
    # Pipeline stages hold different layers: a tensor is extra only if no rank's model has it.
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(model_keys))
    all_model_keys = set().union(*map(set, everyone))
    model_prefixes = {k.split(".")[0] for k in all_model_keys}
    extra = sorted(k for k in available - all_model_keys if k.split(".")[0] in model_prefixes)
    if extra:
        raise CheckpointError(f"{path} holds {len(extra)} tensors this model does not have: " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    shapes = dist_checkpointing.load_tensors_metadata(path)
    for entry in (e for w in wanted for e in w.values()):
        if isinstance(entry, ShardedTensor) and tuple(shapes[entry.key].global_shape) != tuple(entry.global_shape):
            raise CheckpointError(
                f"checkpoint.init_from={root!r}: {entry.key} has shape {tuple(shapes[entry.key].global_shape)} "
                f"in the checkpoint but {tuple(entry.global_shape)} in this model"
            )
    request = {_chunk_key(i, len(models)): w for i, w in enumerate(wanted)}
    loaded = _load(request, path, "checkpoint.init_from", root)
    for (key, _), model in zip(request.items(), models):
        inner = model.module if isinstance(model, Float16Module) else model  # the wrapper returns nothing
        missing, unexpected = inner.load_state_dict(loaded[key], strict=False)
        unexplained = [k for k in missing if not _allowed(k, allow_missing) and not k.endswith("_extra_state")]
        if unexplained or unexpected:
            raise CheckpointError(f"{path}: loading left {unexplained + list(unexpected)} unmatched")
    return sorted(set(fresh))


def _load(sharded, path: str, key: str, root: str, **kwargs):
    try:
        return dist_checkpointing.load(sharded, path, **kwargs)
    except (CheckpointingException, CheckpointException) as e:  # keep megatron's reason, on one line
        reason = [line for line in str(e).splitlines() if line.strip()][-1]
        raise CheckpointError(f"{key}={root!r}: {reason}") from None


def _checkpoint_id(entry):
    """The name an entry of a sharded state dict has in a checkpoint's metadata."""
    if isinstance(entry, ShardedObject):
        return entry.unique_key
    if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
        return entry.key
    return None


def _allowed(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _resolve_weights_dir(root: str) -> str:
    """A checkpoint directory itself, or the newest complete one under a save directory."""
    if not os.path.exists(root):
        raise CheckpointError(f"checkpoint.init_from={root!r}: no such directory")
    step = latest_step(root)
    path = iteration_dir(root, step) if step is not None else root
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"checkpoint.init_from={root!r}: {path} is not a dist_checkpointing checkpoint (no metadata.json)")
    return path
