"""Data: synthetic set, splits, augmentation, sharded batches, ImageFolder dirs and archives, CIFAR-C."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rift_ray import archive as archive_mod
from rift_ray import data as data_mod
from rift_ray.config import DataConfig, SyntheticConfig
from rift_ray.corruptions import load_cifar_c
from rift_ray.data import (
    DataError,
    ImageData,
    augment_batch,
    batches,
    extract_archive,
    load_dataset,
    load_tinyimagenet,
    num_batches,
    split_validation,
    synthetic_dataset,
)
from rift_ray.models import build_model


def _tiny(n: int = 20, size: int = 8) -> ImageData:
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % 3, ["a", "b", "c"])


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic() -> None:
    a, b = synthetic_dataset(n=64, seed=3), synthetic_dataset(n=64, seed=3)
    assert a.images.dtype == torch.uint8 and a.images.shape == (64, 3, 32, 32)
    assert a.labels.dtype == torch.int64 and len(a.classes) == 10
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, synthetic_dataset(n=64, seed=4).images)


def test_synthetic_learnable() -> None:
    torch.manual_seed(0)
    cfg = DataConfig(val_size=0, synthetic=SyntheticConfig(train_size=2000, test_size=500))
    splits = load_dataset(cfg)
    model = build_model("small_cnn", splits.num_classes, mean=splits.mean, std=splits.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        for x, y in batches(splits.train, 64, shuffle=True, augment=True, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    x, y = next(batches(splits.test, 500, shuffle=False))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5, acc


def test_load_dataset_synthetic() -> None:
    cfg = DataConfig(val_size=100, train_subset=600, test_subset=50)
    splits = load_dataset(cfg, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (500, 100, 50)
    assert splits.num_classes == 10 and splits.name == "synthetic"
    assert len(splits.mean) == 3 and all(0 < s < 1 for s in splits.std)
    assert splits.mean == tuple(round(m, 4) for m in splits.mean)
    again = load_dataset(cfg, seed=1)
    assert torch.equal(splits.val.images, again.val.images)
    with pytest.raises(DataError, match="data.val_size"):
        load_dataset(DataConfig(val_size=301, train_subset=600))


# ---------------------------------------------------------------- splits


def test_split_validation() -> None:
    data = ImageData(torch.zeros(50, 3, 4, 4, dtype=torch.uint8), torch.arange(50), ["x"])
    train, val = split_validation(data, 10, seed=0)
    assert len(train) == 40 and len(val) == 10
    ids = torch.cat([train.labels, val.labels])  # labels are the original indices here
    assert sorted(ids.tolist()) == list(range(50))
    assert torch.equal(val.labels, split_validation(data, 10, seed=0)[1].labels)
    assert not torch.equal(val.labels, split_validation(data, 10, seed=1)[1].labels)
    train, val = split_validation(data, 0, seed=0)
    assert len(train) == 50 and val.images.shape == (0, 3, 4, 4)
    with pytest.raises(ValueError, match="val_size=50"):
        split_validation(data, 50, seed=0)


# ---------------------------------------------------------------- augmentation and batches


def test_augment_shape_range_determinism() -> None:
    x = torch.rand(16, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= x.min() and out.max() <= x.max()
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(1)))


def test_augment_flips_happen() -> None:
    x = torch.rand(64, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54


def test_augment_crops_are_shifts_of_padded() -> None:
    x = torch.rand(32, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            for crop in [padded[i, :, dy : dy + 8, dx : dx + 8]]
            if torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1))
        ]
        assert matches, i
        shifts.update(matches)
    assert len(shifts) > 5  # offsets really vary


def test_batches_cover_and_are_seeded() -> None:
    data = _tiny(23)
    got = list(batches(data, 5, shuffle=True, seed=1, epoch=0))
    assert len(got) == num_batches(23, 5) == 5
    x, y = got[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    xs = torch.cat([x for x, _ in got])
    assert sorted(map(tuple, xs.flatten(1).tolist())) == sorted(
        map(tuple, (data.images.float() / 255).flatten(1).tolist())
    )
    again = torch.cat([x for x, _ in batches(data, 5, shuffle=True, seed=1, epoch=0)])
    other = torch.cat([x for x, _ in batches(data, 5, shuffle=True, seed=1, epoch=1)])
    assert torch.equal(xs, again) and not torch.equal(xs, other)
    assert (
        len(list(batches(data, 5, shuffle=True, drop_last=True)))
        == num_batches(23, 5, drop_last=True)
        == 4
    )


def _index_data(n: int) -> ImageData:
    """Images whose first pixel encodes their index (n <= 256)."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageData(images, torch.arange(n), ["x"])


