"""The embedded demo corpus: the running interpreter's standard library sources, tokenized.

    python -m data_prep.corpus --out .cache/stdlib

writes, under --out: stdlib.jsonl (one document per module file, the input of record), tokenizer.json
(byte-level BPE trained on it, `<|endoftext|>` as EOD), stdlib_text_document.{bin,idx} + manifest
(through the data_prep pipeline), tokenizer_config.json (so the directory also loads as a Hugging Face
tokenizer), and corpus.json (what was built, from what, how long it took).
A second call with the same interpreter, options and sources does nothing.

Which files: every `*.py` below `sysconfig.get_paths()["stdlib"]` except site-packages (third-party
code), `_sysconfigdata_*` (generated per machine), anything under a directory named `data` (test
fixtures), and files that are not UTF-8 (deliberately mis-encoded test modules).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"
RECIPE_VERSION = 1  # bump when the file selection or the tokenizer recipe changes


def stdlib_files(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of the corpus files, sorted by path."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "data" in rel.parts[:-1] or rel.name.startswith("_sysconfigdata_"):
            continue
        try:
            out.append((rel.as_posix(), path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def fingerprint(files: list[tuple[str, str]], vocab_size: int) -> str:
    h = hashlib.sha256(f"{RECIPE_VERSION}|{sys.version}|{vocab_size}".encode())
    for rel, text in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> None:
    """Byte-level BPE (GPT-2 style: lossless on any text) with the EOD as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    # Makes the directory loadable as a Hugging Face tokenizer too (AutoTokenizer, Megatron-LM's tools).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(out: Path, vocab_size: int = 8192, workers: int = 2, root: Path | None = None, progress: bool = True) -> dict:
    """Build (or reuse) the corpus under `out`; returns the contents of corpus.json."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    stamp_path, jsonl, tokenizer, prefix = out / "corpus.json", out / "stdlib.jsonl", out / "tokenizer.json", out / "stdlib"
    started = time.perf_counter()
    files = stdlib_files(root)
    if not files:
        raise SystemExit(f"data_prep.corpus: no usable *.py files under {root}")
    stamp = fingerprint(files, vocab_size)
    outputs = [jsonl, tokenizer, out / "tokenizer_config.json"] + [Path(f"{prefix}_text_document{s}") for s in (".bin", ".idx", ".manifest.json")]
    if stamp_path.exists() and all(p.exists() for p in outputs):
        previous = json.loads(stamp_path.read_text())
        if previous.get("fingerprint") == stamp:
            print(f"data_prep.corpus: {out} is up to date", file=sys.stderr)
            return previous

    with open(jsonl, "w") as f:
        for rel, text in files:
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
    t0 = time.perf_counter()
    train_tokenizer([text for _, text in files], vocab_size, tokenizer)
    t1 = time.perf_counter()

    from data_prep.cli import run

    argv = [str(jsonl), "--tokenizer", str(tokenizer), "--output-prefix", str(prefix), "--eod-token", EOD_TOKEN, "--workers", str(workers)]
    dataset = run(argv + ([] if progress else ["--no-progress"]))
    t2 = time.perf_counter()
    manifest = json.loads(Path(dataset + ".manifest.json").read_text())
    info = {
        "fingerprint": stamp,
        "stdlib": str(root),
        "python": sys.version.split()[0],
        "files": len(files),
        "text_mb": round(sum(len(t.encode()) for _, t in files) / 1e6, 2),
        "documents": manifest["documents"],
        "tokens": manifest["tokens"],
        "max_document_tokens": manifest["max_document_tokens"],
        "vocab_size": manifest["vocab_size"],
        "dataset_prefix": dataset,
        "tokenizer": str(tokenizer),
        "seconds": {"tokenizer_training": round(t1 - t0, 1), "tokenization": round(t2 - t1, 1), "total": round(t2 - started, 1)},
    }
    stamp_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"data_prep.corpus: built {out}: {json.dumps(info)}", file=sys.stderr)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("MSA_CACHE", ".cache"), "stdlib"), help="output directory (default: $MSA_CACHE/stdlib or .cache/stdlib)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    build(Path(args.out), args.vocab_size, args.workers, progress=not args.no_progress)


if __name__ == "__main__":
    main()
