"""Datasets held in memory as uint8 tensors, seeded splits, and a batch iterator.

    splits = load_dataset(cfg.data, seed=cfg.seed)   # DatasetSplits: train / val / test
    for x, y in batches(splits.train, 128, shuffle=True, augment=True, seed=0, epoch=3):
        ...                                           # x float32 [B,C,H,W] in [0,1], y int64 [B]

Whole batches are augmented with tensor ops (random crop with reflect padding, horizontal
flip), so the same code runs on CPU and GPU. Image files (ImageFolder dirs, .tar/.tar.gz
archives of them, Tiny-ImageNet) are decoded once and cached as ``.npz``; archives are
extracted once under a file lock. To add a dataset: a loader returning (train, test)
ImageData, a branch in :func:`load_dataset`, and its mean/std in ``_STATS``.
No Ray here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from rift_ray.archive import extract_archive
from rift_ray.config import DataConfig, expand_path
from rift_ray.errors import DataError

log = logging.getLogger(__name__)

CIFAR_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
CIFAR_C_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# Per-channel mean / std of the training images in [0, 1].
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
_CACHE_VERSION = "v1"  # bump when the decoded-cache format changes


@dataclass
class ImageData:
    """A labelled image set in memory."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    crop_padding: int = 4  # its random crop's padding when augmented (data.crop_padding)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageData:
        """The images at ``indices`` (in that order); classes are kept."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return ImageData(self.images[idx], self.labels[idx], list(self.classes), self.crop_padding)


@dataclass
class DatasetSplits:
    """Train / validation (may be empty) / test splits and the model's input normalization."""

    name: str
    train: ImageData
    val: ImageData
    test: ImageData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# ---------------------------------------------------------------- seeds, splits, statistics


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``key`` (same in every process)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _random_indices(n: int, k: int, *key: object) -> torch.Tensor:
    """``k`` distinct indices out of ``n``, sorted, chosen by a generator seeded by ``key``."""
    return torch.randperm(n, generator=_generator(*key))[:k].sort().values


def split_validation(data: ImageData, val_size: int, seed: int) -> tuple[ImageData, ImageData]:
    """Hold out ``val_size`` random images (seeded): returns (train, val).

    train keeps the original order; val is in the seeded random order, so that "the first N
    validation images" (``eval.val_subset``, ``mrc.adv_set_size``, ``finetune.metric_subset``)
    is a random sample even when the files are sorted by class (ImageFolder, Tiny-ImageNet)."""
    if val_size < 0 or (val_size > 0 and val_size >= len(data)):
        raise ValueError(
            f"val_size={val_size} must be >= 0 and less than the {len(data)} images to split"
        )
    perm = torch.randperm(len(data), generator=_generator("val", seed))
    return data.subset(perm[val_size:].sort().values), data.subset(perm[:val_size])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N,C,H,W] scaled to [0, 1], rounded to 4 decimals."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for ch in range(images.shape[1]):  # exact, from a histogram: fast and bounded memory
        counts = torch.bincount(images[:, ch].reshape(-1), minlength=256).to(torch.float64)
        m = float((counts * values).sum() / counts.sum())
        var = float((counts * values**2).sum() / counts.sum()) - m * m
        mean.append(round(m, 4))
        std.append(round(max(var, 0.0) ** 0.5, 4))
    return tuple(mean), tuple(std)


# ---------------------------------------------------------------- synthetic data

_PATTERN_SEED = 20230802  # class patterns do not depend on the sample seed


