"""Run train.py's entry in this process (same code path as the command line, minus the
interpreter start and megatron import), and read back what it wrote."""

from __future__ import annotations

import hashlib
import json
import os

from hydra import compose, initialize_config_dir

from msa_megatron.config import register_hydra_schema
from tests.paths import CONF_DIR
from tests.runs import TEST_DEFAULTS

register_hydra_schema()

# Small and quick: the tiny MoE on 128-token mock documents.
QUICK = {**TEST_DEFAULTS, "data.seq_length": "128", "train.steps": "4"}


def composed(out_dir, *overrides):
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = [f"{k}={v}" for k, v in QUICK.items() if k not in given]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=[f"output_dir={out_dir}", *defaults, *overrides])


def train_main(out_dir, *overrides) -> int:
    """train.py's exit code for these overrides (0, or 2 after one line on stderr)."""
    from msa_megatron.training.entry import main

    return main(composed(out_dir, *overrides))


def records(out_dir, name: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_records(out_dir) -> list[dict]:
    return [r for r in records(out_dir) if "train/lm_loss" in r]


def snapshot(*roots) -> dict:
    """Path -> sha256 of every file under the roots: 'nothing was lost or rewritten' is equality."""
    digest = {}
    for root in roots:
        root = str(root)
        if os.path.isfile(root):
            digest[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
            continue
        for base, _, names in os.walk(root):
            for name in names:
                path = os.path.join(base, name)
                digest[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digest
