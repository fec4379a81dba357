"""The report's RiFT views (:mod:`rift_ray.report`): the clean-vs-robust trade-off along
alpha, MRC against parameter count and in layer order, and the corruption x severity
heatmap; and the figures ``rift-ray compare`` draws on shared axes (:mod:`rift_ray.compare`).

Every function takes plain rows (``tables/*.parquet`` as dicts) and returns a matplotlib
figure, or None when the rows hold nothing to draw. :func:`rift_figures` picks them for
a sweep, as :func:`rift_ray.figures.report_figures` does for the others.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rift_ray.figures import AT_COLOR, RIFT_COLOR, _colors, _figure
from rift_ray.metrics import METRICS, is_finite
from rift_ray.results import SweepResults, regenerated_label

# -- the trade-off along alpha ------------------------------------------------------------


def fig_tradeoff(
    rows: list[dict[str, Any]],
    choices: list[dict[str, Any]] | None = None,
    best: str | None = None,
) -> Any | None:
    """Clean against robust accuracy along alpha, one line per trial: a panel per split with
    PGD, and on test one with AutoAttack (``autoattack_acc``) where it was measured.

    The AT model (alpha 0) is a grey square, each trial's alpha* a star (big: ``best``),
    the last point of each line labelled with its alpha.
    """
    panels = [
        (split, metric)
        for split, metric in (
            ("val", "robust_acc"),
            ("test", "robust_acc"),
            ("test", "autoattack_acc"),
        )  # fmt: skip
        if any(r["split"] == split and is_finite(r.get(metric)) for r in rows)
    ]
    if not panels:
        return None
    trials = list(dict.fromkeys(r["trial"] for r in rows))
    colors = _colors(trials)
    star = {c["trial"]: c.get("alpha") for c in choices or [] if c.get("feasible")}
    fig = _figure(4.6 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, (split, metric) in zip(axes, panels):
        here = [r for r in rows if r["split"] == split and is_finite(r.get("clean_acc"))
                and is_finite(r.get(metric))]  # fmt: skip
        for trial in trials:
            pts = sorted(
                (r["alpha"], r[metric], r["clean_acc"]) for r in here if r["trial"] == trial
            )
            if not pts:
                continue
            win = trial == best
            (line,) = ax.plot([p[1] for p in pts], [p[2] for p in pts], color=colors[trial],
                              marker="o", ms=3, lw=2 if win else 1, alpha=1 if win else 0.7)  # fmt: skip
            handles.setdefault(trial, line)
            ax.annotate(f"{pts[-1][0]:g}", (pts[-1][1], pts[-1][2]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=colors[trial])  # fmt: skip
            hit = [p for p in pts if p[0] == star.get(trial)]
            if hit:
                handles["alpha* of a trial"] = ax.plot(
                    hit[0][1], hit[0][2], "*", ms=14 if win else 9, color=colors[trial],
                    mec="k", zorder=4,
                )[0]  # fmt: skip
        at = [r for r in here if r["alpha"] == 0.0]
        if at:
            handles["AT model (alpha 0)"] = ax.plot(
                at[0][metric], at[0]["clean_acc"], "s", ms=9, color=AT_COLOR, mec="k", zorder=5
            )[0]
        name = "AutoAttack" if metric == "autoattack_acc" else "PGD"
        ax.set_title(f"{split}: clean vs {name} along alpha", fontsize=10)
        ax.set_xlabel(f"robust accuracy (%, {name})")
        ax.set_ylabel("clean accuracy (%)")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3,
               fontsize=7, frameon=False)  # fmt: skip
    fig.suptitle("Clean vs robust trade-off along alpha (labels: the last alpha of a line)")
    return fig


# -- MRC ----------------------------------------------------------------------------------


def _mrc_done(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Finished MRC rows by module (a seeds sweep: one row per seed)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status", "done") == "done" and is_finite(r.get("mrc")):
            out.setdefault(r["module"], []).append(r)
    return out


def fig_mrc_params(rows: list[dict[str, Any]], selected: list[str] | None = None) -> Any | None:
    """MRC against the module's parameter count (log x), one point per module (and seed);
    fine-tuned modules red and named."""
    pts = [r for rs in _mrc_done(rows).values() for r in rs if (r.get("num_params") or 0) > 0]
    if not pts:
        return None
    chosen = set(selected or [])
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    for r in pts:
        red = r["module"] in chosen
        ax.plot(r["num_params"], r["mrc"], "o", color=RIFT_COLOR if red else AT_COLOR,
                ms=7 if red else 5)  # fmt: skip
        if red or len(pts) <= 12:
            ax.annotate(r["module"], (r["num_params"], r["mrc"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the module (weights, log scale)")
    ax.set_ylabel("MRC (nats)")
    ax.grid(alpha=0.3)
    ax.set_title("MRC against parameter count" + (" (red: fine-tuned)" if chosen else ""),
                 fontsize=10)  # fmt: skip
    return fig


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_order(config: dict[str, Any]) -> list[str]:
    """The candidate modules of the sweep's model in forward order (the model built on the
    meta device from ``config``'s ``model`` and ``data`` sections); [] when it cannot be
    built here (an architecture this version does not know)."""
    try:
        import torch

        from rift_ray.models import build_model, mrc_candidates

        model_cfg, data = config.get("model") or {}, config.get("data") or {}
        side = {"tinyimagenet": 64}.get(data.get("dataset", ""), 32)
        if data.get("dataset") == "synthetic":
            side = int((data.get("synthetic") or {}).get("image_size", 32))
        with torch.device("meta"):
            model = build_model(
                model_cfg.get("arch", "wrn"), 10, depth=model_cfg.get("depth", 34),
                widen_factor=model_cfg.get("widen_factor", 10), image_size=side,
            )  # fmt: skip
        return mrc_candidates(model, (1, 3, side, side))
    except Exception:  # noqa: BLE001 - the figure falls back to name order
        return []


def fig_mrc_layers(
    rows: list[dict[str, Any]], order: list[str] | None = None, selected: list[str] | None = None
) -> Any | None:
    """MRC of each module in layer order (``order``: the model's forward order; modules not
    in it, or no order: by name, numbers compared as numbers); a seeds sweep's several rows
    per module as their mean with the range as an error bar."""
    done = _mrc_done(rows)
    if not done:
        return None
    rank = {m: i for i, m in enumerate(order or [])}
    mods = sorted(done, key=lambda m: (rank.get(m, len(rank)), _natural(m)))
    vals = [[r["mrc"] for r in done[m]] for m in mods]
    mean = [sum(v) / len(v) for v in vals]
    chosen = set(selected or [])
    fig = _figure(max(6.0, 0.32 * len(mods) + 1.5), 3.8)
    ax = fig.subplots()
    x = list(range(len(mods)))
    ax.plot(x, mean, color=AT_COLOR, lw=1, zorder=1)
    ax.errorbar(x, mean, yerr=[[m - min(v) for m, v in zip(mean, vals)],
                               [max(v) - m for m, v in zip(mean, vals)]],
                fmt="none", ecolor="k", capsize=2, lw=0.8)  # fmt: skip
    ax.scatter(x, mean, c=[RIFT_COLOR if m in chosen else AT_COLOR for m in mods], zorder=2)
    ax.set_xticks(x, mods, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("MRC (nats)")
    ax.grid(alpha=0.3)
    how = "forward order" if order else "name order (model not built)"
    ax.set_title(f"MRC in layer order ({how}, input to output)"
                 + ("; red: fine-tuned" if chosen else ""), fontsize=10)  # fmt: skip
    return fig


# -- corruptions --------------------------------------------------------------------------


def corruption_cells(row: dict[str, Any]) -> dict[tuple[str, int], float]:
    """``{(corruption, severity): accuracy}`` of an interpolation row (its
    ``corruption_cells`` JSON, ``{"<corruption>-<severity>": acc}``); {} when it has none."""
    text = row.get("corruption_cells")
    if not text:
        return {}
    out = {}
    for key, acc in json.loads(text).items():
        name, sev = key.rsplit("-", 1)
        out[name, int(sev)] = float(acc)
    return out


def fig_corruption_heatmap(
    at: dict[tuple[str, int], float], rift: dict[tuple[str, int], float], label: str = ""
) -> Any | None:
    """Heatmaps corruption x severity of the AT and RiFT models' accuracy and RiFT - AT
    (points), every cell annotated; ``label`` names the corruption source in the title."""
    if not at:
        return None
    names = list(dict.fromkeys(n for n, _ in at))
    sevs = sorted({s for _, s in at})
    panels = [("AT", at, "viridis"), ("RiFT", rift, "viridis")] if rift else [("AT", at, "viridis")]
    if rift:
        diff = {k: rift[k] - at[k] for k in at if k in rift}
        panels.append(("RiFT - AT (points)", diff, "RdBu"))
    fig = _figure(2.0 + 2.4 * len(panels), 1.4 + 0.38 * len(names))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    lo = min(min(at.values()), min(rift.values()) if rift else 100.0)
    hi = max(max(at.values()), max(rift.values()) if rift else 0.0)
    for k, (ax, (title, cells, cmap)) in enumerate(zip(axes, panels)):
        grid = [[cells.get((n, s), float("nan")) for s in sevs] for n in names]
        m = max((abs(v) for v in cells.values()), default=1.0) or 1.0
        if cmap == "RdBu":
            im = ax.imshow(grid, cmap=cmap, vmin=-m, vmax=m, aspect="auto")
        else:
            im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if is_finite(v):
                    dark = (abs(v) / m > 0.6) if cmap == "RdBu" else (v - lo) < 0.6 * (hi - lo)
                    ax.text(j, i, f"{v:+.1f}" if cmap == "RdBu" else f"{v:.1f}", ha="center",
                            va="center", fontsize=7, color="w" if dark else "k")  # fmt: skip
        ax.set_xticks(range(len(sevs)), [str(s) for s in sevs])
        ax.set_yticks(range(len(names)), names if k == 0 else [""] * len(names), fontsize=8)
        ax.set_xlabel("severity")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Accuracy (%) per corruption and severity, test" + (f": {label}" if label else ""))
    return fig


# -- what the report shows ----------------------------------------------------------------


def _winner_cells(res: SweepResults) -> tuple[dict[Any, float], dict[Any, float]]:
    """The corruption cells of the AT model and the final model (alpha* of the best trial);
    a seeds sweep's first seed (each seed has its own)."""
    rows = res.rows("interpolation")
    s = res.summary or {}
    if res.seeds:
        seed = min(res.seeds)
        rows = [r for r in rows if r.get("seed") == seed]
        s = next((p for p in s.get("per_seed") or [] if p.get("seed") == seed), {})
    test = [r for r in rows if r["split"] == "test" and r.get("corruption_cells")]
    at = next((corruption_cells(r) for r in test if r["alpha"] == 0.0), {})
    rift = next(
        (
            corruption_cells(r)
            for r in test
            if r["trial"] == s.get("trial") and r["alpha"] == s.get("alpha")
        ),
        {},
    )
    return at, rift