def _gather_crops(
    padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Crop ``padded`` [B,C,H',W'] at rows dy[b]:dy[b]+h, cols dx[b]:dx[b]+w, mirrored where flip[b]."""
    b, c = padded.shape[:2]
    dev = padded.device
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)  # [B, h]
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [B, w]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _smooth(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """Random coarse grids [N,3,4,4] in [0,1] upsampled to smooth [N,3,size,size] patterns, centred on 0."""
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False) - 0.5


def synthetic_dataset(
    num_classes: int = 10, n: int = 1000, image_size: int = 32, noise: float = 0.15, seed: int = 0
) -> ImageData:
    """``n`` RGB images: 0.5 + 0.4 * class pattern (shifted by up to 2 px) + 0.4 * random distractor + noise.

    Class patterns and per-image distractors are smooth random colour fields; the class
    patterns come from a fixed generator, so sets drawn with different ``seed`` (train vs
    test) share them. ``noise``: std of per-pixel gaussian noise in [0, 1] units. The
    distractor makes the task learnable but not trivial: small_cnn reaches ~80% test
    accuracy after 2 epochs of 2000 images, ~93% after 5. Deterministic in its arguments.
    """
    shift = 2
    pattern_gen = torch.Generator().manual_seed(_PATTERN_SEED)
    patterns = _smooth(
        torch.rand(num_classes, 3, 4, 4, generator=pattern_gen), image_size + 2 * shift
    )
    g = _generator("synthetic", seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    no_flip = torch.zeros(n, dtype=torch.bool)
    signal = _gather_crops(patterns[labels], dy, dx, no_flip, image_size, image_size)
    distractor = _smooth(torch.rand(n, 3, 4, 4, generator=g), image_size)
    x = 0.5 + 0.4 * signal + 0.4 * distractor + noise * torch.randn(signal.shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(images, labels, [f"class{i}" for i in range(num_classes)])


# ---------------------------------------------------------------- load_dataset


def data_root(cfg: DataConfig) -> Path:
    """``data.root``, else ``$RIFT_DATA_ROOT``, else ``~/.cache/rift-ray/data``."""
    root = expand_path(cfg.root) or os.environ.get("RIFT_DATA_ROOT") or "~/.cache/rift-ray/data"
    return Path(root).expanduser()


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``~/.cache/rift-ray``: extracted archives and decoded arrays."""
    return Path(expand_path(cfg.cache_dir) or "~/.cache/rift-ray").expanduser()


def resolved_val_size(cfg: DataConfig, n_train: int) -> int:
    """``cfg.val_size``, or by default 5,000 (CIFAR), 10,000 (Tiny-ImageNet), else 10% of train."""
    if cfg.val_size is not None:
        return cfg.val_size
    return {"cifar10": 5000, "cifar100": 5000, "tinyimagenet": 10000}.get(
        cfg.dataset, n_train // 10
    )


def load_dataset(cfg: DataConfig, seed: int = 0) -> DatasetSplits:
    """Load ``cfg.dataset``, take the seeded subsets, hold out ``cfg.val_size`` training images.

    ``seed`` picks the subsets and the validation split; the synthetic images themselves
    are fixed (sample seeds 0 for train, 1 for test), as a real dataset is. mean/std are
    the standard ones for CIFAR and Tiny-ImageNet, else computed on the final train split.
    Raises :class:`DataError` for missing data or a val_size above half the train split.
    """
    name = cfg.dataset
    root = data_root(cfg)
    if name == "synthetic":
        s = cfg.synthetic
        train = synthetic_dataset(s.num_classes, s.train_size, s.image_size, s.noise, seed=0)
        test = synthetic_dataset(s.num_classes, s.test_size, s.image_size, s.noise, seed=1)
    elif name in ("cifar10", "cifar100"):
        train, test = load_torchvision_cifar(name, root, download=cfg.download)
    elif name == "tinyimagenet":
        train, test = load_tinyimagenet(root, cache_root(cfg))
    elif name == "imagefolder":
        train, test = load_imagefolder(root, cache_root(cfg))
    else:  # unreachable through DataConfig
        raise DataError(f"data.dataset: unknown dataset {name!r}")

    if cfg.train_subset is not None and cfg.train_subset < len(train):
        train = train.subset(_random_indices(len(train), cfg.train_subset, "train_subset", seed))
    if cfg.test_subset is not None and cfg.test_subset < len(test):
        test = test.subset(_random_indices(len(test), cfg.test_subset, "test_subset", seed))
    # A fixed random order of the test split (the same for every seed): evaluation subsets
    # take its first N images, which must not be the first classes of a class-sorted listing.
    test = test.subset(torch.randperm(len(test), generator=_generator("test_order")))
    val_size = resolved_val_size(cfg, len(train))
    if val_size > len(train) / 2:
        raise DataError(
            f"data.val_size: {val_size} is more than half of the {len(train)} training images"
        )
    train, val = split_validation(train, val_size, seed)
    train.crop_padding = cfg.crop_padding  # what :func:`batches` augments it with
    mean, std = _STATS[name] if name in _STATS else channel_stats(train.images)
    return DatasetSplits(name, train, val, test, len(train.classes), mean, std)


def load_torchvision_cifar(name: str, root: Path, *, download: bool) -> tuple[ImageData, ImageData]:
    """CIFAR-10/100 (train, test) through torchvision; downloads under a file lock when allowed."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            if not download:
                raise DataError(
                    f"{pretty} not found under {root} and data.download is false"
                ) from None
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(root / ".download.lock")):
                try:
                    ds = cls(str(root), train=train, download=True)
                except (OSError, RuntimeError) as e:
                    raise DataError(f"downloading {pretty} into {root} failed: {e}") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(ImageData(images, torch.as_tensor(ds.targets), list(ds.classes)))
    return out[0], out[1]


# ---------------------------------------------------------------- image files


def _decode_file(path: Path) -> torch.Tensor:
    """One image file as uint8 RGB [3, H, W] (torchvision's decoders, PIL for other formats)."""
    from torchvision.io import ImageReadMode, decode_image

    raw = path.read_bytes()
    try:
        return decode_image(
            torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
    except RuntimeError:  # a format torchvision does not decode (BMP, TIFF, ...)
        from PIL import Image

        try:
            with Image.open(path) as im:
                return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot decode image: {e}") from None


def decode_images(files: Sequence[Path], threads: int | None = None) -> torch.Tensor:
    """Decode image files of one size into uint8 [N, 3, H, W]; DataError on a size mismatch.

    ``threads`` (default: CPU count, at most 8) decode chunks of 1000 files in parallel.
    """
    threads = threads or min(8, os.cpu_count() or 1)

    def decode_chunk(chunk: Sequence[Path]) -> list[torch.Tensor]:
        return [_decode_file(f) for f in chunk]

    chunks = [files[i : i + 1000] for i in range(0, len(files), 1000)]
    with warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        # torchvision 0.29 deprecates its decoders (in favour of torchcodec); they are 2x faster than PIL
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        images = [im for part in pool.map(decode_chunk, chunks) for im in part]
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    shape = images[0].shape
    for f, im in zip(files, images):
        if im.shape != shape:
            raise DataError(
                f"{f}: image is {tuple(im.shape[1:])} but others are {tuple(shape[1:])}; resize the dataset"
            )
    return torch.stack(images)


def _list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files under ``split_dir/<class>/`` (any depth), sorted, with class indices."""
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name not in index:
            raise DataError(f"{d}: class {d.name!r} is not among the training classes")
        found = sorted(
            p
            for p in d.rglob("*")
            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        files += found
        labels += [index[d.name]] * len(found)
    return files, labels


def _cached_arrays(
    cache_file: Path, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load ``cache_file`` (.npz), or compute ``build()`` once under a lock and save it atomically."""
    if not cache_file.exists():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_file) + ".lock"):
            if not cache_file.exists():
                t0 = time.perf_counter()
                arrays = build()
                tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
                try:
                    with open(tmp, "wb") as f:
                        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
                    os.replace(tmp, cache_file)
                finally:
                    tmp.unlink(missing_ok=True)
                log.info(
                    "decoded images cached in %s (%.1fs)", cache_file, time.perf_counter() - t0
                )
                return arrays
    with np.load(cache_file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _to_splits(arrays: dict[str, np.ndarray]) -> tuple[ImageData, ImageData]:
    classes = [str(c) for c in arrays["classes"]]
    return tuple(  # type: ignore[return-value]
        ImageData(
            torch.from_numpy(arrays[f"{s}_images"]),
            torch.from_numpy(arrays[f"{s}_labels"]),
            classes,
        )
        for s in ("train", "test")
    )


Listing = tuple[list[Path], list[int]]  # image files and their class indices


def _encode(classes: list[str], train: Listing, test: Listing) -> dict[str, np.ndarray]:
    """Decode both splits into the arrays of the .npz cache."""
    out: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=np.str_)}
    for split, (files, labels) in (("train", train), ("test", test)):
        out[f"{split}_images"] = decode_images(files).numpy()
        out[f"{split}_labels"] = np.array(labels, dtype=np.int64)
    return out


