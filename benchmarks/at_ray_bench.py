"""PGD-AT step: images/s inside a Ray Train worker (TorchTrainer, 1 worker) versus a plain loop.

    RAY_AUTH_MODE=disabled nice python benchmarks/at_ray_bench.py

Both run the same epoch (``rift_ray.data.batches`` + ``adversarial_train_epoch``, PGD-10,
batch 128) from the same weights and seeds, with the same torch threads, each in a fresh
process (the plain loop in a ``multiprocessing`` spawn child, no Ray in it: run inside
this long-lived driver it measured 20-30% slower than the Ray worker, a gap that vanishes
in a fresh process, so it is process state, not Ray); the two alternate for ``--rounds`` rounds, who goes first alternating too. Reported: the median images/s
each side measures around its epoch (Ray: reported from inside the worker), their ratio,
and the wall time of ``trainer.fit()`` (worker start-up included) for scale.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import cifar10, machine, random_subset, seeded_model
from rift_ray.data import batches
from rift_ray.rift import adversarial_train_epoch

ATTACK = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}


def one_epoch(config: dict[str, Any]) -> dict[str, float]:
    """One PGD-AT epoch from ``config["state"]`` on ``config["data"]``; the epoch's stats."""
    torch.set_num_threads(config["threads"])
    model = config["model"]
    model.load_state_dict(config["state"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    it = batches(config["data"], 128, shuffle=True, augment=True, seed=0, epoch=0, drop_last=True)
    return adversarial_train_epoch(model, it, opt, **ATTACK, generator=gen)


def ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    stats = one_epoch(config)
    metrics = {"images_per_s": stats["images_per_s"], "loss": stats["loss"]}
    with tempfile.TemporaryDirectory() as d:  # Ray Train keeps metrics reported with a checkpoint
        Path(d, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024, help="training images per epoch")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    splits = cifar10()
    model = seeded_model("small_resnet", splits)
    config = {
        "model": model,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "data": random_subset(splits.train, args.n),
        "threads": args.threads,
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="at-ray-bench-")
    plain, in_ray, fit_s, losses = [], [], [], []

    def run_plain() -> float:  # a fresh process, as a Ray worker is, but no Ray in it
        with mp.get_context("spawn").Pool(1) as pool:
            stats = pool.apply(one_epoch, (config,))
        plain.append(stats["images_per_s"])
        return stats["loss"]

    def run_ray(r: int) -> float:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}
            ),
            run_config=ray.train.RunConfig(name=f"round{r}", storage_path=storage),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_s.append(time.perf_counter() - t0)
        if result.error is not None or not result.metrics:
            raise RuntimeError(f"Ray Train run failed: {result.error!r}")
        in_ray.append(result.metrics["images_per_s"])
        return result.metrics["loss"]

    for r in range(args.rounds):  # alternate who goes first
        if r % 2:
            loss_ray, loss_plain = run_ray(r), run_plain()
        else:
            loss_plain, loss_ray = run_plain(), run_ray(r)
        losses.append(abs(loss_ray - loss_plain))
        print(f"round {r}: plain {plain[-1]:.1f}, ray {in_ray[-1]:.1f} images/s", flush=True)
    ray.shutdown()

    a, b = statistics.median(plain), statistics.median(in_ray)
    print(f"\nmachine: {machine()}")
    print(f"small_resnet, PGD-10 AT, {args.n} images/epoch, batch 128, {args.threads} thread(s)\n")
    print("| loop | images/s (median of rounds) | rounds |")
    print("|---|---|---|")
    print(f"| plain PyTorch, fresh process | {a:.1f} | {', '.join(f'{x:.1f}' for x in plain)} |")
    print(f"| Ray Train worker (1) | {b:.1f} | {', '.join(f'{x:.1f}' for x in in_ray)} |")
    print(f"\nRay overhead inside the step: {100 * (a / b - 1):+.1f}% (plain / Ray - 1)")
    print(
        f"trainer.fit() wall time: median {statistics.median(fit_s):.1f}s for an epoch of "
        f"{args.n / b:.1f}s; same loss in both: max diff {max(losses):.1e}"
    )


if __name__ == "__main__":
    main()
