"""W&B runs for a sweep, logged live from the driver while each stage runs; W&B never fails
the sweep. This module opens, resumes and closes the runs; what each run holds at its stage's
end is :mod:`rift_ray.wandb_views`.

One W&B group per sweep with runs that mirror the stages (``job_type`` = stage):

=========================  ==================================================================
``<name>-adv_train``       per-epoch curves keyed by ``epoch``, logged as each epoch ends:
                           ``train/loss``, ``train/clean_acc``, ``train/adv_acc``,
                           ``val/clean_acc``, ``val/robust_acc``, ``val/clean_loss``, ``lr``,
                           ``images_per_s``; at the end ``at/figure``, ``best/*``
``<name>-mrc``             a row per module as its trial ends (``mrc``, ``loss_after``,
                           ``acc_after``; summary ``mrc/<module>``); at the end ``mrc/table``
                           (every module), ``mrc/by_module`` (bar chart), ``mrc/figure``;
                           summary: least critical module
``<name>-ft-<trial>``      one per fine-tuning trial, opened at its first epoch: per-epoch
                           ``train/*``, ``val/*`` as Tune reports them; summary ``asha/status``
                           (finished | stopped | failed, written when ASHA decides),
                           ``asha/epochs``, ``best/*``; a failed trial ends with exit code 1
``<name>-interpolate``     a row per alpha point as its task ends (``alpha``,
                           ``<split>/<metric>``); at the end ``interp/table``,
                           ``interp/choices``, one line chart per split and metric
                           (``interp/val/clean_acc`` ...: a line per trial, alpha* as a
                           vertical line), ``interp/figure``; summary: alpha*, trial
``<name>-summary``         ``summary/before_after`` table and figure, ``at/<split>/<metric>``,
                           ``rift/<split>/<metric>``, ``delta/...``; the final checkpoint as
                           a ``model`` artifact when ``wandb.log_checkpoint`` (any storage)
=========================  ==================================================================

With ``seeds: [...]`` the runs of stages 2-4 are per seed, ``<name>-s<seed>-mrc`` ...
``<name>-s<seed>-summary`` (config: that seed's), and ``<name>-summary`` is the aggregate:
``mean/<path>``, ``std/<path>`` and ``n/<path>`` for every figure (``mean/rift/test/clean_acc``,
``std/alpha``, ``mean/autoattack/rift/robust_acc`` ...), ``chosen/modules/<module>`` and
``chosen/lr/<lr>`` (how many seeds chose it), and the tables ``seeds/per_seed`` and
``seeds/before_after`` (mean and std).

Resumable: every run has a fixed id (per sweep, stage, seed, trial and stage hash), kept with
the last step it holds in ``wandb/runs.json`` in the sweep's storage. A resumed sweep opens
the same runs again (``resume="allow"``) and skips the steps they already hold; a re-run of
a finished sweep reuses every stage and opens no run.

Settings: ``wandb.<field>`` in the config when given there, else the standard W&B
environment variables (``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``,
``WANDB_TAGS``, ``WANDB_MODE``), else defaults (project ``rift-ray``, group = sweep
name). ``wandb.enabled: false``, ``WANDB_MODE=disabled`` or ``WANDB_DISABLED=true`` turn
logging off. Online needs credentials as wandb finds them: ``WANDB_API_KEY``, the netrc
entry ``wandb login`` writes, or the key in wandb's settings file. Only the driver logs, so
the key never travels to a Ray worker; wandb reads it itself, and this module never prints
or stores it. Without credentials, or when W&B cannot be reached, the tracker warns once,
logs offline and prints the ``wandb sync`` command at the end. Offline runs are written
under ``<sweep>/wandb/`` (object storage: in a local directory, uploaded to
``<sweep>/wandb/`` at each stage end); ``tests/wandb_offline.py`` reads a run back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any

from rift_ray import wandb_views as views
from rift_ray.config import SweepConfig
from rift_ray.hashing import stable_hash
from rift_ray.metrics import is_finite
from rift_ray.store import WANDB_DIR, WANDB_RUNS, Store
from rift_ray.wandb_views import FT_SKIP, history_row, metric_key

_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}


def credentials_found() -> bool:
    """Whether wandb finds an API key the way ``wandb.init`` does: ``$WANDB_API_KEY`` (or an
    identity token file), the netrc entry of ``wandb login`` for the W&B host, or the key in
    wandb's settings file. The key itself is left to wandb."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import HostUrl, read_netrc_auth
        from wandb.sdk.wandb_setup import singleton

        settings = singleton().settings
        host = HostUrl(os.environ.get("WANDB_BASE_URL") or settings.base_url)
        if read_netrc_auth(host=host):  # the entry `wandb login` writes for this host
            return True
        return bool(settings.api_key) and host.is_same_url(settings.base_url)
    except Exception:  # noqa: BLE001 - an unreadable netrc or settings file: no credentials
        return False


