"""Sweep results for people: a self-contained HTML report and table exports.

    rift-ray report results/smoke                  # results/smoke/report.html
    rift-ray report results/smoke --format csv     # results/smoke/export/<table>.csv

Everything here reads a sweep through :mod:`rift_ray.results` (local or object storage)
and never starts Ray; the figures are :mod:`rift_ray.figures`, embedded as PNG.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from typing import Any

from rift_ray import __version__
from rift_ray.aggregate import is_seeds_summary, lookup, mean_std_text, strategy_seed_cells
from rift_ray.figures import png_bytes, report_figures
from rift_ray.figures_rift import rift_figures
from rift_ray.metrics import METRICS, is_finite
from rift_ray.paired import noise_lines, seeds_interval_lines
from rift_ray.progress import duration
from rift_ray.provenance import device_rows, git_text, wandb_rows
from rift_ray.results import (
    TABLES,
    SweepResults,
    pct,
    per_seed_rows,
    regenerated_label,
    stage_records,
    strategy_columns,
    summary_corruption,
)
from rift_ray.rift.selection import set_label
from rift_ray.store import Store

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


def _names(corruption: str | None) -> dict[str, str]:
    """METRICS' names, the corruption one replaced by ``corruption`` (regenerated) if given."""
    return {**METRICS, **({"corruption_acc": corruption} if corruption else {})}


def _before_after_html(summary: dict[str, Any], corruption: str | None = None) -> str:
    head = (
        "<tr><th class='l'>split</th><th class='l'>metric</th>"
        "<th>AT</th><th>RiFT</th><th>change</th></tr>"
    )
    body = ""
    for split in ("val", "test"):
        for metric, label in _names(corruption).items():
            a = ((summary.get("at") or {}).get(split) or {}).get(metric)
            b = ((summary.get("rift") or {}).get(split) or {}).get(metric)
            if a is None and b is None:
                continue
            d = b - a if is_finite(a) and is_finite(b) else None
            cls = "" if d is None or d == 0 else ("good" if d > 0 else "bad")
            delta = "-" if d is None else f"{d:+.2f}"
            body += (
                f"<tr><td class='l'>{split}</td><td class='l'>{label}</td>"
                f"<td>{pct(a)}</td><td>{pct(b)}</td><td class='{cls}'>{delta}</td></tr>"
            )
    return f"<table>{head}{body}</table>"


def _before_after_seeds_html(summary: dict[str, Any], corruption: str | None = None) -> str:
    """The before/after table of a ``seeds`` summary: mean ± std over seeds in every cell."""
    n = summary.get("n")
    head = (
        "<tr><th class='l'>split</th><th class='l'>metric</th><th>AT</th><th>RiFT</th>"
        "<th>change</th></tr>"
    )
    body = ""
    for split in ("val", "test"):
        for metric, label in _names(corruption).items():
            if lookup(summary.get("mean"), "at", split, metric) is None:
                continue
            d = lookup(summary.get("mean"), "delta", split, metric)
            cls = "" if not is_finite(d) or d == 0 else ("good" if d > 0 else "bad")
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


def _strategies_html(rows: list[dict[str, Any]], regenerated: bool = False) -> str:
    shown = [
        {
            **({"seed": r["seed"]} if "seed" in r else {}),  # the per-seed rows of a seeds sweep
            **{
                c.label: (
                    r[c.key] + (" (primary)" if r.get("primary") else "")
                    if c.key == "strategy"
                    else set_label(r[c.key])
                    if c.key == "modules" and r.get(c.key)
                    else r.get(c.key)
                )
                for c in strategy_columns(regenerated)
            },
        }
        for r in rows
    ]
    return _html_table(shown, left=("strategy", "module set"))


