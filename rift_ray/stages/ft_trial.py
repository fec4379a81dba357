"""A fine-tuning trial, what runs in a Tune worker: fine-tune ``config["modules"]`` at
``config["lr"]``, measure after every epoch the clean-accuracy gain of the *interpolated*
model over the AT model (``val_gain``) and the ASHA metric (``val_score``), and report each
epoch with a checkpoint holding only what fine-tuning changed. The grid, ASHA and the stage
around it are :mod:`rift_ray.stages.finetune`.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import tune

from rift_ray.config import SweepConfig
from rift_ray.data import DatasetSplits, ImageData
from rift_ray.errors import one_line
from rift_ray.rift import finetune, interpolate, select_alpha
from rift_ray.rift.finetune import asha_score
from rift_ray.stages.base import SweepContext
from rift_ray.stages.common import (
    cpu_state,
    device_name,
    evaluate_pgd,
    fault,
    fault_sleep,
    start_worker,
    worker_model,
)
from rift_ray.store import trial_name


def metric_subset(cfg: SweepConfig, splits: DatasetSplits) -> ImageData:
    """The ASHA metric's validation images: the first ``finetune.metric_subset`` after the
    ``interpolate.confirm_size`` held out for confirming alpha*."""
    k = min(cfg.interpolate.confirm_size, len(splits.val))
    n = min(cfg.finetune.metric_subset, len(splits.val) - k)
    return splits.val.subset(torch.arange(k, k + n))


def _eval(
    cfg: SweepConfig, model: torch.nn.Module, data: ImageData, device: torch.device
) -> dict[str, float]:
    m = evaluate_pgd(cfg, model, data, device)
    return {"clean_acc": m["clean_acc"], "robust_acc": m["robust_acc"]}


@ray.remote
def _baseline_task(
    cfg_dict: dict[str, Any], spec: Any, splits: DatasetSplits, at_state: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The AT model's clean and PGD accuracy on the metric subset (the alpha = 0 point)."""
    cfg, device, model = start_worker(cfg_dict, "finetune", spec, at_state)
    assert model is not None
    return _eval(cfg, model, metric_subset(cfg, splits), device)


def interpolated_gain(
    cfg: SweepConfig,
    eval_model: torch.nn.Module,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor],
    data: ImageData,
    baseline: dict[str, float],
    device: torch.device,
) -> dict[str, float]:
    """val_gain (the paper's rule), val_score (the ASHA metric), the alpha and the points measured."""
    rows = [{"alpha": 0.0, **baseline}]
    for a in cfg.finetune.metric_alphas:
        eval_model.load_state_dict(interpolate(at_state, ft_state, a))
        rows.append({"alpha": a, **_eval(cfg, eval_model, data, device)})
    choice = select_alpha(rows, tolerance=cfg.interpolate.tolerance)
    out = {
        "val_gain": float(choice.clean_gain or 0.0),
        "val_alpha": float(choice.alpha or 0.0),
        "val_score": asha_score(
            rows, cfg.interpolate.tolerance, cfg.finetune.metric_penalty, cfg.finetune.score
        ),
    }
    for r in rows[1:]:
        out[f"val_clean_acc@{r['alpha']:g}"] = r["clean_acc"]
        out[f"val_robust_acc@{r['alpha']:g}"] = r["robust_acc"]
    return out