def rift_figures(res: SweepResults) -> dict[str, tuple[str, Any]]:
    """id -> (caption, figure) of the RiFT views the sweep's results allow (none missing)."""
    s = res.summary or {}
    rows = res.rows("interpolation")
    chosen = sorted({m for t in res.rows("finetune") for m in str(t.get("modules", "")).split("+") if m})  # fmt: skip
    if res.seeds:  # each seed's winning trial, named by seed
        per_seed = {p.get("seed"): p for p in s.get("per_seed") or []}
        win = {seed: p.get("trial") for seed, p in per_seed.items()}
        rows = [{**r, "trial": f"seed {r['seed']}: {r['trial']}"} for r in rows
                if r.get("trial") == win.get(r.get("seed"))]  # fmt: skip
        choices = [{**c, "trial": f"seed {seed}: {c['trial']}"} for seed, p in per_seed.items()
                   for c in p.get("choices") or [] if c.get("trial") == p.get("trial")]  # fmt: skip
        best = None
    else:
        choices, best = s.get("choices") or [], s.get("trial")
    at, rift = _winner_cells(res)
    source = regenerated_label(res) or "official files"
    figs = {
        "fig-tradeoff": (
            "Clean vs robust accuracy along alpha for each trial (PGD; AutoAttack where it was "
            "measured): the grey square is the AT model (alpha 0), stars each trial's alpha*.",
            fig_tradeoff(rows, choices, best),
        ),
        "fig-mrc-params": (
            "MRC of every module against its parameter count.",
            fig_mrc_params(res.rows("mrc"), chosen),
        ),
        "fig-mrc-layers": (
            "MRC of every module in the model's layer order (input to output).",
            fig_mrc_layers(res.rows("mrc"), module_order(res.config), chosen),
        ),
        "fig-corruption": (
            "Test accuracy per corruption and severity of the AT model and the final model "
            f"(alpha*), and their difference; corruptions: {source}.",
            fig_corruption_heatmap(at, rift, source),
        ),
    }
    return {k: v for k, v in figs.items() if v[1] is not None}


