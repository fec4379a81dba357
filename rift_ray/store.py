"""The one place that knows a sweep's storage layout.

Everything a sweep produces lives under ``<storage>/<name>/`` (a local path, or
``s3://`` / ``gs://`` through pyarrow filesystems)::

    config.yaml                 the resolved config of the last run
    summary.json                the final summary as data
    estimate.json               the dry-run's cost estimate: FLOPs per stage (the report sets
                                it next to the measured seconds)
    manifest.json               artifact -> sha256, size, stage hash (what a re-run trusts)
    stages/<stage>.json         stage record: status, hash, timings, counts
    tables/mrc.parquet          one row per candidate module, sorted by MRC
    tables/finetune.parquet     one row per fine-tuning trial (module(s), lr, epochs, metric)
    tables/finetune_epochs.parquet  per-epoch metrics of every fine-tuning trial
    tables/interpolation.parquet    one row per (trial, alpha, split)
    tables/per_image.parquet        per (trial, alpha, split): each image's clean / PGD / corruption result
    tables/joint_mrc.parquet    every module set the greedy strategy scored (finetune.strategies)
    tables/strategies.parquet   per selection strategy: its best trial, alpha*, accuracy
    tables/summary.parquet      the final summary as a table (AT vs RiFT per split)
    checkpoints/at.pt           the adversarially trained (starting) model
    checkpoints/rift.pt         the final RiFT model (interpolated at alpha*)
    checkpoints/finetune/<trial>.pt  best epoch of each surviving fine-tuning trial
    artifacts/adv_set.pt        the fixed adversarial set used by MRC
    artifacts/autoattack/<name>/shard-<i>.json  AutoAttack results, shard by shard
    ray/<stage>-<hash>/         Ray Train / Tune run directories (resume state)

With ``seeds: [s, ...]`` the AT model and its records stay at the top, each seed's RiFT
stages (records, tables, checkpoints, adversarial set, manifest, Ray dirs) live in a
sweep directory of their own, ``seeds/<s>/`` (:meth:`Store.for_seed`), laid out as above,
and the top level holds the aggregate over seeds::

    summary.json                per-seed summaries, mean and std of every figure
    tables/summary.parquet      AT vs RiFT per split: mean and std over seeds
    tables/seeds.parquet        AT vs RiFT per split, one row per seed
    seeds/<s>/...               stages/{mrc,finetune,interpolate}.json, tables/, checkpoints/ ...

Writes go to a temporary name and are renamed into place (local), or are single
PUTs (object stores, which are atomic per object); every artifact's checksum is in
``manifest.json`` so an interrupted or corrupted write is never trusted.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CONFIG = "config.yaml"
SUMMARY = "summary.json"
ESTIMATE = "estimate.json"
"""FLOPs per stage and hours on the default card (:func:`rift_ray.cost.estimate_record`)."""
MANIFEST = "manifest.json"
MRC_TABLE = "tables/mrc.parquet"
FINETUNE_TABLE = "tables/finetune.parquet"
FINETUNE_EPOCHS_TABLE = "tables/finetune_epochs.parquet"
FINETUNE_RUNGS_TABLE = "tables/finetune_rungs.parquet"
"""Every rung decision of the fine-tuning grid (:mod:`rift_ray.stages.rungs`)."""
INTERPOLATION_TABLE = "tables/interpolation.parquet"
PER_IMAGE_TABLE = "tables/per_image.parquet"
"""Per-image clean / PGD / corruption results of every alpha point (paired statistics)."""
JOINT_MRC_TABLE = "tables/joint_mrc.parquet"
STRATEGIES_TABLE = "tables/strategies.parquet"
SUMMARY_TABLE = "tables/summary.parquet"
SEEDS_TABLE = "tables/seeds.parquet"
SEEDS_DIR = "seeds"
AT_CHECKPOINT = "checkpoints/at.pt"
RIFT_CHECKPOINT = "checkpoints/rift.pt"
ADV_SET = "artifacts/adv_set.pt"
MRC_BASE = "artifacts/mrc_base.pt"
WANDB_DIR = "wandb"
"""Offline W&B runs (``wandb/offline-run-*``; for object storage a copy, uploaded at each
stage end) and :data:`WANDB_RUNS`."""
WANDB_RUNS = "wandb/runs.json"
"""The sweep's W&B run ids (one per stage, seed and trial) and the last step each holds."""
LOGS_DIR = "logs"
RAY_LOG = "logs/ray.log"
"""Everything Ray printed during the sweep's runs (``rift-ray sweep -v`` shows it live)."""
STAGES = ("adv_train", "mrc", "finetune", "interpolate")
RAY_DIR = "ray"
SWEEP_DIRS = ("stages", "tables", "checkpoints", "artifacts", RAY_DIR)
"""The directories of a sweep's results (what ``--restart`` removes, with the seeds, the
manifest and the summary)."""


