"""Input files -> bounded chunks of raw documents, for one shard of the input.

Documents are ordered: input paths in the order given, directories walked in sorted order, lines
(rows) in file order. Sharding places every document at a coordinate on the concatenated input
bytes (its start offset for JSON lines, the file start for a text file, a point spread evenly over
the file for parquet rows, the compressed read position for gzip) and gives shard i of n the
documents whose coordinate falls in [i*T/n, (i+1)*T/n), T being the total input size. Shards are
therefore contiguous runs of the document order: concatenated in shard order they are exactly one
unsharded run. Plain JSON lines are seeked into, so each task reads about 1/n of the input; gzip
must be decompressed from its start.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional


class InputError(ValueError):
    """Unusable input (path, format, column); the message is one line naming it."""


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # jsonl | jsonl.gz | parquet | text
    size: int


@dataclass
class Chunk:
    """A bounded batch of raw documents from one input file, handed to a worker as is."""

    file: int  # index into the input file list
    kind: str
    payload: Any  # jsonl: bytes of whole lines; text: list of bytes (one per file); parquet: pyarrow array
    offset: int  # jsonl: byte offset of payload in the (decompressed) file; parquet: first row index
    first_line: Optional[int]  # 1-based number of the payload's first line when known without counting
    progress: int  # input coordinate reached after this chunk (for the progress bar)
    files: tuple = ()  # text: input file index of each payload item


def _kind_of(path: str) -> Optional[str]:
    name = path.lower()
    if name.endswith(tuple(s + ".gz" for s in JSONL_SUFFIXES)):
        return "jsonl.gz"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    return None


def discover(paths: list[str], include: Optional[str] = None) -> list[InputFile]:
    """Input files in document order. A directory contributes every (non-hidden) file under it as
    one text document each, optionally only names matching the glob `include`."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    full = os.path.join(root, name)
                    if name.startswith(".") or not os.path.isfile(full):
                        continue
                    if include and not fnmatch.fnmatch(name, include):
                        continue
                    files.append(InputFile(full, "text", os.path.getsize(full)))
        elif os.path.isfile(path):
            kind = _kind_of(path)
            if kind is None:
                raise InputError(f"input={path}: unknown format (want .jsonl[.gz], .json[.gz], .parquet, .txt or a directory)")
            files.append(InputFile(path, kind, os.path.getsize(path)))
        else:
            raise InputError(f"input={path}: no such file or directory")
    if not files:
        raise InputError(f"input={' '.join(paths)}: no input files found")
    return files


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"shard={text!r}: expected i/n, e.g. 0/8") from None
    if not (count >= 1 and 0 <= index < count):
        raise InputError(f"shard={text!r}: need 0 <= i < n")
    return index, count


def shard_bounds(files: list[InputFile], index: int, count: int) -> tuple[int, int]:
    """[lo, hi) on the concatenated input coordinates for shard `index` of `count`."""
    total = sum(f.size for f in files)
    return total * index // count, total * (index + 1) // count


def read_chunks(files: list[InputFile], lo: int, hi: int, text_key: str, block_bytes: int) -> Iterator[Chunk]:
    """Chunks of the documents whose coordinate lies in [lo, hi), in document order."""
    base = 0
    text_batch: list[tuple[int, bytes]] = []
    text_bytes = 0
    for i, f in enumerate(files):
        start, end = base, base + f.size
        base = end
        if f.kind == "text":
            if lo <= start < hi:
                with open(f.path, "rb") as fh:
                    data = fh.read()
                text_batch.append((i, data))
                text_bytes += len(data)
                if text_bytes >= block_bytes:
                    yield _text_chunk(text_batch, end)
                    text_batch, text_bytes = [], 0
            continue
        if text_batch:  # keep document order across kinds
            yield _text_chunk(text_batch, start)
            text_batch, text_bytes = [], 0
        if end <= lo or start >= hi:
            continue
        local_lo, local_hi = max(lo - start, 0), hi - start
        if f.kind == "jsonl":
            for offset, blob in _jsonl_blocks(f.path, local_lo, local_hi, block_bytes):
                yield Chunk(i, "jsonl", blob, offset, None, start + min(offset + len(blob), f.size))
        elif f.kind == "jsonl.gz":
            for offset, line_no, coord, blob in _gzip_jsonl_blocks(f.path, local_lo, local_hi):
                yield Chunk(i, "jsonl", blob, offset, line_no, start + coord)
        else:
            for row, array, coord in _parquet_batches(f, local_lo, local_hi, text_key, block_bytes):
                yield Chunk(i, "parquet", array, row, row + 1, start + coord)
    if text_batch:
        yield _text_chunk(text_batch, min(base, hi))


