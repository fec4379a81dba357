"""Live status of a sweep (``rift-ray status``): each stage's state, timing and best
figures so far, from the stage records and, while a stage runs, the files that Ray Tune
(``ray/<experiment>/<trial>/result.json``) and Ray Train (``checkpoint_manager_snapshot.json``)
write under the sweep directory.

    rift-ray status results/smoke                  # stages, timings, best figures so far
"""

from __future__ import annotations

import json
import time
from typing import Any

from rift_ray.metrics import is_finite
from rift_ray.progress import duration
from rift_ray.results import SweepResults, stage_records
from rift_ray.store import Store, experiment_dir, experiment_name, train_snapshot, tune_result


def _live_tune(store: Store, experiment: str) -> list[dict[str, Any]]:
    """The last result of every trial of a Tune experiment still running under ray/."""
    out = []
    for trial in store.list(experiment_dir(experiment)):
        rel = tune_result(experiment, trial)
        try:
            lines = store.read_bytes(rel).decode().strip().splitlines() if store.exists(rel) else []
            if lines:
                out.append(json.loads(lines[-1]))
        except (OSError, ValueError):
            continue
    return out


Figures = tuple[str, dict[str, Any]]  # (one line for a person, the same figures as data)


def _adv_train_figures(res: SweepResults, rec: dict[str, Any]) -> Figures:
    hist = rec.get("history") or []
    if rec.get("status") == "running":  # the last committed Ray Train checkpoint
        snap = train_snapshot(experiment_name("adv_train", str(rec.get("hash"))))
        try:
            hist = [json.loads(res.store.read_bytes(snap))["latest_checkpoint_result"]["metrics"]]
        except (OSError, ValueError, KeyError, TypeError):
            hist = []
    if not hist:
        return "", {}
    best = max(hist, key=lambda r: r.get("val_robust_acc", float("-inf")))
    line = f"epoch {hist[-1].get('epoch')}/{res.setting('adv_train', 'epochs', '?')}"
    if "val_robust_acc" in best:
        line += (
            f"; best epoch {best['epoch']}: val clean {best.get('val_clean_acc', 0):.2f}, "
            f"PGD {best['val_robust_acc']:.2f}"
        )
    return line, {k: best.get(k) for k in ("epoch", "val_clean_acc", "val_robust_acc")}


def _mrc_figures(res: SweepResults, rec: dict[str, Any]) -> Figures:
    running = rec.get("status") == "running"
    exp = experiment_name("mrc", str(rec.get("hash")))
    rows = _live_tune(res.store, exp) if running else res.rows("mrc")
    if not rows:
        return "", {}
    ok = sorted((r for r in rows if r.get("status") == "done"), key=lambda r: r["mrc"])
    line = f"{len(ok)} module(s) done, {len(rows) - len(ok)} failed"
    if ok:
        line += f"; least critical {ok[0]['module']} (MRC {ok[0]['mrc']:.4g})"
    return line, {"modules_done": len(ok), "least_critical": ok[0]["module"] if ok else None}


def _finetune_figures(res: SweepResults, rec: dict[str, Any]) -> Figures:
    if rec.get("status") == "running":
        rows = [
            r
            for name in res.store.experiments("finetune", str(rec.get("hash")))
            for r in _live_tune(res.store, name)
        ]
        line = f"{len(rows)} trial(s) reporting"
    else:
        rows = res.rows("finetune")
        outcomes = ("finished", "stopped", "failed")
        counts = {s: sum(r.get("status") == s for r in rows) for s in outcomes}
        line = f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})"
    if not rows:
        return "", {}

    def score(r: dict[str, Any]) -> float:
        v = r.get("best_val_score", r.get("best_val_gain"))
        return v if is_finite(v) else float("-inf")

    best = max(rows, key=score)
    if score(best) > float("-inf"):
        line += (
            f"; best{' so far' if rec.get('status') == 'running' else ''} {best.get('trial')} "
            f"(score {score(best):+.2f} at epoch {best.get('best_epoch')})"
        )
    return line, {"trials": len(rows), "best_trial": best.get("trial")}