@pytest.mark.parametrize("n, world", [(24, 3), (25, 4)])
def test_batches_shard_across_ranks(n: int, world: int) -> None:
    data = _index_data(n)
    shards = [
        torch.cat(
            [
                y
                for _, y in batches(
                    data, 4, shuffle=True, seed=7, epoch=2, rank=r, world_size=world
                )
            ]
        )
        for r in range(world)
    ]
    sizes = {len(s) for s in shards}
    assert sizes == {-(-n // world)}
    assert all(
        num_batches(n, 4, world)
        == len(list(batches(data, 4, shuffle=True, rank=r, world_size=world)))
        for r in range(world)
    )
    everything = torch.cat(shards)
    assert set(everything.tolist()) == set(range(n))
    if n % world == 0:
        assert len(everything) == n  # disjoint
    else:
        assert (
            len(everything) - len(set(everything.tolist())) == world * sizes.pop() - n
        )  # wrapped padding only


def test_augmentation_seeded_by_rank() -> None:
    one = _tiny(1, size=16)
    data = ImageData(one.images.repeat(16, 1, 1, 1), torch.zeros(16, dtype=torch.long), ["a"])

    def first(rank: int) -> torch.Tensor:
        return next(batches(data, 8, shuffle=False, augment=True, seed=3, rank=rank, world_size=2))[
            0
        ]

    assert torch.equal(first(0), first(0)) and not torch.equal(first(0), first(1))


# ---------------------------------------------------------------- image folders and archives


def _write_imagefolder(root: Path, n_per_class: int = 3, size: int = 8) -> None:
    colours = {"cat": (200, 30, 30), "ant": (30, 200, 30), "bee": (30, 30, 200)}
    for split in ("train", "test"):
        for name, colour in colours.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n_per_class):
                Image.new("RGB", (size, size), colour).save(d / f"{i}.png")


def test_imagefolder_dir(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "ds")
    (tmp_path / "ds" / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(tmp_path / "ds"),
        cache_dir=str(tmp_path / "cache"),
        val_size=2,
    )
    splits = load_dataset(cfg)
    assert splits.train.classes == ["ant", "bee", "cat"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 2, 9)
    assert splits.test.images.shape == (9, 3, 8, 8)
    cat = splits.test.images[splits.test.labels == 2]
    assert cat[:, 0].eq(200).all() and cat[:, 2].eq(30).all()
    assert list((tmp_path / "cache" / "decoded").glob("imagefolder-*.npz"))


def test_first_images_of_val_and_test_mix_classes(tmp_path: Path) -> None:
    """ImageFolder files are sorted by class; "the first N" evaluation images must not be."""
    _write_imagefolder(tmp_path / "ds", n_per_class=20)
    cfg = DataConfig(
        dataset="imagefolder", root=str(tmp_path / "ds"), cache_dir=str(tmp_path / "c"), val_size=15
    )
    splits = load_dataset(cfg, seed=0)
    assert set(splits.test.labels[:12].tolist()) == {0, 1, 2}
    assert set(splits.val.labels[:8].tolist()) == {0, 1, 2}
    # the test order is fixed across seeds (every seed is evaluated on the same images)
    assert torch.equal(load_dataset(cfg, seed=1).test.labels, splits.test.labels)
    assert sorted(splits.test.labels.tolist()) == sorted([0, 1, 2] * 20)


def test_imagefolder_archive_extracts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_imagefolder(tmp_path / "src" / "top")
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "top", arcname="top")
    cfg = DataConfig(
        dataset="imagefolder", root=str(archive), cache_dir=str(tmp_path / "cache"), val_size=0
    )
    first = load_dataset(cfg)
    assert len(first.train) == 9 and len(first.test) == 9 and first.val.images.shape == (0, 3, 8, 8)
    (extracted,) = [p for p in (tmp_path / "cache" / "extracted").iterdir() if p.is_dir()]
    assert (extracted / ".complete").exists() and (
        extracted / "top" / "train" / "ant" / "0.png"
    ).exists()

    def fail(*_: object) -> None:
        raise AssertionError("should have been cached")

    monkeypatch.setattr(data_mod, "decode_images", fail)
    monkeypatch.setattr(archive_mod, "_extract_members", fail)
    second = load_dataset(cfg)
    assert (
        torch.equal(first.train.images, second.train.images)
        and second.train.classes == first.train.classes
    )


