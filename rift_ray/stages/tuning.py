"""Run (or resume) one Ray Tune experiment under the sweep's storage."""

from __future__ import annotations

import posixpath
from typing import Any

from ray import tune

from rift_ray.store import Store

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
                verbose=1,
            ),
        )
    return tuner.fit()


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
