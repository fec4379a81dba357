"""FGSM-RS vs PGD-AT: wall time to the same validation PGD-10 accuracy on real CIFAR-10.

    RIFT_CIFAR10_ARCHIVE=../shared/data/cifar10-jpeg.tar.gz nice python -m benchmarks.fast_at_bench

The setting is sweeps/cifar10-cpu-at.yaml's (read from it): small_resnet, 15,000 training
images (5,000 held out for validation, the same split), batch 128, SGD lr 0.1 with the
decay at epochs 6 and 7, 8 epochs, eps 8/255; PGD-AT trains on PGD-5 (step 2/255), FGSM-RS
(``adv_train.method: fgsm_rs``) on one step of 1.25 eps from a random start. Both methods
start from the same weights and run what stage 1 runs in each epoch, without Ray:
``rift_ray.data.batches`` + ``adversarial_train_epoch``, then the stage's validation check
(PGD with the sweep's ``attack`` settings, PGD-5, on ``eval.val_subset`` = 1,000 images),
which picks the kept epoch (``rift_ray.rift.train.best_epoch``) and flags a collapse. The
two methods alternate epoch by epoch, so load from other jobs hits both alike.

Measured, outside the timed work: PGD-10 (step 2/255) accuracy on all 5,000 validation
images after every epoch. Time-to-target: the target is PGD-AT's best PGD-10 accuracy minus
2 points; each method's time is its cumulative wall time (training + the stage's check) up
to the first epoch at or above the target (its CPU time too: on a shared box the process's
CPU seconds move less with other jobs' load than wall seconds do).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from benchmarks.common import ARCHIVE, ROOT, machine
from rift_ray.attacks import evaluate
from rift_ray.config import SweepConfig, load_config
from rift_ray.data import DatasetSplits, ImageData, batches, load_dataset
from rift_ray.rift.train import adversarial_train_epoch, best_epoch, collapsed
from rift_ray.stages.common import worker_model

PGD10 = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}


class Run:
    """One method's model, optimizer, schedule and per-epoch rows."""

    def __init__(self, cfg: SweepConfig, splits: DatasetSplits, method: str) -> None:
        self.cfg = cfg.model_copy(
            update={"adv_train": cfg.adv_train.model_copy(update={"method": method})}
        )
        at = self.cfg.adv_train
        torch.manual_seed(cfg.seed)  # the same initial weights for every method
        self.model = worker_model(self.cfg, splits)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=at.lr, momentum=at.momentum, weight_decay=at.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.MultiStepLR(
            self.opt, milestones=list(at.lr_milestones), gamma=at.lr_gamma
        )
        self.gen = torch.Generator()
        self.rows: list[dict[str, Any]] = []
        self.seconds = self.cpu_seconds = 0.0

    def epoch(self, splits: DatasetSplits, check: ImageData, measure: ImageData) -> dict[str, Any]:
        cfg, at, epoch = self.cfg, self.cfg.adv_train, len(self.rows)
        a = cfg.attack
        start, cpu = time.perf_counter(), time.process_time()
        self.gen.manual_seed(cfg.seed * 100003 + epoch)  # as stages/at.py seeds rank 0
        it = batches(
            splits.train, at.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed,
            epoch=epoch, drop_last=True,
        )  # fmt: skip
        stats = adversarial_train_epoch(
            self.model, it, self.opt, eps=a.eps, step_size=a.step_size, steps=a.steps,
            method=at.method, fgsm_step=at.fgsm_step, random_start=a.random_start,
            generator=self.gen,
        )  # fmt: skip
        self.sched.step()
        train_s = time.perf_counter() - start
        attack = {"eps": a.eps, "step_size": a.step_size, "steps": a.steps}
        stage = evaluate(
            self.model, check, batch_size=cfg.eval.batch_size, attack=attack, seed=cfg.seed
        )
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        m = evaluate(self.model, measure, batch_size=cfg.eval.batch_size, attack=PGD10, seed=1)
        best_before = max((r["check_pgd"] for r in self.rows), default=-1.0)
        row = {
            "epoch": epoch + 1, "train_s": train_s, "check_s": self.seconds - train_s
            - sum(r["train_s"] + r["check_s"] for r in self.rows), "cum_s": self.seconds,
            "cum_cpu_s": self.cpu_seconds,
            "train_adv_acc": stats["adv_acc"], "check_pgd": stage["robust_acc"],
            "clean": m["clean_acc"], "pgd10": m["robust_acc"],
            "collapsed": collapsed(stage["robust_acc"], best_before),
        }  # fmt: skip
        self.rows.append(row)
        return row

    def time_to(self, target: float) -> tuple[int, float, float] | None:
        """(epoch, cumulative wall s, cumulative CPU s) of the first epoch at ``target``."""
        for r in self.rows:
            if r["pgd10"] >= target:
                return r["epoch"], r["cum_s"], r["cum_cpu_s"]
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "sweeps/cifar10-cpu-at.yaml"))
    p.add_argument("--epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RIFT_CIFAR10_ARCHIVE", str(ARCHIVE))
    sets = [f"adv_train.epochs={args.epochs}"] if args.epochs else []
    cfg = load_config(args.config, overrides=sets)
    torch.set_num_threads(args.threads)
    splits = load_dataset(cfg.data, cfg.seed)
    check = splits.val.subset(torch.arange(cfg.eval.val_subset or len(splits.val)))
    runs = {m: Run(cfg, splits, m) for m in ("pgd", "fgsm_rs")}
    wall = time.perf_counter()
    for _ in range(cfg.adv_train.epochs):
        for name, run in runs.items():  # alternate: both see the same load
            r = run.epoch(splits, check, splits.val)
            print(
                f"{name} epoch {r['epoch']}: train {r['train_s']:.1f} s, check {r['check_s']:.1f}"
                f" s, PGD-10 {r['pgd10']:.2f}, clean {r['clean']:.2f}"
                + (" COLLAPSED" if r["collapsed"] else ""),
                flush=True,
            )

    a = cfg.attack
    print(f"\nmachine: {machine()}; load average {os.getloadavg()}")
    print(
        f"{cfg.model.arch}, {len(splits.train)} train images, batch {cfg.adv_train.batch_size}, "
        f"{cfg.adv_train.epochs} epochs, lr {cfg.adv_train.lr} milestones "
        f"{cfg.adv_train.lr_milestones}; PGD-AT: PGD-{a.steps} step {a.step_size * 255:.2f}/255; "
        f"FGSM-RS step {cfg.adv_train.fgsm_step} eps; stage check PGD-{a.steps} on "
        f"{len(check)} val images; measured PGD-10 on {len(splits.val)} val images; "
        f"total {time.perf_counter() - wall:.0f} s\n"
    )
    print("| method | epoch | train s | check s | cumulative s | cumulative CPU s | "
          "train adv acc | check PGD | val clean | val PGD-10 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        for r in run.rows:
            mark = " (collapsed)" if r["collapsed"] else ""
            print(
                f"| {name} | {r['epoch']}{mark} | {r['train_s']:.1f} | {r['check_s']:.1f} | "
                f"{r['cum_s']:.1f} | {r['cum_cpu_s']:.1f} | {r['train_adv_acc']:.2f} | {r['check_pgd']:.2f} | "
                f"{r['clean']:.2f} | {r['pgd10']:.2f} |"
            )
    target = max(r["pgd10"] for r in runs["pgd"].rows) - 2.0
    print(f"\ntarget: PGD-AT's best val PGD-10 accuracy - 2 = {target:.2f}")
    reached = {}
    for name, run in runs.items():
        kept = best_epoch([r["check_pgd"] for r in run.rows])
        hit = run.time_to(target)
        reached[name] = hit
        kept_row = run.rows[kept - 1]
        print(
            f"{name}: kept epoch {kept} (val PGD-10 {kept_row['pgd10']:.2f}); "
            + (
                f"target at epoch {hit[0]} after {hit[1]:.1f} s wall, {hit[2]:.1f} s CPU"
                if hit
                else "target not reached"
            )
        )
    if reached["pgd"] and reached["fgsm_rs"]:
        wall_x = reached["pgd"][1] / reached["fgsm_rs"][1]
        cpu_x = reached["pgd"][2] / reached["fgsm_rs"][2]
        print(f"time-to-target: PGD-AT / FGSM-RS = {wall_x:.2f}x wall, {cpu_x:.2f}x CPU")
    last = {name: run.rows[-1] for name, run in runs.items()}
    print(
        f"whole schedule: PGD-AT / FGSM-RS = {last['pgd']['cum_s'] / last['fgsm_rs']['cum_s']:.2f}x"
        f" wall, {last['pgd']['cum_cpu_s'] / last['fgsm_rs']['cum_cpu_s']:.2f}x CPU"
    )


if __name__ == "__main__":
    main()
