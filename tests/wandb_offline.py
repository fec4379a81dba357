"""Reading an offline W&B run directory back (what :mod:`rift_ray.tracking` logged), for the
tests: run info, config, history, summary, artifacts and exit code, parsed from the
``run-<id>.wandb`` file with wandb's own protobuf records.

    from wandb_offline import offline_run_dirs, read_offline_run
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OfflineRun:
    """What one offline W&B run directory holds: run info, config, history, summary, artifacts."""

    path: str
    info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def table(self, key: str) -> list[dict[str, Any]]:
        """Rows of the ``wandb.Table`` logged as ``key`` (a chart's data: ``<key>_table``)."""
        for row in reversed(self.history):
            v = row.get(key)
            if isinstance(v, dict) and "path" in v:
                with open(os.path.join(self.path, "files", v["path"])) as f:
                    data = json.load(f)
                return [dict(zip(data["columns"], r)) for r in data["data"]]
        raise KeyError(f"no table {key!r} in {self.path}")

    def values(self, key: str) -> list[Any]:
        """Every logged value of ``key``, in order."""
        return [row[key] for row in self.history if key in row]


def _leveldb_records(path: str) -> Iterator[bytes]:
    """Records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB-log blocks of 32 KiB."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def _put(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir: str, wait: float = 0.0) -> OfflineRun:
    """Read an offline run directory (``.../wandb/offline-run-<time>-<id>``) back.

    W&B's service writes the run file in the background and may still be flushing it
    after ``run.finish()`` returns (seen on a loaded machine); ``wait`` gives it that many
    seconds to hold both its run record and its exit record (a record still half-written
    then fails to parse: read again).
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait
    while True:
        try:
            out = _read_offline_run(run_dir)
        except DecodeError:  # a record caught half-written by the flushing service
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
            continue
        if (out.info and out.exit_code is not None) or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


def _read_offline_run(run_dir: str) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out = OfflineRun(run_dir)
    for raw in _leveldb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.info = {
                "id": r.run_id,
                "name": r.display_name,
                "project": r.project,
                "entity": r.entity,
                "group": r.run_group,
                "job_type": r.job_type,
                "tags": list(r.tags),
            }
            for item in r.config.update:
                _put(out.config, item)
        elif kind == "config":
            for item in rec.config.update:
                _put(out.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, item)
            if "_step" not in row and rec.history.HasField("step"):
                row["_step"] = rec.history.step.num
            out.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(out.summary, item)
        elif kind == "artifact":
            a = rec.artifact
            out.artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                    "files": {c.path: c.local_path for c in a.manifest.contents},
                }
            )
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
    return out


def offline_run_dirs(wandb_dir: str) -> list[str]:
    """The offline run directories under a ``wandb/`` directory, oldest first."""
    return sorted(glob.glob(os.path.join(wandb_dir, "offline-run-*")))
