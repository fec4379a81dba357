"""Roofline: achieved FLOP/s of the AT step and the MRC ascent as a fraction of matmul FLOP/s.

    nice python benchmarks/roofline.py

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions,
matmuls; element-wise ops such as BatchNorm and ReLU count as 0). The machine's peak is
measured, not quoted: the best of several fp32 2048x2048 matmuls with the same threads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import cifar10, machine, seeded_model
from rift_ray.models import block_index, model_blocks, run_blocks
from rift_ray.rift import adversarial_train_epoch


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arch", default="small_resnet")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / seconds(lambda: a @ a, repeat=5)

    splits = cifar10()
    model = seeded_model(args.arch, splits)
    x = splits.train.images[:128].float() / 255
    y = splits.train.labels[:128]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every repeat does the same work

    def at_step() -> None:
        attack = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}
        adversarial_train_epoch(model, [(x, y)], opt, **attack)

    def ce_backward(inputs: torch.Tensor, params: bool) -> None:
        for q in model.parameters():
            q.requires_grad_(params)
        F.cross_entropy(model(inputs), y).backward()
        for q in model.parameters():
            q.requires_grad_(True)

    # FlopCounterMode cannot follow autograd.grad (which PGD uses), so the AT step is
    # counted in its parts: clean forward + 10 x (forward + input gradient) + train step
    with torch.no_grad():
        fwd = flops(lambda: model.eval()(x))
    attack = flops(lambda: ce_backward(x.clone().requires_grad_(True), params=False))
    train = flops(lambda: ce_backward(x, params=True))
    rows = [("AT step (PGD-10 + update), batch 128", fwd + 10 * attack + train, seconds(at_step))]

    model.eval()
    xb = splits.val.images[:512].float() / 255
    yb = splits.val.labels[:512]
    blocks = model_blocks(model)
    for name in ("conv1", "layer2.0.conv2", "linear"):
        k = block_index(blocks, name)
        with torch.no_grad():
            feats = run_blocks(blocks[:k], xb)
        weight = model.get_submodule(name).weight
        for p_ in model.parameters():
            p_.requires_grad_(p_ is weight)

        def ascent(feats: torch.Tensor = feats, k: int = k) -> None:
            (-F.cross_entropy(run_blocks(blocks[k:], feats), yb)).backward()

        rows.append(
            (f"MRC ascent step {name} (fast path), batch 512", flops(ascent), seconds(ascent))
        )
    for p_ in model.parameters():
        p_.requires_grad_(True)

    print(f"machine: {machine()}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| step | GFLOP | seconds | GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|---|")
    for name, f, s in rows:
        print(f"| {name} | {f / 1e9:.2f} | {s:.3f} | {f / s / 1e9:.1f} | {f / s / peak:.0%} |")


if __name__ == "__main__":
    main()