def _strategies_seeds_html(s: dict[str, Any]) -> list[str]:
    """The strategy comparison of a ``seeds`` summary: over seeds, then every seed's rows."""
    cells = strategy_seed_cells(s)
    if not cells:
        return []
    primary = _e(s["strategies"]["primary"])
    per_seed = [
        {"seed": p.get("seed"), **r}
        for p in s.get("per_seed") or []
        for r in p.get("strategies") or []
    ]
    return [
        "<h2>Module selection strategies</h2>",
        f"<p>Each strategy's best trial at its alpha*, over {_e(s.get('n'))} seeds (test, %): "
        "accuracy and its change over the same seed's AT model as mean ± sample std (n: the "
        f"seeds with the figure); <b>{primary}</b> (primary: the final model) minus each "
        "strategy, paired by seed, as mean ± std with a 95% Student t interval over seeds "
        "(n - 1 degrees of freedom; none for one seed).</p>",
        _html_table(cells, left=("strategy", "metric")),
        "<details><summary>Per seed</summary>",
        _strategies_html(per_seed, summary_corruption(s, "corruption_source") == "generated"),
        "</details>",
    ]


def _stages_rows(res: SweepResults) -> list[dict[str, Any]]:
    out = []
    for seed, stage, rec in stage_records(res):
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


def _cost_html(res: SweepResults) -> list[str]:
    """The sweep's FLOP estimate (``estimate.json``, what ``--dry-run`` counts) per stage next
    to the seconds each stage took (summed over seeds); none for sweeps without one."""
    from rift_ray.cost import report_rows
    from rift_ray.store import ESTIMATE

    if not res.store.exists(ESTIMATE):
        return []
    est = json.loads(res.store.read_bytes(ESTIMATE))
    seconds: dict[str, float] = {}
    for _, stage, rec in stage_records(res):
        if rec.get("status") == "done" and isinstance(rec.get("seconds"), (int, float)):
            seconds[stage] = seconds.get(stage, 0.0) + float(rec["seconds"])
    return [
        "<h2>Cost: estimate and measured</h2>",
        f"<p class='muted'>Counted FLOPs (docs/cost.md); the estimated wall time on "
        f"{_e(est.get('gpu'))} at {_e(est.get('utilisation'))} utilisation with the config's "
        "GPUs; achieved TFLOP/s = the estimate's FLOPs over the measured seconds.</p>",
        _html_table(report_rows(est, seconds), left=("stage",)),
    ]


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
    links = (s.get("wandb") or {}).get("runs") or {}
    if links:  # the online W&B runs, as links
        cells = ", ".join(f"<a href='{_e(url)}'>{_e(name)}</a>" for name, url in links.items())
        rows += f"<tr><th class='l'>W&amp;B runs</th><td class='l'>{cells}</td></tr>"
    return f"<table>{rows}</table>"


def _headline_html(s: dict[str, Any], figure: Any, corruption: str | None = None) -> list[str]:
    """What the sweep chose and the before/after table (per seed for a seeds sweep);
    ``corruption``: the label of regenerated corruption figures, said up front."""
    note = []
    if corruption and s:
        note = [
            f"<p class='bad'><b>{_e(corruption)}</b>: the corruption figures of this sweep were "
            "measured on corruptions regenerated by rift-ray (<code>eval.corruption_source: "
            "generated</code>), a fallback not comparable to published CIFAR-C numbers; "
            "<code>rift-ray data cifar10-c</code> fetches the official files.</p>"
        ]
    if is_seeds_summary(s):
        chosen, n = s.get("chosen") or {}, s.get("n")
        mods = ", ".join(f"{m} ({k} of {n})" for m, k in chosen.get("modules", {}).items())
        lrs = ", ".join(f"{m} ({k} of {n})" for m, k in chosen.get("lr", {}).items())
        return [
            f"<p>The RiFT stages ran once per seed ({_e(', '.join(map(str, s.get('seeds', []))))}) "
            f"from one AT model (seed {_e(s.get('seed'))}). Fine-tuned module: {_e(mods)}; "
            f"lr: {_e(lrs)}; <b>alpha* = {_e(mean_std_text(s, 'alpha'))}</b>.</p>",
            *note,
            "<h2>Before / after</h2>",
            _before_after_seeds_html(s, corruption),
            *[f"<p>{_e(line)}</p>" for line in seeds_interval_lines(s)],
            figure("fig-before-after"),
            "<h2>Per seed</h2>",
            _html_table(per_seed_rows(s), left=("modules",)),
        ]
    if s:
        mods = "+".join(s.get("modules") or [])
        return [
            f"<p>Fine-tuned module <b>{_e(mods)}</b> at lr {_e(fmt(s.get('lr')))}, "
            f"interpolated at <b>alpha* = {_e(fmt(s.get('alpha')))}</b>. "
            f"{_e(s.get('reason', ''))}</p>",
            *note,
            "<h2>Before / after</h2>",
            _before_after_html(s, corruption),
            *[f"<p>{_e(line)}</p>" for line in noise_lines(s)],  # paired intervals, noise
            figure("fig-before-after"),
        ]
    return ['<p class="muted">The sweep has not finished: no summary yet.</p>']


