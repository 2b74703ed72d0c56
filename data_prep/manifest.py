"""The manifest written next to every megatron .bin/.idx pair by data_prep, and read back by training.

It records what the token ids mean (tokenizer hash, vocab size, EOD id) so that training can refuse
data tokenized for another vocabulary, and what went in (sources, counts, skipped lines). Its
presence also marks the pair as complete: data_prep writes it last.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "msa-megatron/data_prep/v1"


def manifest_path(prefix: str) -> str:
    return prefix + MANIFEST_SUFFIX


@dataclass
class Manifest:
    tokenizer_sha256: str  # of the tokenizer.json file
    vocab_size: int  # including added/special tokens
    eod_token: str
    eod_id: int
    dtype: str  # numpy dtype name of the token ids in .bin
    documents: int
    tokens: int  # including one EOD per document
    text_bytes: int  # UTF-8 bytes of the documents' text
    sources: list  # input files, in reading order
    malformed_lines: int = 0
    empty_documents: int = 0  # skipped: no text
    text_key: Optional[str] = None
    shard: Optional[list] = None  # [index, count] when written by `--shard i/n`
    max_document_tokens: int = 0
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def write(self, prefix: str) -> str:
        path = manifest_path(prefix)
        tmp = path + ".partial"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, prefix: str) -> "Manifest":
        with open(manifest_path(prefix)) as f:
            raw = json.load(f)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)
