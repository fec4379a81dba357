"""Sweep results for people: figures, a self-contained HTML report, table exports, stage status.

    rift-ray report results/smoke                  # results/smoke/report.html
    rift-ray report results/smoke --format csv     # results/smoke/export/<table>.csv
    rift-ray status results/smoke                  # stages, timings, best figures so far

Everything here reads a sweep directory through :class:`rift_ray.store.Store` (local
or object storage) and never starts Ray. The figures are matplotlib (no display
needed) and are shared with the W&B tracker (:mod:`rift_ray.tracking`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rift_ray import __version__
from rift_ray import store as layout
from rift_ray.aggregate import is_seeds_summary, lookup, mean_std_text
from rift_ray.progress import duration
from rift_ray.store import STAGES, SUMMARY_TABLE, StorageError, Store

TABLES = {
    "mrc": layout.MRC_TABLE,
    "finetune": layout.FINETUNE_TABLE,
    "finetune_epochs": layout.FINETUNE_EPOCHS_TABLE,
    "interpolation": layout.INTERPOLATION_TABLE,
    "summary": SUMMARY_TABLE,
    "seeds": layout.SEEDS_TABLE,
    "joint_mrc": layout.JOINT_MRC_TABLE,
    "strategies": layout.STRATEGIES_TABLE,
}
"""Every table of a sweep: export name -> path under the sweep directory (docs/tables.md).
In a ``seeds`` sweep the per-seed tables (mrc ... interpolation) are those of every
``seeds/<s>/`` directory, concatenated with a leading ``seed`` column."""
PER_SEED_TABLES = ("mrc", "finetune", "finetune_epochs", "interpolation")

SUMMARY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("split", pa.string()),
        ("trial", pa.string()),
        ("alpha", pa.float64()),
        ("clean_acc", pa.float64()),
        ("robust_acc", pa.float64()),
        ("corruption_acc", pa.float64()),
        ("autoattack_acc", pa.float64()),
    ]
)
METRICS = {
    "clean_acc": "clean",
    "robust_acc": "PGD",
    "corruption_acc": "corruption",
    "autoattack_acc": "AutoAttack",
}
SEEDS_SUMMARY_SCHEMA = pa.schema(
    [
        *SUMMARY_SCHEMA,
        ("n", pa.int64()),
        ("alpha_std", pa.float64()),
        *((f"{k}_std", pa.float64()) for k in METRICS),
    ]
)
"""``tables/summary.parquet`` of a ``seeds`` sweep: the mean over seeds, n and std columns."""
SEEDS_SCHEMA = pa.schema([("seed", pa.int64()), *SUMMARY_SCHEMA])
"""``tables/seeds.parquet``: the before/after rows of every seed."""
AT_COLOR, RIFT_COLOR, LIMIT_COLOR = "#7f7f7f", "#d62728", "#b8860b"


# -- reading a sweep directory -----------------------------------------------------------


def open_sweep(arg: str) -> Store:
    """The sweep at ``arg``: a directory, an ``s3://``/``gs://`` URI, or a name under ./results."""
    if "://" in arg:
        base, name = arg.rstrip("/").rsplit("/", 1)
        store = Store.open(base, name)
    else:
        path = os.path.expanduser(arg)
        if not os.path.isdir(path):
            from rift_ray.config import SweepConfig

            default = os.path.join(SweepConfig().storage, arg)
            if os.sep in arg or not os.path.isdir(default):
                raise StorageError(f"{arg}: no such sweep directory (nor {default})")
            path = default
        storage, name = os.path.split(os.path.abspath(path))
        store = Store.open(storage, name)
    if not (store.exists(layout.CONFIG) or store.exists("stages")):
        raise StorageError(f"{store.uri}: not a sweep directory (no config.yaml, no stages/)")
    return store