def _add_bytes(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_archive_refused(tmp_path: Path, kind: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        _add_bytes(tf, "train/a/ok.png", b"x")
        if kind == "dotdot":
            _add_bytes(tf, "../evil", b"pwned")
        elif kind == "absolute":
            _add_bytes(tf, str(tmp_path / "evil"), b"pwned")
        else:
            link = tarfile.TarInfo("train/a/link")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../../evil"
            tf.addfile(link)
    cache = work / "cache"
    with pytest.raises(DataError, match="refusing archive member"):
        extract_archive(archive, cache)
    assert (
        not (tmp_path / "evil").exists()
        and not (work / "evil").exists()
        and not (cache / "evil").exists()
    )
    assert not [p for p in (cache / "extracted").iterdir() if p.is_dir()]  # temp dir removed


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    rows = []
    for k, wnid in enumerate(["n02", "n01"]):
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (k * 100, 0, 0)).save(d / f"{wnid}_{i}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        rows.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t1\t1")
    (root / "val" / "images").mkdir(parents=True)
    for k in range(2):
        Image.new("L", (16, 16), 50).save(root / "val" / "images" / f"val_{k}.JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(
        dataset="tinyimagenet", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), val_size=2
    )
    splits = load_dataset(cfg)
    assert splits.train.classes == ["n01", "n02"] and sorted(splits.test.labels.tolist()) == [0, 1]
    # the listing order (before the sweep's fixed shuffle of the test split): val_0 is n02
    _, test = load_tinyimagenet(tmp_path / "tiny-imagenet-200", tmp_path / "cache")
    assert test.labels.tolist() == [1, 0]
    assert (len(splits.train), len(splits.val), splits.test.images.shape) == (6, 2, (2, 3, 16, 16))
    assert splits.mean == (0.4802, 0.4481, 0.3975)


def test_missing_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))


# ---------------------------------------------------------------- CIFAR-C


def test_load_cifar_c(tmp_path: Path) -> None:
    n = 4  # images per severity
    for c, value in (("fog", 10), ("snow", 20)):
        arr = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
        arr[:, 0, 0, 0] = value + np.arange(5 * n) // n  # severity encoded in the first pixel
        np.save(tmp_path / f"{c}.npy", arr)
    np.save(tmp_path / "labels.npy", np.tile(np.arange(n, dtype=np.uint8), 5))
    out = load_cifar_c(tmp_path, ["fog", "snow"], [1, 5], n_per_severity=n)
    assert set(out) == {("fog", 1), ("fog", 5), ("snow", 1), ("snow", 5)}
    assert out[("snow", 5)].images.shape == (n, 3, 32, 32)
    assert out[("snow", 5)].images[:, 0, 0, 0].tolist() == [24] * n
    assert (
        out[("fog", 1)].labels.tolist() == list(range(n))
        and out[("fog", 1)].labels.dtype == torch.int64
    )
    with pytest.raises(DataError, match="frost.npy"):
        load_cifar_c(tmp_path, ["frost"], [1], n_per_severity=n)
    assert len(data_mod.CIFAR_C_CORRUPTIONS) == 15 and len(data_mod.CIFAR_C_EXTRA) == 4


# ---------------------------------------------------------------- the real archive


def _real_archive() -> Path:
    return Path(
        os.environ.get("RIFT_CIFAR10_ARCHIVE")
        or Path(__file__).parents[2] / "shared/data/cifar10-jpeg.tar.gz"
    )


REAL = pytest.mark.skipif(
    not _real_archive().is_file(),
    reason="CIFAR-10 JPEG archive not found (set RIFT_CIFAR10_ARCHIVE)",
)


