"""MRC stage: the fast path (cached block inputs) versus the reference procedure.

    nice python benchmarks/mrc_bench.py                      # small_resnet, 1024 images, 10 epochs
    nice python benchmarks/mrc_bench.py --arch small_cnn --n 512 --epochs 3

Reference = ``robust_criticality(..., MRCOptions(fast=False))``: the procedure of RIFT.md in one
process (a full forward and backward per step, a full evaluation pass per epoch). Same
model, fixed adversarial set (PGD-10 on validation images of real CIFAR-10), seed and
batches for every mode; the modes run interleaved module by module, ``--repeats`` times
in rotating order, and each mode's fastest run counts (the box is shared). Times are
this process's CPU seconds by default (``--clock cpu``; with 1 torch thread that is the
work done, nearly independent of other jobs on the machine), ``--clock wall`` for wall time. Peak memory: for
every module, one more trial per mode (reference, fast) under ``rift_ray.memory.PeakMemory``:
the peak bytes of the tensors the trial allocates (deterministic; the process RSS could not
resolve it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import torch

from benchmarks.common import cifar10, machine, random_subset, seeded_model
from rift_ray.memory import PeakMemory
from rift_ray.models import mrc_candidates
from rift_ray.rift.mrc import (
    MRCBase,
    MRCOptions,
    MRCResult,
    adversarial_set,
    mrc_base,
    robust_criticality,
)

# MRCOptions fields per mode; "base": the mode also passes the shared MRCBase
MODES: dict[str, dict[str, Any]] = {
    "reference": {"fast": False},
    # block-input caching only, no evaluation reuse (the first fast path)
    "block": {"fast": True, "split_blocks": False, "reuse_eval": False},
    # + caching inside blocks + evaluation reuse, each trial on its own
    "cache": {"fast": True},
    # + the shared MRCBase: what the MRC stage runs (the default); the base's cost is counted
    "fast": {"fast": True, "base": True},
    "fast+CL": {"fast": True, "channels_last": True, "base": True},
}
SHORT = {
    "reference": "ref",
    "block": "block",
    "cache": "cache",
    "fast": "fast",
    "fast+CL": "fast+CL",
}


def peak_mib(
    model: torch.nn.Module,
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    opts: MRCOptions,
    base: MRCBase | None,
) -> float:
    """Peak MiB of tensors allocated by one trial (rift_ray.memory.PeakMemory, CPU method)."""
    with PeakMemory("cpu") as mem:
        robust_criticality(model, name, x, y, opts, base=base)
    return mem.peak_bytes / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--n", type=int, default=1024, help="images in the fixed adversarial set")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest counts")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time trials by this process's CPU seconds (default; 1 thread) or wall seconds",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    splits = cifar10()
    model = seeded_model(args.arch, splits)
    t0 = time.perf_counter()
    x, y = adversarial_set(model, random_subset(splits.val, args.n), batch_size=256)
    adv_s = time.perf_counter() - t0
    modules = mrc_candidates(model)
    common = MRCOptions(epochs=args.epochs, batch_size=args.batch_size, seed=0)
    robust_criticality(model, modules[-1], x, y, dataclasses.replace(common, epochs=1))  # warm-up

    def opts(m: str) -> MRCOptions:
        return dataclasses.replace(common, **{k: v for k, v in MODES[m].items() if k != "base"})

    bases: dict[str, MRCBase] = {}
    base_s: dict[str, float] = {}
    for _ in range(args.repeats):  # the shared base of the modes that use one, once per stage
        for m, mode in MODES.items():
            if mode.get("base"):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                bases[m] = mrc_base(model, modules, x, y, opts(m))
                took = (
                    time.process_time() - cpu0
                    if args.clock == "cpu"
                    else time.perf_counter() - wall0
                )
                base_s[m] = min(base_s.get(m, took), took)

    def base(m: str) -> MRCBase | None:
        return bases[m] if MODES[m].get("base") else None

    rows = []
    modes = list(MODES)
    for i, name in enumerate(modules):
        res: dict[str, MRCResult] = {}
        for r in range(args.repeats):  # rotate who runs first; keep each mode's fastest run
            k = (i + r) % len(modes)
            for m in modes[k:] + modes[:k]:
                cpu0 = time.process_time()
                out = robust_criticality(model, name, x, y, opts(m), base=base(m))
                if args.clock == "cpu":  # CPU seconds of this process: robust to other jobs' load
                    out = dataclasses.replace(out, seconds=time.process_time() - cpu0)
                if m not in res or out.seconds < res[m].seconds:
                    res[m] = out
        rows.append((name, res))
        print(name, {m: round(r.seconds, 2) for m, r in res.items()}, flush=True)

    memory: dict[tuple[str, str], float] = {}
    if not args.no_memory:  # deterministic: the same computation allocates the same tensors
        for name in modules:
            for m in ("reference", "fast"):
                memory[name, m] = peak_mib(model, name, x, y, opts(m), base(m))

    print(f"\nmachine: {machine()}; load average {os.getloadavg()}")
    print(
        f"{args.arch}, {len(modules)} modules, {args.n} adversarial images (PGD-10 took "
        f"{adv_s:.1f}s), {args.epochs} epochs, batch {args.batch_size}, "
        f"times in {args.clock} seconds (best of {args.repeats})\n"
    )
    others = modes[1:]
    print(
        "| module | cached | cache MiB | "
        + " | ".join(f"{SHORT[m]} s" for m in modes)
        + " | "
        + " | ".join(f"{SHORT[m]} x" for m in others)
        + " | "
        + " | ".join(f"abs dMRC {SHORT[m]}" for m in others)
        + " | peak MiB ref / fast |"
    )
    print("|---" * (4 + len(modes) + 2 * len(others)) + "|")
    tot = dict.fromkeys(modes, 0.0)
    diffs = dict.fromkeys(others, 0.0)

    def diff(a: MRCResult, b: MRCResult) -> float:  # the MRC and every end-of-epoch loss
        return max(
            [abs(a.mrc - b.mrc)] + [abs(u - v) for u, v in zip(a.epoch_losses, b.epoch_losses)]
        )

    for name, res in rows:
        ref, fast = res["reference"], res["fast"]
        for m in modes:
            tot[m] += res[m].seconds
        d = {m: diff(ref, res[m]) for m in others}
        for m in others:
            diffs[m] = max(diffs[m], d[m])
        where = (fast.cached_block + (" (inside)" if fast.cached_inside else "")) or "-"
        print(
            f"| {name} | {where} | {fast.cache_bytes / 2**20:.1f} | "
            + " | ".join(f"{res[m].seconds:.2f}" for m in modes)
            + " | "
            + " | ".join(f"{ref.seconds / res[m].seconds:.2f}" for m in others)
            + " | "
            + " | ".join(f"{d[m]:.1e}" for m in others)
            + (
                f" | {memory[name, 'reference']:.1f} / {memory[name, 'fast']:.1f} |"
                if memory
                else " | - |"
            )
        )
    print(
        "| shared base (once per stage) | | | "
        + " | ".join(f"{base_s[m]:.2f}" if m in base_s else "-" for m in modes)
        + " |"
        + " |" * (2 * len(others) + 1)
    )
    for m in base_s:
        tot[m] += base_s[m]
    ref_t = tot["reference"]
    print(
        "| **total** | | | "
        + " | ".join(f"{tot[m]:.1f}" for m in modes)
        + " | "
        + " | ".join(f"**{ref_t / tot[m]:.2f}**" for m in others)
        + " | "
        + " | ".join(f"{diffs[m]:.1e}" for m in others)
        + " | |"
    )
    print(
        f"\nadversarial set: {x.numel() * 4 / 2**20:.1f} MiB float32, "
        f"{x.numel() / 2**20:.1f} MiB as uint8 (adversarial_set(dtype=torch.uint8))"
    )


if __name__ == "__main__":
    main()
