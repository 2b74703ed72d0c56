"""May this config resume that checkpoint? Compare the resolved config with its msa_meta.json.

A run directory is named after a few settings only, so rerunning with, say, another
data.seq_length lands on the previous run's checkpoints. Resuming is allowed when every
difference is in a key that does not change what the checkpoint means:

- how long and how often: train.steps and the intervals, checkpoint paths and retention;
- where the numbers go: logging.*, name, output_dir;
- how it runs, not what it computes: the parallel layout (dist_checkpointing reshards),
  activation recompute, attention.backend, data loader workers and index cache, validation
  size, the tokenizer path (checked against the data's manifests), init settings (ignored on
  resume);
- the LR schedule (optim.lr, min_lr, lr_warmup_steps, lr_decay_style, weight_decay,
  clip_grad): the schedule follows the new config from the saved step, and the resume logs it.

Anything else (model shape, attention, data, batch sizes, seed, stage, precision, optimizer
type and parameter groups) is refused with one line listing every differing key.
"""

from __future__ import annotations

from typing import Any, Optional

SAFE_KEYS = (
    "name",
    "output_dir",
    "train.steps",
    "train.log_interval",
    "train.eval_interval",
    "train.exit_interval",
    "checkpoint.*",
    "logging.*",
    "parallel.*",
    "attention.backend",
    "attention.recall_interval",
    "data.num_workers",
    "data.cache_dir",
    "data.valid_microbatches",
    "data.tokenizer",  # only checked against the manifests' hashes: the tokens stay the same
    "model.use_cpu_initialization",
    "model.transformer_impl",
    "model.recompute_granularity",
    "model.recompute_method",
    "model.recompute_num_layers",
    "model.recompute_modules",
    "optim.lr",
    "optim.min_lr",
    "optim.lr_warmup_steps",
    "optim.lr_decay_style",
    "optim.weight_decay",
    "optim.clip_grad",
)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def is_safe(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in SAFE_KEYS)


def config_tree(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _schema_defaults() -> dict:
    from msa_megatron.config import RunConfig

    return flatten(config_tree(RunConfig()))


def refused_changes(saved_config: dict, cfg) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, current value) for every difference a resume may not make.

    A key the checkpoint predates counts as having its schema default there."""
    saved, current, defaults = flatten(saved_config), flatten(config_tree(cfg)), _schema_defaults()
    changes = []
    for key, now in current.items():
        before = saved.get(key, defaults.get(key))
        if before != now and not is_safe(key):
            changes.append((key, before, now))
    return changes


def check_resume_config(cfg) -> Optional[int]:
    """Raise CheckpointError when the newest complete checkpoint under checkpoint.load was made
    with settings this config may not change; returns its step (None: nothing to resume)."""
    from msa_megatron.training import checkpoint

    root = cfg.checkpoint.load
    step = checkpoint.latest_step(root)
    if step is None:
        return None
    try:
        meta = checkpoint.read_meta(root, step)
    except checkpoint.UnreadableCheckpoint:
        return step  # the resume itself reports it and falls back to an older one
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return step  # an older checkpoint without its config: nothing to compare
    changes = refused_changes(saved, cfg)
    if changes:
        listed = ", ".join(f"{key}={now!r} (checkpoint: {before!r})" for key, before, now in changes)
        raise checkpoint.CheckpointError(
            f"checkpoint.load={root!r}: iter_{step:07d} was trained with other settings: {listed}; "
            "resume with the checkpoint's values, or start a new run elsewhere (output_dir=... or name=...)"
        )
    return step
