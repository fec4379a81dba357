"""Stage 1: adversarial training with Ray Train (TorchTrainer, DDP).

Each worker trains on its shard of the training split (PGD-AT, TRADES or FGSM-RS), the
validation split is evaluated (clean and PGD, sharded and all-reduced) after every
epoch, and rank 0 commits a checkpoint every ``adv_train.checkpoint_every`` epochs
holding the latest state (to resume) and the best state by validation robust
accuracy (the model the sweep keeps; never an epoch whose validation PGD accuracy collapsed,
``rift_ray.rift.train.best_epoch``: FGSM-RS's guard against catastrophic overfitting). A killed worker restarts from the last
committed checkpoint (``adv_train.max_failures``); a re-run of an interrupted sweep
reuses the run name and continues the same way.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from rift_ray.attacks import evaluate
from rift_ray.config import SweepConfig
from rift_ray.data import DatasetSplits, batches
from rift_ray.errors import StageFailed, one_line
from rift_ray.progress import log
from rift_ray.rift import adversarial_train_epoch
from rift_ray.rift.train import COLLAPSE_DROP, collapsed
from rift_ray.stages.base import Stage, SweepContext, SweepState
from rift_ray.stages.common import (
    attack_kwargs,
    cpu_state,
    device_name,
    fault,
    setup_worker,
    worker_model,
)
from rift_ray.store import AT_CHECKPOINT, experiment_name


def _sharded_eval(
    model: torch.nn.Module,
    splits: DatasetSplits,
    cfg: SweepConfig,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """Clean and PGD accuracy on the validation split, sharded over workers and all-reduced."""
    val = splits.val
    if cfg.eval.val_subset is not None and len(val) > cfg.eval.val_subset:
        val = val.subset(torch.arange(cfg.eval.val_subset))
    if len(val) == 0:
        return {}
    shard = val.subset(torch.arange(rank, len(val), world))
    m = evaluate(
        model,
        shard,
        batch_size=cfg.eval.batch_size,
        device=device,
        attack=attack_kwargs(cfg),
        restarts=cfg.eval.restarts,
        seed=cfg.seed,
        amp=cfg.compute.amp,
    )
    sums = torch.tensor(
        [
            m["clean_acc"] * m["n"],
            m["robust_acc"] * m["n"],
            m["clean_loss"] * m["n"],
            float(m["n"]),
        ],
        dtype=torch.float64,
    )
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    n = sums[3].item()
    return {
        "val_clean_acc": sums[0].item() / n,
        "val_robust_acc": sums[1].item() / n,
        "val_clean_loss": sums[2].item() / n,
    }


def _with_fault(it: Iterator[Any], epoch: int) -> Iterator[Any]:
    """Test hook ``at_worker_exit@epoch=N`` (see ``stages.common.fault``): die mid-epoch."""
    for i, item in enumerate(it):
        if i == 1 and fault("at_worker_exit", epoch=epoch):
            os.kill(os.getpid(), signal.SIGKILL)
        yield item


def _resume(model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The loop's progress: from Ray Train's last committed checkpoint (model, optimizer and
    scheduler loaded from it), else a fresh start."""
    progress: dict[str, Any] = {
        "epoch": 0, "best_acc": -1.0, "best_state": None, "best_epoch": 0, "history": []
    }  # fmt: skip
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return progress
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress.update(
        epoch=int(state["epoch"]), best_acc=float(state["best_acc"]),
        best_state=state["best_state"], best_epoch=int(state["best_epoch"]),
        history=list(state["history"]),
    )  # fmt: skip
    return progress


def _put(queue: Any, row: dict[str, Any]) -> None:
    """Hand an epoch's metrics to the driver (a ``ray.util.queue.Queue``); never blocks training."""
    if queue is None:
        return
    try:
        queue.put_nowait(dict(row))
    except Exception:  # noqa: BLE001 - live progress only; the checkpoint has the history
        pass


