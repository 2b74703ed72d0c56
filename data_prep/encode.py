"""Worker side: a Chunk of raw documents -> token ids with one EOD per document.

Runs in pool processes, so it imports only what it needs (no torch, no megatron). Parsing happens
here too, which keeps the reading process nearly idle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from data_prep.sources import Chunk


@dataclass
class Encoded:
    tokens: np.ndarray  # int32, all documents' ids, each followed by EOD (stored in megatron's dtype later)
    lengths: np.ndarray  # int64 tokens per document (EOD included)
    text_bytes: int = 0
    empty: int = 0  # documents with no text, skipped
    # (item index in the chunk, byte offset of the item in a jsonl payload, reason)
    bad: list = field(default_factory=list)


class Encoder:
    def __init__(self, tokenizer_file: str, eod_id: int, text_key: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.eod_id, self.text_key = eod_id, text_key

    def __call__(self, chunk: Chunk) -> Encoded:
        texts, bad = _EXTRACT[chunk.kind](chunk.payload, self.text_key)
        kept = [t for t in texts if t]
        encodings = self.tokenizer.encode_batch_fast(kept, add_special_tokens=False) if kept else []
        flat, lengths = [], []
        for encoding in encodings:
            ids = encoding.ids
            flat.extend(ids)
            flat.append(self.eod_id)
            lengths.append(len(ids) + 1)
        return Encoded(
            tokens=np.array(flat, dtype=np.int32),
            lengths=np.array(lengths, dtype=np.int64),
            text_bytes=sum(len(t.encode("utf-8")) for t in kept),
            empty=len(texts) - len(kept),
            bad=bad,
        )


def _jsonl_texts(blob: bytes, key: str) -> tuple[list, list]:
    texts, bad, offset = [], [], 0
    lines = blob.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the payload ends with a newline
    for index, line in enumerate(lines):
        line_offset, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue  # blank lines carry no document
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            bad.append((index, line_offset, f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        except ValueError as e:
            bad.append((index, line_offset, f"bad JSON ({e})"))
            continue
        if not isinstance(record, dict):
            bad.append((index, line_offset, f"not a JSON object but {type(record).__name__}"))
        elif key not in record:
            bad.append((index, line_offset, f"no key {key!r}"))
        elif not isinstance(record[key], str):
            bad.append((index, line_offset, f"{key!r} is {type(record[key]).__name__}, not a string"))
        else:
            texts.append(record[key])
    return texts, bad


def _file_texts(payload: list, key: str) -> tuple[list, list]:
    texts, bad = [], []
    for index, data in enumerate(payload):
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            bad.append((index, 0, f"line {line}: not UTF-8 ({e.reason} at byte {e.start})"))
    return texts, bad


def _parquet_texts(array, key: str) -> tuple[list, list]:
    texts, bad = [], []
    for index, value in enumerate(array.to_pylist()):
        if value is None:
            bad.append((index, 0, f"{key!r} is null"))
        else:
            texts.append(value)
    return texts, bad


_EXTRACT = {"jsonl": _jsonl_texts, "text": _file_texts, "parquet": _parquet_texts}

# Pool plumbing: one Encoder per worker process.
_worker_encoder: Encoder | None = None


def init_worker(tokenizer_file: str, eod_id: int, text_key: str) -> None:
    # Parallelism comes from the process pool; the library's own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker_encoder
    _worker_encoder = Encoder(tokenizer_file, eod_id, text_key)


def encode_in_worker(chunk: Chunk) -> Encoded:
    return _worker_encoder(chunk)