def _real_subset(dest: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class and split of the real archive, as a tar
    of the same layout (real JPEG files; the whole archive is read, none of it decoded)."""
    out, taken = dest / "cifar10-subset.tar", {}
    with tarfile.open(_real_archive(), "r:gz") as src, tarfile.open(out, "w") as tf:
        for m in src:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3:
                continue
            key = parts[-3:-1]  # (split, class)
            if taken.get(key, 0) < per_class:
                taken[key] = taken.get(key, 0) + 1
                tf.addfile(m, src.extractfile(m))
    return out


@pytest.mark.data
@REAL
def test_real_cifar10_archive_layout() -> None:
    """The whole archive: 50,000 train and 10,000 test JPEGs, 10 classes, balanced."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(_real_archive(), "r:gz") as tf:
        for m in tf:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and m.name.endswith(".jpg"):
                counts[parts[-3], parts[-2]] = counts.get((parts[-3], parts[-2]), 0) + 1
    assert sum(v for (s, _), v in counts.items() if s == "train") == 50000
    assert sum(v for (s, _), v in counts.items() if s == "test") == 10000
    assert {c for _, c in counts} == set(CIFAR10_CLASSES)
    assert set(counts.values()) == {5000, 1000}


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")  # fmt: skip


@pytest.mark.data
@REAL
def test_real_cifar10_archive(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real JPEGs decoded and cached through the archive path: a per-class subset of the real
    archive (60 images per class and split) by default; the whole archive (45,000 / 5,000 /
    10,000, ~50 s here) with RIFT_TEST_FULL_DATA=1."""
    import rift_ray.data

    full = os.environ.get("RIFT_TEST_FULL_DATA") == "1"
    tmp = tmp_path_factory.mktemp("real")
    archive = _real_archive() if full else _real_subset(tmp, 60)
    cache = os.environ.get("RIFT_TEST_CACHE_DIR") or str(tmp / "cache")
    val = 5000 if full else 100
    cfg = DataConfig(dataset="imagefolder", root=str(archive), cache_dir=cache, val_size=val)
    t0 = time.perf_counter()
    first = load_dataset(cfg)
    t1 = time.perf_counter()
    assert list(Path(cache).rglob("*.npz"))  # the decoded arrays, cached

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load decoded images instead of reading the cache")

    monkeypatch.setattr(rift_ray.data, "decode_images", no_decoding)
    second = load_dataset(cfg)
    t2 = time.perf_counter()
    print(f"first load {t1 - t0:.1f}s, cached load {t2 - t1:.1f}s")
    n_train, n_test = (50000, 10000) if full else (600, 600)
    assert (len(first.train), len(first.val), len(first.test)) == (n_train - val, val, n_test)
    assert first.num_classes == 10 and tuple(first.train.classes) == CIFAR10_CLASSES
    assert first.test.images.shape[1:] == (3, 32, 32) and first.test.images.dtype == torch.uint8
    assert torch.bincount(first.test.labels).tolist() == [n_test // 10] * 10
    assert torch.equal(first.val.images, second.val.images)
    assert torch.equal(first.test.images, second.test.images)
    # a test image decoded as PIL decodes its file (the test set is held in a seeded order)
    with tarfile.open(archive, "r:*") as tf:
        name = sorted(m.name for m in tf if "/test/airplane/" in f"/{m.name}")[0]
        raw = tf.extractfile(name).read()  # type: ignore[union-attr]
    ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))).int()
    planes = first.test.images[first.test.labels == 0].permute(0, 2, 3, 1).int()
    closest = (planes - ref).abs().float().mean(dim=(1, 2, 3)).min()
    assert closest < 2.0  # libjpeg (torchvision) and PIL's decoders may differ by 1


def test_default_val_size_per_dataset() -> None:
    from rift_ray.data import resolved_val_size

    assert resolved_val_size(DataConfig(dataset="cifar10"), 50000) == 5000
    assert resolved_val_size(DataConfig(dataset="tinyimagenet"), 100000) == 10000
    assert resolved_val_size(DataConfig(), 2000) == 200
    assert resolved_val_size(DataConfig(val_size=0), 2000) == 0
    splits = load_dataset(DataConfig())
    assert (len(splits.train), len(splits.val)) == (1800, 200)
