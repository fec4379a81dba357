"""Shared by the benchmark scripts: the real CIFAR-10 data, a machine line, a seeded model.

Every script measures its figures side by side in one run (interleaved where noise
matters) and prints a Markdown table; benchmarks/README.md collects them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from rift_ray.config import DataConfig
from rift_ray.data import DatasetSplits, ImageData, load_dataset
from rift_ray.models import build_model

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = Path(
    os.environ.get("RIFT_CIFAR10_ARCHIVE", ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
)


def cifar10(val_size: int = 2000) -> DatasetSplits:
    """Real CIFAR-10 (JPEG archive; decoded once and cached under ~/.cache/rift-ray)."""
    if not ARCHIVE.is_file():
        raise SystemExit(f"CIFAR-10 archive not found at {ARCHIVE} (set RIFT_CIFAR10_ARCHIVE)")
    cfg = DataConfig(dataset="imagefolder", root=str(ARCHIVE), val_size=val_size, download=False)
    return load_dataset(cfg, seed=0)


def machine() -> str:
    """CPU model, cores, threads used, torch version (and the GPU, if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){gpu}"
    )


def seeded_model(arch: str, splits: DatasetSplits, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model whose BatchNorm statistics come from a few training batches."""
    torch.manual_seed(seed)
    model = build_model(arch, splits.num_classes, mean=splits.mean, std=splits.std)
    images = random_subset(splits.train, 1024, seed).images
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(images[i * 256 : (i + 1) * 256].float() / 255)
    return model.eval()


def random_subset(data: ImageData, n: int, seed: int = 0) -> ImageData:
    """``n`` images drawn at random (seeded): splits are stored class by class."""
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)
