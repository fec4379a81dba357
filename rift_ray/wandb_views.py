"""What goes into each stage's W&B run: metric keys, history rows, and the tables, charts and
figures logged when a stage ends. Plain functions of an open run (``tracking.LiveRun``), the
``wandb`` module and the results; opening, resuming and closing runs is :mod:`rift_ray.tracking`'s.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any

from rift_ray.config import SweepConfig
from rift_ray.metrics import is_finite
from rift_ray.store import RIFT_CHECKPOINT

if TYPE_CHECKING:
    from rift_ray.tracking import LiveRun, Tracker


def metric_key(name: str) -> str:
    """``train_clean_acc`` -> ``train/clean_acc`` (W&B panel sections); other names unchanged."""
    for prefix in ("train", "val", "test", "best", "last"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1 :]}"
    return name


def history_row(row: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Numeric, finite entries of a stage row under W&B keys (``seconds`` -> ``epoch_seconds``)."""
    out = {}
    for k, v in row.items():
        if k in skip or not is_finite(v):
            continue
        out["epoch_seconds" if k == "seconds" else metric_key(k)] = v
    return out


FT_SKIP = ("epoch", "best_epoch", "best_val_gain", "best_val_score")
"""Fine-tuning epoch row fields that are not curves (the best so far goes to the summary)."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"at": {"test": {"clean_acc": 1.0}}}`` -> ``{"at/test/clean_acc": 1.0}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def table(wandb: Any, rows: list[dict[str, Any]]) -> Any:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=cols, data=[[cell(r.get(c)) for c in cols] for r in rows])


def cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def adv_train_view(
    live: LiveRun, wandb: Any, cfg: SweepConfig, history: list[dict[str, Any]]
) -> None:
    """The AT run at the stage's end: every epoch it does not hold yet, the figure and the best
    epoch (or the source checkpoint when training was skipped)."""
    for row in history:
        epoch = int(row["epoch"])
        live.log({"epoch": epoch, **history_row(row, ("epoch", "best_epoch"))}, epoch)
    run = live.run
    if not history:
        run.summary["source"] = str(cfg.adv_train.checkpoint or "")
        return
    best = max(history, key=lambda r: r.get("val_robust_acc", -1.0))
    run.summary["best_epoch"] = int(history[-1].get("best_epoch", best["epoch"]))
    for k in ("val_clean_acc", "val_robust_acc"):
        if k in best:
            run.summary[f"best/{k}"] = best[k]
    from rift_ray.figures import fig_adv_train

    log_figure(live, wandb, "at/figure", fig_adv_train(history))


def mrc_step(live: LiveRun, row: dict[str, Any]) -> None:
    """A module's MRC row as the next step of the MRC run, once per module and outcome (what
    was logged is kept in the run's registry entry, across drivers; a module retried by
    ``--retry-failed`` logs its new outcome)."""
    logged = live.entry.setdefault("modules", {})
    if logged.get(row.get("module")) == row.get("status"):
        return
    keys = ("mrc", "loss_before", "loss_after", "acc_after", "seconds")
    logged[str(row.get("module"))] = row.get("status")
    live.log({k: row[k] for k in keys if is_finite(row.get(k))})
    if is_finite(row.get("mrc")):
        live.run.summary[f"mrc/{row['module']}"] = row["mrc"]


def mrc_view(live: LiveRun, wandb: Any, cfg: SweepConfig, rows: list[dict[str, Any]]) -> None:
    """The MRC run at the stage's end: the per-module table, a bar chart, the report figure."""
    from rift_ray.figures import fig_mrc

    live.log({"mrc/table": table(wandb, rows)})
    ok = sorted(
        (r for r in rows if r.get("status") == "done" and is_finite(r.get("mrc"))),
        key=lambda r: r["mrc"],
    )
    bar = wandb.Table(columns=["module", "mrc"], data=[[r["module"], r["mrc"]] for r in ok])
    live.log({"mrc/by_module": wandb.plot.bar(bar, "module", "mrc", title="MRC by module")})
    fig = fig_mrc(rows, [r["module"] for r in ok[: cfg.finetune.top_k]])
    log_figure(live, wandb, "mrc/figure", fig)
    run = live.run
    run.summary["modules"] = len(rows)
    run.summary["failed"] = len(rows) - len(ok)
    if ok:
        run.summary["least_critical"] = ok[0]["module"]
        run.summary["least_critical_mrc"] = ok[0]["mrc"]


