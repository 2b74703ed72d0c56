"""Read what wandb wrote: the records of an offline run's `run-<id>.wandb` file.

The file is a sequence of protobuf `Record`s (wandb/proto/wandb_internal.proto) in LevelDB's log
framing: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a
7-byte header (crc32, length, type: full / first / middle / last).
"""

from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too small for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def offline_runs(run_dir: str) -> list[str]:
    """The `.wandb` files under run_dir/wandb, oldest first."""
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))


def history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def run_info(records):
    """(run id, config as a dict of top-level keys)."""
    for r in records:
        if r.WhichOneof("record_type") == "run":
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
            return r.run.run_id, config
    raise ValueError("no run record")
