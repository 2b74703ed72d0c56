"""Start-up checks: every user error that would otherwise surface mid-run, found before any
process group, model or file is touched. Each raises ConfigError / CheckpointError with one line.
"""

from __future__ import annotations

import os

from msa_megatron.config import ConfigError, RunConfig, validate


def check(cfg: RunConfig) -> None:
    check_world_size(cfg)
    check_backend(cfg)
    check_kernel_environment()
    if cfg.data.type == "indexed":
        from msa_megatron.data.blend import check_blend

        check_blend(cfg)
    from msa_megatron.training.resume_check import check_resume_config

    resuming = check_resume_config(cfg) is not None
    init = cfg.checkpoint.init_from
    if init and not resuming and not os.path.exists(init):
        raise ConfigError(f"checkpoint.init_from={init!r}: no such directory")


def check_world_size(cfg: RunConfig) -> None:
    """The layout against the ranks this process was started with (torchrun / srun set WORLD_SIZE)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r}: must be a positive integer (set by torchrun or slurm/launch.sh)")
    validate(cfg, world_size=int(text))


def check_backend(cfg: RunConfig) -> None:
    """attention.backend=triton needs a CUDA device (or the Triton interpreter) and Triton itself."""
    if cfg.attention.type not in ("msa", "local") or cfg.attention.backend != "triton":
        return
    import torch

    from msa_megatron import ops

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        ops.resolve_backend("triton", device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"attention.backend='triton': Triton is not importable ({e})") from None


def check_kernel_environment() -> None:
    """The Triton kernels' environment knobs, which they read only mid-step."""
    try:
        from msa_megatron.ops.triton.common import query_chunk
        from msa_megatron.ops.triton.dense_lib import forced_backend
    except ImportError:  # no Triton: no kernel reads them
        return
    try:
        query_chunk()
        forced_backend()
    except ValueError as e:
        raise ConfigError(str(e)) from None