def _strategies_section(res: SweepResults, s: dict[str, Any]) -> list[str]:
    """The strategy comparison and the greedy joint MRC table, when the sweep has them."""
    if is_seeds_summary(s):  # strategies over seeds; joint MRC tables are per seed
        return _strategies_seeds_html(s)
    joint = res.rows("joint_mrc")
    if len(s.get("strategies") or []) <= 1 and not joint:
        return []
    parts = [
        "<h2>Module selection strategies</h2>",
        f"<p>Each strategy's best trial at its alpha* (accuracy, %). The final model is "
        f"the primary strategy's (<b>{_e(s.get('primary', 'lowest'))}</b>).</p>",
        _strategies_html(
            s.get("strategies") or [], summary_corruption(s, "corruption_source") == "generated"
        ),
    ]
    if joint:
        parts += [
            "<p>Greedy joint selection: every module set scored (joint MRC, nats).</p>",
            _html_table(joint, left=("modules", "added", "status", "error", "node")),
        ]
    return parts


def render_html(res: SweepResults, history: str | None = None) -> str:
    """The whole report as one HTML string, figures embedded as base64 PNG (``history``: the
    ``history/`` entry the report shows, :func:`rift_ray.history.history_view`)."""
    s = res.summary or {}
    figs = {k: (cap, png_bytes(fig)) for k, (cap, fig) in report_figures(res).items()}
    figs |= {k: (cap, png_bytes(fig)) for k, (cap, fig) in rift_figures(res).items()}

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
    if history:
        parts.append(f'<p class="muted">As it was with history/{_e(history)}: a result a '
                     "restart or a changed config replaced; not the sweep's current result.</p>")  # fmt: skip
    parts += _headline_html(s, figure, regenerated_label(res))
    parts += ["<h2>Stages</h2>", _html_table(_stages_rows(res), left=("stage", "status", "error"))]
    parts += _cost_html(res)
    parts += ["<h2>Adversarial training</h2>", figure("fig-adv-train")]
    parts += [
        "<h2>Module robust criticality</h2>",
        figure("fig-mrc"),
        *[figure(f) for f in ("fig-mrc-params", "fig-mrc-layers") if f in figs],
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
    parts += [x for f, h in (("fig-tradeoff", "Clean vs robust trade-off"),
                             ("fig-corruption", "Corruptions by severity"))
              if f in figs for x in (f"<h2>{h}</h2>", figure(f))]  # fmt: skip
    parts += _strategies_section(res, s)
    parts += [
        "<h2>Run metadata</h2>",
        _metadata_html(res),
        *provenance_html(res),
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


def write_report(store: Store, out: str | None = None, history: str | None = None) -> str:
    """Write the HTML report; return its path. ``history``: a ``history/`` entry of the
    sweep (a name or its hash): the sweep as it was with it, in ``report-<entry>.html``."""
    if history:
        from rift_ray.history import history_view

        view, entry = history_view(store, history)
        out = out or default_output(store, f"report-{entry}.html")
        text = render_html(SweepResults.load(view), history=entry)
    else:
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


def provenance_html(res: SweepResults) -> list[str]:
    """The report's provenance view: the git commit, each trial's device and every W&B run
    (a link when online; an offline run's directory and the ``wandb sync`` that uploads it)."""
    from html import escape

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