def trial_view(
    live: LiveRun, cfg: SweepConfig, trial: dict[str, Any], epochs: list[dict[str, Any]]
) -> int | None:
    """A fine-tuning trial's run at the stage's end: its epochs and ASHA outcome; the run's
    exit code (1 for a failed trial)."""
    for e in epochs:
        live.log({"epoch": int(e["epoch"]), **history_row(e, FT_SKIP)}, int(e["epoch"]))
    run = live.run
    run.summary["asha/status"] = trial.get("status")
    run.summary["asha/epochs"] = trial.get("epochs")
    run.summary["asha/max_epochs"] = cfg.finetune.epochs
    for k, v in trial.items():
        if k.startswith(("best_", "last_")) and v is not None:
            run.summary[metric_key(k)] = v
    if trial.get("error"):
        run.summary["error"] = trial["error"]
    return 1 if trial.get("status") == "failed" else None


def seeds_view(live: LiveRun, wandb: Any, summary: dict[str, Any]) -> None:
    """The aggregate run of a ``seeds`` sweep: mean, std and n of every figure, how often each
    module / lr was chosen, the per-seed and mean/std before/after tables, and with several
    strategies their comparison over seeds (``seeds/strategies``, ``paired/...``)."""
    from rift_ray.aggregate import strategy_seed_rows
    from rift_ray.figures import fig_before_after_seeds
    from rift_ray.results import per_seed_rows, summary_rows

    run = live.run
    for part in ("mean", "std", "count"):
        for key, v in flatten(summary.get(part) or {}).items():
            if v is not None:
                run.summary[f"{'n' if part == 'count' else part}/{key}"] = v
    for what, counts in (summary.get("chosen") or {}).items():
        for k, v in counts.items():
            run.summary[f"chosen/{what}/{k}"] = v
    run.summary["n"] = summary.get("n")
    run.summary["seeds"] = list(summary.get("seeds") or [])
    run.summary["seconds"] = summary.get("seconds") or {}
    live.log(
        {
            "seeds/per_seed": table(wandb, per_seed_rows(summary)),
            "seeds/before_after": table(wandb, summary_rows(summary)),
        }
    )
    log_figure(live, wandb, "seeds/figure", fig_before_after_seeds(summary))
    rows = strategy_seed_rows(summary)
    if rows:  # the module-selection comparison over seeds (finetune.strategies)
        live.log({"seeds/strategies": table(wandb, rows)})
        for p in summary["strategies"].get("paired") or []:  # primary - strategy, 95% t CI
            key = f"paired/{p['strategy']}/{p['metric']}"
            run.summary[f"{key}/mean"] = p["mean"]
            run.summary[f"{key}/n"] = p["n"]
            if p.get("ci95"):
                run.summary[f"{key}/ci95_lo"], run.summary[f"{key}/ci95_hi"] = p["ci95"]


def interp_view(
    live: LiveRun,
    wandb: Any,
    cfg: SweepConfig,
    grid: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """The interpolation run at the stage's end: the grid, the choices, a line chart per split
    and metric (a line per trial, alpha* as a vertical line), the figure, alpha* in the summary."""
    from rift_ray.figures import fig_interpolation
    from rift_ray.metrics import METRICS

    live.log({"interp/table": table(wandb, grid)})
    if summary.get("choices"):
        live.log({"interp/choices": table(wandb, summary["choices"])})
    trials = list(dict.fromkeys(r["trial"] for r in grid))
    best, alpha = summary.get("trial"), summary.get("alpha")
    for split in ("val", "test"):
        for metric in METRICS:
            pts = [r for r in grid if r["split"] == split and is_finite(r.get(metric))]
            if not pts:
                continue
            xs, ys, keys = [], [], []
            for trial in trials:
                series = sorted((r["alpha"], r[metric]) for r in pts if r["trial"] == trial)
                if series:
                    xs.append([a for a, _ in series])
                    ys.append([v for _, v in series])
                    keys.append(trial)
            if alpha is not None:  # alpha* as a vertical segment across the chart
                lo, hi = min(map(min, ys)), max(map(max, ys))
                xs.append([alpha, alpha])
                ys.append([lo, hi])
                keys.append(f"alpha* = {alpha:g} ({best})")
            title = f"{split} {METRICS[metric]} accuracy vs alpha"
            chart = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="alpha")
            live.log({f"interp/{split}/{metric}": chart})
    fig = fig_interpolation(grid, summary.get("choices"), best, cfg.interpolate.tolerance)
    log_figure(live, wandb, "interp/figure", fig)
    for k in ("alpha", "trial", "lr", "reason", "clean_gain_val", "robust_drop_val"):
        if summary.get(k) is not None:
            live.run.summary[k] = summary[k]
    live.run.summary["modules"] = "+".join(summary.get("modules") or [])