# -- rift-ray compare: sweeps on shared axes ---------------------------------------------


def fig_compare_curves(rows: list[dict[str, Any]], sweeps: list[str]) -> Any | None:
    """Accuracy against alpha, a panel per split and metric with shared axes, a color per
    sweep (``rows``: :func:`rift_ray.compare.winning_curves` with a ``sweep`` column; a
    seeds sweep's seeds are lines of its color); a star at each line's alpha*."""
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    metrics = [m for m in METRICS if any(is_finite(r.get(m)) for r in rows)]
    if not splits or not metrics:
        return None
    fig = _figure(3.8 * len(metrics), 2.8 * len(splits) + 0.6)
    axes = fig.subplots(len(splits), len(metrics), squeeze=False, sharex=True, sharey="col")
    handles: dict[str, Any] = {}
    for i, split in enumerate(splits):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for k, sweep in enumerate(sweeps):
                mine = [r for r in rows if r["sweep"] == sweep and r["split"] == split]
                for seed in dict.fromkeys(r.get("seed") for r in mine):
                    pts = sorted((r["alpha"], r[metric]) for r in mine
                                 if r.get("seed") == seed and is_finite(r.get(metric)))  # fmt: skip
                    if not pts:
                        continue
                    (line,) = ax.plot(*zip(*pts), color=f"C{k % 10}", marker="o", ms=3,
                                      alpha=1.0 if seed is None else 0.75)  # fmt: skip
                    handles.setdefault(sweep, line)
                    star = next((r.get("alpha_star") for r in mine if r.get("seed") == seed), None)
                    y = dict(pts).get(star) if star is not None else None
                    if y is not None:
                        ax.plot(star, y, "*", ms=11, color=f"C{k % 10}", mec="k", zorder=4)
            ax.set_title(f"{split}: {METRICS[metric]}", fontsize=10)
            if not ax.lines:  # e.g. corruptions and AutoAttack: test only
                ax.text(0.5, 0.5, "not measured", ha="center", va="center",
                        transform=ax.transAxes, color="0.5")  # fmt: skip
            ax.set_xlabel("alpha (0 = AT, 1 = fine-tuned)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(4, len(handles) or 1), fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle("Interpolation curves of each sweep's winning trial (stars: alpha*)")
    return fig


def fig_compare_mrc(tables: dict[str, list[dict[str, Any]]], order: list[str]) -> Any | None:
    """MRC in layer order, one line per sweep (its mean over seeds for a seeds sweep);
    ``order``: the modules' forward order (modules not in it last, by name)."""
    done = {sweep: _mrc_done(rows) for sweep, rows in tables.items()}
    mods = {m for d in done.values() for m in d}
    if not mods:
        return None
    rank = {m: i for i, m in enumerate(order)}
    xs = sorted(mods, key=lambda m: (rank.get(m, len(rank)), _natural(m)))
    fig = _figure(max(6.0, 0.32 * len(xs) + 1.5), 3.8)
    ax = fig.subplots()
    for k, (sweep, d) in enumerate(done.items()):
        pts = [(i, sum(r["mrc"] for r in d[m]) / len(d[m])) for i, m in enumerate(xs) if m in d]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, color=f"C{k % 10}", label=sweep)
    ax.set_xticks(range(len(xs)), xs, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("MRC (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("MRC in layer order, one line per sweep", fontsize=10)
    return fig