class StorageError(RuntimeError):
    """Storage that cannot be used (unwritable, unreachable, malformed URI)."""


LEASE = "lease.json"
"""The running driver's lease (:mod:`rift_ray.lease`): host, pid, start, heartbeat, token."""
HISTORY_DIR = "history"
"""What ``--restart`` replaced: ``history/<stage>-<hash>/`` holds that stage's outputs as they
were, under their usual relative paths."""

STAGE_OUTPUTS = {
    "adv_train": [AT_CHECKPOINT],
    "mrc": [MRC_TABLE, ADV_SET, MRC_BASE],
    "finetune": [
        FINETUNE_TABLE,
        FINETUNE_EPOCHS_TABLE,
        FINETUNE_RUNGS_TABLE,
        JOINT_MRC_TABLE,
        "checkpoints/finetune",
    ],  # fmt: skip
    "interpolate": [
        INTERPOLATION_TABLE,
        PER_IMAGE_TABLE,
        RIFT_CHECKPOINT,
        SUMMARY,
        SUMMARY_TABLE,
        STRATEGIES_TABLE,
        SEEDS_TABLE,
    ],
}
"""Everything each stage writes (besides its record and its Ray experiments)."""

RAY_EXPERIMENTS = {"adv_train": "at", "mrc": "mrc", "finetune": "finetune"}
"""The stages that run under Ray Train / Tune, and the prefix of their run directory."""


def finetune_checkpoint(trial: str) -> str:
    return f"checkpoints/finetune/{trial}.pt"


def trial_name(modules: list[str] | tuple[str, ...], lr: float) -> str:
    """A fine-tuning trial's name: its modules joined by ``+`` (characters a file name cannot
    hold replaced by ``_``) and its learning rate, e.g. ``layer2.1.conv2_lr0.01``; the
    ablations' sets ``:all`` and ``:bn_stats`` give ``all_lr0.01`` and ``bn_stats_lr0``."""
    joined = "+".join(m.removeprefix(":") for m in modules)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", joined) + f"_lr{lr:g}"


def experiment_name(
    stage: str, stage_hash: str, strategy: str | None = None, retry: int | None = None
) -> str:
    """The Ray Train / Tune run name of ``stage`` at ``stage_hash`` (``ray/<name>/``):
    ``at-<hash>``, ``mrc-<hash>``, ``finetune-<hash>``; a fine-tuning strategy other than
    the primary one runs in ``finetune-<hash>-<strategy>``; the ``n``-th ``--retry-failed``
    of a stage in ``<stage>-<hash>-retry<n>``."""
    name = f"{RAY_EXPERIMENTS[stage]}-{stage_hash}"
    name = f"{name}-{strategy}" if strategy else name
    return f"{name}-retry{retry}" if retry else name


def experiment_dir(name: str) -> str:
    """The run directory of the Ray experiment ``name``, relative to the sweep directory."""
    return f"{RAY_DIR}/{name}"


def tune_result(experiment: str, trial: str) -> str:
    """The result lines Tune writes for ``trial`` of ``experiment`` (one JSON per report)."""
    return f"{experiment_dir(experiment)}/{trial}/result.json"


def train_snapshot(experiment: str) -> str:
    """Ray Train's record of the last committed checkpoint of ``experiment``."""
    return f"{experiment_dir(experiment)}/checkpoint_manager_snapshot.json"


def autoattack_shard(name: str, i: int) -> str:
    """Where the AutoAttack result of shard ``i`` of the evaluation ``name`` is kept."""
    return f"artifacts/autoattack/{name}/shard-{i}.json"


def seed_dir(seed: int) -> str:
    """Where the RiFT stages of one seed of ``seeds`` live, relative to the sweep directory."""
    return f"{SEEDS_DIR}/{seed}"


def stage_record(stage: str) -> str:
    return f"stages/{stage}.json"


def _is_uri(path: str) -> bool:
    return "://" in path


def is_local_storage(storage: str) -> bool:
    """Whether a ``storage`` setting is this machine's file system (a path or ``file://``),
    as :meth:`Store.open` reads it, rather than an object store every node can reach."""
    return not _is_uri(storage) or storage.startswith("file://")