def state_delta(
    state: dict[str, torch.Tensor] | None, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The entries of ``state`` that differ from ``base`` (fine-tuning changes a few modules)."""
    if state is None:
        return None
    return {
        k: v
        for k, v in state.items()
        if k not in base or v.shape != base[k].shape or not torch.equal(v, base[k])
    }


def load_trial_state(ckpt: Any, at_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A fine-tuning trial checkpoint with whole state dicts (older sweeps stored them whole)."""
    with ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    if "model_delta" in saved:
        saved["model"] = {**at_state, **saved.pop("model_delta")}
    best = saved["best"]
    if "state_delta" in best:
        delta = best.pop("state_delta")
        best["state"] = None if delta is None else {**at_state, **delta}
    return dict(saved)


@dataclass
class TrialProgress:
    """What a fine-tuning trial carries from epoch to epoch, and what its checkpoint holds.

    Checkpoints store only what fine-tuning changed from the AT model (:func:`state_delta`):
    the latest epoch's model, to resume, and the best epoch's (by ``val_score``), which goes on
    to interpolation.
    """

    at_state: dict[str, torch.Tensor]
    epoch: int = 0
    optimizer: Any = None
    best: dict[str, Any] = field(
        default_factory=lambda: {"val_score": float("-inf"), "epoch": 0, "state": None}
    )
    history: list[dict[str, Any]] = field(default_factory=list)
    best_delta: dict[str, torch.Tensor] | None = None

    @classmethod
    def resume(
        cls, ckpt: Any, at_state: dict[str, torch.Tensor]
    ) -> tuple[TrialProgress, dict[str, torch.Tensor] | None]:
        """The progress saved in Tune's checkpoint (a fresh one without), and its model state."""
        if ckpt is None:
            return cls(at_state), None
        saved = load_trial_state(ckpt, at_state)
        progress = cls(
            at_state, saved["epoch"], saved["optimizer"], saved["best"], saved["history"]
        )
        progress.best_delta = state_delta(progress.best["state"], at_state)
        return progress, saved["model"]

    def add_epoch(
        self, row: dict[str, Any], state: dict[str, torch.Tensor], extra: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Record one finished epoch (``row`` from :func:`rift_ray.rift.finetune`, the model's
        ``state`` after it): (the metrics Tune gets, the checkpoint's content)."""
        self.optimizer = row.pop("optimizer_state", None)
        delta = state_delta(state, self.at_state)
        if row["val_score"] > self.best["val_score"]:
            keys = ("val_score", "val_gain", "val_alpha", "epoch")
            self.best = {**{k: row[k] for k in keys}, "state": state}
            self.best_delta = delta
        metrics = {
            **row,
            **extra["trial"],
            "best_val_score": self.best["val_score"],
            "best_val_gain": self.best["val_gain"],
            "best_epoch": self.best["epoch"],
            **extra["worker"],
            "status": "running",
        }
        self.history.append(
            {k: v for k, v in metrics.items() if k not in ("run_token", "status", "error")}
        )
        self.epoch = row["epoch"]
        best = {k: v for k, v in self.best.items() if k != "state"}
        saved = {
            "model_delta": delta,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "best": {**best, "state_delta": self.best_delta},
            "history": self.history,
        }
        return metrics, saved


def finetune_trial(
    config: dict[str, Any],
    cfg_dict: dict[str, Any] | None = None,
    spec: Any = None,
    splits: DatasetSplits | None = None,
    at_state: dict[str, torch.Tensor] | None = None,
    baseline: dict[str, float] | None = None,
    run_token: str = "",
) -> None:
    """Tune function trial: fine-tune ``config["modules"]`` with ``config["lr"]``, report every
    epoch with a checkpoint. Any error, a GPU Ray gave but torch cannot use included, is
    reported as a failed trial row (the sweep goes on without it)."""
    assert (
        cfg_dict is not None
        and splits is not None
        and at_state is not None
        and baseline is not None
    )
    modules, lr = list(config["modules"]), float(config["lr"])
    trial = trial_name(modules, lr)
    ident = {"trial": trial, "modules": "+".join(modules), "lr": lr}
    t0 = time.time()
    try:
        cfg, device, model = start_worker(cfg_dict, "finetune", spec, at_state)
        assert model is not None
        eval_model = worker_model(cfg, spec).to(device)
        at_dev = {k: v.to(device) for k, v in at_state.items()}
        data = metric_subset(cfg, splits)
        progress, resumed = TrialProgress.resume(tune.get_checkpoint(), at_state)
        if resumed is not None:  # an interrupted trial goes on from its last epoch
            model.load_state_dict(resumed)

        def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
            t_metric = time.perf_counter()
            gain = interpolated_gain(
                cfg, eval_model, at_dev, m.state_dict(), data, baseline, device
            )
            return {**gain, "metric_seconds": time.perf_counter() - t_metric}

        t0 = time.time()
        fault_sleep("finetune_sleep", lr=lr)
        if fault("finetune_raise", lr=lr):
            raise RuntimeError(f"injected fault (RIFT_RAY_FAULTS) in fine-tuning trial {trial}")
        f = cfg.finetune
        rows = finetune(
            model, modules, splits.train, epochs=f.epochs, lr=lr, momentum=f.momentum,
            weight_decay=f.weight_decay, lr_milestones=f.lr_milestones, lr_gamma=f.lr_gamma,
            batch_size=f.batch_size, augment=cfg.data.augment, seed=cfg.seed, device=device,
            evaluate_fn=evaluate_fn, start_epoch=progress.epoch,
            optimizer_state=progress.optimizer, with_optimizer_state=True, amp=cfg.compute.amp,
        )  # fmt: skip
        extra = {"trial": ident, "worker": {"device": device_name(device), "run_token": run_token}}
        for row in rows:
            if fault("finetune_nan", lr=lr):
                row["train_loss"] = float("nan")
            if not torch.isfinite(torch.tensor(row["train_loss"])):
                raise FloatingPointError(
                    f"fine-tuning loss is {row['train_loss']} at epoch {row['epoch']}"
                )
            metrics, saved = progress.add_epoch(row, cpu_state(model), extra)
            with tempfile.TemporaryDirectory() as d:
                torch.save(saved, os.path.join(d, "state.pt"))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    except Exception as e:  # noqa: BLE001 - reported as a failed trial row, the sweep goes on
        failed = {**ident, "status": "failed", "run_token": run_token}
        tune.report({**failed, "error": one_line(e, typed=True),
                     "traceback": traceback.format_exc()[-2000:],
                     "val_score": float("-inf"), "seconds": time.time() - t0})  # fmt: skip


def finetune_baseline(ctx: SweepContext, at_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The AT model on the ASHA metric's subset (one Ray task): every trial's alpha = 0 point."""
    r = ctx.cfg.resources.finetune
    return ray.get(
        _baseline_task.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(
            ctx.cfg.to_dict(), ctx.spec, ctx.splits_ref, at_state
        )
    )
