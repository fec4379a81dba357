"""W&B runs for a sweep, logged from the driver after each stage; W&B never fails the sweep.

One W&B group per sweep with runs that mirror the stages (``job_type`` = stage):

=========================  ==================================================================
``<name>-adv_train``       per-epoch curves keyed by ``epoch``: ``train/loss``,
                           ``train/clean_acc``, ``train/adv_acc``, ``val/clean_acc``,
                           ``val/robust_acc``, ``val/clean_loss``, ``lr``, ``images_per_s``
``<name>-mrc``             ``mrc/table`` (every module), ``mrc/by_module`` (bar chart),
                           ``mrc/figure``; summary: least critical module
``<name>-ft-<trial>``      one per fine-tuning trial: per-epoch ``train/*``, ``val/*``;
                           summary ``asha/status`` (finished | stopped | failed),
                           ``asha/epochs``, ``best/*``; a failed trial ends with exit code 1
``<name>-interpolate``     ``interp/table``, ``interp/choices``, one line chart per split and
                           metric (``interp/val/clean_acc`` ...: a line per trial, alpha*
                           as a vertical line), ``interp/figure``; summary: alpha*, trial
``<name>-summary``         ``summary/before_after`` table and figure, ``at/<split>/<metric>``,
                           ``rift/<split>/<metric>``, ``delta/...``; the final checkpoint as
                           a ``model`` artifact when ``wandb.log_checkpoint``
=========================  ==================================================================

With ``seeds: [...]`` the runs of stages 2-4 are per seed, ``<name>-s<seed>-mrc`` ...
``<name>-s<seed>-summary`` (config: that seed's), and ``<name>-summary`` is the aggregate:
``mean/<path>``, ``std/<path>`` and ``n/<path>`` for every figure (``mean/rift/test/clean_acc``,
``std/alpha``, ``mean/autoattack/rift/robust_acc`` ...), ``chosen/modules/<module>`` and
``chosen/lr/<lr>`` (how many seeds chose it), and the tables ``seeds/per_seed`` and
``seeds/before_after`` (mean and std).

Settings: ``wandb.<field>`` in the config when given there, else the standard W&B
environment variables (``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``,
``WANDB_TAGS``, ``WANDB_MODE``), else defaults (project ``rift-ray``, group = sweep
name). ``wandb.enabled: false``, ``WANDB_MODE=disabled`` or ``WANDB_DISABLED=true`` turn
logging off. Online needs ``WANDB_API_KEY`` in the environment; the key is read by
wandb itself, never by this module, and never printed or stored. Without a key, or
when W&B cannot be reached, the tracker warns once, logs offline and prints the
``wandb sync`` command at the end. Offline runs land in ``<sweep dir>/wandb/``
(``$WANDB_DIR`` when set); ``tests/wandb_offline.py`` reads a run back.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from rift_ray.config import SweepConfig
from rift_ray.metrics import is_finite
from rift_ray.store import RIFT_CHECKPOINT, Store

_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}


def metric_key(name: str) -> str:
    """``train_clean_acc`` -> ``train/clean_acc`` (W&B panel sections); other names unchanged."""
    for prefix in ("train", "val", "test", "best", "last"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1 :]}"
    return name


def _history_row(row: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Numeric, finite entries of a stage row under W&B keys (``seconds`` -> ``epoch_seconds``)."""
    out = {}
    for k, v in row.items():
        if k in skip or not is_finite(v):
            continue
        out["epoch_seconds" if k == "seconds" else metric_key(k)] = v
    return out


