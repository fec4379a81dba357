"""Run (or resume) one Ray Tune experiment under the sweep's storage."""

from __future__ import annotations

import os
import posixpath
import sys
from typing import Any

from ray import tune

from rift_ray.console import ray_console
from rift_ray.progress import TrialBoard
from rift_ray.store import Store

_LIVE: dict[str, tuple[Any, ...]] = {}
"""The live hooks of each running experiment, by name: Tune pickles its callbacks with the
experiment (and a restore brings the pickled ones back), so a :class:`LiveTrials` carries only
the experiment's name and finds the current driver's hooks here."""


class LiveTrials(tune.Callback):
    """In the driver, as Tune runs: each trial's reports (``on_result(config, result)``) and its
    end (``on_end(config, last_result, "complete" | "error")`` returning the status shown,
    ASHA's stops included), and the stage's console board. ``name(config)``: a trial's name.
    Hook errors only warn: they never stop the stage."""

    def __init__(
        self,
        experiment: str,
        board: TrialBoard,
        name: Any,
        metric: str,
        on_result: Any = None,
        on_end: Any = None,
    ) -> None:
        self.experiment = experiment
        _LIVE[experiment] = (board, name, metric, on_result, on_end)

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment": self.experiment}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.experiment = state["experiment"]

    def _hooks(self) -> tuple[Any, ...] | None:
        return _LIVE.get(self.experiment)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        hooks = self._hooks()
        if hooks is None:
            return
        board, name, metric, on_result, _ = hooks
        status = "failed" if result.get("status") == "failed" else "running"
        _call(on_result, trial.config, result)
        board.update(name(trial.config), status, result.get("training_iteration"),
                     result.get(metric))  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "complete")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "error")

    def _end(self, trial: Any, how: str) -> None:
        hooks = self._hooks()
        if hooks is None:
            return
        board, name, metric, _, on_end = hooks
        last = dict(trial.last_result or {})
        status = _call(on_end, trial.config, last, how)
        if not isinstance(status, str):
            status = "failed" if how == "error" or last.get("status") == "failed" else "done"
        board.update(name(trial.config), status, last.get("training_iteration"), last.get(metric))

    def close(self) -> None:
        """The experiment is over: forget its hooks."""
        _LIVE.pop(self.experiment, None)


def _call(fn: Any, *args: Any) -> Any:
    if fn is None:
        return None
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - live logging never stops a stage
        print(f"[rift-ray] warning: live update failed ({type(e).__name__}: {e})",
              file=sys.stderr, flush=True)  # fmt: skip
        return None


# A trial starts on the actor its predecessor used instead of in a new worker process (torch
# import, model code): ~3 s less per trial on a 2-core box (benchmarks/tune_reuse_bench.py).
REUSE_ACTORS = True


def run_tune(
    trainable: Any,
    param_space: dict[str, Any],
    *,
    store: Store,
    name: str,
    resources: dict[str, float],
    max_concurrent: int | None = None,
    metric: str | None = None,
    mode: str | None = None,
    scheduler: Any = None,
    checkpoint_config: Any = None,
    callbacks: list[Any] | None = None,
    max_failures: int = 2,
    stop: Any = None,
) -> tune.ResultGrid:
    """Fit a Tune grid; when the experiment ``name`` exists in storage, restore it.

    A trial whose worker or node dies is retried up to ``max_failures`` times (from its
    last checkpoint where it has one). The name carries the stage's config hash, so only an interrupted run of the same
    stage configuration is resumed: finished trials are kept, unfinished ones continue
    from their last checkpoint and errored ones are retried.
    """
    storage_path, storage_fs = store.ray_storage()
    resources = {k: v for k, v in resources.items() if v}
    trainable = tune.with_resources(trainable, resources)
    path = f"{storage_path}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            restart_errored=True,
            param_space=param_space,
            storage_filesystem=storage_fs,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=scheduler,
                max_concurrent_trials=max_concurrent,
                reuse_actors=REUSE_ACTORS,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                checkpoint_config=checkpoint_config,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                callbacks=callbacks,
                stop=stop,
                verbose=1 if ray_console() else 0,  # else the stage's board (LiveTrials) shows them
            ),
        )
    quiet = not ray_console()  # Tune's new output engine prints its boxes even at verbose=0
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if quiet:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        return tuner.fit()
    finally:
        if quiet:
            if saved is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = saved
        for cb in callbacks or []:
            if isinstance(cb, LiveTrials):
                cb.close()


def prune_checkpoints(results: tune.ResultGrid) -> int:
    """Delete every trial checkpoint but the last, once the grid is done; return how many.

    Only safe after ``fit`` returned: the final experiment snapshot names the last ones.
    """
    import pyarrow.fs as pafs

    removed = 0
    for res in results:
        ckpt = res.checkpoint
        if ckpt is None:
            continue
        fs, trial_dir = ckpt.filesystem, posixpath.dirname(ckpt.path)
        keep = posixpath.basename(ckpt.path)
        for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
            name = posixpath.basename(info.path)
            if (
                info.type == pafs.FileType.Directory
                and name.startswith("checkpoint_")
                and name != keep
            ):
                fs.delete_dir(info.path)
                removed += 1
    return removed