@dataclass
class SweepResults:
    """What a sweep directory holds so far; anything not written yet is missing or empty."""

    store: Store
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    summary: dict[str, Any] | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    seeds: dict[int, SweepResults] = field(default_factory=dict)
    """A ``seeds`` sweep: each seed's own results (``seeds/<s>/``), by seed."""

    @classmethod
    def load(cls, store: Store) -> SweepResults:
        res = cls._load(store)
        seeds = res.config.get("seeds") or (
            store.seed_dirs() if is_seeds_summary(res.summary) else []
        )
        for seed in seeds:
            res.seeds[int(seed)] = cls._load(store.for_seed(int(seed)))
        if "seeds" not in res.tables and is_seeds_summary(res.summary):
            res.tables["seeds"] = seeds_table(res.summary or {})
        for name in PER_SEED_TABLES if res.seeds else ():
            parts = [
                t.add_column(0, "seed", pa.array([seed] * t.num_rows, pa.int64()))
                for seed, r in res.seeds.items()
                if (t := r.tables.get(name)) is not None
            ]
            if parts:
                res.tables[name] = pa.concat_tables(parts, promote_options="permissive")
        return res

    @classmethod
    def _load(cls, store: Store) -> SweepResults:
        res = cls(store)
        if store.exists(layout.CONFIG):
            res.config_text = store.read_bytes(layout.CONFIG).decode()
            res.config = yaml.safe_load(res.config_text) or {}
        if store.exists(layout.SUMMARY):
            res.summary = json.loads(store.read_bytes(layout.SUMMARY))
        res.stages = {s: rec for s in STAGES if (rec := store.read_stage(s))}
        for name, rel in TABLES.items():
            if store.exists(rel):
                res.tables[name] = pq.read_table(io.BytesIO(store.read_bytes(rel)))
        if "summary" not in res.tables and res.summary:
            res.tables["summary"] = summary_table(res.summary)
        return res

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.store.root.rsplit("/", 1)[-1])

    def rows(self, table: str) -> list[dict[str, Any]]:
        t = self.tables.get(table)
        return t.to_pylist() if t is not None else []

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        return (self.config.get(section) or {}).get(key, default)


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The before/after table: one row per (model "at" | "rift", split) from summary.json.

    A ``seeds`` summary gives the mean over seeds, with ``n`` and ``<column>_std``."""
    if is_seeds_summary(summary):
        return _mean_std_rows(summary)
    rows = []
    for model in ("at", "rift"):
        for split in ("val", "test"):
            m = (summary.get(model) or {}).get(split)
            if not m:
                continue
            rows.append(
                {
                    "model": model,
                    "split": split,
                    "trial": summary.get("trial") if model == "rift" else None,
                    "alpha": float(summary.get("alpha") or 0.0) if model == "rift" else 0.0,
                    **{k: m.get(k) for k in METRICS},
                }
            )
    return rows


def _mean_std_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    mean, std, count = summary.get("mean") or {}, summary.get("std") or {}, summary["count"]
    for model in ("at", "rift"):
        for split in ("val", "test"):
            m = lookup(mean, model, split)
            if not m:
                continue
            rift = model == "rift"
            rows.append(
                {
                    "model": model,
                    "split": split,
                    "trial": None,
                    "alpha": mean.get("alpha") if rift else 0.0,
                    **{k: m.get(k) for k in METRICS},
                    "n": max((lookup(count, model, split, k) or 0) for k in METRICS),
                    "alpha_std": std.get("alpha") if rift else None,
                    **{f"{k}_std": lookup(std, model, split, k) for k in METRICS},
                }
            )
    return rows


def summary_table(summary: dict[str, Any]) -> pa.Table:
    """:func:`summary_rows` with a fixed schema (``tables/summary.parquet``; a ``seeds``
    summary: :data:`SEEDS_SUMMARY_SCHEMA`, the mean and std over seeds)."""
    schema = SEEDS_SUMMARY_SCHEMA if is_seeds_summary(summary) else SUMMARY_SCHEMA
    return pa.Table.from_pylist(summary_rows(summary), schema=schema)


def seeds_table(summary: dict[str, Any]) -> pa.Table:
    """The before/after table of every seed of a ``seeds`` summary (``tables/seeds.parquet``)."""
    rows = [
        {"seed": s.get("seed"), **row}
        for s in summary.get("per_seed") or []
        for row in summary_rows(s)
    ]
    return pa.Table.from_pylist(rows, schema=SEEDS_SCHEMA)


def environment_info(
    ray_resources: dict[str, float] | None = None, ray_nodes: int | None = None
) -> dict[str, Any]:
    """Host, hardware and library versions, for summary.json (``summary["environment"]``)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("rift-ray", "torch", "torchvision", "ray", "wandb", "numpy", "pyarrow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    gpus: list[str] = []
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPUs to name
        pass
    out: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpus": gpus,
        "versions": versions,
    }
    if ray_resources is not None:
        out["ray_cluster"] = {
            "nodes": ray_nodes,
            **{k: v for k, v in ray_resources.items() if k in ("CPU", "GPU", "memory")},
        }
    return out


