"""Compact storage of the fixed adversarial set: size and the MRC change it causes.

    nice python -m benchmarks.adv_set_bench                # small_resnet, 1024 images, 5 epochs

One adversarial set (PGD-10 on real CIFAR-10 validation images, seeded small_resnet as in
mrc_bench) is encoded in each format of ``rift_ray.advset.encode_adversarial_set``
(``mrc.adv_set_format``), decoded, and the MRC of every module is computed on it (fast
path, same seed and batches). Reported: bytes, the largest pixel error, the largest
|dMRC| and |d end-of-epoch loss| against float32, and whether the MRC ranking (and so
the chosen module) is unchanged.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import cifar10, machine, random_subset, seeded_model
from rift_ray.advset import decode_adversarial_set, encode_adversarial_set
from rift_ray.models import mrc_candidates
from rift_ray.rift.mrc import MRCOptions, adversarial_set, robust_criticality


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    splits = cifar10()
    model = seeded_model(args.arch, splits)
    x, y = adversarial_set(model, random_subset(splits.val, args.n), batch_size=256)
    modules = mrc_candidates(model)
    opts = MRCOptions(epochs=args.epochs, batch_size=args.batch_size, seed=0)
    results = {}
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    print(f"{args.arch}, {args.n} images, {args.epochs} epochs, batch {args.batch_size}\n")
    print(
        "| format | MiB | max pixel error | max abs dMRC | max abs d(epoch loss) | same ranking |"
    )
    print("|---|---|---|---|---|---|")
    for fmt in ("float32", "uint16", "uint8"):
        blob = encode_adversarial_set(x, fmt)  # type: ignore[arg-type]
        size = blob["inputs"].numel() * blob["inputs"].element_size()
        xs = decode_adversarial_set(blob)
        err = float(((xs.float() / 255) if xs.dtype == torch.uint8 else xs).sub(x).abs().max())
        results[fmt] = {m: robust_criticality(model, m, xs, y, opts) for m in modules}
        ref = results["float32"]
        d_mrc = max(abs(results[fmt][m].mrc - ref[m].mrc) for m in modules)
        d_loss = max(
            abs(a - b)
            for m in modules
            for a, b in zip(results[fmt][m].epoch_losses, ref[m].epoch_losses)
        )
        rank = sorted(modules, key=lambda m: results[fmt][m].mrc)
        same = rank == sorted(modules, key=lambda m: ref[m].mrc)
        print(
            f"| {fmt} | {size / 2**20:.1f} | {err:.1e} | {d_mrc:.1e} | {d_loss:.1e} | "
            f"{'yes' if same else 'no'} (argmin {rank[0]}) |",
            flush=True,
        )
    print(
        "\nMRC per module (float32):", {m: round(r.mrc, 4) for m, r in results["float32"].items()}
    )


if __name__ == "__main__":
    main()
