"""Scaling note: what each stage of a sweep costs, from counted FLOPs per image.

    python benchmarks/scaling.py                          # WRN-34-10, CIFAR-10, sweeps/wrn.yaml
    python benchmarks/scaling.py --measure                # also time a train pass here (GPU if any)

Costs are forward-pass equivalents (F = FLOPs of one forward pass of one image, counted
with FlopCounterMode on the meta device): a training step is 3F (forward, input and
weight gradients), a PGD step 2F (no weight gradients), an MRC step of module m
F_in(m) + F_tail(m)-ish on the reference path and 3 F_tail(m) on the fast path, where
F_tail(m) is the FLOPs from m's block to the logits. GPU-hours = FLOPs / achieved FLOP/s:
the achieved rate is an ASSUMPTION (``--tflops``, several shown), unless ``--measure``
times a WRN-34-10 training pass on this machine's GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rift_ray.models import block_index, build_model, model_blocks, run_blocks


def forward_flops(fn, x: torch.Tensor) -> float:  # noqa: ANN001 - a forward callable
    with FlopCounterMode(display=False) as c:
        fn(x)
    return float(c.get_total_flops())


def module_names(model: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and "sub_block" not in n
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=45000)
    p.add_argument("--val", type=int, default=5000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--at-epochs", type=int, default=110)
    p.add_argument("--restarts", type=int, default=3, help="PGD restarts in evaluation")
    p.add_argument("--mrc-epochs", type=int, default=10)
    p.add_argument("--ft-trial-epochs", type=int, default=88, help="ASHA: 16 trials, grace 3, rf 2")
    p.add_argument("--ft-metric", type=int, default=3 * 2000, help="alphas x images per epoch")
    p.add_argument("--interp-trials", type=int, default=4)
    p.add_argument("--tflops", type=float, nargs="+", default=[50.0, 100.0, 200.0])
    p.add_argument("--measure", action="store_true")
    args = p.parse_args()

    with torch.device("meta"):
        model = build_model("wrn", 10).eval()
        x = torch.empty(1, 3, 32, 32)
    blocks = model_blocks(model)
    f = forward_flops(model, x)
    tails = []
    for name in module_names(model):
        k = block_index(blocks, name)
        with torch.device("meta"):
            feats = run_blocks(blocks[:k], x)
        tails.append(forward_flops(lambda t, k=k: run_blocks(blocks[k:], t), feats) / f)

    pgd_eval = 1 + args.restarts * (10 * 2 + 1)  # clean + per restart (10 steps + final forward)
    stages = {  # forward equivalents (x F) per stage
        "1 AT (PGD-10, 110 epochs)": args.at_epochs
        * (args.train * (1 + 10 * 2 + 3) + args.val * pgd_eval),
        "2 MRC adversarial set": args.val * 10 * 2,
        "2 MRC, reference (35 modules)": sum(
            args.val * (1 + args.mrc_epochs * (1 + 2 * t + 1)) for t in tails
        ),
        "2 MRC, fast path (35 modules)": sum(
            args.val * (t + args.mrc_epochs * 3 * t) for t in tails
        ),
        "3 fine-tune (ASHA)": args.ft_trial_epochs * (args.train * 2.5 + args.ft_metric * 22),
        "4 interpolate (11 alphas, val+test, PGD x restarts)": (1 + 10 * args.interp_trials)
        * (args.val + args.test)
        * pgd_eval,
        "4 interpolate with search_alpha (<= 5 alphas on val)": (1 + 5 * args.interp_trials)
        * args.val
        * pgd_eval
        + (1 + args.interp_trials) * args.test * pgd_eval,
    }
    print(
        f"WRN-34-10: F = {f / 1e9:.2f} GFLOP per image forward; {len(tails)} MRC modules, "
        f"mean tail fraction {sum(tails) / len(tails):.2f}"
    )
    measured = None
    if args.measure:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        net = build_model("wrn", 10).to(dev).train()
        xb = torch.rand(128 if dev == "cuda" else 4, 3, 32, 32, device=dev)
        for i in range(4):
            if i == 1:
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            net(xb).sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        measured = 3 * f * len(xb) * 3 / (time.perf_counter() - t0)
        print(f"measured on {dev}: {measured / 1e12:.1f} TFLOP/s in fp32 training passes")
    rates = [measured] if measured else [t * 1e12 for t in args.tflops]
    head = " | ".join(f"GPU-h @ {r / 1e12:.0f} TFLOP/s" for r in rates)
    print(f"\n| stage | PFLOP | {head} |")
    print("|---|---|" + "---|" * len(rates))
    for name, units in stages.items():
        flops = units * f
        hours = " | ".join(f"{flops / r / 3600:.1f}" for r in rates)
        print(f"| {name} | {flops / 1e15:.1f} | {hours} |")


if __name__ == "__main__":
    main()
