"""`python -m data_prep`: raw text -> megatron .bin/.idx + manifest, for one shard of the input."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Optional

from tqdm import tqdm

from data_prep.encode import Encoder, encode_in_worker, init_worker
from data_prep.pool import ordered_map
from data_prep.sources import Chunk, InputError, InputFile, discover, parse_shard, read_chunks, shard_bounds
from data_prep.writer import DatasetWriter, output_prefix, start_megatron_import, token_dtype
from data_prep.manifest import Manifest
from data_prep.tokenizer_file import TokenizerFileError, file_sha256, find_eod, load_tokenizer, resolve_tokenizer_file

MAX_REPORTED = 100  # malformed lines printed one by one; all of them are counted


class MalformedInput(ValueError):
    """A malformed record under --strict; the message names its file and line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize jsonl / jsonl.gz / parquet / directories of text files into a megatron "
        "indexed dataset <output-prefix>_text_document.{bin,idx} plus a .manifest.json.",
    )
    p.add_argument("inputs", nargs="+", help="files (.jsonl, .json, .ndjson, optionally .gz; .parquet; .txt) or directories (each file one document)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json file, or a directory holding one")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_text_document.* (<prefix>-iiiii-of-nnnnn_... with --shard)")
    p.add_argument("--text-key", default="text", help="JSON key / parquet column of the text (default: text)")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: the first of the usual ones the tokenizer has)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer processes (default: the CPUs this task may use); 0 tokenizes in this process")
    p.add_argument("--shard", default="0/1", help="i/n: process only shard i of n (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed record instead of skipping it")
    p.add_argument("--include", default=None, help="glob on file names inside directory inputs, e.g. '*.py'")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="raw text per worker task (MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class LineLocator:
    """`file:line` of a record, counting newlines only when a record has to be reported."""

    def __init__(self, files: list[InputFile]):
        self.files = files
        self._counted: dict[int, tuple[int, int]] = {}  # file -> (offset, newlines before it)

    def where(self, chunk: Chunk, item: int, offset: int) -> str:
        if chunk.kind == "text":
            return self.files[chunk.files[item]].path
        path = self.files[chunk.file].path
        if chunk.kind == "parquet":
            return f"{path}: row {chunk.offset + item}"
        if chunk.first_line is not None:
            return f"{path}:{chunk.first_line + item}"
        return f"{path}:{self._line_at(chunk.file, chunk.offset + offset)}"

    def _line_at(self, file: int, offset: int) -> int:
        start, count = self._counted.get(file, (0, 0))
        if offset < start:
            start, count = 0, 0
        with open(self.files[file].path, "rb") as fh:
            fh.seek(start)
            remaining = offset - start
            while remaining > 0:
                block = fh.read(min(remaining, 1 << 22))
                if not block:
                    break
                count += block.count(b"\n")
                remaining -= len(block)
        self._counted[file] = (offset, count)
        return count + 1