def _epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One line per epoch: readable in a terminal and in CI logs."""
    m = metrics
    val = (
        f" val clean {m['val_clean_acc']:.2f} PGD {m['val_robust_acc']:.2f}"
        if "val_robust_acc" in m
        else ""
    )
    if m.get("collapsed"):
        val += (
            f" COLLAPSED (catastrophic overfitting: val PGD more than {COLLAPSE_DROP:g} points "
            "below the best epoch; this epoch is never kept)"
        )
    return (
        f"adv_train: epoch {m['epoch']}/{epochs} lr {m['lr']:.4g} loss {m['train_loss']:.4f} "
        f"train adv acc {m['train_adv_acc']:.2f}{val} "
        f"{m['images_per_s']:.0f} img/s (best epoch {m['best_epoch']})"
    )


def judge_epoch(score: float, best_acc: float, *, validated: bool) -> tuple[bool, bool]:
    """(whether this epoch is the new best, whether it collapsed): the rule of
    ``rift.train.best_epoch`` one epoch at a time. ``score``: validation PGD accuracy (without
    validation, the epoch index: the last epoch is kept and nothing collapses)."""
    return score > best_acc, validated and collapsed(score, best_acc)


def _train_epoch(
    cfg: SweepConfig, model: torch.nn.Module, optimizer: Any, train: Any, epoch: int,
    rank: int, world: int, device: torch.device, gen: torch.Generator,
) -> dict[str, float]:  # fmt: skip
    """One epoch of adversarial training on this worker's shard of ``train``."""
    at = cfg.adv_train
    # PGD random starts seeded per (seed, rank, epoch): a resumed run repeats them exactly
    gen.manual_seed((cfg.seed * 1000 + rank) * 100003 + epoch)
    train_batches = batches(
        train, at.batch_size // world if world > 1 else at.batch_size, shuffle=True,
        augment=cfg.data.augment, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world,
        drop_last=True, device=device,
    )  # fmt: skip
    return adversarial_train_epoch(
        model, _with_fault(train_batches, epoch + 1), optimizer, eps=cfg.attack.eps,
        step_size=cfg.attack.step_size, steps=cfg.attack.steps, method=at.method,
        trades_beta=at.trades_beta, fgsm_step=at.fgsm_step, free_replays=at.free_replays,
        random_start=cfg.attack.random_start, generator=gen, amp=cfg.compute.amp,
    )  # fmt: skip


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function (runs inside Ray Train workers)."""
    cfg = SweepConfig.model_validate(config["cfg"])
    splits: DatasetSplits = config["splits"]
    if isinstance(splits, ray.ObjectRef):
        splits = ray.get(splits)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = setup_worker(cfg, cfg.resources.adv_train.cpus_per_worker, cfg.seed + rank)
    at = cfg.adv_train

    model = worker_model(cfg, splits)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=at.lr, momentum=at.momentum, weight_decay=at.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(at.lr_milestones), gamma=at.lr_gamma
    )
    p = _resume(model, optimizer, scheduler)
    if p["epoch"] and rank == 0:
        print(f"[adv_train] resuming from the checkpoint of epoch {p['epoch']}", flush=True)
        _put(config.get("progress"), {"resumed_from": p["epoch"]})
    model = distributed_model(model, cfg, world, device)
    core = model.module if hasattr(model, "module") else model
    gen = torch.Generator(device=device)
    devices = worker_devices(device, world)

    for epoch in range(p["epoch"], at.epochs):
        lr = optimizer.param_groups[0]["lr"]
        stats = _train_epoch(cfg, model, optimizer, splits.train, epoch, rank, world, device, gen)
        scheduler.step()
        t_val = time.perf_counter()
        val = _sharded_eval(core, splits, cfg, rank, world, device)
        if val:
            val["val_seconds"] = time.perf_counter() - t_val
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": stats["loss"],
            "train_clean_acc": stats["clean_acc"],
            "train_adv_acc": stats["adv_acc"],
            "images_per_s": stats["images_per_s"] * world,
            "seconds": stats["seconds"],
            **val,
            "devices": devices,
        }
        score = val.get("val_robust_acc", float(epoch))  # no validation split: keep the last epoch
        better, collapse = judge_epoch(score, p["best_acc"], validated=bool(val))
        if collapse:
            metrics["collapsed"] = True
        if better:
            p.update(best_acc=score, best_epoch=epoch + 1, best_state=cpu_state(core))
        metrics["best_epoch"] = p["best_epoch"]
        p["history"].append(metrics)
        if rank == 0:  # the driver logs it (console line, W&B) as it arrives
            _put(config.get("progress"), metrics)
        if rank != 0 or ((epoch + 1) % at.checkpoint_every and epoch + 1 < at.epochs):
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as d:  # rank 0 commits a checkpoint
            torch.save(
                {
                    "model": cpu_state(core),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "best_acc": p["best_acc"],
                    "best_epoch": p["best_epoch"],
                    "best_state": p["best_state"],
                    "history": p["history"],
                },
                os.path.join(d, "state.pt"),
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def distributed_model(
    model: torch.nn.Module, cfg: SweepConfig, world: int, device: torch.device
) -> torch.nn.Module:
    """The model as this worker trains it. One worker: moved to ``device``. Several: DDP
    (``ray.train.torch.prepare_model``), its BatchNorm layers first converted to SyncBatchNorm
    where ``adv_train.sync_bn`` resolves on (GPU workers), so they normalise over the whole
    batch. SyncBatchNorm has BatchNorm's state dict keys: checkpoints load into the plain model.
    """
    if world <= 1:
        return model.to(device)
    if cfg.adv_train.uses_sync_bn(cfg.resources.adv_train):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return ray.train.torch.prepare_model(model)


def start_line(cfg: SweepConfig) -> str:
    """What the stage says when training starts: the method, the epochs, how the batch is
    split over the workers (each worker's batch is ``batch_size // num_workers``) and whether
    BatchNorm is synchronised, e.g. ``pgd for 110 epochs, batch 128 = 4 workers x 32,
    SyncBatchNorm``."""
    at, r = cfg.adv_train, cfg.resources.adv_train
    method = {
        "fgsm_rs": f"fgsm_rs (step {at.fgsm_step:g} x eps)",
        "free": f"free ({at.free_replays} replays per minibatch)",
    }.get(at.method, at.method)
    head = f"{method} for {at.epochs} epochs, "
    if r.num_workers == 1:
        return head + f"batch {at.batch_size} on 1 worker"
    per = at.batch_size // r.num_workers
    line = head + f"batch {per * r.num_workers} = {r.num_workers} workers x {per}"
    if per * r.num_workers != at.batch_size:
        line += f" (adv_train.batch_size {at.batch_size} does not divide evenly)"
    if at.uses_sync_bn(r):
        return line + ", SyncBatchNorm"
    if at.sync_bn is None:  # wanted with several workers, but SyncBatchNorm trains on GPUs only
        return line + ", BatchNorm per worker (sync_bn ignored: SyncBatchNorm needs GPU workers)"
    return line + ", BatchNorm per worker (adv_train.sync_bn: false)"


def worker_devices(device: torch.device, world: int) -> str:
    """Where every AT worker computes, by rank: ``node-id-prefix:device`` joined by commas."""
    node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "local"
    mine = f"{node}:{device_name(device)}"
    if world <= 1 or not torch.distributed.is_initialized():
        return mine
    everyone: list[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return ",".join(str(d) for d in everyone)


# How often Ray Train's controller polls its workers (Ray's default: 2 s). Each poll is one
# small RPC per worker; at the default a run waits up to 2 s to schedule its workers and
# again to notice that training ended, several seconds of a small sweep's stage.
HEALTH_CHECK_INTERVAL_S = "0.2"


def fast_polling() -> None:
    """Set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` for this driver's trainers (Ray Train passes it
    on to the controller it starts), unless the user set it."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)


def warm_up() -> None:
    """Start, in the background, the cluster-wide actor Ray Train's controller waits for before
    it schedules any worker (Ray's autoscaling coordinator, one detached actor per cluster):
    a new process that otherwise costs ~2.5 s of a small sweep's first training run. Called as
    soon as Ray is up, so that it starts while the sweep loads its data. Ray-internal: where a
    Ray release moves it, nothing happens (training creates it itself, as before)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()  # actor creation is asynchronous: no wait
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


class EpochFeed:
    """While training runs: each epoch's metrics, as rank 0 puts them on ``queue``, become one
    console line and a step of the W&B run (a thread of the driver drains the queue)."""

    def __init__(self, queue: Any, ctx: SweepContext, epochs: int) -> None:
        self.queue, self.ctx, self.epochs = queue, ctx, epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="rift-at-epochs", daemon=True)

    def __enter__(self) -> EpochFeed:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - the queue actor is gone with the job anyway
            pass

    def _drain(self) -> None:
        while True:
            try:
                n = self.queue.qsize()
                rows = self.queue.get_nowait_batch(n) if n else []
            except Exception:  # noqa: BLE001 - the queue actor is gone: nothing more comes
                rows = []
            for row in rows:
                if "resumed_from" in row:  # a worker restarted from a checkpoint
                    log(f"adv_train: resuming from the checkpoint of epoch {row['resumed_from']}")
                    continue
                log(_epoch_line(row, self.epochs))
                self.ctx.tracker.at_epoch(row)
            if self._stop.is_set() and not rows:
                return
            self._stop.wait(0.5)


def run_adv_train(ctx: SweepContext) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run adversarial training (``adv_train.method``) under Ray Train; return (best state dict, per-epoch history)."""
    cfg = ctx.cfg
    r = cfg.resources.adv_train
    storage_path, storage_fs = ctx.store.ray_storage()
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker or 1.0
    from ray.util.queue import Queue

    fast_polling()
    progress = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "splits": ctx.splits_ref, "progress": progress},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=experiment_name("adv_train", ctx.hashes["adv_train"]),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.adv_train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with EpochFeed(progress, ctx, cfg.adv_train.epochs):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("adversarial training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    history = [dict(h) for h in state["history"]]
    best = state["best_state"] if state["best_state"] is not None else state["model"]
    return best, history


class AdvTrainStage(Stage):
    """Stage 1: the robust model the RiFT stages start from, trained now or given."""

    name = "adv_train"
    reuses = AT_CHECKPOINT

    def load(self, ctx: SweepContext, st: SweepState) -> None:
        st.at_state = ctx.load_state(AT_CHECKPOINT)
        st.at_history = (ctx.store.read_stage(self.name) or {}).get("history", [])

    def compute(self, ctx: SweepContext, st: SweepState) -> dict[str, Any]:
        cfg = ctx.cfg
        if cfg.adv_train.checkpoint:
            self.say(f"starting from {cfg.adv_train.checkpoint}")
            assert ctx.start_state is not None
            st.at_state, st.at_history = ctx.start_state, []
        else:
            self.say(start_line(cfg))
            try:
                st.at_state, st.at_history = run_adv_train(ctx)
            except Exception as e:
                err = one_line(e, typed=True)
                raise StageFailed(f"adversarial training failed: {err}", error=err) from e
        ctx.store.put(
            AT_CHECKPOINT, ctx.checkpoint_bytes(st.at_state), stage_hash=ctx.hashes[self.name]
        )
        return {"history": st.at_history}

    def track(self, ctx: SweepContext, st: SweepState) -> None:
        ctx.tracker.log_adv_train(st.at_history)
