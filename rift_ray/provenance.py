"""Where a sweep's results came from: the code (git), the devices and the W&B runs.

The commit is what ``summary.json`` records as ``environment.git`` (``rift_ray.version.git_info``:
the checkout the driver ran from); :func:`wandb_rows` and :func:`device_rows` read what the stage records
(``stages/*.json`` ``wandb``) and the tables (``device`` columns) already hold, for the
report's provenance view. Never starts Ray; no matplotlib.
"""

from __future__ import annotations

from typing import Any

from rift_ray.results import SweepResults, stage_records


def git_text(summary: dict[str, Any] | None) -> str:
    """The commit a summary records (``environment.git``), ``+ uncommitted changes`` when
    the checkout was dirty; says so when none was recorded (sweeps before it was)."""
    g = ((summary or {}).get("environment") or {}).get("git")
    if not g:
        return "not recorded"
    return g["sha"] + (" + uncommitted changes" if g.get("dirty") else "")


def wandb_rows(res: SweepResults) -> list[dict[str, Any]]:
    """One row per W&B run in the stage records: stage, run name, id, mode and where to see
    it: the URL of an online run, else the ``wandb sync <its directory>`` that uploads it."""
    rows, seen = [], set()
    for seed, stage, rec in stage_records(res):
        runs = rec.get("wandb") or []
        # a run recorded twice (by its worker, then the driver): the entry that says most
        runs = sorted(runs, key=lambda r: not (r.get("url") or r.get("dir")))
        for run in runs:
            if (seed, stage, run.get("id")) in seen:
                continue
            seen.add((seed, stage, run.get("id")))
            url = run.get("url")
            where = url or (
                f"wandb sync {run['dir']}" if run.get("dir") else "offline, no directory recorded"
            )
            rows.append(
                {
                    "stage": stage if seed is None else f"seed {seed}: {stage}",
                    "run": run.get("name", ""),
                    "id": run.get("id", ""),
                    "mode": run.get("mode", "online" if url else ""),
                    "url": url,
                    "where": where,
                }
            )
    return rows


def device_rows(res: SweepResults) -> list[dict[str, Any]]:
    """The device of each trial, grouped: stage, device, how many and which trials. AT: the
    workers of its history (``devices``, ``<node>:<device>``); MRC, fine-tuning and the
    alpha points: their tables' ``device`` columns (a seeds sweep's rows name their seed)."""
    out: list[dict[str, Any]] = []
    history = (res.stages.get("adv_train") or {}).get("history") or []
    workers = sorted({str(h["devices"]) for h in history if h.get("devices")})
    if workers:
        out.append({"stage": "adv_train", "device": ", ".join(workers), "n": 1, "trials": "AT"})
    for stage, table, key in (
        ("mrc", "mrc", "module"),
        ("finetune", "finetune", "trial"),
        ("interpolate", "interpolation", "trial"),
    ):
        by_device: dict[str, list[str]] = {}
        for r in res.rows(table):
            name = str(r.get(key)) if r.get("seed") is None else f"seed {r['seed']}: {r.get(key)}"
            names = by_device.setdefault(str(r.get("device") or "not recorded"), [])
            if name not in names:
                names.append(name)
        for dev, names in by_device.items():
            shown = ", ".join(names[:6]) + (f" ... (+{len(names) - 6})" if len(names) > 6 else "")
            out.append({"stage": stage, "device": dev, "n": len(names), "trials": shown})
    return out
