"""A sweep as it was before a restart or a config change replaced a stage: one ``history/`` entry
laid over the sweep, for ``rift-ray report SWEEP --history ENTRY``.

    view = history_view(store, "mrc-3f2a9c1b7d0e")     # a local Store under a temp directory

The view holds the entry's own outputs; for each earlier stage the result it was computed
from (its record's ``after``: the hash of the stage before it, when it ran), current or in
``history/``; and for each later stage the result that was computed from the one before it.
A stage with no such result (never computed, deleted by ``keep_history: false``, or
recorded before ``after`` existed: earlier stages are then the current ones) is left out,
with the stages beyond it. The config is
the one the entry's stage ran with (``history/config-<hash>.yaml``, kept when a changed
config replaced ``config.yaml``), else the current one.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from rift_ray import store as layout
from rift_ray.store import HISTORY_DIR, STAGES, StorageError, Store


def entry_stage(entry: str) -> str:
    """``finetune`` of ``finetune-<hash>`` / ``finetune-<hash>-2``."""
    stage = entry.split("-", 1)[0]
    if stage not in STAGES:
        raise StorageError(f"history entry {entry}: not <stage>-<hash>")
    return stage


def find_entry(store: Store, arg: str) -> str:
    """The ``history/`` entry named ``arg``, or the one whose name contains it (a hash)."""
    entries = store.history()
    if arg in entries:
        return arg
    hits = [e for e in entries if arg in e]
    if len(hits) == 1:
        return hits[0]
    have = ", ".join(entries) or "none"
    what = "matches several" if hits else "matches no"
    raise StorageError(f"--history {arg}: {what} history entry of {store.uri} (entries: {have})")


def config_key(text: str) -> str:
    """The name of a config text in ``history/`` (``config-<key>.yaml``) and stage records."""
    from rift_ray.hashing import stable_hash

    return stable_hash(["config.yaml", text])


def _record(store: Store, prefix: str, stage: str) -> dict[str, Any] | None:
    rel = f"{prefix}{layout.stage_record(stage)}"
    if not store.exists(rel):
        return None
    rec: dict[str, Any] = json.loads(store.read_bytes(rel))
    return rec


def history_view(store: Store, arg: str, root: str | None = None) -> tuple[Store, str]:
    """(a local copy of the sweep as it was with history entry ``arg``, the entry's name)."""
    entry = find_entry(store, arg)
    first = entry_stage(entry)
    name = store.root.rstrip("/").rsplit("/", 1)[-1]
    view = Store.open(root or tempfile.mkdtemp(prefix="rift-ray-history-"), name)
    here = STAGES.index(first)
    top = f"{HISTORY_DIR}/{entry}/"
    rec = _record(store, top, first) or {}
    sources: dict[str, str] = {first: top}
    need = rec.get("after")  # backwards: what the entry was computed from
    for stage in reversed(STAGES[:here]):
        src = (
            _find(store, stage, "hash", need) if need else ("" if store.read_stage(stage) else None)
        )
        if src is None:
            break
        sources[stage] = src
        need = (_record(store, src, stage) or {}).get("after")
    before = rec.get("hash")  # forwards: what was computed from it
    for stage in STAGES[here + 1 :]:
        src = _find(store, stage, "after", before)
        if src is None:
            break
        sources[stage] = src
        before = (_record(store, src, stage) or {}).get("hash")
    for stage, src in sources.items():
        _copy(store, view, src, [layout.stage_record(stage), *layout.STAGE_OUTPUTS[stage]])
    old = f"{HISTORY_DIR}/config-{rec.get('config')}.yaml"
    cfg = old if rec.get("config") and store.exists(old) else layout.CONFIG
    if store.exists(cfg):
        view.put(layout.CONFIG, store.read_bytes(cfg))
    return view, entry


def _candidates(store: Store, stage: str) -> list[str]:
    """Where results of ``stage`` are: the sweep itself (``""``), then its ``history/``
    entries, newest first."""
    entries = [f"{HISTORY_DIR}/{e}/" for e in store.history() if entry_stage(e) == stage]
    return ["", *sorted(entries, key=_entry_order, reverse=True)]


def _entry_order(src: str) -> tuple[str, int]:
    stem = src.rstrip("/").rsplit("/", 1)[-1]
    head, _, n = stem.rpartition("-")
    return (head, int(n)) if n.isdigit() and len(n) < 4 else (stem, 1)


def _find(store: Store, stage: str, key: str, value: str | None) -> str | None:
    """Where the result of ``stage`` whose record holds ``key == value`` is (``hash``: that
    result; ``after``: the one computed from the stage before it at that hash), None when
    nowhere."""
    if value is None:
        return None
    for src in _candidates(store, stage):
        if (_record(store, src, stage) or {}).get(key) == value:
            return src
    return None


def _copy(store: Store, view: Store, prefix: str, rels: list[str]) -> None:
    """The files (or directories' files) ``rels`` under ``prefix`` of ``store`` into ``view``;
    checkpoints are left out (a report does not read them)."""
    for rel in rels:
        if rel.startswith("checkpoints"):
            continue
        src = f"{prefix}{rel}"
        if store.exists(src):
            view.put(rel, store.read_bytes(src))
