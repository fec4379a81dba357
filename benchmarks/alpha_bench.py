"""Alpha search: evaluations and wall time to find alpha* versus the full 11-point grid.

    nice python benchmarks/alpha_bench.py

A small_resnet is adversarially trained briefly on real CIFAR-10 (PGD-AT), one module is
fine-tuned on clean data (RiFT stage 3), and alpha* is chosen on validation images (clean
and PGD-10 accuracy) twice: by ``search_alpha`` and by evaluating every alpha in
{0, 0.1, ..., 1} then ``select_alpha``. The AT model's metrics are the baseline of both
(measured once, not counted). Also run: the same comparison on 1000 random monotone
synthetic curves (no model), which gives the evaluation counts of the usual case.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from benchmarks.common import cifar10, machine, random_subset, seeded_model
from rift_ray.attacks import evaluate
from rift_ray.data import batches
from rift_ray.rift import adversarial_train_epoch, finetune, interpolate, select_alpha
from rift_ray.rift.interpolate import search_alpha

GRID = [round(0.1 * i, 1) for i in range(11)]
ATTACK = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}


def synthetic_counts(trials: int = 1000) -> tuple[list[int], int, int]:
    """(evaluations per search, searches that fell back to the grid, answers differing from the grid)."""
    rng = random.Random(0)
    counts, grid_used, wrong = [], 0, 0
    for _ in range(trials):
        clean, robust, curve = 80.0, 50.0, {}
        for a in GRID:
            curve[a] = {"clean_acc": round(clean, 2), "robust_acc": round(robust, 2)}
            clean += rng.uniform(0.0, 0.6)
            robust -= rng.choice([0.0, rng.uniform(0, 0.08), rng.uniform(0, 1.0)])
        res = search_alpha(lambda a, c=curve: c[a], GRID, 0.1, baseline=curve[0.0])
        full = select_alpha([{"alpha": a, **m} for a, m in curve.items()], 0.1)
        counts.append(res.evaluations)
        grid_used += res.used_grid
        wrong += res.choice.alpha != full.alpha
    return counts, grid_used, wrong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=4000, help="training images for AT")
    p.add_argument("--at-epochs", type=int, default=3)
    p.add_argument("--val", type=int, default=500, help="validation images per evaluation")
    p.add_argument("--module", default="layer2.0.conv2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    splits = cifar10()
    train = random_subset(splits.train, args.train)
    val = random_subset(splits.val, args.val)
    model = seeded_model("small_resnet", splits).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.at_epochs):
        it = batches(train, 128, shuffle=True, augment=True, seed=0, epoch=epoch)
        adversarial_train_epoch(model, it, opt, **ATTACK | {"steps": 5})
    at_state = copy.deepcopy(model.state_dict())
    ft = copy.deepcopy(model)
    for _ in finetune(ft, [args.module], train, epochs=2, lr=0.01, lr_milestones=()):
        pass
    ft_state = ft.state_dict()

    def metrics(alpha: float) -> dict[str, float]:
        net = copy.deepcopy(model)
        net.load_state_dict(interpolate(at_state, ft_state, alpha))
        m = evaluate(net, val, batch_size=250, attack=ATTACK, seed=0)
        return {"clean_acc": m["clean_acc"], "robust_acc": m["robust_acc"]}

    baseline = metrics(0.0)
    t0 = time.perf_counter()
    rows = [{"alpha": a, **(baseline if a == 0.0 else metrics(a))} for a in GRID]
    grid_s = time.perf_counter() - t0
    full = select_alpha(rows, 0.1, baseline=baseline)
    t0 = time.perf_counter()
    res = search_alpha(metrics, GRID, 0.1, baseline=baseline)
    search_s = time.perf_counter() - t0
    counts, grid_used, wrong = synthetic_counts()

    print(f"machine: {machine()}")
    print(
        f"small_resnet, PGD-AT {args.at_epochs} epochs on {args.train} images, "
        f"{args.module} fine-tuned 2 epochs (lr 0.01); alpha chosen on {args.val} val images\n"
    )
    print(
        "curve (alpha: clean / PGD-10 %):",
        ", ".join(f"{r['alpha']:g}: {r['clean_acc']:.1f}/{r['robust_acc']:.1f}" for r in rows),
    )
    print("\n| method | evaluations | wall s | alpha* | fell back to grid |")
    print("|---|---|---|---|---|")
    print(f"| full grid + select_alpha | 10 | {grid_s:.1f} | {full.alpha} | |")
    print(
        f"| search_alpha | {res.evaluations} | {search_s:.1f} | {res.choice.alpha} | {res.used_grid} |"
    )
    print(
        f"| ratio grid / search | {10 / res.evaluations:.1f}x | {grid_s / search_s:.1f}x | "
        f"{'same' if res.choice.alpha == full.alpha else 'DIFFERENT'} | |"
    )
    print(
        f"\nsynthetic monotone curves (1000, ties allowed): evaluations median "
        f"{statistics.median(counts):g}, max {max(counts)}; <= 5 in "
        f"{sum(c <= 5 for c in counts) / 10:.1f}%; fell back to the grid (ties) {grid_used}; "
        f"answers differing from the grid {wrong}"
    )


if __name__ == "__main__":
    main()