class LiveRun:
    """One open W&B run. :meth:`log` skips steps the run already holds (logged by an earlier,
    interrupted driver, or live before the stage's final logging)."""

    def __init__(self, tracker: Tracker, key: str, run: Any, entry: dict[str, Any]) -> None:
        self.tracker, self.key, self.run, self.entry = tracker, key, run, entry

    @property
    def step(self) -> int:
        return int(self.entry.get("step", 0))

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        step = self.step + 1 if step is None else int(step)
        if step <= self.step:
            return
        self.run.log(data, step=step)
        self.entry["step"] = step
        self.tracker._save_registry()


class Tracker:
    """Logs each stage to W&B from the driver, live; every failure is a warning."""

    init_timeout: float = 60.0
    """Seconds ``wandb.init`` may take online before the tracker falls back to offline."""

    def __init__(
        self, cfg: SweepConfig, store: Store, hashes: dict[str, str] | None = None
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.hashes = dict(hashes or {})
        w, env = cfg.wandb, os.environ
        explicit = w.model_fields_set
        self.project = w.project if "project" in explicit else env.get("WANDB_PROJECT", w.project)
        self.entity = w.entity or env.get("WANDB_ENTITY") or None
        self.group = w.group or env.get("WANDB_RUN_GROUP") or cfg.name
        env_tags = [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
        self.tags = list(w.tags) if w.tags else env_tags
        self.mode, self._pending_notice = self._resolve_mode()
        if os.environ.get("WANDB_INIT_TIMEOUT"):  # wandb's own setting, honoured here too
            self.init_timeout = float(os.environ["WANDB_INIT_TIMEOUT"])
        # runs live with the sweep: <sweep>/wandb/ (object storage: a local copy, uploaded)
        self.dir = store.path("") if store.is_local else tempfile.mkdtemp(prefix="rift-ray-wandb-")
        self.offline_runs: list[str] = []
        self.runs: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self.prefix = ""  # "s<seed>-" in a seed's tracker
        self._children: list[Tracker] = []
        self._live: dict[str, LiveRun] = {}
        self._registry: dict[str, Any] | None = None
        self._uploaded: dict[str, tuple[int, float]] = {}
        self._lock = threading.RLock()

    def for_seed(self, cfg: SweepConfig, store: Store, hashes: dict[str, str]) -> Tracker:
        """The tracker of one seed of ``seeds``: runs ``<name>-s<seed>-<stage>`` in the same
        group and W&B directory, logged with that seed's config, recorded in its stage records;
        warnings and the final ``wandb sync`` line are shared with this tracker."""
        import copy

        child = copy.copy(self)
        child.cfg, child.store, child.prefix = cfg, store, f"s{cfg.seed}-"
        child.hashes = dict(hashes)
        child.runs, child._children, child._live = [], [], {}
        child._parent = self._root()
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
        if asked is not None and _MODES.get(asked, "offline") == "offline":
            return "offline", None
        if credentials_found():
            return "online", None
        if asked is None:
            return "offline", "no W&B credentials (WANDB_API_KEY or `wandb login`)"
        return "offline", "wandb mode is online but no W&B credentials were found"

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def _warn(self, kind: str, what: str) -> None:
        """Print a warning once per kind of problem (no key, unreachable, logging, ...)."""
        if kind not in self._warned:
            self._warned.add(kind)
            print(f"[rift-ray] warning: W&B: {what}", file=sys.stderr, flush=True)

    # -- run ids, kept in storage -------------------------------------------------------
    def _load_registry(self) -> dict[str, Any]:
        """``wandb/runs.json`` of the sweep (top level; shared by its seeds)."""
        root = self._root()
        if root._registry is None:
            reg = root.store.read_json_file(WANDB_RUNS)
            if not isinstance(reg, dict) or "token" not in reg:
                reg = {"token": uuid.uuid4().hex[:12], "runs": {}}
            root._registry = reg
        return root._registry

    def _root(self) -> Tracker:
        return getattr(self, "_parent", None) or self

    def _save_registry(self) -> None:
        root = self._root()
        with root._lock:
            if root._registry is not None:
                try:
                    data = json.dumps(root._registry, indent=1, sort_keys=True).encode()
                    root.store.write_file(WANDB_RUNS, data)
                except Exception as e:  # noqa: BLE001 - bookkeeping only
                    self._warn("registry", f"writing {WANDB_RUNS} failed ({type(e).__name__})")

    def _entry(self, key: str, stage: str) -> dict[str, Any]:
        """The registry entry of run ``key`` of ``stage``: its fixed id (from the sweep's token,
        the run, and the stage's hash, so a changed stage gets new runs) and the last step it
        holds."""
        reg = self._load_registry()
        h = self.hashes.get(stage) or self.hashes.get("interpolate", "")
        full = f"{key}@{h}" if h else key
        if full not in reg["runs"]:
            gen = int(reg.get("generations", {}).get(full, 0))
            reg["runs"][full] = {
                "id": stable_hash([reg["token"], full, *([gen] if gen else [])], 16),
                "name": key,
                "step": 0,
            }
        entry: dict[str, Any] = reg["runs"][full]
        return entry

    def forget(self, stages: list[str] | None = None, names: list[str] | None = None) -> None:
        """Drop this tracker's registry entries of ``stages`` (or the runs ``names``), so
        their results, computed again, go to new runs instead of being skipped as steps
        already held (``--retry-failed``)."""
        if not self.enabled:
            return
        with self._root()._lock:
            runs = self._load_registry()["runs"]
            keys = {f"{self.prefix}{n}" for n in names or []}
            for k, e in list(runs.items()):
                if not e.get("name", "").startswith(self.prefix):
                    continue
                if e.get("stage") in (stages or []) or e.get("name") in keys:
                    del runs[k]  # the next run of this key gets a new id (a new generation)
                    gens = self._load_registry().setdefault("generations", {})
                    gens[k] = int(gens.get(k, 0)) + 1
            self._save_registry()

    # -- runs -----------------------------------------------------------------------------
    def _init(self, name: str, job_type: str, config: dict[str, Any] | None, run_id: str) -> Any:
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
            id=run_id,
            resume="allow",
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
                self._root().mode = self.mode = "offline"
                for child in self._root()._children:
                    child.mode = "offline"
                # wandb's service still holds the failed run's id: the offline run gets its own
                # (recorded in runs.json, so a resumed sweep opens that one)
                kwargs["id"] = stable_hash([run_id, "offline"], 16)
        return wandb.init(mode="offline", settings=settings(), **kwargs)

    def open(
        self,
        stage: str,
        name: str,
        *,
        config: dict[str, Any] | None = None,
        job_type: str | None = None,
        epoch_axis: bool = False,
    ) -> LiveRun | None:
        """The open run ``name`` of ``stage``: the one already open, or the run with this
        sweep's fixed id for it, opened (again) now. None when W&B is off or fails."""
        key = f"{self.prefix}{name}"
        with self._lock:
            if key in self._live:
                return self._live[key]
            if not self.enabled:
                return None
            try:
                entry = self._entry(key, stage)
                run = self._init(name, job_type or stage, config, entry["id"])
                if epoch_axis:
                    run.define_metric("epoch")
                    run.define_metric("*", step_metric="epoch")
            except Exception as e:  # noqa: BLE001 - W&B never fails the sweep
                self._warn("log", f"opening {name} failed ({type(e).__name__}: {str(e)[:200]})")
                return None
            entry["stage"] = stage
            entry["id"] = run.id
            live = LiveRun(self, key, run, entry)
            self._live[key] = live
            return live

    def close(self, live: LiveRun | None, exit_code: int | None = None) -> None:
        """Finish an open run (its id stays in the registry; re-opening it resumes it)."""
        if live is None:
            return
        with self._lock:
            self._live.pop(live.key, None)
        run, stage = live.run, live.entry.get("stage", "")
        try:
            offline = bool(getattr(run, "offline", self.mode == "offline"))
            run_dir = os.path.dirname(run.dir) if getattr(run, "dir", None) else None
            info = {"stage": stage, "name": run.name, "id": run.id, "mode": self.mode}
            if offline and run_dir:
                self.offline_runs.append(run_dir)
                info["dir"] = run_dir
            elif getattr(run, "url", None):
                info["url"] = run.url
                live.entry["url"] = run.url
            self.runs.append(info)
            live.entry["finished"] = True
            self._save_registry()
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._warn("finish", f"finishing a run failed ({type(e).__name__}: {str(e)[:200]})")

    def _guard(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``; a W&B failure is a warning (once per kind), never an error."""
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - W&B never fails the sweep
            self._warn("log", f"logging {name} failed ({type(e).__name__}: {str(e)[:200]})")
            return None

    def _run(
        self,
        stage: str,
        name: str,
        fn: Callable[[LiveRun, Any], int | None],
        config: dict[str, Any] | None = None,
        job_type: str | None = None,
        epoch_axis: bool = False,
    ) -> None:
        """Let ``fn(live, wandb)`` finish the run ``name`` (open, or resumed now; its return:
        the exit code), then close it."""
        if not self.enabled:
            return
        live = self.open(stage, name, config=config, job_type=job_type, epoch_axis=epoch_axis)
        if live is None:
            return
        exit_code = None
        try:
            import wandb

            exit_code = fn(live, wandb)
        except Exception as e:  # noqa: BLE001 - W&B never fails the sweep
            self._warn("log", f"logging {name} failed ({type(e).__name__}: {str(e)[:200]})")
        finally:
            self.close(live, exit_code)

    # -- live, while a stage runs ---------------------------------------------------------
    def at_epoch(self, row: dict[str, Any]) -> None:
        """One finished adversarial-training epoch (a Ray Train report)."""

        def fn() -> None:
            live = self.open("adv_train", "adv_train", epoch_axis=True)
            if live is not None:
                epoch = int(row["epoch"])
                live.log({"epoch": epoch, **history_row(row, ("epoch", "best_epoch"))}, epoch)

        self._guard("adv_train", fn)

    def mrc_row(self, row: dict[str, Any]) -> None:
        """One finished MRC trial: its row, as the next step of the MRC run."""

        def fn() -> None:
            live = self.open("mrc", "mrc")
            if live is not None:
                views.mrc_step(live, row)

        self._guard("mrc", fn)

    def _trial_config(self, trial: str, modules: Any, lr: Any) -> dict[str, Any]:
        return {**self.cfg.to_dict(), "trial": {"name": trial, "modules": modules, "lr": lr}}

    def trial_epoch(self, row: dict[str, Any]) -> None:
        """One epoch of a fine-tuning trial as Tune reports it (a failed trial's row too)."""

        def fn() -> None:
            t = row["trial"]
            cfg = self._trial_config(t, row.get("modules"), row.get("lr"))
            live = self.open("finetune", f"ft-{t}", config=cfg, epoch_axis=True)
            if live is None or "epoch" not in row:
                return
            epoch = int(row["epoch"])
            live.log({"epoch": epoch, **history_row(row, FT_SKIP)}, epoch)

        self._guard("finetune", fn)

    def trial_end(self, row: dict[str, Any], status: str) -> None:
        """A fine-tuning trial ended: ``finished``, ``stopped`` (ASHA's decision, written when
        it is made) or ``failed``; ``row`` is its last report."""

        def fn() -> None:
            t = row["trial"]
            cfg = self._trial_config(t, row.get("modules"), row.get("lr"))
            live = self.open("finetune", f"ft-{t}", config=cfg, epoch_axis=True)
            if live is None:
                return
            s = live.run.summary
            s["asha/status"] = status
            s["asha/epochs"] = int(row.get("epoch") or 0)
            s["asha/max_epochs"] = self.cfg.finetune.epochs
            for k in ("best_val_score", "best_val_gain", "best_epoch", "val_score"):
                if is_finite(row.get(k)):
                    s[metric_key("last_val_score" if k == "val_score" else k)] = row[k]
            if row.get("error"):
                s["error"] = row["error"]
            self.close(live, 1 if status == "failed" else None)

        self._guard("finetune", fn)

    def interp_rows(self, rows: list[dict[str, Any]]) -> None:
        """Alpha points just computed (one task's rows): a step each in the interpolation run."""

        def fn() -> None:
            from rift_ray.metrics import METRICS

            live = self.open("interpolate", "interpolate")
            if live is None:
                return
            for r in rows:
                data = {"alpha": r["alpha"]}
                data |= {f"{r['split']}/{m}": r[m] for m in METRICS if is_finite(r.get(m))}
                live.log(data)

        self._guard("interpolate", fn)

    # -- at a stage's end: the whole result ------------------------------------------------
    def log_adv_train(self, history: list[dict[str, Any]]) -> None:
        """The AT run: every epoch it does not hold yet, the figure and the best epoch."""
        fn = lambda live, wandb: views.adv_train_view(live, wandb, self.cfg, history)  # noqa: E731
        self._run("adv_train", "adv_train", fn, epoch_axis=True)
        self._record("adv_train")

    def log_mrc(self, rows: list[dict[str, Any]]) -> None:
        """The MRC run: a step for each module no driver logged live (one that finished while
        the driver was down), the per-module table, a bar chart by module and the figure."""

        def fn(live: LiveRun, wandb: Any) -> None:
            for row in rows:
                views.mrc_step(live, row)
            views.mrc_view(live, wandb, self.cfg, rows)

        self._run("mrc", "mrc", fn)
        self._record("mrc")

    def log_finetune(
        self, trial_rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]]
    ) -> None:
        """One run per fine-tuning trial: its learning curves and its ASHA outcome (trials whose
        run was finished live are left as they are)."""
        reg = self._load_registry()["runs"] if self.enabled else {}
        for t in trial_rows:
            key = f"{self.prefix}ft-{t['trial']}"
            entry = reg.get(f"{key}@{self.hashes.get('finetune', '')}") or reg.get(key)
            if entry and entry.get("finished"):
                self.runs.append({"stage": "finetune", "name": f"{self.cfg.name}-{key}",
                                  "id": entry["id"], "mode": self.mode})  # fmt: skip
                continue
            epochs = sorted(
                (e for e in epoch_rows if e.get("trial") == t["trial"]), key=lambda e: e["epoch"]
            )
            config = self._trial_config(t["trial"], t.get("modules"), t.get("lr"))
            self._run(
                "finetune", f"ft-{t['trial']}",
                lambda live, _wandb, t=t, epochs=epochs: views.trial_view(live, self.cfg, t, epochs),
                config=config, epoch_axis=True,
            )  # fmt: skip
        self._record("finetune")

    def log_interpolation(self, table: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """The interpolation run (grid, curves, alpha*) and the summary run (before/after)."""
        self._run(
            "interpolate",
            "interpolate",
            lambda live, wandb: views.interp_view(live, wandb, self.cfg, table, summary),
        )
        self._run(
            "interpolate",
            "summary",
            lambda live, wandb: views.summary_view(live, wandb, self, summary),
            job_type="summary",
        )
        self._record("interpolate")

    def log_seeds(self, summary: dict[str, Any]) -> None:
        """The aggregate run of a ``seeds`` sweep (:func:`wandb_views.seeds_view`)."""
        self._run(
            "summary",
            "summary",
            lambda live, wandb: views.seeds_view(live, wandb, summary),
            config=self.cfg.to_dict(),
            job_type="summary",
        )

    def _record(self, stage: str) -> None:
        """Note the stage's W&B runs (name, id, url or offline dir) in its stage record."""
        runs = [r for r in self.runs if r["stage"] == stage]
        if runs:
            try:
                self.store.write_stage(stage, wandb=runs)
            except Exception as e:  # noqa: BLE001 - bookkeeping only
                self._warn("record", f"recording the runs of {stage} failed ({type(e).__name__})")

    def urls(self) -> dict[str, str]:
        """The online runs' URLs by run name (this tracker's and its seeds')."""
        return {
            r["name"]: r["url"] for t in (self, *self._children) for r in t.runs if r.get("url")
        }

    def flush(self) -> None:
        """After a stage: with object storage, upload the offline runs written so far to
        ``<sweep>/wandb/`` (only files that changed since the last upload)."""
        if not self.enabled or self.store.is_local:
            return
        root = self._root()
        local = os.path.join(self.dir, WANDB_DIR)
        try:
            for dirpath, _, files in os.walk(local):
                for f in files:
                    path = os.path.join(dirpath, f)
                    try:  # wandb may remove a temporary file while we walk
                        st = os.stat(path)
                        if root._uploaded.get(path) == (st.st_size, st.st_mtime):
                            continue
                        with open(path, "rb") as fh:
                            data = fh.read()
                    except OSError:
                        continue
                    rel = os.path.relpath(path, self.dir).replace(os.sep, "/")
                    root.store.write_file(rel, data)
                    root._uploaded[path] = (st.st_size, st.st_mtime)
        except Exception as e:  # noqa: BLE001 - the local copy stays; the hint names it
            self._warn("upload", f"uploading the offline runs failed ({type(e).__name__})")

    def finish(self) -> None:
        """At the end of the sweep: close what is still open (a stage that failed), upload the
        offline runs with object storage, and say how to upload them (never the key)."""
        for t in (self, *self._children):
            for live in list(t._live.values()):
                t.close(live, 1)
        self.flush()
        if self.offline_runs or any(c.offline_runs for c in self._children):
            runs = [*self.offline_runs, *(r for c in self._children for r in c.offline_runs)]
            parents = {os.path.dirname(r) for r in runs}
            what = (
                os.path.join(parents.pop(), "offline-run-*")
                if len(parents) == 1
                else " ".join(dict.fromkeys(runs))
            )
            where = "" if self.store.is_local else f" (stored in {self.store.uri}/{WANDB_DIR})"
            print(
                f"[rift-ray] W&B runs were logged offline{where}; to upload them: wandb sync {what}",
                file=sys.stderr,
                flush=True,
            )
        urls = self.urls()
        if urls:
            print(f"[rift-ray] W&B group {self.group}: {next(iter(urls.values()))}",
                  file=sys.stderr, flush=True)  # fmt: skip
