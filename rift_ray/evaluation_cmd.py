"""``rift-ray eval``: any checkpoint measured with a sweep's evaluation protocol, on Ray.

    cfg = load_config("results/smoke/config.yaml")
    res = evaluate_checkpoint(cfg, "results/smoke/checkpoints/at.pt")
    res["val"]["robust_acc"]   # == summary.json's at.val.robust_acc of that sweep

"The same protocol" is the same code, not a copy of it:

- the checkpoint is read as ``adv_train.checkpoint`` is (:func:`rift_ray.checks.
  load_start_checkpoint`: a file or RobustBench's ``model_dir/name``, foreign layouts and
  ``adv_train.checkpoint_normalization`` included);
- the data is split as the sweep splits it (:func:`rift_ray.data.load_dataset` with the
  config's ``seed``: the same validation images carved from train, the same test order);
- each split is measured by the Ray task stage 4 measures the AT model (alpha 0) with
  (:class:`rift_ray.stages.alpha_points.Points`): ``eval_sets``' subsets
  (``eval.val_subset`` / ``test_subset``, ``interpolate.confirm_size`` held out of val), PGD
  with the ``attack`` section, ``eval.restarts``, ``eval.batch_size``, ``compute.amp`` and
  random starts seeded by ``seed``, on ``resources.interpolate``'s CPU / GPU share;
- corruptions on the test images of :func:`rift_ray.stages.interp.corruption_sets`;
  AutoAttack by :func:`rift_ray.stages.autoattack.run_autoattack` (``eval.autoattack``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from rift_ray.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from rift_ray.config import ConfigError, SweepConfig, expand_path, load_config
from rift_ray.data import DatasetSplits
from rift_ray.metrics import ACCURACIES

Split = Literal["val", "test"]
SPLITS: tuple[Split, ...] = ("val", "test")


def sweep_config_path(checkpoint: str, config: str | None) -> str:
    """``config``, else the ``config.yaml`` of the sweep whose ``checkpoints/`` holds
    ``checkpoint`` (``<sweep>/checkpoints/at.pt``, ``.../finetune/<trial>.pt``); ConfigError
    when there is neither."""
    if config:
        return config
    p = Path(checkpoint).expanduser().absolute()
    for parent in list(p.parents)[:3]:
        if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
            return str(parent.parent / "config.yaml")
    raise ConfigError(
        "--config: required (the sweep YAML whose protocol to use; CHECKPOINT is not in a "
        "sweep's checkpoints/ directory with a config.yaml beside it)"
    )


def eval_config(path: str, overrides: Sequence[str] = ()) -> SweepConfig:
    """The sweep config at ``path`` with ``--set`` overrides (ConfigError, one line)."""
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"--config: no such file: {path}")
    return load_config(path, overrides=list(overrides))


def checkpoint_file(cfg: SweepConfig, checkpoint: str) -> Path:
    """The file ``checkpoint`` names (itself, or RobustBench's ``model_dir/<dataset>/<threat
    model>/<name>.pt``, as for ``adv_train.checkpoint``); CheckpointError when none exists."""
    file = find_checkpoint(expand_path(checkpoint) or checkpoint, cfg.data.dataset)
    if file is None:
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    return file


def load_eval_checkpoint(
    cfg: SweepConfig, spec: Any, checkpoint: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the weights as the sweep's model holds them, the file's metadata): ``checkpoint``
    read exactly as the sweep reads ``adv_train.checkpoint``. CheckpointError (one line)
    for a missing file or one that does not fit ``cfg.model`` on this data."""
    from rift_ray.checks import load_start_checkpoint

    path = expand_path(checkpoint) or checkpoint
    file = checkpoint_file(cfg, checkpoint)
    as_start = cfg.model_copy(
        update={"adv_train": cfg.adv_train.model_copy(update={"checkpoint": str(path)})}
    )
    meta = load_checkpoint(file)[1]
    try:
        state = load_start_checkpoint(as_start, spec)
    except CheckpointError as e:
        arch, classes = meta.get("arch"), meta.get("num_classes")
        if arch and (arch != cfg.model.arch or classes != spec.num_classes):
            raise CheckpointError(
                f"{checkpoint}: a {arch} checkpoint with {classes} classes, but the config builds "
                f"{cfg.model.arch} with {spec.num_classes} ({cfg.data.dataset})"
            ) from None
        raise CheckpointError(" ".join(str(e).split())) from None
    return state, meta


