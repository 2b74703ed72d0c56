"""The command-line contract of train.py: a user error is one line on stderr and exit code 2.

User errors are the ones a user fixes by changing the command, the config, the data, the
checkpoint or the environment (ConfigError, CheckpointError, LoggingSetupError); anything else is
a bug and keeps its traceback. The checks run before anything in the run directory is written,
so a rejected command leaves an existing run as it was.
"""

from __future__ import annotations

import re
import sys

from msa_megatron.config import ConfigError, load_config

EXIT_USER_ERROR = 2


def _user_errors() -> dict:
    from msa_megatron.training.checkpoint import CheckpointError
    from msa_megatron.training.metrics import LoggingSetupError

    return {ConfigError: "config error", CheckpointError: "checkpoint error", LoggingSetupError: "logging error"}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_overrides(conf_dir: str, config_name: str, overrides: list[str]) -> int:
    """Compose the config once before Hydra's own entry does: Hydra reports a bad override or a
    missing preset over several lines and exits 1; here it is one line and exit code 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=conf_dir, version_base=None):
            compose(config_name=config_name, overrides=overrides)
    except HydraException as e:
        print(f"config error: {hydra_error_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def hydra_error_line(error: BaseException) -> str:
    """Hydra's message, first line first, with the available options of a missing preset."""
    text = str(error)
    first = text.strip().splitlines()[0].strip()
    if first.startswith("Could not override") and "To append to your config" in text:
        first = first.rstrip(".") + ": not a config key"
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if options:
        names = ", ".join(line.strip() for line in options.group(2).splitlines() if line.strip())
        return f"{first} (available options in '{options.group(1)}': {names})"
    return first


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
