"""W&B runs for a sweep, logged from the driver; W&B problems never fail the sweep.

One W&B group per sweep (``wandb.group`` or the sweep name) with a run per stage
(``<name>-adv_train``, ``<name>-mrc``, ``<name>-ft-<trial>`` for each fine-tuning trial,
``<name>-interpolate``). Mode: ``wandb.mode``, else ``$WANDB_MODE``, else online when
``WANDB_API_KEY`` is set, else offline. When online logging fails, the tracker warns
once, switches to offline and prints the ``wandb sync`` command at the end. The API
key is only ever read by wandb itself from the environment.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rift_ray.config import SweepConfig
from rift_ray.store import RIFT_CHECKPOINT, Store


class Tracker:
    def __init__(self, cfg: SweepConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        w = cfg.wandb
        self.mode = (
            "disabled"
            if not w.enabled
            else (
                w.mode
                or os.environ.get("WANDB_MODE")
                or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            )
        )
        if self.mode not in ("online", "offline", "disabled"):
            self.mode = "offline"
        self.dir = os.environ.get("WANDB_DIR") or (
            store.path("") if store.is_local else os.path.abspath(".")
        )
        self.offline_runs: list[str] = []
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def _warn(self, what: str, e: BaseException) -> None:
        if not self._warned:
            print(
                f"[rift-ray] warning: W&B {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                "logging offline, the sweep goes on",
                file=sys.stderr,
                flush=True,
            )
            self._warned = True

    def _init(self, name: str, job_type: str, config: dict[str, Any] | None = None) -> Any:
        import wandb

        w = self.cfg.wandb
        kwargs = dict(
            project=w.project,
            entity=w.entity,
            group=w.group or self.cfg.name,
            name=f"{self.cfg.name}-{name}",
            job_type=job_type,
            tags=list(w.tags),
            config=config or self.cfg.to_dict(),
            dir=self.dir,
            reinit="create_new",
        )
        os.makedirs(self.dir, exist_ok=True)
        try:
            return wandb.init(
                mode=self.mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs
            )
        except Exception as e:  # noqa: BLE001 - unreachable service, bad key, ...
            if self.mode != "online":
                raise
            self._warn("init", e)
            self.mode = "offline"
            return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)

    def _run(self, name: str, job_type: str, fn: Any, config: dict[str, Any] | None = None) -> None:
        """Open a run, let ``fn(run, wandb)`` log into it, close it; never raise."""
        if not self.enabled:
            return
        run = None
        try:
            import wandb

            run = self._init(name, job_type, config)
            fn(run, wandb)
        except Exception as e:  # noqa: BLE001
            self._warn(f"logging of {name}", e)
        finally:
            if run is not None:
                try:
                    if self.mode == "offline" and getattr(run, "dir", None):
                        self.offline_runs.append(os.path.dirname(run.dir))
                    run.finish()
                except Exception as e:  # noqa: BLE001
                    self._warn("finish", e)

    def log_adv_train(self, history: list[dict[str, Any]]) -> None:
        def fn(run: Any, wandb: Any) -> None:
            for row in history:
                run.log(
                    {f"at/{k}": v for k, v in row.items() if isinstance(v, (int, float))},
                    step=int(row["epoch"]),
                )

        self._run("adv_train", "adv_train", fn)

    def log_mrc(self, rows: list[dict[str, Any]]) -> None:
        def fn(run: Any, wandb: Any) -> None:
            cols = list(rows[0].keys())
            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
            run.log({"mrc/table": table})
            ok = [r for r in rows if r["status"] == "done"]
            bar = wandb.Table(columns=["module", "mrc"], data=[[r["module"], r["mrc"]] for r in ok])
            run.log({"mrc/by_module": wandb.plot.bar(bar, "module", "mrc", title="MRC by module")})
            if ok:
                run.summary["mrc/lowest_module"] = ok[0]["module"]
                run.summary["mrc/lowest"] = ok[0]["mrc"]

        self._run("mrc", "mrc", fn)

    def log_finetune(self, trials: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> None:
        for t in trials:

            def fn(run: Any, wandb: Any, t: dict[str, Any] = t) -> None:
                for row in epochs:
                    if row["trial"] == t["trial"]:
                        run.log(
                            {f"ft/{k}": v for k, v in row.items() if isinstance(v, (int, float))},
                            step=int(row["epoch"]),
                        )
                for k, v in t.items():
                    run.summary[f"ft/{k}"] = v

            self._run(
                f"ft-{t['trial']}", "finetune", fn, config={**self.cfg.to_dict(), "trial": dict(t)}
            )

    def log_interpolation(self, table: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        def fn(run: Any, wandb: Any) -> None:
            cols = list(table[0].keys())
            run.log(
                {
                    "interp/table": wandb.Table(
                        columns=cols, data=[[r.get(c) for c in cols] for r in table]
                    )
                }
            )
            for metric in ("clean_acc", "robust_acc"):
                trials = sorted({r["trial"] for r in table})
                xs = sorted({r["alpha"] for r in table})
                ys = [
                    [
                        next(
                            (
                                r[metric]
                                for r in table
                                if r["trial"] == t and r["alpha"] == a and r["split"] == "val"
                            ),
                            None,
                        )
                        for a in xs
                    ]
                    for t in trials
                ]
                run.log(
                    {
                        f"interp/val_{metric}": wandb.plot.line_series(
                            xs=xs, ys=ys, keys=trials, title=f"val {metric} vs alpha", xname="alpha"
                        )
                    }
                )
            for k in ("alpha", "lr", "trial", "clean_gain_val", "robust_drop_val"):
                run.summary[k] = summary.get(k)
            for who in ("at", "rift"):
                for split, m in summary.get(who, {}).items():
                    for k, v in m.items():
                        run.summary[f"{who}/{split}_{k}"] = v
            if self.cfg.wandb.log_checkpoint and self.store.is_local:
                path = self.store.path(RIFT_CHECKPOINT)
                if os.path.isfile(path):
                    art = wandb.Artifact(
                        f"{self.cfg.name}-rift",
                        type="model",
                        metadata={"alpha": summary.get("alpha")},
                    )
                    art.add_file(path)
                    run.log_artifact(art)

        self._run("interpolate", "interpolate", fn)

    def finish(self) -> None:
        if self.offline_runs:
            runs = " ".join(sorted(set(self.offline_runs)))
            print(
                f"[rift-ray] W&B logged offline; to upload: wandb sync {runs}",
                file=sys.stderr,
                flush=True,
            )