def check_request(
    cfg: SweepConfig,
    splits: DatasetSplits,
    which: Sequence[str],
    *,
    corruptions: bool,
    autoattack: bool,
) -> None:
    """ConfigError (one line) for a request this config and data cannot answer, before Ray."""
    from rift_ray.stages.alpha_points import eval_sets

    bad = [s for s in which if s not in SPLITS]
    if bad or not which:
        raise ConfigError(f"--split: must be val or test (got {', '.join(bad) or 'none'})")
    have = eval_sets(cfg, splits)
    for s in which:
        if s not in have:
            field = "data.val_size" if s == "val" else "data.test_subset"
            raise ConfigError(f"--split {s}: this config has no {s} images ({field})")
    if (corruptions or autoattack) and "test" not in which:
        flag = "--corruptions" if corruptions else "--autoattack"
        raise ConfigError(f"{flag}: measured on test only (drop --split val)")
    if corruptions:
        if not cfg.eval.corruptions:
            raise ConfigError("--corruptions: the config names none (eval.corruptions is empty)")
        from rift_ray.checks import check_corruptions

        check_corruptions(cfg)
    if autoattack:
        from rift_ray.autoattack import require_autoattack

        try:
            require_autoattack()
        except ImportError as e:
            raise ConfigError(f"--autoattack: {e}") from None


def connect_ray(cfg: SweepConfig, address: str | None) -> Any:
    """Join or start Ray as ``rift-ray sweep`` does (:func:`rift_ray.cluster.connect`) and
    check that one stage-4 task fits a node; returns the cluster's shape."""
    from rift_ray import cluster as cl
    from rift_ray.progress import log

    shape = cl.connect(cfg, address)
    log(("started " if shape.private else "joined ") + shape.describe())
    bundles = cl.stage_bundles(cfg, 1, adv_train=False)
    cl.check_fits(shape, [b for b in bundles if b.stage == "interpolate"])
    return shape