# -- figures ------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fig_adv_train(history: list[dict[str, Any]]) -> Any | None:
    """Adversarial training per epoch: losses, clean / PGD accuracy, learning rate."""
    if not history:
        return None
    fig = _figure(10, 3)
    axes = fig.subplots(1, 3)
    ep = [h["epoch"] for h in history]
    panels = [
        (axes[0], "loss", {"train_loss": "train (adv.)", "val_clean_loss": "val clean"}),
        (
            axes[1],
            "accuracy (%)",
            {
                "train_clean_acc": "train clean",
                "train_adv_acc": "train adv.",
                "val_clean_acc": "val clean",
                "val_robust_acc": "val PGD",
            },
        ),
        (axes[2], "learning rate", {"lr": "lr"}),
    ]
    for ax, ylabel, keys in panels:
        for k, label in keys.items():
            if any(_finite(h.get(k)) for h in history):
                ax.plot(ep, [h.get(k) for h in history], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("Adversarial training")
    return fig


def fig_mrc(rows: list[dict[str, Any]], selected: list[str] | None = None) -> Any | None:
    """Horizontal bars of MRC by module, least critical on top; fine-tuned modules highlighted."""
    done = [r for r in rows if r.get("status") == "done" and _finite(r.get("mrc"))]
    if not done:
        return None
    done.sort(key=lambda r: r["mrc"])
    chosen = set(selected or [])
    fig = _figure(7, 1.0 + 0.24 * len(done))
    ax = fig.subplots()
    y = list(range(len(done)))[::-1]
    colors = [RIFT_COLOR if r["module"] in chosen else AT_COLOR for r in done]
    ax.barh(y, [r["mrc"] for r in done], color=colors)
    ax.set_yticks(y, [r["module"] for r in done], fontsize=8)
    ax.set_xlabel("MRC (robust loss increase under a weight perturbation)")
    ax.grid(axis="x", alpha=0.3)
    failed = [r["module"] for r in rows if r.get("status") != "done"]
    title = "Module robust criticality"
    if chosen:
        title += " (red: fine-tuned)"
    if failed:
        title += f"; failed: {', '.join(failed[:4])}" + (" ..." if len(failed) > 4 else "")
    ax.set_title(title, fontsize=10)
    return fig


def _colors(names: list[str], order: list[str] | None = None) -> dict[str, str]:
    """A color per trial from its place in ``order`` (all trials), so that figures agree."""
    full = list(dict.fromkeys([*(order or []), *names]))
    return {n: f"C{full.index(n) % 10}" for n in names}


def fig_finetune(epochs: list[dict[str, Any]], trials: list[dict[str, Any]]) -> Any | None:
    """Fine-tuning learning curves of every trial; ASHA-stopped trials dashed."""
    if not epochs:
        return None
    metric = "val_score" if any(_finite(e.get("val_score")) for e in epochs) else "val_gain"
    status = {t["trial"]: t.get("status", "") for t in trials}
    names = list(dict.fromkeys(e["trial"] for e in epochs))
    fig = _figure(10, 3.4 + 0.18 * ((len(names) + 2) // 3))
    axes = fig.subplots(1, 3)
    panels = [
        ("train_loss", "train loss"),
        ("train_acc", "train accuracy (%)"),
        (metric, f"{metric} (ASHA metric, points)"),
    ]
    lines = []
    colors = _colors(names, [t["trial"] for t in trials])
    for name in names:
        rows = sorted((e for e in epochs if e["trial"] == name), key=lambda e: e["epoch"])
        style = {"finished": "-", "stopped": "--", "failed": ":"}.get(status.get(name, ""), "-")
        color = colors[name]
        for ax, (key, _) in zip(axes, panels):
            (line,) = ax.plot(
                [e["epoch"] for e in rows],
                [e.get(key) for e in rows],
                ls=style,
                color=color,
                marker="o",
                ms=3,
            )
        label = name + (f" ({status[name]})" if status.get(name) not in (None, "finished") else "")
        lines.append((line, label))
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.legend(
        [ln for ln, _ in lines],
        [lb for _, lb in lines],
        loc="outside lower center",
        ncol=3,
        fontsize=7,
        frameon=False,
    )
    fig.suptitle("Fine-tuning (solid: finished, dashed: stopped by ASHA)")
    return fig


def fig_interpolation(
    rows: list[dict[str, Any]],
    choices: list[dict[str, Any]] | None = None,
    best: str | None = None,
    tolerance: float | None = None,
    order: list[str] | None = None,
) -> Any | None:
    """Accuracy against alpha for each trial and split; the constraint line and alpha* marked.

    ``choices`` are the per-trial alpha* choices (summary.json ``choices``), ``best`` the
    winning trial, ``tolerance`` the robust-accuracy slack of the selection rule and
    ``order`` every trial's name (colors as in :func:`fig_finetune` with the same order).
    """
    if not rows:
        return None
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    metrics = [m for m in METRICS if any(_finite(r.get(m)) for r in rows)]
    trials = list(dict.fromkeys(r["trial"] for r in rows))
    alpha_star = {c["trial"]: c.get("alpha") for c in choices or [] if c.get("feasible")}
    fig = _figure(4.0 * len(metrics), 2.9 * len(splits) + 0.3 + 0.18 * ((len(trials) + 2) // 3))
    axes = fig.subplots(len(splits), len(metrics), squeeze=False)
    handles: dict[str, Any] = {}
    colors = _colors(trials, order)
    for i, split in enumerate(splits):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for trial in trials:
                pts = sorted(
                    (r["alpha"], r[metric])
                    for r in rows
                    if r["trial"] == trial and r["split"] == split and _finite(r.get(metric))
                )
                if not pts:
                    continue
                win = trial == best
                (line,) = ax.plot(
                    *zip(*pts),
                    color=colors[trial],
                    lw=2.2 if win else 1.0,
                    alpha=1.0 if win or best is None else 0.6,
                    marker="o",
                    ms=2.5,
                    zorder=3 if win else 2,
                )
                handles.setdefault(trial + (" (alpha* chosen)" if win else ""), line)
                a = alpha_star.get(trial)
                y = dict(pts).get(a) if a is not None else None
                if y is not None:
                    star = ax.plot(
                        a,
                        y,
                        marker="*",
                        ms=12 if win else 8,
                        color=colors[trial],
                        mec="k",
                        zorder=4,
                    )[0]
                    handles.setdefault("alpha* of a trial", star)
            at_pts = [
                r[metric]
                for r in rows
                if r["split"] == split and r["alpha"] == 0.0 and _finite(r.get(metric))
            ]
            if metric == "robust_acc" and split == "val" and tolerance is not None and at_pts:
                limit = at_pts[0] - tolerance
                handles["constraint: AT - tolerance"] = ax.axhline(
                    limit, color=LIMIT_COLOR, ls=":", lw=1.5
                )
            if best is not None and alpha_star.get(best) is not None:
                handles[f"alpha* = {alpha_star[best]:g}"] = ax.axvline(
                    alpha_star[best], color="k", ls="--", lw=1
                )
            ax.set_title(f"{split}: {METRICS[metric]} accuracy", fontsize=10)
            ax.set_xlabel("alpha (0 = AT, 1 = fine-tuned)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncol=3,
        fontsize=7,
        frameon=False,
    )
    fig.suptitle("Interpolation between AT and fine-tuned weights")
    return fig


def fig_before_after(summary: dict[str, Any]) -> Any | None:
    """Grouped bars: AT vs RiFT accuracy on validation and test."""
    groups = [
        (split, metric)
        for split in ("val", "test")
        for metric in METRICS
        if _finite(((summary.get("at") or {}).get(split) or {}).get(metric))
    ]
    if not groups:
        return None
    fig = _figure(1.2 + 1.3 * len(groups), 3.2)
    ax = fig.subplots()
    w = 0.38
    for off, who, label, color in (
        (-w / 2, "at", "AT", AT_COLOR),
        (w / 2, "rift", "RiFT", RIFT_COLOR),
    ):
        vals = [((summary.get(who) or {}).get(s) or {}).get(m) for s, m in groups]
        xs = [i + off for i in range(len(groups))]
        bars = ax.bar(xs, [v if _finite(v) else 0 for v in vals], w, label=label, color=color)
        ax.bar_label(bars, [f"{v:.2f}" if _finite(v) else "-" for v in vals], fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{s}\n{METRICS[m]}" for s, m in groups])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"AT vs RiFT (alpha* = {summary.get('alpha', 0):g})", fontsize=10)
    return fig


def fig_before_after_seeds(summary: dict[str, Any]) -> Any | None:
    """Grouped bars of a ``seeds`` summary: mean AT vs RiFT accuracy, std error bars, one dot
    per seed."""
    mean, std = summary.get("mean") or {}, summary.get("std") or {}
    groups = [
        (split, metric)
        for split in ("val", "test")
        for metric in METRICS
        if _finite(lookup(mean, "at", split, metric))
    ]
    if not groups:
        return None
    fig = _figure(1.2 + 1.3 * len(groups), 3.2)
    ax = fig.subplots()
    w = 0.38
    for off, who, label, color in (
        (-w / 2, "at", "AT", AT_COLOR),
        (w / 2, "rift", "RiFT", RIFT_COLOR),
    ):
        vals = [lookup(mean, who, s, m) for s, m in groups]
        errs = [lookup(std, who, s, m) for s, m in groups]
        xs = [i + off for i in range(len(groups))]
        bars = ax.bar(
            xs,
            [v if _finite(v) else 0 for v in vals],
            w,
            yerr=[e if _finite(e) else 0 for e in errs],
            capsize=3,
            label=label,
            color=color,
            alpha=0.85,
        )
        ax.bar_label(bars, [f"{v:.2f}" if _finite(v) else "-" for v in vals], fontsize=7)
        for x, (split, metric) in zip(xs, groups):
            pts = [lookup(p, who, split, metric) for p in summary.get("per_seed") or []]
            pts = [p for p in pts if _finite(p)]
            ax.plot([x] * len(pts), pts, "o", ms=3, color="k", zorder=3)
    ax.set_xticks(range(len(groups)), [f"{s}\n{METRICS[m]}" for s, m in groups])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(
        f"AT vs RiFT over {summary.get('n')} seeds: mean ± std, dots = seeds "
        f"(alpha* {mean_std_text(summary, 'alpha', n=False)})",
        fontsize=10,
    )
    return fig


def fig_mrc_seeds(rows: list[dict[str, Any]], selected: list[str] | None = None) -> Any | None:
    """MRC by module over the seeds of a ``seeds`` sweep: mean bars, std error bars."""
    by_module: dict[str, list[float]] = {}
    for r in rows:
        if r.get("status") == "done" and _finite(r.get("mrc")):
            by_module.setdefault(r["module"], []).append(r["mrc"])
    if not by_module:
        return None
    from rift_ray.aggregate import mean_std

    stats = sorted(((m, *mean_std(v)) for m, v in by_module.items()), key=lambda t: t[1])
    chosen = set(selected or [])
    fig = _figure(7, 1.0 + 0.24 * len(stats))
    ax = fig.subplots()
    y = list(range(len(stats)))[::-1]
    ax.barh(
        y,
        [t[1] for t in stats],
        xerr=[t[2] or 0.0 for t in stats],
        capsize=2,
        color=[RIFT_COLOR if t[0] in chosen else AT_COLOR for t in stats],
    )
    ax.set_yticks(y, [t[0] for t in stats], fontsize=8)
    ax.set_xlabel("MRC, mean ± std over seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(
        "Module robust criticality" + (" (red: chosen by some seed)" if chosen else ""),
        fontsize=10,
    )
    return fig


def _seed_figures(res: SweepResults) -> dict[str, tuple[str, Any]]:
    """The figures of a ``seeds`` sweep: error bars over seeds, or one curve per seed."""
    s = res.summary or {}
    per_seed = {p.get("seed"): p for p in s.get("per_seed") or []}

    def tagged(rows: list[dict[str, Any]], keep: Any = None) -> list[dict[str, Any]]:
        return [
            {**r, "trial": f"seed {r['seed']}: {r['trial']}"}
            for r in rows
            if keep is None or keep(r)
        ]

    def winner(r: dict[str, Any]) -> bool:
        return r.get("trial") == (per_seed.get(r.get("seed")) or {}).get("trial")

    choices = [
        {**c, "trial": f"seed {seed}: {c['trial']}"}
        for seed, p in per_seed.items()
        for c in p.get("choices") or []
        if c.get("trial") == p.get("trial")
    ]
    chosen = sorted(m for p in per_seed.values() for m in p.get("modules") or [])
    figs = {
        "fig-before-after": (
            "Accuracy of the AT and RiFT models: mean over seeds, std error bars, one dot per seed.",
            fig_before_after_seeds(s) if s else None,
        ),
        "fig-adv-train": (
            "Adversarial training (once, shared by every seed): per-epoch loss, accuracy, lr.",
            fig_adv_train((res.stages.get("adv_train") or {}).get("history") or []),
        ),
        "fig-mrc": (
            "Module robust criticality over seeds (mean ± std; lower = less critical).",
            fig_mrc_seeds(res.rows("mrc"), chosen),
        ),
        "fig-finetune": (
            "Fine-tuning learning curves of every trial of every seed under ASHA.",
            fig_finetune(tagged(res.rows("finetune_epochs")), tagged(res.rows("finetune"))),
        ),
        "fig-interpolation": (
            "Accuracy against alpha of each seed's winning trial; stars mark each seed's alpha*.",
            fig_interpolation(tagged(res.rows("interpolation"), winner), choices),
        ),
    }
    return {k: v for k, v in figs.items() if v[1] is not None}


def report_figures(res: SweepResults) -> dict[str, tuple[str, Any]]:
    """id -> (caption, figure) for every figure the sweep's results allow so far."""
    if res.seeds:
        return _seed_figures(res)
    s = res.summary or {}
    ft_trials = res.rows("finetune")
    selected = sorted({m for t in ft_trials for m in str(t.get("modules", "")).split("+") if m})
    figs = {
        "fig-before-after": (
            "Accuracy of the AT model and the RiFT model (interpolated at alpha*).",
            fig_before_after(s) if s else None,
        ),
        "fig-adv-train": (
            "Adversarial training: per-epoch loss, accuracy and learning rate.",
            fig_adv_train((res.stages.get("adv_train") or {}).get("history") or []),
        ),
        "fig-mrc": (
            "Module robust criticality of every candidate module (lower = less critical).",
            fig_mrc(res.rows("mrc"), selected),
        ),
        "fig-finetune": (
            "Fine-tuning learning curves of every trial under ASHA.",
            fig_finetune(res.rows("finetune_epochs"), ft_trials),
        ),
        "fig-interpolation": (
            "Accuracy against alpha for each fine-tuning trial; stars mark each trial's alpha*, "
            "the dashed line the chosen alpha*, the dotted line the robust-accuracy constraint.",
            fig_interpolation(
                res.rows("interpolation"),
                s.get("choices"),
                s.get("trial"),
                res.setting("interpolate", "tolerance", 0.1),
                [t["trial"] for t in ft_trials],
            ),
        ),
    }
    return {k: v for k, v in figs.items() if v[1] is not None}


# -- HTML ---------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px} .wide{overflow-x:auto}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left} .muted{color:#777} .good{color:#2a7d2a} .bad{color:#b22}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
"""

# Marks <body data-loaded="OK/ALL"> once every figure has decoded (checked by the tests).
_SCRIPT = """
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.loaded = ok + "/" + imgs.length;
});
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant figures, None/NaN as '-'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _html_table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, left: tuple[str, ...] = ()
) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f'<th class="{"l" if c in left else ""}">{_e(c)}</th>' for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if c in left else ""}">{_e(fmt(r.get(c)))}</td>' for c in cols)
        + "</tr>"
        for r in rows
    )
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def _before_after_html(summary: dict[str, Any]) -> str:
    head = (
        "<tr><th class='l'>split</th><th class='l'>metric</th>"
        "<th>AT</th><th>RiFT</th><th>change</th></tr>"
    )
    body = ""
    for split in ("val", "test"):
        for metric, label in METRICS.items():
            a = ((summary.get("at") or {}).get(split) or {}).get(metric)
            b = ((summary.get("rift") or {}).get(split) or {}).get(metric)
            if a is None and b is None:
                continue
            d = b - a if _finite(a) and _finite(b) else None
            cls = "" if d is None or d == 0 else ("good" if d > 0 else "bad")
            delta = "-" if d is None else f"{d:+.2f}"
            body += (
                f"<tr><td class='l'>{split}</td><td class='l'>{label}</td>"
                f"<td>{_pct(a)}</td><td>{_pct(b)}</td><td class='{cls}'>{delta}</td></tr>"
            )
    return f"<table>{head}{body}</table>"


def _pct(v: Any) -> str:
    return f"{v:.2f}" if _finite(v) else "-"


def _before_after_seeds_html(summary: dict[str, Any]) -> str:
    """The before/after table of a ``seeds`` summary: mean ± std over seeds in every cell."""
    n = summary.get("n")
    head = (
        "<tr><th class='l'>split</th><th class='l'>metric</th><th>AT</th><th>RiFT</th>"
        "<th>change</th></tr>"
    )
    body = ""
    for split in ("val", "test"):
        for metric, label in METRICS.items():
            if lookup(summary.get("mean"), "at", split, metric) is None:
                continue
            d = lookup(summary.get("mean"), "delta", split, metric)
            cls = "" if not _finite(d) or d == 0 else ("good" if d > 0 else "bad")
            cells = [mean_std_text(summary, who, split, metric, n=False) for who in ("at", "rift")]
            body += (
                f"<tr><td class='l'>{split}</td><td class='l'>{label}</td>"
                f"<td>{cells[0]}</td><td>{cells[1]}</td>"
                f"<td class='{cls}'>{mean_std_text(summary, 'delta', split, metric, n=False)}</td></tr>"
            )
    extra = [
        ("alpha*", ("alpha",)),
        ("clean gain (val, points)", ("clean_gain_val",)),
        ("robust drop (val, points)", ("robust_drop_val",)),
        ("AutoAttack AT (test)", ("autoattack", "at", "robust_acc")),
        ("AutoAttack RiFT (test)", ("autoattack", "rift", "robust_acc")),
    ]
    for label, path in extra:
        if lookup(summary.get("mean"), *path) is not None:
            body += (
                f"<tr><td class='l' colspan='2'>{_e(label)}</td>"
                f"<td colspan='3'>{mean_std_text(summary, *path, n=False)}</td></tr>"
            )
    return f"<p>mean ± sample std over n={_e(n)} seeds</p><table>{head}{body}</table>"


def per_seed_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per seed of a ``seeds`` summary: the choice made and the test figures."""
    rows = []
    for p in summary.get("per_seed") or []:
        row: dict[str, Any] = {
            "seed": p.get("seed"),
            "modules": "+".join(p.get("modules") or []),
            "lr": p.get("lr"),
            "alpha": p.get("alpha"),
            "clean_gain_val": p.get("clean_gain_val"),
            "robust_drop_val": p.get("robust_drop_val"),
        }
        for metric, label in METRICS.items():
            for who in ("at", "rift"):
                v = lookup(p, who, "test", metric)
                if v is not None:
                    row[f"test {label} {who.upper() if who == 'at' else 'RiFT'}"] = v
        for who, aa in (p.get("autoattack") or {}).items():
            row[f"AutoAttack {who.upper() if who == 'at' else 'RiFT'}"] = aa.get("robust_acc")
        rows.append(row)
    return rows


STRATEGY_COLUMNS = {
    "strategy": "strategy", "modules": "module set", "set_mrc": "MRC", "lr": "lr",
    "alpha": "alpha*", "val_clean_acc": "val clean", "val_robust_acc": "val PGD",
    "test_clean_acc": "test clean", "test_robust_acc": "test PGD",
    "test_corruption_acc": "test corruption",
}  # fmt: skip
"""Columns of the strategy comparison (``summary["strategies"]``) as the report and CLI show them."""


def _strategies_html(rows: list[dict[str, Any]]) -> str:
    shown = [
        {
            label: (
                r.get(k) if k != "strategy" else r[k] + (" (primary)" if r.get("primary") else "")
            )
            for k, label in STRATEGY_COLUMNS.items()
        }
        for r in rows
    ]
    return _html_table(shown, left=("strategy", "module set"))


def _stages_rows(res: SweepResults) -> list[dict[str, Any]]:
    out = []
    for seed, stage, rec in _stage_records(res):
        started = rec.get("started")
        out.append(
            {
                "stage": stage if seed is None else f"seed {seed}: {stage}",
                "status": rec.get("status", "pending"),
                "duration": duration(rec.get("seconds")),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
                if isinstance(started, (int, float))
                else "",
                "finished": rec.get("updated", "") if rec.get("status") == "done" else "",
                "error": rec.get("error", ""),
            }
        )
    return out


def _stage_records(res: SweepResults) -> list[tuple[int | None, str, dict[str, Any]]]:
    """(seed or None, stage, record) of every stage: in a ``seeds`` sweep adversarial training
    at the top, then stages 2-4 of each seed."""
    if not res.seeds:
        return [(None, st, res.stages.get(st) or {}) for st in STAGES]
    out: list[tuple[int | None, str, dict[str, Any]]] = [
        (None, "adv_train", res.stages.get("adv_train") or {})
    ]
    for seed, r in res.seeds.items():
        out += [(seed, st, r.stages.get(st) or {}) for st in STAGES[1:]]
    return out


def _metadata_html(res: SweepResults) -> str:
    s = res.summary or {}
    env = s.get("environment") or {}
    items: list[tuple[str, Any]] = [
        ("sweep", res.name),
        ("location", res.store.uri),
        ("seed", s.get("seed", res.config.get("seed"))),
        *([("seeds (RiFT stages)", ", ".join(map(str, res.seeds)))] if res.seeds else []),
        ("config hash", s.get("config_hash", "")),
        ("model", f"{res.setting('model', 'arch', '')} on {res.setting('data', 'dataset', '')}"),
    ]
    versions = {**(s.get("versions") or {}), **(env.get("versions") or {})}
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if env:
        hw = f"{env.get('host', '')}: {env.get('platform', '')}, {env.get('cpus')} CPUs"
        if env.get("gpus"):
            hw += ", GPUs: " + ", ".join(env["gpus"])
        items.append(("driver host", hw))
        if env.get("ray_cluster"):
            items.append(
                (
                    "Ray cluster",
                    ", ".join(
                        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in env["ray_cluster"].items()
                    ),
                )
            )
    else:
        nodes = sorted({r["node"] for r in res.rows("mrc") if r.get("node")})
        items.append(
            (
                "hardware",
                "not recorded" + (f"; MRC ran on Ray node(s) {', '.join(nodes)}" if nodes else ""),
            )
        )
    secs = s.get("seconds") or {
        k: v["seconds"] for k, v in res.stages.items() if isinstance(v.get("seconds"), (int, float))
    }
    if secs:
        items.append(("durations", ", ".join(f"{k} {duration(v)}" for k, v in secs.items())))
    items.append(("report", f"rift-ray {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"))
    rows = "".join(
        f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>" for k, v in items
    )
    return f"<table>{rows}</table>"


def render_html(res: SweepResults) -> str:
    """The whole report as one HTML string, figures embedded as base64 PNG."""
    s = res.summary or {}
    figs = {k: (cap, png_bytes(fig)) for k, (cap, fig) in report_figures(res).items()}

    def figure(fid: str) -> str:
        if fid not in figs:
            return '<p class="muted">not available yet</p>'
        cap, png = figs[fid]
        data = base64.b64encode(png).decode()
        return (
            f'<figure id="{fid}"><img alt="{_e(cap)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(cap)}</figcaption></figure>"
        )

    parts = [f"<h1>RiFT sweep {_e(res.name)}</h1>"]
    if is_seeds_summary(s):
        chosen = s.get("chosen") or {}
        parts.append(
            f"<p>The RiFT stages ran once per seed ({_e(', '.join(map(str, s.get('seeds', []))))}) "
            f"from one AT model (seed {_e(s.get('seed'))}). Fine-tuned module: "
            + _e(
                ", ".join(
                    f"{m} ({k} of {s.get('n')})" for m, k in chosen.get("modules", {}).items()
                )
            )
            + "; lr: "
            + _e(", ".join(f"{m} ({k} of {s.get('n')})" for m, k in chosen.get("lr", {}).items()))
            + f"; <b>alpha* = {_e(mean_std_text(s, 'alpha'))}</b>.</p>"
        )
        parts += [
            "<h2>Before / after</h2>",
            _before_after_seeds_html(s),
            figure("fig-before-after"),
            "<h2>Per seed</h2>",
            _html_table(per_seed_rows(s), left=("modules",)),
        ]
    elif s:
        mods = "+".join(s.get("modules") or [])
        parts.append(
            f"<p>Fine-tuned module <b>{_e(mods)}</b> at lr {_e(fmt(s.get('lr')))}, "
            f"interpolated at <b>alpha* = {_e(fmt(s.get('alpha')))}</b>. "
            f"{_e(s.get('reason', ''))}</p>"
        )
        parts += ["<h2>Before / after</h2>", _before_after_html(s), figure("fig-before-after")]
    else:
        parts.append('<p class="muted">The sweep has not finished: no summary yet.</p>')
    parts += ["<h2>Stages</h2>", _html_table(_stages_rows(res), left=("stage", "status", "error"))]
    parts += ["<h2>Adversarial training</h2>", figure("fig-adv-train")]
    parts += [
        "<h2>Module robust criticality</h2>",
        figure("fig-mrc"),
        "<details><summary>MRC table</summary>",
        _html_table(res.rows("mrc"), left=("module", "status", "error", "node")),
        "</details>",
    ]
    parts += [
        "<h2>Fine-tuning</h2>",
        figure("fig-finetune"),
        _html_table(res.rows("finetune"), left=("trial", "modules", "status", "error")),
    ]
    parts += ["<h2>Interpolation</h2>", figure("fig-interpolation")]
    choices = s.get("choices") or [
        {"seed": p.get("seed"), **c}
        for p in s.get("per_seed") or []
        for c in p.get("choices") or []
    ]
    if choices:
        parts.append(_html_table(choices, left=("trial", "reason")))
    if len(s.get("strategies") or []) > 1 or res.rows("joint_mrc"):
        parts += [
            "<h2>Module selection strategies</h2>",
            f"<p>Each strategy's best trial at its alpha* (accuracy, %). The final model is "
            f"the primary strategy's (<b>{_e(s.get('primary', 'lowest'))}</b>).</p>",
            _strategies_html(s.get("strategies") or []),
        ]
        if res.rows("joint_mrc"):
            parts += [
                "<p>Greedy joint selection: every module set scored (joint MRC, nats).</p>",
                _html_table(
                    res.rows("joint_mrc"), left=("modules", "added", "status", "error", "node")
                ),
            ]
    parts += [
        "<h2>Run metadata</h2>",
        _metadata_html(res),
        "<details><summary>Config</summary>",
        f"<pre>{_e(res.config_text)}</pre></details>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>RiFT sweep {_e(res.name)}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def default_output(store: Store, filename: str) -> str:
    """``<sweep dir>/<filename>`` for a local sweep, else ``./<name>-<filename>``."""
    if store.is_local:
        return os.path.join(store.root, filename)
    return os.path.abspath(f"{store.root.rsplit('/', 1)[-1]}-{filename}")


def write_report(store: Store, out: str | None = None) -> str:
    """Write the HTML report; return its path."""
    out = out or default_output(store, "report.html")
    text = render_html(SweepResults.load(store))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return out


# -- exports ------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def table_records(res: SweepResults) -> dict[str, list[dict[str, Any]]]:
    """Every table the sweep has so far, as JSON-safe records (non-finite floats as null)."""
    return {
        name: [{k: _jsonable(v) for k, v in r.items()} for r in res.rows(name)]
        for name in TABLES
        if name in res.tables
    }


def export_tables(store: Store, fmt_: str, out_dir: str | None = None) -> list[str]:
    """Write every table as ``<out_dir>/<table>.csv`` or ``.json``; return the paths."""
    res = SweepResults.load(store)
    out_dir = out_dir or default_output(store, "export")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, records in table_records(res).items():
        path = os.path.join(out_dir, f"{name}.{fmt_}")
        if fmt_ == "csv":
            res.tables[name].to_pandas().to_csv(path, index=False)
        else:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
        paths.append(path)
    return paths


# -- status -------------------------------------------------------------------------------


def _live_tune(store: Store, experiment: str) -> list[dict[str, Any]]:
    """The last result of every trial of a Tune experiment still running under ray/."""
    out = []
    for trial in store.list(f"ray/{experiment}"):
        rel = f"ray/{experiment}/{trial}/result.json"
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
        snap = f"ray/at-{rec.get('hash')}/checkpoint_manager_snapshot.json"
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
    rows = _live_tune(res.store, f"mrc-{rec.get('hash')}") if running else res.rows("mrc")
    if not rows:
        return "", {}
    ok = sorted((r for r in rows if r.get("status") == "done"), key=lambda r: r["mrc"])
    line = f"{len(ok)} module(s) done, {len(rows) - len(ok)} failed"
    if ok:
        line += f"; least critical {ok[0]['module']} (MRC {ok[0]['mrc']:.4g})"
    return line, {"modules_done": len(ok), "least_critical": ok[0]["module"] if ok else None}


def _finetune_figures(res: SweepResults, rec: dict[str, Any]) -> Figures:
    if rec.get("status") == "running":
        exp = f"finetune-{rec.get('hash')}"  # and finetune-<hash>-<strategy> (one per strategy)
        rows = [
            r
            for name in res.store.list("ray")
            if name == exp or name.startswith(exp + "-")
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
        return v if _finite(v) else float("-inf")

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
    for seed, stage, rec in _stage_records(res):
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
    out["wandb"] = [run for _, _, rec in _stage_records(res) for run in rec.get("wandb") or []]
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
    runs = status.get("wandb") or []
    urls = [r["url"] for r in runs if r.get("url")]
    dirs = [r["dir"] for r in runs if r.get("dir")]
    if urls:
        lines.append(f"  W&B: {len(urls)} run(s), e.g. {urls[0]}")
    if dirs:
        lines.append(f"  W&B: {len(dirs)} offline run(s); upload with: wandb sync {' '.join(dirs)}")
    if any(r["status"] == "running" for r in status["stages"]):
        lines.append(
            "  (a stage shown running may also have been interrupted: re-run the sweep to resume)"
        )
    return lines