def _interpolate_figures(res: SweepResults, rec: dict[str, Any]) -> Figures:
    s = res.summary
    if not s or rec.get("status") != "done":
        return "", {}
    at, rift = (s.get("at") or {}).get("test") or {}, (s.get("rift") or {}).get("test") or {}
    line = f"alpha* {s.get('alpha', 0):g} on {s.get('trial')}"
    if at and rift:
        line += (
            f"; test clean {at.get('clean_acc', 0):.2f} -> {rift.get('clean_acc', 0):.2f}, "
            f"PGD {at.get('robust_acc', 0):.2f} -> {rift.get('robust_acc', 0):.2f}"
        )
    return line, {"alpha": s.get("alpha"), "trial": s.get("trial"), "test": rift}


_FIGURES = {
    "adv_train": _adv_train_figures,
    "mrc": _mrc_figures,
    "finetune": _finetune_figures,
    "interpolate": _interpolate_figures,
}


def sweep_status(store: Store) -> dict[str, Any]:
    """Each stage's status, timing and best figures so far, plus the summary when finished."""
    res = SweepResults.load(store)
    now = time.time()
    stages = []
    for seed, stage, rec in stage_records(res):
        status = rec.get("status", "pending")
        started = rec.get("started")
        of = res if seed is None else res.seeds[seed]
        line, best = _FIGURES[stage](of, rec) if rec else ("", {})
        stages.append(
            {
                **({} if seed is None else {"seed": seed}),
                "stage": stage,
                "status": status,
                "seconds": rec.get("seconds") if status == "done" else None,
                "elapsed": now - started
                if status == "running" and isinstance(started, (int, float))
                else None,
                "computed": rec.get("computed"),
                "failed": rec.get("failed") or None,
                "error": rec.get("error"),
                "updated": rec.get("updated"),
                "detail": line,
                "best": best,
            }
        )
    out: dict[str, Any] = {"name": res.name, "location": store.uri, "stages": stages}
    from rift_ray.lease import describe, read_lease

    lease = read_lease(store)
    if lease is not None:  # the driver running the sweep now (or one that died: see heartbeat)
        out["driver"] = {k: v for k, v in lease.items() if k != "token"} | {
            "describe": describe(lease, now)
        }
    out["history"] = store.history()
    out["wandb"] = [run for _, _, rec in stage_records(res) for run in rec.get("wandb") or []]
    if res.summary:
        out["summary"] = res.summary
    return out


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status as plain aligned lines (one per stage)."""
    lines = [f"sweep {status['name']} at {status['location']}"]
    width = max([12] + [len(f"s{r['seed']} {r['stage']}") for r in status["stages"] if "seed" in r])
    for r in status["stages"]:
        if r["status"] == "running":
            when = f"{duration(r['elapsed'])} so far" if r["elapsed"] is not None else ""
            state = "running"  # or interrupted: a record cannot tell a dead driver apart
        else:
            when, state = duration(r["seconds"]), r["status"]
        detail = r["detail"]
        if r["failed"]:
            detail += f"{'; ' if detail else ''}failed: {', '.join(r['failed'])}"
        if r["status"] == "failed" and r["error"]:
            detail += f"{'; ' if detail else ''}{r['error']}"
        stage = r["stage"] if "seed" not in r else f"s{r['seed']} {r['stage']}"
        lines.append(f"  {stage:<{width}} {state:<8} {when:>12}  {detail}".rstrip())
    if status.get("driver"):  # after the stage lines: `status --follow` reads those by position
        lines.append(f"  run by {status['driver']['describe']}")
    runs = status.get("wandb") or []
    urls = [r["url"] for r in runs if r.get("url")]
    dirs = [r["dir"] for r in runs if r.get("dir")]
    if urls:
        lines.append(f"  W&B: {len(urls)} run(s), e.g. {urls[0]}")
    if dirs:
        lines.append(f"  W&B: {len(dirs)} offline run(s); upload with: wandb sync {' '.join(dirs)}")
    if status.get("history"):
        lines.append(
            f"  history (replaced results; `rift-ray report SWEEP --history ENTRY`): "
            f"{', '.join(status['history'])}"
        )
    if any(r["status"] == "running" for r in status["stages"]):
        lines.append(
            "  (a stage shown running may also have been interrupted: re-run the sweep to resume)"
        )
    return lines
