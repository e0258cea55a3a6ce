"""Reads a W&B offline ``run-*.wandb`` file: records in LevelDB-log framing (32 KiB blocks, 7-byte chunk
headers: crc32, length, type) holding protobuf ``Record`` messages from wandb's own schema."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    magic, version = struct.unpack("<4sH", data[:6])[0], data[6]
    assert magic == b":W&B", f"{path} is not a W&B run file (magic {magic!r}, version {version})"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if (length == 0 and kind == 0) or pos + HEADER + length > len(data):
            break  # the end, or a chunk the writer has not finished yet
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished(path: Path, timeout_s: float = 60.0) -> Path:
    """``path`` once its exit record is on disk. wandb's core service writes the run file on its own, and
    may still be writing after ``finish()`` has returned in this process (a finished run's file is complete
    once the process exits), so a test that trains in-process waits for it, bounded."""
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in records(path)):
        assert time.monotonic() < deadline, f"the W&B run file {path} never got its exit record"
        time.sleep(0.5)
    return path


def history(path: Path) -> list[dict]:
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def config(path: Path) -> dict:
    out: dict = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