def _scan_imagefolder(folder: Path) -> tuple[list[str], Listing, Listing]:
    """Classes (sorted train/ subfolders) and the train and test listings of an ImageFolder dir.

    ``folder`` holds train/ and test/, or has a single subfolder that does.
    """
    if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
        subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) != 1 or not (
            (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir()
        ):
            raise DataError(
                f"{folder}: expected train/<class>/* and test/<class>/* (ImageFolder layout)"
            )
        folder = subdirs[0]
    classes = sorted(
        p.name for p in (folder / "train").iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    train = _list_images(folder / "train", classes)
    test = _list_images(folder / "test", classes)
    if not train[0] or not test[0]:
        raise DataError(f"{folder}: no images in train/ or test/")
    return classes, train, test


def load_imagefolder(root: Path, cache_dir: Path) -> tuple[ImageData, ImageData]:
    """(train, test) from an ImageFolder dir or a .tar/.tar.gz/.tgz of one; classes sorted by name.

    Decoded arrays are cached: for an archive next to its extraction (``<key>-v1.npz``),
    for a dir in ``cache_dir/decoded/`` keyed by its path and its files' sizes and mtimes.
    """
    if root.is_file():
        if not root.name.endswith((".tar", ".tar.gz", ".tgz")):
            raise DataError(f"{root}: data.root must be a directory or a .tar/.tar.gz/.tgz archive")
        folder = extract_archive(root, cache_dir)
        cache_file = folder.with_name(f"{folder.name}-{_CACHE_VERSION}.npz")
        return _to_splits(_cached_arrays(cache_file, lambda: _encode(*_scan_imagefolder(folder))))
    if not root.is_dir():
        raise DataError(f"{root}: imagefolder data not found (data.root)")
    scan = _scan_imagefolder(root)
    h = hashlib.sha256(f"{_CACHE_VERSION}|{root.resolve()}".encode())
    for f in scan[1][0] + scan[2][0]:
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_file = cache_dir / "decoded" / f"imagefolder-{h.hexdigest()[:16]}.npz"
    return _to_splits(_cached_arrays(cache_file, lambda: _encode(*scan)))


def load_tinyimagenet(root: Path, cache_dir: Path) -> tuple[ImageData, ImageData]:
    """Tiny-ImageNet (train 100k, test = the official val 10k), 64x64, from ``root[/tiny-imagenet-200]``.

    Test labels come from ``val/val_annotations.txt``; decoded arrays are cached in ``cache_dir/decoded``.
    """
    folder = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    annotations = folder / "val" / "val_annotations.txt"
    if not (folder / "train").is_dir() or not annotations.is_file():
        raise DataError(
            f"{folder}: Tiny-ImageNet not found (expected train/<wnid>/images/ and val/val_annotations.txt)"
        )
    key = hashlib.sha256(
        f"{_CACHE_VERSION}|{folder.resolve()}|{annotations.stat().st_mtime_ns}".encode()
    )
    cache_file = cache_dir / "decoded" / f"tinyimagenet-{key.hexdigest()[:16]}.npz"

    def build() -> dict[str, np.ndarray]:
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        index = {c: i for i, c in enumerate(classes)}
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        test = ([folder / "val" / "images" / r[0] for r in rows], [index[r[1]] for r in rows])
        return _encode(classes, _list_images(folder / "train", classes), test)

    return _to_splits(_cached_arrays(cache_file, build))


# ---------------------------------------------------------------- batches and augmentation


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (reflect padding ``pad``) and horizontal flip (p=0.5) of each image in x.

    ``x``: float [B, C, H, W]; returns the same shape on x's device. All B images in one
    gather, no Python loop; random numbers come from ``generator`` (on any device).
    """
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device)
    flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
    dev = x.device
    return _gather_crops(padded, dy.to(dev), dx.to(dev), flip.to(dev), h, w)


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches one rank gets from :func:`batches` for ``n`` images."""
    per_rank = -(-n // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def batches(
    data: ImageData,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float32 [B,C,H,W] in [0,1], y int64 [B]) on ``device``.

    The order is a permutation seeded by (seed, epoch) when ``shuffle``. With
    ``world_size > 1`` rank r takes every world_size-th index from r, after the order is
    padded by wrapping to a multiple of world_size (as DistributedSampler), so ranks get
    equal, disjoint shards. Augmentation (:func:`augment_batch`, padding
    ``data.crop_padding``) is seeded by (seed, epoch, rank).
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
        )
    n = len(data)
    order = (
        torch.randperm(n, generator=_generator("order", seed, epoch))
        if shuffle
        else torch.arange(n)
    )
    if world_size > 1 and n > 0:
        total = -(-n // world_size) * world_size
        order = order.repeat(-(-total // n))[:total][rank::world_size]
    gen = _generator("augment", seed, epoch, rank) if augment else None
    order = order.to(data.images.device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        x = data.images[idx].to(device, non_blocking=True).float().div_(255)
        y = data.labels[idx].to(device, non_blocking=True)
        yield (augment_batch(x, gen, data.crop_padding) if gen is not None else x), y