@dataclass
class Store:
    """A sweep directory ``<root>`` on a pyarrow filesystem."""

    fs: pafs.FileSystem
    root: str  # path inside fs, no trailing slash
    uri: str  # what the user gave, joined with the name (for printing and for Ray)

    @classmethod
    def open(cls, storage: str, name: str) -> Store:
        if _is_uri(storage):
            try:
                fs, base = pafs.FileSystem.from_uri(storage)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise StorageError(f"storage: {storage!r}: {' '.join(str(e).split())}") from None
            base = base.rstrip("/")
            return cls(fs, f"{base}/{name}", storage.rstrip("/") + "/" + name)
        base = os.path.abspath(os.path.expanduser(os.path.expandvars(storage)))
        root = os.path.join(base, name)
        return cls(pafs.LocalFileSystem(), root, root)

    def for_seed(self, seed: int) -> Store:
        """The sweep directory of one seed of ``seeds`` (same filesystem, ``seeds/<seed>/``)."""
        rel = seed_dir(seed)
        return Store(self.fs, self.path(rel), f"{self.uri}/{rel}")

    def seed_dirs(self) -> list[int]:
        """The seeds that have a directory under ``seeds/`` (numeric names only), ascending."""
        return sorted(int(n) for n in self.list(SEEDS_DIR) if n.isdigit())

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray Train / Tune RunConfig."""
        if self.is_local:
            return self.path(RAY_DIR), None
        return self.path(RAY_DIR), self.fs

    # -- checks --------------------------------------------------------------
    def experiments(self, stage: str, stage_hash: str) -> list[str]:
        """The Ray experiments of ``stage`` at ``stage_hash`` under ``ray/`` (fine-tuning: one
        per strategy, :func:`experiment_name`)."""
        name = experiment_name(stage, stage_hash)
        return [n for n in self.list(RAY_DIR) if n == name or n.startswith(name + "-")]

    def check_writable(self) -> None:
        """Write and delete a probe file; raise StorageError naming the location."""
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        created = []  # local directories the probe creates (innermost first)
        if self.is_local:
            d = self.root
            while not os.path.lexists(d) and os.path.dirname(d) != d:
                created.append(d)
                d = os.path.dirname(d)
        try:
            self._write(probe, b"ok")
            self.fs.delete_file(self.path(probe))
            for d in created:  # leave no trace: the sweep may still be refused
                os.rmdir(d)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"storage: {self.uri}: not writable ({_short(e)})") from None

    # -- raw bytes -----------------------------------------------------------
    def _write(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:  # interrupted: the target keeps its old content
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                raise
        else:  # one PUT: the object appears whole or not at all
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def exists(self, rel: str) -> bool:
        info = self.fs.get_file_info(self.path(rel))
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return bytes(f.read())

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def list(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    # -- artifacts with checksums ----------------------------------------------
    def put(self, rel: str, data: bytes, *, stage_hash: str | None = None) -> None:
        """Write an artifact atomically and record its checksum in the manifest."""
        self._write(rel, data)
        manifest = self.manifest()
        manifest[rel] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "hash": stage_hash,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._write(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())

    def get(self, rel: str) -> bytes:
        """Read an artifact, verifying its checksum; raise StorageError if it does not match."""
        data = self.read_bytes(rel)
        entry = self.manifest().get(rel)
        if entry is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StorageError(f"{self.path(rel)}: checksum does not match the manifest")
        return data

    def valid(self, rel: str, stage_hash: str | None = None) -> bool:
        """True if the artifact exists, matches its manifest checksum and (optionally) hash."""
        entry = self.manifest().get(rel)
        if entry is None or (stage_hash is not None and entry.get("hash") != stage_hash):
            return False
        try:
            data = self.read_bytes(rel)
        except (OSError, pa.ArrowException):
            return False
        return hashlib.sha256(data).hexdigest() == entry["sha256"]

    def manifest(self) -> dict[str, Any]:
        if not self.exists(MANIFEST):
            return {}
        try:
            return dict(json.loads(self.read_bytes(MANIFEST)))
        except (ValueError, OSError):
            return {}

    # -- typed helpers ---------------------------------------------------------
    def put_json(self, rel: str, obj: Any, *, stage_hash: str | None = None) -> None:
        self.put(
            rel,
            json.dumps(obj, indent=2, sort_keys=False, default=str).encode(),
            stage_hash=stage_hash,
        )

    def get_json(self, rel: str) -> Any:
        return json.loads(self.get(rel))

    def put_table(
        self,
        rel: str,
        table: pa.Table | builtins.list[dict[str, Any]],
        *,
        stage_hash: str | None = None,
    ) -> None:
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(table)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.put(rel, buf.getvalue(), stage_hash=stage_hash)

    def get_table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.get(rel)))

    def put_text(self, rel: str, text: str) -> None:
        self.put(rel, text.encode())

    # -- history: what a restart replaces ----------------------------------------
    def archive_stage(self, stage: str, *, keep: bool = True) -> str | None:
        """Move ``stage``'s outputs, record and Ray experiments to
        ``history/<stage>-<hash>/`` (relative paths kept) and drop them from the manifest;
        return that directory, None when the stage left nothing. ``keep=False``: delete them
        instead (``keep_history: false``)."""
        rec = self.read_stage(stage)
        h = (rec or {}).get("hash") or "unknown"
        dest, n = f"{HISTORY_DIR}/{stage}-{h}", 1
        while self.exists(dest):  # the same stage restarted again at the same hash
            n += 1
            dest = f"{HISTORY_DIR}/{stage}-{h}-{n}"
        rels = [*STAGE_OUTPUTS[stage], stage_record(stage)]
        if stage in RAY_EXPERIMENTS and rec and rec.get("hash"):
            rels += [f"{RAY_DIR}/{n}" for n in self.experiments(stage, rec["hash"])]
        if keep:
            moved = [rel for rel in rels if self._move(rel, f"{dest}/{rel}")]
        else:
            moved = [rel for rel in rels if self.exists(rel)]
            for rel in moved:
                self.delete(rel)
            dest = "deleted (keep_history: false)"
        if not moved:
            return None
        manifest = self.manifest()
        kept = {k: v for k, v in manifest.items() if not any(
            k == rel or k.startswith(rel + "/") for rel in moved)}  # fmt: skip
        if kept != manifest:
            self._write(MANIFEST, json.dumps(kept, indent=1, sort_keys=True).encode())
        return dest

    def _move(self, src: str, dst: str) -> bool:
        """Move the file or directory ``src`` to ``dst`` (object stores: copy, then delete)."""
        info = self.fs.get_file_info(self.path(src))
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.File:
            files = [(self.path(src), self.path(dst))]
        else:
            sel = pafs.FileSelector(self.path(src), recursive=True)
            files = [
                (i.path, self.path(dst) + i.path[len(self.path(src)) :])
                for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File
            ]
        for a, b in files:
            self.fs.create_dir(b.rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(a, b)
        self.delete(src)
        return True

    def history(self) -> builtins.list[str]:
        """The entries of ``history/`` (``<stage>-<hash>``), by name; not the configs kept
        there (``config-<key>.yaml``)."""
        return [e for e in self.list(HISTORY_DIR) if not e.startswith("config-")]

    # -- bookkeeping outside the manifest (W&B run ids, logs) --------------------
    def write_file(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole (atomically), without a manifest entry: files that change often
        and that no stage's result depends on."""
        self._write(rel, data)

    def read_json_file(self, rel: str) -> Any:
        """The JSON at ``rel`` (written by :meth:`write_file`), None when absent or unreadable."""
        try:
            return json.loads(self.read_bytes(rel)) if self.exists(rel) else None
        except (ValueError, OSError, pa.ArrowException):
            return None

    # -- stage records -----------------------------------------------------------
    def stage_artifacts(self, stage: str) -> builtins.list[str]:
        """What a finished stage must have left in storage (fine-tuning: its record names
        the surviving trials whose checkpoints go on to interpolation)."""
        if stage == "finetune":
            survivors = (self.read_stage("finetune") or {}).get("survivors", [])
            return [FINETUNE_TABLE] + [finetune_checkpoint(t) for t in survivors]
        return {
            "adv_train": [AT_CHECKPOINT],
            "mrc": [MRC_TABLE],
            "interpolate": [INTERPOLATION_TABLE, RIFT_CHECKPOINT, SUMMARY],
        }[stage]

    def stage_done(self, stage: str, stage_hash: str) -> bool:
        """A stage is reusable when its record says done for this hash and its artifacts verify."""
        rec = self.read_stage(stage)
        if not rec or rec.get("status") != "done" or rec.get("hash") != stage_hash:
            return False
        if stage == "finetune" and not rec.get("survivors"):
            return False
        return all(self.valid(a, stage_hash) for a in self.stage_artifacts(stage))

    def read_stage(self, stage: str) -> dict[str, Any] | None:
        rel = stage_record(stage)
        if not self.exists(rel):
            return None
        try:
            return dict(json.loads(self.read_bytes(rel)))
        except (ValueError, OSError):
            return None

    def write_stage(self, stage: str, **record: Any) -> None:
        rec = self.read_stage(stage) or {}
        rec.update(record)
        rec["stage"] = stage
        rec["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write(stage_record(stage), json.dumps(rec, indent=2, default=str).encode())


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
