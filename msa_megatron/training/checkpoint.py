"""Checkpoints on megatron-core dist_checkpointing (torch_dist): save, resume, init from weights.

Layout under `checkpoint.save`:
    iter_0000100/                   the sharded checkpoint (reshardable across TP/PP/EP/DP)
    iter_0000100/msa_meta.json      our metadata: resolved config, step, consumed tokens, stage,
                                    W&B run id, code version
    latest_checkpointed_iteration.txt

- resume (`checkpoint.load`, by default the save directory): model, optimizer, LR schedule,
  step and consumed tokens, so the stage and the data position follow.
- init (`checkpoint.init_from`): weights only, into a fresh run. Keys the model has but the
  checkpoint lacks must match `checkpoint.init_allow_missing` (default `*.indexer.*`: converting
  a dense GQA checkpoint to MSA); anything else missing, or a checkpoint tensor the model does not
  have, is an error that lists the keys.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.validation import StrictHandling

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's states are saved in model-parameter shapes, so they load at any
# layout (megatron-core's default format for it cannot be saved in 0.19.2).
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
META = "msa_meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the path and the keys."""


@dataclass
class TrainState:
    step: int = 0
    consumed_tokens: int = 0


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: Optional[str]) -> Optional[int]:
    """Step of the newest complete checkpoint under root, or None when there is none."""
    if not root:
        return None
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    step = int(text)
    if not os.path.isdir(iteration_dir(root, step)):
        raise CheckpointError(f"{tracker} points at step {step} but {iteration_dir(root, step)} does not exist")
    return step


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
    """Write a full checkpoint for `state.step` (collective: every rank calls it)."""
    cfg = trainer.cfg
    root = cfg.checkpoint.save
    path = iteration_dir(root, state.step)
    if _rank0():
        if os.path.exists(path):  # a rerun of the same step replaces the old copy
            shutil.rmtree(path)
        os.makedirs(path)
    dist.barrier()
    model_sd = model_state_dicts(trainer.model)
    sharded = {
        **model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT),
        "scheduler": trainer.scheduler.state_dict(),
        "train_state": asdict(state),
    }
    dist_checkpointing.save(sharded, path)
    dist.barrier()
    if _rank0():
        from omegaconf import OmegaConf

        meta = {
            **asdict(state),
            "stage": trainer.stage_name(state.consumed_tokens),
            "wandb_run_id": wandb_run_id,
            "code_version": _code_version(),
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        }
        with open(os.path.join(path, META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(state.step))
        os.replace(tmp, os.path.join(root, TRACKER))  # the tracker only ever names a complete checkpoint
        _prune(root, keep=cfg.checkpoint.keep_last)
    dist.barrier()
    return path


def _prune(root: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0: keep everything)."""
    if keep <= 0:
        return
    steps = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    for step in steps[:-keep]:
        shutil.rmtree(iteration_dir(root, step), ignore_errors=True)


def resume(trainer, root: str) -> Optional[TrainState]:
    """Load everything from the newest checkpoint under root; None when there is none."""
    step = latest_step(root)
    if step is None:
        return None
    path = iteration_dir(root, step)
    _check_optimizer_kind(path, trainer.cfg.parallel.use_distributed_optimizer)
    model_sd = model_state_dicts(trainer.model)
    _allocate_optimizer_state(trainer.optimizer)
    sharded = {**model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT)}
    loaded = _load(sharded, path, "checkpoint.load", root, strict=StrictHandling.RAISE_ALL)
    for key, chunk in zip(model_sd, trainer.model):
        chunk.module.load_state_dict(loaded[key])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(trainer.optimizer)
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    return TrainState(**loaded["train_state"])


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


def init_weights(models, root: str, allow_missing: list) -> list:
    """Load weights into `models` (unwrapped model chunks, or one model, before the optimizer is
    built) from a checkpoint directory or its parent with a tracker; returns the keys that keep
    their fresh initialisation. Collective: every rank calls it."""
    models = models if isinstance(models, (list, tuple)) else [models]
    path = _resolve_weights_dir(root)
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
        missing, unexpected = model.load_state_dict(loaded[key], strict=False)
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
    if not os.path.exists(root):
        raise CheckpointError(f"checkpoint.init_from={root!r}: no such directory")
    step = latest_step(root) if os.path.exists(os.path.join(root, TRACKER)) else None
    path = iteration_dir(root, step) if step is not None else root
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"checkpoint.init_from={root!r}: {path} is not a dist_checkpointing checkpoint (no metadata.json)")
    return path
