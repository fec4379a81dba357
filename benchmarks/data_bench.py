"""Training input pipeline: ours (uint8 tensors in memory, whole-batch tensor augmentation)
versus torchvision's usual DataLoader with per-image PIL transforms, on real CIFAR-10.

    nice python benchmarks/data_bench.py            # 10240 images per measurement, 3 rounds

All pipelines yield float32 batches [128, 3, 32, 32] in [0, 1] with random crop (pad 4,
reflect) and horizontal flip. torchvision baselines: (a) "CIFAR10-style", the uint8 array
in memory and ``Image.fromarray`` + transforms per image, as ``datasets.CIFAR10`` does;
(b) ``datasets.ImageFolder`` over the extracted JPEG files (decoded every epoch).
Each DataLoader runs with 0 and with 2 worker processes. Rounds are interleaved; the
median images/s of the rounds is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from benchmarks.common import ARCHIVE, cifar10, machine
from rift_ray.data import ImageData, batches, extract_archive

TRANSFORM = transforms.Compose(
    [
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ]
)


class ArrayDataset(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: PIL image from a uint8 HWC array, transform."""

    def __init__(self, data: ImageData) -> None:
        self.images = data.images.permute(0, 2, 3, 1).numpy()  # [N, H, W, C] like CIFAR10.data
        self.labels = data.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return TRANSFORM(Image.fromarray(np.asarray(self.images[i]))), self.labels[i]


def images_per_s(make: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], n: int) -> float:
    """Images/s pulling ``n`` images from a fresh iterator (start-up, e.g. worker spawn, included)."""
    t0 = time.perf_counter()
    seen = 0
    for x, _ in make():
        seen += len(x)
        if seen >= n:
            break
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10240, help="images per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = cifar10().train
    folder = extract_archive(ARCHIVE, Path("~/.cache/rift-ray").expanduser())
    train_dir = next(folder.rglob("train"))
    image_folder = datasets.ImageFolder(str(train_dir), transform=TRANSFORM)
    arrays = ArrayDataset(train)

    def ours() -> Iterable:
        return batches(train, 128, shuffle=True, augment=True, seed=0, epoch=0)

    def loader(ds: Dataset, workers: int) -> Callable[[], Iterable]:
        return lambda: DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers)

    pipelines = {
        "rift_ray.data.batches (ours)": ours,
        "torchvision CIFAR10-style, PIL, 0 workers": loader(arrays, 0),
        "torchvision CIFAR10-style, PIL, 2 workers": loader(arrays, 2),
        "torchvision ImageFolder (JPEG), PIL, 0 workers": loader(image_folder, 0),
        "torchvision ImageFolder (JPEG), PIL, 2 workers": loader(image_folder, 2),
    }
    results: dict[str, list[float]] = {k: [] for k in pipelines}
    for _ in range(args.rounds):
        for name, make in pipelines.items():
            results[name].append(images_per_s(make, args.n))
            print(name, round(results[name][-1]), flush=True)

    print(f"\nmachine: {machine()}; {args.n} images per measurement, median of {args.rounds}\n")
    print("| pipeline | images/s | ours / this |")
    print("|---|---|---|")
    base = statistics.median(results["rift_ray.data.batches (ours)"])
    for name, r in results.items():
        med = statistics.median(r)
        print(f"| {name} | {med:,.0f} | {base / med:.1f}x |")


if __name__ == "__main__":
    main()
