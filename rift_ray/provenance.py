"""Where a sweep's results came from: the code (git), the devices and the W&B runs.

:func:`git_info` is what ``summary.json`` records as ``environment.git`` (the checkout the
driver ran from); :func:`wandb_rows` and :func:`device_rows` read what the stage records
(``stages/*.json`` ``wandb``) and the tables (``device`` columns) already hold, for the
report's provenance view. Never starts Ray; no matplotlib.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from rift_ray.results import SweepResults, stage_records


def git_info(path: str | None = None) -> dict[str, Any] | None:
    """``{"sha": <commit>, "dirty": <uncommitted changes to tracked files>}`` of the git
    checkout holding ``path`` (default: this package's source); None when it is not in one
    (an installed wheel) or git is missing."""
    where = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", where, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty} if sha else None


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


def provenance_html(res: SweepResults) -> list[str]:
    """The report's provenance view: the git commit, each trial's device and every W&B run
    (a link when online; an offline run's directory and the ``wandb sync`` that uploads it)."""
    from html import escape

    from rift_ray.report import _html_table

    runs = wandb_rows(res)
    body = "".join(
        f"<tr><td class='l'>{escape(r['stage'])}</td><td class='l'>{escape(r['run'])}</td>"
        f"<td class='l'>{escape(r['id'])}</td><td class='l'>{escape(r['mode'])}</td>"
        + (
            f"<td class='l'><a href='{escape(r['url'])}'>{escape(r['url'])}</a></td></tr>"
            if r["url"]
            else f"<td class='l'><code>{escape(r['where'])}</code></td></tr>"
        )
        for r in runs
    )
    head = "".join(f"<th class='l'>{h}</th>" for h in ("stage", "run", "id", "mode", "where"))
    return [
        "<h2>Provenance</h2>",
        f"<p>git commit: <code>{escape(git_text(res.summary))}</code></p>",
        "<p>Devices (the <code>device</code> columns of the tables):</p>",
        _html_table(device_rows(res), left=("stage", "device", "trials")),
        "<p>W&amp;B runs (an offline run: the command that uploads it):</p>",
        f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"
        if runs
        else "<p class='muted'>none recorded (W&amp;B off)</p>",
    ]