def evaluate_checkpoint(
    cfg: SweepConfig,
    checkpoint: str,
    *,
    splits: Sequence[str] = SPLITS,
    corruptions: bool = False,
    autoattack: bool = False,
    address: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Clean and PGD accuracy (percent) of ``checkpoint`` on each of ``splits`` with the
    sweep's protocol (module docstring), plus corruption and AutoAttack accuracy on test when
    asked. ``seed``: the RiFT seed of a ``seeds`` sweep whose stage 4 to reproduce (its PGD
    starts; the data split stays the config's ``seed``).

    Returns ``{"val": {...}, "test": {...}}`` (the requested splits, keys as in
    ``summary.json``: ``clean_acc``, ``robust_acc``, ``corruption_acc``, ``autoattack_acc``,
    and ``n``), with ``checkpoint``, ``model``, ``attack``, ``protocol``, ``config_hash``,
    ``autoattack`` (its full result, when run) and ``seconds``.
    """
    import ray

    from rift_ray.checks import field_call
    from rift_ray.data import load_dataset
    from rift_ray.hashing import config_hash
    from rift_ray.progress import Progress
    from rift_ray.stages.alpha_points import Points
    from rift_ray.stages.common import ModelSpec
    from rift_ray.stages.interp import corruption_sets
    from rift_ray.stages.per_image import split_per_image

    t0 = time.time()
    which = tuple(dict.fromkeys(splits))
    checkpoint_file(cfg, checkpoint)  # before the data is read
    data = field_call("data.root", load_dataset, cfg.data, seed=cfg.seed)
    spec = ModelSpec.of(data)
    state, meta = load_eval_checkpoint(cfg, spec, checkpoint)
    check_request(cfg, data, which, corruptions=corruptions, autoattack=autoattack)
    run_cfg = cfg if seed is None else cfg.for_seed(seed)
    # stage 4 reads val and test only: the training images stay on this machine
    lean = dataclasses.replace(data, train=data.train.subset(torch.arange(0)))
    connect_ray(cfg, address)
    cdata = corruption_sets(run_cfg, data, data_seed=cfg.seed) if corruptions else None
    splits_ref = ray.put(lean)
    pts = Points(run_cfg, spec, splits_ref, state)
    with Progress("eval", 1, "checkpoint") as bar:
        pts.alphas("eval", None, [0.0], ray.put(cdata) if cdata else None, which)
        rows, _ = split_per_image(pts.gather(bar, None)["eval"], "eval")
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": model_fields(cfg, spec, meta),
        "attack": attack_fields(run_cfg),
        "protocol": protocol_fields(run_cfg, which, corruptions=corruptions, autoattack=autoattack),
        "config_hash": config_hash(cfg),
    }
    for row in sorted(rows, key=lambda r: SPLITS.index(r["split"])):
        out[row["split"]] = {k: row[k] for k in ACCURACIES if row.get(k) is not None}
        out[row["split"]]["n"] = row["n"]
    if autoattack:
        aa = _autoattack(run_cfg, spec, splits_ref, state)
        out["autoattack"] = {
            k: aa[k] for k in ("robust_acc", "clean_acc", "n", "after", "settings")
        }
        out["test"]["autoattack_acc"] = aa["robust_acc"]
    out["seconds"] = time.time() - t0
    return out


def _autoattack(
    cfg: SweepConfig, spec: Any, splits_ref: Any, state: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """:func:`rift_ray.stages.autoattack.run_autoattack` with its resumable shards in a
    scratch directory (the sweep's storage is not written)."""
    from rift_ray.stages.autoattack import run_autoattack
    from rift_ray.store import Store

    with tempfile.TemporaryDirectory(prefix="rift-ray-eval-") as tmp:
        return run_autoattack(cfg, Store.open(tmp, "eval"), spec, splits_ref, state, "eval")


def model_fields(cfg: SweepConfig, spec: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """What was evaluated: the architecture the config builds and the checkpoint's metadata."""
    out: dict[str, Any] = {
        "arch": cfg.model.arch,
        "num_classes": spec.num_classes,
        "dataset": cfg.data.dataset,
        "image_shape": list(spec.image_shape),
    }
    if cfg.model.arch == "wrn":
        out |= {"depth": cfg.model.depth, "widen_factor": cfg.model.widen_factor}
    for k in ("config_hash", "rift_ray_version", "extra"):
        if meta.get(k):
            out[f"checkpoint_{k}"] = meta[k]
    return out


def attack_fields(cfg: SweepConfig) -> dict[str, Any]:
    """The threat model and PGD settings of the protocol (``attack``, ``eval.restarts``)."""
    a = cfg.attack
    return {
        "norm": "Linf",
        "eps": a.eps,
        "step_size": a.step_size,
        "steps": a.steps,
        "random_start": a.random_start,
        "restarts": cfg.eval.restarts,
    }


def protocol_fields(
    cfg: SweepConfig, which: Sequence[str], *, corruptions: bool, autoattack: bool
) -> dict[str, Any]:
    """The evaluation settings that make two figures comparable."""
    e = cfg.eval
    out: dict[str, Any] = {
        "splits": list(which),
        "val_subset": e.val_subset,
        "test_subset": e.test_subset,
        "confirm_size": cfg.interpolate.confirm_size,
        "batch_size": e.batch_size,
        "seed": cfg.seed,
        "amp": cfg.compute.amp,
    }
    if corruptions:
        from rift_ray.results import corruption_fields

        out["corruptions"] = {"names": list(e.corruptions), "severities": list(e.severities),
                              "source": e.corruption_source,
                              "label": corruption_fields(cfg)["corruption_label"]}  # fmt: skip
    if autoattack:
        out["autoattack"] = {"version": e.autoattack.version, "subset": e.autoattack.subset}
    return out


__all__ = ["SPLITS", "evaluate_checkpoint", "load_eval_checkpoint", "sweep_config_path"]
