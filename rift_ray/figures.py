"""Matplotlib figures of a sweep: those of the HTML report (:mod:`rift_ray.report`), also
logged to W&B by :mod:`rift_ray.tracking`. No display needed; matplotlib is imported on the
first figure drawn.
"""

from __future__ import annotations

import io
from typing import Any

from rift_ray.aggregate import lookup, mean_std_text
from rift_ray.metrics import METRICS, is_finite
from rift_ray.results import SweepResults, regenerated_label

AT_COLOR, RIFT_COLOR, LIMIT_COLOR = "#7f7f7f", "#d62728", "#b8860b"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
            if any(is_finite(h.get(k)) for h in history):
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
    done = [r for r in rows if r.get("status") == "done" and is_finite(r.get("mrc"))]
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
    metric = "val_score" if any(is_finite(e.get("val_score")) for e in epochs) else "val_gain"
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


def _trial_curve(
    ax: Any, pts: list[tuple[float, float]], color: Any, win: bool, faded: bool,
    alpha_star: float | None, handles: dict[str, Any], label: str,
) -> None:  # fmt: skip
    """One trial's accuracy along alpha on ``ax``, with a star at its alpha* (bold: the winner)."""
    (line,) = ax.plot(*zip(*pts), color=color, lw=2.2 if win else 1.0,
                      alpha=0.6 if faded else 1.0, marker="o", ms=2.5, zorder=3 if win else 2)  # fmt: skip
    handles.setdefault(label + (" (alpha* chosen)" if win else ""), line)
    y = dict(pts).get(alpha_star) if alpha_star is not None else None
    if y is not None:
        star = ax.plot(alpha_star, y, marker="*", ms=12 if win else 8, color=color, mec="k",
                       zorder=4)[0]  # fmt: skip
        handles.setdefault("alpha* of a trial", star)


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
    metrics = [m for m in METRICS if any(is_finite(r.get(m)) for r in rows)]
    trials = list(dict.fromkeys(r["trial"] for r in rows))
    alpha_star = {c["trial"]: c.get("alpha") for c in choices or [] if c.get("feasible")}
    fig = _figure(4.0 * len(metrics), 2.9 * len(splits) + 0.3 + 0.18 * ((len(trials) + 2) // 3))
    axes = fig.subplots(len(splits), len(metrics), squeeze=False)
    handles: dict[str, Any] = {}
    colors = _colors(trials, order)
    for i, split in enumerate(splits):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            here = [r for r in rows if r["split"] == split and is_finite(r.get(metric))]
            for trial in trials:
                pts = sorted((r["alpha"], r[metric]) for r in here if r["trial"] == trial)
                if pts:
                    _trial_curve(ax, pts, colors[trial], trial == best,
                                 trial != best and best is not None, alpha_star.get(trial),
                                 handles, trial)  # fmt: skip
            at_pts = [r[metric] for r in here if r["alpha"] == 0.0]
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
        if is_finite(((summary.get("at") or {}).get(split) or {}).get(metric))
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
        bars = ax.bar(xs, [v if is_finite(v) else 0 for v in vals], w, label=label, color=color)
        ax.bar_label(bars, [f"{v:.2f}" if is_finite(v) else "-" for v in vals], fontsize=7)
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
        if is_finite(lookup(mean, "at", split, metric))
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
            [v if is_finite(v) else 0 for v in vals],
            w,
            yerr=[e if is_finite(e) else 0 for e in errs],
            capsize=3,
            label=label,
            color=color,
            alpha=0.85,
        )
        ax.bar_label(bars, [f"{v:.2f}" if is_finite(v) else "-" for v in vals], fontsize=7)
        for x, (split, metric) in zip(xs, groups):
            pts = [lookup(p, who, split, metric) for p in summary.get("per_seed") or []]
            pts = [p for p in pts if is_finite(p)]
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
        if r.get("status") == "done" and is_finite(r.get("mrc")):
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
    return _label_corruption(res, {k: v for k, v in figs.items() if v[1] is not None})


def _label_corruption(
    res: SweepResults, figs: dict[str, tuple[str, Any]]
) -> dict[str, tuple[str, Any]]:
    """Captions of figures with corruption accuracy say when it is regenerated (a fallback)."""
    label = regenerated_label(res)
    for k in ("fig-before-after", "fig-interpolation"):
        if label and k in figs:
            figs[k] = (f"{figs[k][0]} Corruption: {label}.", figs[k][1])
    return figs


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
    return _label_corruption(res, {k: v for k, v in figs.items() if v[1] is not None})