def _text_chunk(batch: list[tuple[int, bytes]], progress: int) -> Chunk:
    return Chunk(batch[0][0], "text", [d for _, d in batch], 0, 1, progress, tuple(i for i, _ in batch))


def _jsonl_blocks(path: str, lo: int, hi: int, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) runs of whole lines whose first byte lies in [lo, hi)."""
    with open(path, "rb") as fh:
        if lo > 0:
            fh.seek(lo - 1)
            fh.readline()  # now at the first line starting at or after lo
        start = fh.tell()  # file offset of pending[0]
        pending = bytearray()
        while start < hi:
            buf = fh.read(block_bytes)
            if not buf:
                if pending:  # last line without a newline
                    yield start, bytes(pending)
                return
            pending += buf
            # The last line starting before hi is the one holding byte hi-1: it ends at the first
            # newline at or after that byte.
            last = hi - 1 - start
            if last < len(pending):
                cut = pending.find(b"\n", last)
                if cut != -1:
                    yield start, bytes(pending[: cut + 1])
                    return
                continue
            cut = pending.rfind(b"\n")
            if cut != -1:
                yield start, bytes(pending[: cut + 1])
                start += cut + 1
                del pending[: cut + 1]


# Fixed, so that every shard task sees the same read positions whatever its chunk size.
GZIP_READ_BYTES = 1 << 20


def _gzip_jsonl_blocks(path: str, lo: int, hi: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(decompressed offset, first line number, coordinate, bytes) runs of whole lines.

    A line's coordinate is the compressed-file position at which the read that delivered its last
    byte began: deterministic, non-decreasing, and inside [0, compressed size)."""
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as fh:
        offset, line_no = 0, 1  # of pending[0]
        pending = bytearray()
        previous = 0  # coordinate of the read that delivered pending's last byte
        while True:
            coord = raw.tell()
            try:
                buf = fh.read(GZIP_READ_BYTES)
            except (OSError, EOFError) as e:
                raise InputError(f"input={path}: unreadable gzip ({e})") from None
            if not buf:
                if pending and lo <= previous < hi:  # last line without a newline
                    yield offset, line_no, previous, bytes(pending)
                return
            if coord >= hi:
                return
            previous = coord
            pending += buf
            cut = pending.rfind(b"\n")
            if cut == -1:
                continue
            blob = bytes(pending[: cut + 1])
            del pending[: cut + 1]
            if coord >= lo:
                yield offset, line_no, coord, blob
            offset += len(blob)
            line_no += blob.count(b"\n")


def _parquet_batches(f: InputFile, lo: int, hi: int, text_key: str, block_bytes: int) -> Iterator[tuple[int, Any, int]]:
    """(first row, text array, coordinate after it) for the rows whose coordinate row*size//rows
    lies in [lo, hi)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise InputError(f"input={f.path}: no column {text_key!r} (columns: {', '.join(schema.names)})")
    column_type = schema.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"input={f.path}: column {text_key!r} has type {column_type}, need a string column")
    meta = pf.metadata
    rows = meta.num_rows
    # the first row r with r*size//rows >= x is ceil(x*rows/size)
    first, stop = (min(rows, -(-x * rows // f.size)) for x in (lo, hi))
    if first >= stop:
        return
    column = schema.get_field_index(text_key)
    groups, row, group_start, text_size, selected_rows = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group_start < stop and group_start + group.num_rows > first:
            if not groups:
                row = group_start
            groups.append(g)
            text_size += group.column(column).total_uncompressed_size
            selected_rows += group.num_rows
        group_start += group.num_rows
    batch_rows = max(1, block_bytes * selected_rows // max(text_size, 1))
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=[text_key]):
        array = batch.column(0)
        lo_cut, hi_cut = max(first - row, 0), min(stop - row, len(array))
        if lo_cut < hi_cut:
            yield row + lo_cut, array.slice(lo_cut, hi_cut - lo_cut), (row + hi_cut) * f.size // rows
        row += len(array)
        if row >= stop:
            return