def run(argv: Optional[list[str]] = None) -> str:
    """Tokenize one shard; returns the output prefix. Raises a ValueError subclass on bad input."""
    args = build_parser().parse_args(argv)
    start_megatron_import()
    if args.workers < 0:
        raise InputError(f"workers={args.workers}: must be >= 0")
    if args.chunk_mb <= 0:
        raise InputError(f"chunk-mb={args.chunk_mb}: must be > 0")
    shard = parse_shard(args.shard)
    files = discover(args.inputs, args.include)
    tokenizer_file = resolve_tokenizer_file(args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_file)
    eod_token, eod_id = find_eod(tokenizer, args.eod_token)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    prefix = output_prefix(args.output_prefix, shard)
    lo, hi = shard_bounds(files, *shard)

    chunks = read_chunks(files, lo, hi, args.text_key, max(1, int(args.chunk_mb * (1 << 20))))
    worker_args = (tokenizer_file, eod_id, args.text_key)
    if args.workers == 0:
        encoder = Encoder(*worker_args)
        results = ((chunk, encoder(chunk)) for chunk in chunks)
    else:
        results = ordered_map(encode_in_worker, chunks, args.workers, init_worker, worker_args, max_pending=4 * args.workers + 4)

    started = time.perf_counter()
    writer = None
    try:
        # Workers start before megatron's import is waited for: they fill the pending window meanwhile.
        first = next(results, None)
        dtype = token_dtype(vocab_size)
        writer = DatasetWriter(prefix, dtype)
        stream = itertools.chain([first] if first is not None else [], results)
        counts = _write_all(stream, writer, LineLocator(files), args.strict, hi - lo, lo, not args.no_progress)
        if writer.documents == 0:
            raise InputError(_no_documents(args, shard, counts))
        manifest = Manifest(
            tokenizer_sha256=file_sha256(tokenizer_file),
            vocab_size=vocab_size,
            eod_token=eod_token,
            eod_id=eod_id,
            dtype=dtype.name,
            documents=writer.documents,
            tokens=writer.tokens,
            text_bytes=counts["text_bytes"],
            sources=[os.path.abspath(f.path) for f in files],
            malformed_lines=counts["malformed"],
            empty_documents=counts["empty"],
            text_key=args.text_key,
            shard=list(shard) if shard[1] > 1 else None,
            max_document_tokens=writer.max_document_tokens,
            extra={"tokenizer_path": os.path.abspath(tokenizer_file)},
        )
        writer.finish(manifest)
    except BaseException:
        results.close()  # stops the worker pool now, not when the traceback is collected
        if writer is not None:
            writer.abort()
        raise
    malformed, empty, text_bytes = counts["malformed"], counts["empty"], counts["text_bytes"]
    elapsed = time.perf_counter() - started
    if malformed > MAX_REPORTED:
        print(f"data_prep: {malformed - MAX_REPORTED} more malformed records not shown", file=sys.stderr)
    print(
        f"data_prep: wrote {prefix}.{{bin,idx}}: {writer.documents} documents, {writer.tokens} tokens ({dtype.name}), "
        f"{text_bytes / 1e6:.1f} MB text in {elapsed:.1f} s ({text_bytes / elapsed / 1e6:.2f} MB/s, "
        f"{writer.documents / elapsed:.0f} docs/s); skipped {malformed} malformed, {empty} empty",
        file=sys.stderr,
    )
    return prefix


def _no_documents(args, shard: tuple[int, int], counts: dict) -> str:
    where = " ".join(args.inputs) + (f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else "")
    if counts["malformed"]:
        hint = f"all {counts['malformed']} records were malformed (see above; is --text-key={args.text_key!r} right?)"
    elif counts["empty"]:
        hint = f"all {counts['empty']} documents were empty"
    else:
        hint = "the input holds no records" + ("; use fewer shards" if shard[1] > 1 else "")
    return f"input={where}: no documents to write: {hint}; nothing written"


def _write_all(results, writer: DatasetWriter, locator: LineLocator, strict: bool, total: int, lo: int, progress: bool) -> dict:
    """Drain the encoded chunks into the writer, reporting malformed records; returns counts."""
    counts = {"malformed": 0, "empty": 0, "text_bytes": 0}
    started = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="input", file=sys.stderr, disable=not progress, mininterval=0.5) as bar:
        for chunk, encoded in results:
            for item, offset, reason in encoded.bad:
                where = locator.where(chunk, item, offset)
                if strict:
                    raise MalformedInput(f"{where}: {reason} (--strict)")
                counts["malformed"] += 1
                if counts["malformed"] <= MAX_REPORTED:
                    tqdm.write(f"data_prep: skipped {where}: {reason}", file=sys.stderr)
            writer.add(encoded.tokens, encoded.lengths)
            counts["empty"] += encoded.empty
            counts["text_bytes"] += encoded.text_bytes
            elapsed = max(time.perf_counter() - started, 1e-9)
            rates = f"{writer.documents / elapsed:.0f} docs/s, {counts['text_bytes'] / elapsed / 1e6:.2f} MB/s text"
            bar.set_postfix_str(rates, refresh=False)
            bar.update(min(chunk.progress - lo, total) - bar.n)
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    try:
        run(argv)
    except (InputError, TokenizerFileError, MalformedInput) as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        sys.exit(2)  # a user error, like argparse's
