"""A sweep's results as data: reading a sweep, and the summary tables the pipeline writes.

:func:`open_sweep` finds a sweep (a directory, an ``s3://``/``gs://`` URI, or a name under
./results); :class:`SweepResults` loads what it holds so far through
:class:`rift_ray.store.Store`; :data:`SUMMARY_SCHEMA`, :data:`SEEDS_SUMMARY_SCHEMA` and
:data:`SEEDS_SCHEMA` are the schemas of ``tables/summary.parquet`` and ``tables/seeds.parquet``
(docs/tables.md), :data:`STRATEGY_COLUMNS` the columns of the strategy comparison as people
see it. Never starts Ray; no matplotlib.
"""

from __future__ import annotations

import io
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rift_ray import store as layout
from rift_ray.aggregate import is_seeds_summary, lookup
from rift_ray.metrics import METRICS, is_finite
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
        ("corruption_source", pa.string()),  # files | generated (regenerated: a fallback)
    ]
)
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


class StrategyColumn(NamedTuple):
    """One column of the strategy comparison (``summary["strategies"]``, docs/tables.md)."""

    key: str
    """The field of a comparison row."""
    label: str
    """Its header in the HTML report."""
    short: str
    """Its header in the printed summary; empty: not a column there (the printed summary
    lists each strategy's module set and its MRC below the table)."""
    accuracy: bool = False
    """An accuracy in percent (two decimals); else shown as it is."""


STRATEGY_COLUMNS = (
    StrategyColumn("strategy", "strategy", "strategy"),
    StrategyColumn("modules", "module set", ""),
    StrategyColumn("set_mrc", "MRC", ""),
    StrategyColumn("lr", "lr", "lr"),
    StrategyColumn("alpha", "alpha*", "alpha*"),
    StrategyColumn("val_clean_acc", "val clean", "val clean", accuracy=True),
    StrategyColumn("val_robust_acc", "val PGD", "val PGD", accuracy=True),
    StrategyColumn("test_clean_acc", "test clean", "test clean", accuracy=True),
    StrategyColumn("test_robust_acc", "test PGD", "test PGD", accuracy=True),
    StrategyColumn("test_corruption_acc", "test corruption", "test corr.", accuracy=True),
)
"""Columns of the strategy comparison as the report and the printed summary show them, in order."""


def strategy_columns(regenerated: bool) -> tuple[StrategyColumn, ...]:
    """:data:`STRATEGY_COLUMNS`, the corruption column's headers saying "regenerated" when
    the sweep's corruptions are the fallback (``eval.corruption_source: generated``)."""
    if not regenerated:
        return STRATEGY_COLUMNS
    return tuple(
        c._replace(label=f"{c.label} (regenerated)", short=f"{c.short} (regen.)")
        if c.key == "test_corruption_acc"
        else c
        for c in STRATEGY_COLUMNS
    )


# -- values -------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """The versions a summary records."""
    import torch

    from rift_ray import __version__

    return {
        "rift_ray": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def pct(v: Any, *, finite_only: bool = True) -> str:
    """An accuracy in percent with two decimals, ``-`` when there is none.

    ``finite_only`` (the HTML report): ``-`` for anything but a finite number. Without it
    (the printed summary) only None is ``-``; NaN prints as ``nan``."""
    if finite_only:
        return f"{v:.2f}" if is_finite(v) else "-"
    return "-" if v is None else f"{v:.2f}"


def corruption_name(source: str | None, dataset: str | None = None) -> str:
    """What a corruption accuracy is called where people see it: "corruption" (the official
    CIFAR-10-C / CIFAR-100-C files), or for ``eval.corruption_source: generated``
    "corruption (regenerated, not the official CIFAR-10-C)": a fallback, not comparable to
    published numbers."""
    if source != "generated":
        return METRICS["corruption_acc"]
    official = "CIFAR-100-C" if dataset == "cifar100" else "CIFAR-10-C"
    return f"corruption (regenerated, not the official {official})"


def corruption_fields(cfg: Any) -> dict[str, str | None]:
    """``summary.json``'s ``corruption_source`` (files | generated; None: no corruptions) and
    ``corruption_label`` (:func:`corruption_name`)."""
    if not cfg.eval.corruptions:
        return {"corruption_source": None, "corruption_label": None}
    source = cfg.eval.corruption_source
    return {
        "corruption_source": source,
        "corruption_label": corruption_name(source, cfg.data.dataset),
    }


def summary_corruption(summary: dict[str, Any] | None, key: str = "corruption_label") -> Any:
    """``corruption_label`` (or ``corruption_source``) of a summary, a ``seeds`` summary's
    from its seeds; None when it has none (no corruptions, or written before labels)."""
    for s in (summary or {}, *((summary or {}).get("per_seed") or [])):
        if s.get(key):
            return s[key]
    return None


def regenerated_label(res: SweepResults) -> str | None:
    """The corruption label of a sweep whose corruption figures are regenerated (a fallback,
    to be said wherever they are shown); None for the official files or no corruptions. A
    summary written before labels existed: from the sweep's config."""
    source = summary_corruption(res.summary, "corruption_source")
    if source is None and res.setting("eval", "corruptions"):
        source = res.setting("eval", "corruption_source", "files")
    return (
        corruption_name(source, res.setting("data", "dataset")) if source == "generated" else None
    )


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


def stage_records(res: SweepResults) -> list[tuple[int | None, str, dict[str, Any]]]:
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


# -- the summary tables ------------------------------------------------------------------


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
                    "corruption_source": _source(summary, m.get("corruption_acc")),
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
                    "corruption_source": _source(summary, m.get("corruption_acc")),
                    "n": max((lookup(count, model, split, k) or 0) for k in METRICS),
                    "alpha_std": std.get("alpha") if rift else None,
                    **{f"{k}_std": lookup(std, model, split, k) for k in METRICS},
                }
            )
    return rows


def _source(summary: dict[str, Any], corruption_acc: Any) -> str | None:
    return summary_corruption(summary, "corruption_source") if corruption_acc is not None else None


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


def environment_info(
    ray_resources: dict[str, float] | None = None, ray_nodes: int | None = None
) -> dict[str, Any]:
    """Host, hardware, library versions and the git commit (``git``: :func:`rift_ray.version.
    git_info`), for summary.json (``summary["environment"]``)."""
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
    from rift_ray.version import git_info

    out["git"] = git_info()  # the commit the driver ran (None outside a git checkout)
    if ray_resources is not None:
        out["ray_cluster"] = {
            "nodes": ray_nodes,
            **{k: v for k, v in ray_resources.items() if k in ("CPU", "GPU", "memory")},
        }
    return out
