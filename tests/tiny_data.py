"""A small real dataset for training tests: synthetic documents, a byte-level BPE, data_prep output."""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_prep.corpus import train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def documents(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 10, 40, 150, 400]))) for _ in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def make_tokenizer(path: Path, texts: list[str]) -> str:
    train_tokenizer(texts, 300, path)
    return str(path)


def make_dataset(root: Path, name: str = "tiny", count: int = 120, seed: int = 1) -> dict:
    """{'prefix', 'tokenizer', 'jsonl'}: data_prep output of `count` documents (vocab ~300)."""
    from data_prep import cli

    root.mkdir(parents=True, exist_ok=True)
    texts = documents(seed, count)
    src = write_jsonl(root / f"{name}.jsonl", texts)
    tokenizer = make_tokenizer(root / "tokenizer.json", texts)
    prefix = cli.run([str(src), "--tokenizer", tokenizer, "--output-prefix", str(root / name), "--workers", "0", "--no-progress"])
    return {"prefix": prefix, "tokenizer": tokenizer, "jsonl": str(src)}


def indexed_overrides(prefix: str, tokenizer: str | None) -> list[str]:
    """train.py overrides that train on one data_prep prefix."""
    overrides = ["data.type=indexed", f"data.blend=[[1.0,'{prefix}']]", "data.split='80,20,0'", "data.cache_dir=null"]
    overrides.append(f"data.tokenizer='{tokenizer}'" if tokenizer else "data.tokenizer=null")
    return overrides
