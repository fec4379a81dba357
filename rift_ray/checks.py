"""Every check a sweep can make before any compute, without Ray: storage, data, the start
checkpoint, module names, selection settings, corruptions, AutoAttack.

    prep = preflight(cfg)      # ConfigError / DataError / CheckpointError / StorageError
    prep.splits, prep.modules, prep.start_state

``rift-ray sweep`` runs it before it starts or joins Ray; ``--dry-run`` runs it alone.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from rift_ray.checkpoint import CheckpointError, find_checkpoint, fit_checkpoint
from rift_ray.config import ConfigError, SweepConfig, expand_path
from rift_ray.data import DataError, DatasetSplits, load_dataset
from rift_ray.models import mrc_candidates, select_modules
from rift_ray.stages.common import ModelSpec, cpu_state, new_model
from rift_ray.store import Store


@dataclass
class Prepared:
    """What the checks found: the sweep's storage, its data, the MRC candidates in forward
    order, and the weights of ``adv_train.checkpoint`` (None without one)."""

    cfg: SweepConfig
    store: Store
    splits: DatasetSplits
    modules: list[str] = field(default_factory=list)
    start_state: dict[str, torch.Tensor] | None = None


def preflight(cfg: SweepConfig) -> Prepared:
    """Every check that needs no compute: storage, data, checkpoint, module names, corruptions."""
    store = Store.open(cfg.storage, cfg.name)
    store.check_writable()
    if cfg.adv_train.checkpoint is not None:
        path = field_call("adv_train.checkpoint", expand_path, cfg.adv_train.checkpoint)
        # a file, or RobustBench's model_dir/<name> (rift_ray.checkpoint.find_checkpoint)
        if not path or not field_call(
            "adv_train.checkpoint", find_checkpoint, path, cfg.data.dataset
        ):
            raise ConfigError(f"adv_train.checkpoint: file not found: {cfg.adv_train.checkpoint}")
    check_corruptions(cfg)
    if cfg.eval.autoattack.enabled:
        from rift_ray.autoattack import require_autoattack

        try:
            require_autoattack()
        except ImportError as e:
            raise ConfigError(f"eval.autoattack.enabled: {e}") from None
    splits = field_call("data.root", load_dataset, cfg.data, seed=cfg.seed)
    if len(splits.val) == 0:
        raise ConfigError(
            "data.val_size: must be > 0 for a sweep (MRC, checkpoint and alpha* choice use validation)"
        )
    spec = ModelSpec.of(splits)
    found = mrc_candidates(new_model(cfg, spec), (1, *spec.image_shape))
    for pat in cfg.mrc.include:
        if not any(fnmatch.fnmatchcase(m, pat) for m in found):
            raise ConfigError(
                f"mrc.include: {pat!r} matches no Conv2d/Linear module of {cfg.model.arch}"
            )
    modules = select_modules(found, cfg.mrc.include, cfg.mrc.exclude)
    if not modules:
        raise ConfigError("mrc.exclude: every Conv2d/Linear module of the model is excluded")
    check_selection(cfg, modules)
    start = (
        field_call("adv_train.checkpoint", load_start_checkpoint, cfg, spec)
        if cfg.adv_train.checkpoint
        else None
    )
    return Prepared(cfg, store, splits, modules, start)


def check_corruptions(cfg: SweepConfig) -> None:
    """The corruptions asked for can be generated, or their CIFAR-10-C files exist (where
    :func:`rift_ray.downloads.cifar_c_dir` says; else the error names ``rift-ray data``)."""
    if cfg.eval.corruptions and cfg.eval.corruption_source == "generated":
        from rift_ray.corruptions import AVAILABLE

        for c in cfg.eval.corruptions:
            if c not in AVAILABLE:
                raise ConfigError(
                    f"eval.corruptions: {c!r} cannot be generated (available: {', '.join(AVAILABLE)})"
                )
    elif cfg.eval.corruptions:
        from rift_ray.downloads import cifar_c_dir, data_hint

        fallback = "or --set eval.corruption_source=generated (regenerated, not the official files)"
        where = "eval.cifar_c_root" if cfg.eval.cifar_c_root else "data.root"  # the default
        root = field_call(where, cifar_c_dir, cfg)
        if not root:
            raise ConfigError(
                "eval.cifar_c_root: required when eval.corruptions is set and data.dataset is "
                f"{cfg.data.dataset} (no official CIFAR-C files of its own); {fallback}"
            )
        for c in [*cfg.eval.corruptions, "labels"]:
            if not os.path.isfile(os.path.join(root, f"{c}.npy")):
                raise ConfigError(
                    f"eval.corruptions: {os.path.join(root, c + '.npy')} not found: "
                    f"{data_hint(cfg)} for the official files, {fallback}"
                )


def check_selection(cfg: SweepConfig, modules: list[str]) -> None:
    """Bad selection settings for this model, before any compute (ConfigError naming the field)."""
    f, n = cfg.finetune, len(modules)
    if "greedy" in f.strategies and f.greedy.size > n:
        raise ConfigError(
            f"finetune.greedy.size: {f.greedy.size} exceeds the {n} candidate modules"
        )
    if "random" in f.strategies and f.random_draws > n:
        raise ConfigError(
            f"finetune.random_draws: {f.random_draws} exceeds the {n} candidate modules"
        )


def field_call(field: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; a bad-input error it raises is re-raised led by ``field``.

    Errors that already name a field of the same section (``data.val_size: ...``) are kept.
    """
    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, CheckpointError) as e:
        msg = " ".join(str(e).split())
        if msg.startswith(field.split(".")[0] + "."):
            raise
        msg = msg.removesuffix(f" ({field})")
        raise type(e)(f"{field}: {msg}") from None


def load_start_checkpoint(cfg: SweepConfig, spec: Any) -> dict[str, torch.Tensor]:
    """The robust model the sweep starts from; CheckpointError when it does not fit the model."""
    path = expand_path(cfg.adv_train.checkpoint)
    assert path is not None
    model = new_model(cfg, spec)
    fit_checkpoint(
        model,
        path,
        dataset=cfg.data.dataset,
        normalization=cfg.adv_train.checkpoint_normalization,
    )
    return cpu_state(model)
