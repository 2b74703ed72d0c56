"""The command-line contract of train.py: a user error is one line on stderr and exit code 2.

User errors are the ones a user fixes by changing the command, the config, the data, the
checkpoint or the environment (ConfigError, CheckpointError, LoggingSetupError); anything else is
a bug and keeps its traceback. The checks run before anything in the run directory is written,
so a rejected command leaves an existing run as it was.
"""

from __future__ import annotations

import sys

from msa_megatron.config import ConfigError, load_config

EXIT_USER_ERROR = 2


def _user_errors() -> dict:
    from msa_megatron.training.checkpoint import CheckpointError
    from msa_megatron.training.metrics import LoggingSetupError

    return {ConfigError: "config error", CheckpointError: "checkpoint error", LoggingSetupError: "logging error"}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(cfg) -> int:
    """Validate and train; returns the process exit code (0, or 2 after printing a user error)."""
    try:
        run_cfg = load_config(cfg)
    except ConfigError as e:
        print(f"config error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    from msa_megatron.training import run

    errors = _user_errors()
    try:
        run(run_cfg)
    except tuple(errors) as e:
        label = next(name for kind, name in errors.items() if isinstance(e, kind))
        print(f"{label}: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0