def summary_view(live: LiveRun, wandb: Any, tracker: Tracker, summary: dict[str, Any]) -> None:
    """The summary run: before/after table and figure, the figures, the model artifact."""
    cfg = tracker.cfg
    from rift_ray.figures import fig_before_after
    from rift_ray.results import summary_rows

    run = live.run
    live.log({"summary/before_after": table(wandb, summary_rows(summary))})
    if len(summary.get("strategies") or []) > 1:  # the module-selection comparison
        live.log({"summary/strategies": table(wandb, summary["strategies"])})
    log_figure(live, wandb, "summary/figure", fig_before_after(summary))
    for split in ("val", "test"):
        at = (summary.get("at") or {}).get(split) or {}
        rift = (summary.get("rift") or {}).get(split) or {}
        for k in set(at) | set(rift):
            if k in at:
                run.summary[f"at/{split}/{k}"] = at[k]
            if k in rift:
                run.summary[f"rift/{split}/{k}"] = rift[k]
            if is_finite(at.get(k)) and is_finite(rift.get(k)):
                run.summary[f"delta/{split}/{k}"] = rift[k] - at[k]
    for k in ("alpha", "trial", "lr", "reason"):
        if summary.get(k) is not None:
            run.summary[k] = summary[k]
    run.summary["modules"] = "+".join(summary.get("modules") or [])
    run.summary["seconds"] = summary.get("seconds") or {}
    for split, figs in (summary.get("paired") or {}).items():  # RiFT - AT, paired 95% intervals
        for k, iv in figs.items() if isinstance(figs, dict) else ():
            for part in ("diff", "lo", "hi"):
                run.summary[f"paired/{split}/{k}/{part}"] = iv[part]
    if summary.get("rule"):
        run.summary["rule"] = summary["rule"]
    if (summary.get("noise_floor") or {}).get("robust_drop") is not None:
        run.summary["noise_floor/val_robust_drop"] = summary["noise_floor"]["robust_drop"]
    if summary.get("confirmation"):
        run.summary["confirmation/confirmed"] = summary["confirmation"]["confirmed"]
    if cfg.wandb.log_checkpoint and tracker.store.exists(RIFT_CHECKPOINT):
        log_model(run, wandb, tracker, summary)


def log_model(run: Any, wandb: Any, tracker: Tracker, summary: dict[str, Any]) -> None:
    """The final checkpoint as a ``model`` artifact, from any storage (object storage: a
    local copy, staged by wandb before it is removed)."""
    meta = {k: summary.get(k) for k in ("alpha", "trial", "modules", "lr", "config_hash", "seed")}
    art = wandb.Artifact(
        f"{tracker.cfg.name}-{tracker.prefix}rift", type="model",
        metadata={**meta, "rift": summary.get("rift")},
    )  # fmt: skip
    if tracker.store.is_local:
        art.add_file(tracker.store.path(RIFT_CHECKPOINT), name="rift.pt")
        run.log_artifact(art)
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rift.pt")
        with open(path, "wb") as f:
            f.write(tracker.store.get(RIFT_CHECKPOINT))
        art.add_file(path, name="rift.pt", policy="mutable")  # copied into wandb's staging
        run.log_artifact(art)


def log_figure(live: LiveRun, wandb: Any, key: str, fig: Any) -> None:
    if fig is None:
        return
    import io

    from PIL import Image

    from rift_ray.figures import png_bytes

    live.log({key: wandb.Image(Image.open(io.BytesIO(png_bytes(fig))))})