class Tracker:
    """Logs each stage's results to W&B from the driver; every failure is a warning."""

    init_timeout: float = 60.0
    """Seconds ``wandb.init`` may take online before the tracker falls back to offline."""

    def __init__(self, cfg: SweepConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        w, env = cfg.wandb, os.environ
        explicit = w.model_fields_set
        self.project = w.project if "project" in explicit else env.get("WANDB_PROJECT", w.project)
        self.entity = w.entity or env.get("WANDB_ENTITY") or None
        self.group = w.group or env.get("WANDB_RUN_GROUP") or cfg.name
        env_tags = [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
        self.tags = list(w.tags) if w.tags else env_tags
        self.mode, self._pending_notice = self._resolve_mode()
        self.dir = env.get("WANDB_DIR") or (store.path("") if store.is_local else os.getcwd())
        self.offline_runs: list[str] = []
        self.runs: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self.prefix = ""  # "s<seed>-" in a seed's tracker
        self._children: list[Tracker] = []

    def for_seed(self, cfg: SweepConfig, store: Store) -> Tracker:
        """The tracker of one seed of ``seeds``: runs ``<name>-s<seed>-<stage>`` in the same
        group and W&B directory, logged with that seed's config, recorded in its stage records;
        warnings and the final ``wandb sync`` line are shared with this tracker."""
        import copy

        child = copy.copy(self)
        child.cfg, child.store, child.prefix = cfg, store, f"s{cfg.seed}-"
        child.runs, child._children = [], []
        self._children.append(child)
        return child

    def _resolve_mode(self) -> tuple[str, str | None]:
        """(mode, a notice to print once when a run is first opened)."""
        w, env = self.cfg.wandb, os.environ
        if not w.enabled or env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            return "disabled", None
        asked = w.mode or env.get("WANDB_MODE") or None
        if asked == "disabled":
            return "disabled", None
        has_key = bool(env.get("WANDB_API_KEY"))
        if asked is None:
            if has_key:
                return "online", None
            return "offline", "no WANDB_API_KEY in the environment"
        mode = _MODES.get(asked, "offline")
        if mode == "online" and not has_key:
            return "offline", "wandb mode is online but WANDB_API_KEY is not set"
        return mode, None

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def _warn(self, kind: str, what: str) -> None:
        """Print a warning once per kind of problem (no key, unreachable, logging, ...)."""
        if kind not in self._warned:
            self._warned.add(kind)
            print(f"[rift-ray] warning: W&B: {what}", file=sys.stderr, flush=True)

    # -- runs -----------------------------------------------------------------------------
    def _init(self, name: str, job_type: str, config: dict[str, Any] | None) -> Any:
        import wandb

        if self._pending_notice:
            self._warn("mode", f"{self._pending_notice}; logging offline, the sweep goes on")
            self._pending_notice = None
        kwargs: dict[str, Any] = dict(
            project=self.project,
            entity=self.entity,
            group=self.group,
            name=f"{self.cfg.name}-{self.prefix}{name}",
            job_type=job_type,
            tags=self.tags,
            config=config if config is not None else self.cfg.to_dict(),
            dir=self.dir,
            reinit="create_new",
        )
        os.makedirs(self.dir, exist_ok=True)

        def settings(**extra: Any) -> Any:
            return wandb.Settings(silent=True, console="off", x_disable_stats=True, **extra)

        if self.mode == "online":
            try:
                return wandb.init(
                    mode="online", settings=settings(init_timeout=self.init_timeout), **kwargs
                )
            except Exception as e:  # noqa: BLE001 - unreachable service, bad key, ...
                msg = " ".join(str(e).split())[:200]
                self._warn("init", f"cannot reach W&B ({type(e).__name__}: {msg}); logging offline")
                self.mode = "offline"
        return wandb.init(mode="offline", settings=settings(), **kwargs)

    def _run(
        self,
        stage: str,
        name: str,
        fn: Callable[[Any, Any], int | None],
        config: dict[str, Any] | None = None,
        job_type: str | None = None,
    ) -> None:
        """Open a run, let ``fn(run, wandb)`` log into it (its return: the exit code), close it."""
        if not self.enabled:
            return
        run, exit_code = None, None
        try:
            import wandb

            run = self._init(name, job_type or stage, config)
            exit_code = fn(run, wandb)
        except Exception as e:  # noqa: BLE001 - W&B never fails the sweep
            self._warn("log", f"logging {name} failed ({type(e).__name__}: {str(e)[:200]})")
        finally:
            if run is not None:
                self._finish_run(run, stage, exit_code)

    def _finish_run(self, run: Any, stage: str, exit_code: int | None) -> None:
        try:
            offline = bool(getattr(run, "offline", self.mode == "offline"))
            run_dir = os.path.dirname(run.dir) if getattr(run, "dir", None) else None
            info = {"stage": stage, "name": run.name, "id": run.id, "mode": self.mode}
            if offline and run_dir:
                self.offline_runs.append(run_dir)
                info["dir"] = run_dir
            elif getattr(run, "url", None):
                info["url"] = run.url
            self.runs.append(info)
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._warn("finish", f"finishing a run failed ({type(e).__name__}: {str(e)[:200]})")

    # -- stages ---------------------------------------------------------------------------
    def log_adv_train(self, history: list[dict[str, Any]]) -> None:
        """The AT run: one history row per epoch (or a note when training was skipped)."""

        def fn(run: Any, wandb: Any) -> None:
            run.define_metric("epoch")
            run.define_metric("*", step_metric="epoch")
            for row in history:
                run.log(
                    {"epoch": int(row["epoch"]), **_history_row(row, skip=("epoch", "best_epoch"))},
                    step=int(row["epoch"]),
                )
            if not history:
                run.summary["source"] = str(self.cfg.adv_train.checkpoint or "")
                return
            best = max(history, key=lambda r: r.get("val_robust_acc", -1.0))
            run.summary["best_epoch"] = int(history[-1].get("best_epoch", best["epoch"]))
            for k in ("val_clean_acc", "val_robust_acc"):
                if k in best:
                    run.summary[f"best/{k}"] = best[k]
            from rift_ray.figures import fig_adv_train

            self._log_figure(run, wandb, "at/figure", fig_adv_train(history))

        self._run("adv_train", "adv_train", fn)
        self._record("adv_train")

    def log_mrc(self, rows: list[dict[str, Any]]) -> None:
        """The MRC run: the per-module table, a bar chart by module and the report figure."""

        def fn(run: Any, wandb: Any) -> None:
            from rift_ray.figures import fig_mrc

            run.log({"mrc/table": _table(wandb, rows)})
            ok = sorted(
                (r for r in rows if r.get("status") == "done" and is_finite(r.get("mrc"))),
                key=lambda r: r["mrc"],
            )
            bar = wandb.Table(columns=["module", "mrc"], data=[[r["module"], r["mrc"]] for r in ok])
            run.log({"mrc/by_module": wandb.plot.bar(bar, "module", "mrc", title="MRC by module")})
            top = self.cfg.finetune.top_k
            self._log_figure(
                run, wandb, "mrc/figure", fig_mrc(rows, [r["module"] for r in ok[:top]])
            )
            run.summary["modules"] = len(rows)
            run.summary["failed"] = len(rows) - len(ok)
            if ok:
                run.summary["least_critical"] = ok[0]["module"]
                run.summary["least_critical_mrc"] = ok[0]["mrc"]

        self._run("mrc", "mrc", fn)
        self._record("mrc")

    def log_finetune(
        self, trial_rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]]
    ) -> None:
        """One run per fine-tuning trial: its learning curves and its ASHA outcome."""
        for t in trial_rows:
            epochs = sorted(
                (e for e in epoch_rows if e.get("trial") == t["trial"]), key=lambda e: e["epoch"]
            )

            def fn(
                run: Any, wandb: Any, t: dict[str, Any] = t, epochs: list = epochs
            ) -> int | None:
                run.define_metric("epoch")
                run.define_metric("*", step_metric="epoch")
                for e in epochs:
                    skip = ("epoch", "best_epoch", "best_val_gain", "best_val_score")
                    run.log(
                        {"epoch": int(e["epoch"]), **_history_row(e, skip)}, step=int(e["epoch"])
                    )
                run.summary["asha/status"] = t.get("status")
                run.summary["asha/epochs"] = t.get("epochs")
                run.summary["asha/max_epochs"] = self.cfg.finetune.epochs
                for k, v in t.items():
                    if k.startswith(("best_", "last_")) and v is not None:
                        run.summary[metric_key(k)] = v
                if t.get("error"):
                    run.summary["error"] = t["error"]
                return 1 if t.get("status") == "failed" else None

            config = {
                **self.cfg.to_dict(),
                "trial": {"name": t["trial"], "modules": t.get("modules"), "lr": t.get("lr")},
            }
            self._run("finetune", f"ft-{t['trial']}", fn, config=config)
        self._record("finetune")

    def log_interpolation(self, table: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """The interpolation run (grid, curves, alpha*) and the summary run (before/after)."""
        self._run(
            "interpolate",
            "interpolate",
            lambda run, wandb: self._interp(run, wandb, table, summary),
        )
        self._run(
            "interpolate",
            "summary",
            lambda run, wandb: self._summary(run, wandb, summary),
            job_type="summary",
        )
        self._record("interpolate")

    def _interp(
        self, run: Any, wandb: Any, table: list[dict[str, Any]], summary: dict[str, Any]
    ) -> None:
        from rift_ray.figures import fig_interpolation
        from rift_ray.metrics import METRICS

        run.log({"interp/table": _table(wandb, table)})
        if summary.get("choices"):
            run.log({"interp/choices": _table(wandb, summary["choices"])})
        trials = list(dict.fromkeys(r["trial"] for r in table))
        best, alpha = summary.get("trial"), summary.get("alpha")
        for split in ("val", "test"):
            for metric in METRICS:
                pts = [r for r in table if r["split"] == split and is_finite(r.get(metric))]
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
                run.log({f"interp/{split}/{metric}": chart})
        fig = fig_interpolation(table, summary.get("choices"), best, self.cfg.interpolate.tolerance)
        self._log_figure(run, wandb, "interp/figure", fig)
        for k in ("alpha", "trial", "lr", "reason", "clean_gain_val", "robust_drop_val"):
            if summary.get(k) is not None:
                run.summary[k] = summary[k]
        run.summary["modules"] = "+".join(summary.get("modules") or [])

    def _summary(self, run: Any, wandb: Any, summary: dict[str, Any]) -> None:
        from rift_ray.figures import fig_before_after
        from rift_ray.results import summary_rows

        run.log({"summary/before_after": _table(wandb, summary_rows(summary))})
        if len(summary.get("strategies") or []) > 1:  # the module-selection comparison
            run.log({"summary/strategies": _table(wandb, summary["strategies"])})
        self._log_figure(run, wandb, "summary/figure", fig_before_after(summary))
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
        path = self.store.path(RIFT_CHECKPOINT)
        if self.cfg.wandb.log_checkpoint and self.store.is_local and os.path.isfile(path):
            meta = {
                k: summary.get(k)
                for k in ("alpha", "trial", "modules", "lr", "config_hash", "seed")
            }
            art = wandb.Artifact(
                f"{self.cfg.name}-{self.prefix}rift",
                type="model",
                metadata={**meta, "rift": summary.get("rift")},
            )
            art.add_file(path, name="rift.pt")
            run.log_artifact(art)

    def log_seeds(self, summary: dict[str, Any]) -> None:
        """The aggregate run of a ``seeds`` sweep: mean, std and n of every figure, how often
        each module / lr was chosen, the per-seed and mean/std before/after tables."""

        def fn(run: Any, wandb: Any) -> None:
            from rift_ray.figures import fig_before_after_seeds
            from rift_ray.results import per_seed_rows, summary_rows

            for part in ("mean", "std", "count"):
                for key, v in _flatten(summary.get(part) or {}).items():
                    if v is not None:
                        run.summary[f"{'n' if part == 'count' else part}/{key}"] = v
            for what, counts in (summary.get("chosen") or {}).items():
                for k, v in counts.items():
                    run.summary[f"chosen/{what}/{k}"] = v
            run.summary["n"] = summary.get("n")
            run.summary["seeds"] = list(summary.get("seeds") or [])
            run.summary["seconds"] = summary.get("seconds") or {}
            run.log(
                {
                    "seeds/per_seed": _table(wandb, per_seed_rows(summary)),
                    "seeds/before_after": _table(wandb, summary_rows(summary)),
                }
            )
            self._log_figure(run, wandb, "seeds/figure", fig_before_after_seeds(summary))

        self._run("summary", "summary", fn, config=self.cfg.to_dict(), job_type="summary")

    def _record(self, stage: str) -> None:
        """Note the stage's W&B runs (name, id, url or offline dir) in its stage record."""
        runs = [r for r in self.runs if r["stage"] == stage]
        if runs:
            try:
                self.store.write_stage(stage, wandb=runs)
            except Exception as e:  # noqa: BLE001 - bookkeeping only
                self._warn("record", f"recording the runs of {stage} failed ({type(e).__name__})")

    def _log_figure(self, run: Any, wandb: Any, key: str, fig: Any) -> None:
        if fig is None:
            return
        import io

        from PIL import Image

        from rift_ray.figures import png_bytes

        run.log({key: wandb.Image(Image.open(io.BytesIO(png_bytes(fig))))})

    def finish(self) -> None:
        """At the end of the sweep: how to upload offline runs (never the key)."""
        if self.offline_runs:
            runs = " ".join(dict.fromkeys(self.offline_runs))
            print(
                f"[rift-ray] W&B runs were logged offline; to upload them: wandb sync {runs}",
                file=sys.stderr,
                flush=True,
            )
        urls = [r["url"] for t in (self, *self._children) for r in t.runs if r.get("url")]
        if urls:
            print(f"[rift-ray] W&B group {self.group}: {urls[0]}", file=sys.stderr, flush=True)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"at": {"test": {"clean_acc": 1.0}}}`` -> ``{"at/test/clean_acc": 1.0}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table(wandb: Any, rows: list[dict[str, Any]]) -> Any:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows])


def _cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v
