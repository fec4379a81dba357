"""Finished sweeps side by side: ``rift-ray compare`` (one HTML file, or CSV tables).

    rift-ray compare results/smoke results/smoke-seed1              # ./compare.html
    rift-ray compare results/a results/b -o a-vs-b.html
    rift-ray compare results/a results/b --format csv -o a-vs-b/    # <table>.csv

What it shows: the config fields that differ (``config.yaml`` flattened to dotted keys),
the summary figures (AT and RiFT accuracy, alpha*, the chosen modules and lr), the MRC
rankings and the interpolation curves of each sweep's winning trial on shared axes. A
``seeds`` sweep shows its mean over seeds, its curves one line per seed. Reads sweeps
through :mod:`rift_ray.results`; never starts Ray. docs/report.md.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
from typing import Any

from rift_ray.aggregate import is_seeds_summary, lookup
from rift_ray.metrics import METRICS, is_finite
from rift_ray.results import SweepResults, open_sweep
from rift_ray.store import StorageError

TABLE_NAMES = ("config_diff", "summary", "mrc", "interpolation")
"""The tables a comparison has (``--format csv``: ``<name>.csv``)."""


# -- loading ------------------------------------------------------------------------------


def load_finished(arg: str) -> SweepResults:
    """The results of the finished sweep at ``arg``; StorageError naming it otherwise."""
    res = SweepResults.load(open_sweep(arg))
    s = res.summary or {}
    if not (is_seeds_summary(s) or s.get("rift")):
        raise StorageError(
            f"{arg}: not a finished sweep (no summary.json yet; `rift-ray status {arg}` "
            "says how far it got)"
        )
    return res


def labels(results: list[SweepResults]) -> list[str]:
    """A short unique name per sweep: its name, else ``<parent>/<name>``, else numbered."""
    names = [r.name for r in results]
    if len(set(names)) == len(names):
        return names
    tails = ["/".join(r.store.root.rstrip("/").split("/")[-2:]) for r in results]
    if len(set(tails)) == len(tails):
        return tails
    return [f"{n} #{i + 1}" for i, n in enumerate(names)]


# -- the tables ---------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys (``finetune.asha.mode``); lists and scalars as leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def config_diff(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per config key whose value is not the same in every sweep: ``key`` then each
    sweep's value (``-`` where its config has no such key), keys in sorted order."""
    flat = {label: flatten(c) for label, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    missing = object()
    rows = []
    for k in keys:
        vals = [f.get(k, missing) for f in flat.values()]
        if all(v == vals[0] for v in vals[1:]):
            continue
        rows.append(
            {"key": k, **{lb: "-" if v is missing else _cell(v) for lb, v in zip(flat, vals)}}
        )
    return rows


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """figure name -> value of one sweep's summary (a ``seeds`` summary: the mean over
    seeds, the chosen modules and lrs with how many seeds chose them)."""
    seeds = is_seeds_summary(summary)
    tree = summary.get("mean") or {} if seeds else summary
    out: dict[str, Any] = {}
    if seeds:
        n = summary.get("n")
        chosen = summary.get("chosen") or {}
        out["seeds"] = n
        out["modules"] = ", ".join(f"{m} ({k}/{n})" for m, k in chosen.get("modules", {}).items())
        out["lr"] = ", ".join(f"{m} ({k}/{n})" for m, k in chosen.get("lr", {}).items())
        out["alpha*"] = tree.get("alpha")
    else:
        out["modules"] = "+".join(summary.get("modules") or [])
        out["lr"] = summary.get("lr")
        out["alpha*"] = summary.get("alpha")
    for split in ("val", "test"):
        for metric, name in METRICS.items():
            at, rift = (lookup(tree, who, split, metric) for who in ("at", "rift"))
            if metric == "autoattack_acc" and split == "test":
                at = at if at is not None else lookup(tree, "autoattack", "at", "robust_acc")
                rift = rift if rift is not None else lookup(tree, "autoattack", "rift", "robust_acc")  # fmt: skip
            if at is None and rift is None:
                continue
            out[f"{split} {name}: AT"] = at
            out[f"{split} {name}: RiFT"] = rift
            out[f"{split} {name}: RiFT - AT"] = (
                rift - at if is_finite(at) and is_finite(rift) else None
            )
    return out


def summary_table(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per summary figure (:func:`summary_figures`), a column per sweep."""
    figs = {label: summary_figures(s) for label, s in summaries.items()}
    names = list(dict.fromkeys(k for f in figs.values() for k in f))
    return [{"figure": k, **{label: f.get(k) for label, f in figs.items()}} for k in names]


def mrc_ranks(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """module -> (MRC, rank: 1 = least critical) of a ``mrc.parquet`` (a seeds sweep: the
    mean MRC over its seeds); failed modules left out."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r.get("status", "done") == "done" and is_finite(r.get("mrc")):
            by.setdefault(r["module"], []).append(float(r["mrc"]))
    mean = sorted(((sum(v) / len(v), m) for m, v in by.items()))
    return {m: (v, i + 1) for i, (v, m) in enumerate(mean)}


def mrc_table(tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The MRC rankings side by side: one row per module (the first sweep's ranking order,
    then modules only later sweeps have), ``<sweep> mrc`` and ``<sweep> rank`` columns."""
    ranks = {label: mrc_ranks(rows) for label, rows in tables.items()}
    order: list[str] = []
    for r in ranks.values():
        order += [m for m in sorted(r, key=lambda m: r[m][1]) if m not in order]
    return [
        {
            "module": m,
            **{
                f"{label} {k}": (r[m][i] if m in r else None)
                for label, r in ranks.items()
                for i, k in ((0, "mrc"), (1, "rank"))
            },
        }
        for m in order
    ]


def winning_curves(res: SweepResults) -> list[dict[str, Any]]:
    """The interpolation rows of the sweep's winning trial (a seeds sweep: each seed's),
    with ``seed`` (None for one seed) and ``alpha_star`` (that trial's alpha*)."""
    s = res.summary or {}
    picks = (
        {p.get("seed"): p for p in s.get("per_seed") or []} if is_seeds_summary(s) else {None: s}
    )
    keep = ("trial", "split", "alpha", *METRICS)
    return [
        {
            "seed": r.get("seed"),
            **{k: r.get(k) for k in keep},
            "alpha_star": picks[r.get("seed")].get("alpha"),
        }  # fmt: skip
        for r in res.rows("interpolation")
        if r.get("seed") in picks and r.get("trial") == picks[r.get("seed")].get("trial")
    ]


def compare_tables(results: list[SweepResults]) -> dict[str, list[dict[str, Any]]]:
    """Every table of the comparison (:data:`TABLE_NAMES`), sweeps labelled by :func:`labels`."""
    names = labels(results)
    return {
        "config_diff": config_diff({lb: r.config for lb, r in zip(names, results)}),
        "summary": summary_table({lb: r.summary or {} for lb, r in zip(names, results)}),
        "mrc": mrc_table({lb: r.rows("mrc") for lb, r in zip(names, results)}),
        "interpolation": [
            {"sweep": lb, **row} for lb, r in zip(names, results) for row in winning_curves(r)
        ],
    }


# -- output -------------------------------------------------------------------------------


def render_compare_html(results: list[SweepResults]) -> str:
    """The comparison as one self-contained HTML string (figures as base64 PNG)."""
    from rift_ray.figures import png_bytes
    from rift_ray.figures_rift import fig_compare_curves, fig_compare_mrc, module_order
    from rift_ray.report import _CSS, _SCRIPT, _html_table

    names = labels(results)
    tables = compare_tables(results)
    order: list[str] = []
    for r in results:
        order += [m for m in module_order(r.config) if m not in order]
    figs = {
        "fig-compare-interpolation": (
            "Accuracy against alpha of each sweep's winning trial on shared axes (a seeds "
            "sweep: one line per seed); stars mark alpha*.",
            fig_compare_curves(tables["interpolation"], names),
        ),
        "fig-compare-mrc": (
            "MRC of every module in layer order, one line per sweep.",
            fig_compare_mrc({lb: r.rows("mrc") for lb, r in zip(names, results)}, order),
        ),
    }

    def figure(fid: str) -> str:
        cap, fig = figs[fid]
        if fig is None:
            return '<p class="muted">nothing to draw</p>'
        data = base64.b64encode(png_bytes(fig)).decode()
        return (
            f'<figure id="{fid}"><img alt="{html.escape(cap)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(cap)}</figcaption>'
            "</figure>"
        )

    sweeps = [
        {"sweep": lb, "name": r.name, "location": r.store.uri} for lb, r in zip(names, results)
    ]
    title = "Compare " + " vs ".join(names)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        _html_table(sweeps, left=("sweep", "name", "location")),
        "<h2>Config differences</h2>",
        "<p>The keys of <code>config.yaml</code> (flattened) whose values differ.</p>",
        _html_table(tables["config_diff"], left=("key", *names)),
        "<h2>Summary</h2>",
        "<p>Accuracy in %, changes in points; a seeds sweep: the mean over seeds.</p>",
        _html_table(tables["summary"], left=("figure",)),
        "<h2>Interpolation</h2>",
        figure("fig-compare-interpolation"),
        "<h2>MRC rankings</h2>",
        figure("fig-compare-mrc"),
        "<p>MRC (nats) and rank (1 = least critical) of every module.</p>",
        _html_table(tables["mrc"], left=("module",)),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_compare(args: list[str], out: str | None = None) -> str:
    """Write the HTML comparison of the sweeps at ``args`` to ``out`` (default
    ./compare.html); return its path."""
    results = [load_finished(a) for a in args]
    out = out or "compare.html"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_compare_html(results))
    return out


def export_compare(args: list[str], out_dir: str | None = None) -> list[str]:
    """Write the comparison's tables as ``<out_dir>/<table>.csv`` (default ./compare/);
    return the paths."""
    results = [load_finished(a) for a in args]
    out_dir = out_dir or "compare"
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in compare_tables(results).items():
        path = os.path.join(out_dir, f"{name}.csv")
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        paths.append(path)
    return paths
