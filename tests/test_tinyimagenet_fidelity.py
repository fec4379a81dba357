"""Issue 14, F6: Tiny-ImageNet as the reference RiFT code does it (microsoft/robustlearn,
RiFT/): random crop with padding 8 (dataloader.py: ``RandomCrop(64, padding=8)``) and heads
that pool with ``F.avg_pool2d(out, 4)`` (ResNet) / ``(out, 8)`` (WideResNet), so 64x64 images
keep 2x2 cells and the classifier has ``512 * (64 // 32) ** 2`` inputs (models/resnet.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rift_ray.config import DataConfig, SweepConfig, load_config
from rift_ray.data import ImageData, batches, load_dataset
from rift_ray.hashing import stage_hashes
from rift_ray.models import build_model
from rift_ray.models.blocks import global_pool, reference_pool
from rift_ray.stages.common import ModelSpec, new_model

# ---------------------------------------------------------------- crop padding


def test_crop_padding_is_the_references_per_dataset() -> None:
    assert DataConfig(dataset="tinyimagenet").crop_padding == 8
    for name in ("synthetic", "cifar10", "cifar100", "imagefolder"):
        assert DataConfig(dataset=name).crop_padding == 4  # type: ignore[arg-type]
    assert DataConfig(dataset="tinyimagenet", crop_padding=4).crop_padding == 4  # explicit wins
    assert load_config(overrides=["data.dataset=tinyimagenet"]).data.crop_padding == 8


def _fake_tinyimagenet(tmp_path: Path) -> Path:
    """The official layout (train/<wnid>/images, val/val_annotations.txt), 16x16 images."""
    root = tmp_path / "tiny-imagenet-200"
    rows = []
    for k, wnid in enumerate(["n01", "n02"]):
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (k * 100, i * 30, 0)).save(d / f"{wnid}_{i}.JPEG")
        rows.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t1\t1")
    (root / "val" / "images").mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (16, 16), (50, 50, 50)).save(root / "val" / "images" / f"val_{k}.JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_tinyimagenet_training_images_are_augmented_with_padding_8(tmp_path: Path) -> None:
    root = _fake_tinyimagenet(tmp_path)
    cfg = DataConfig(
        dataset="tinyimagenet", root=str(root), cache_dir=str(tmp_path / "c"), val_size=2
    )
    assert load_dataset(cfg).train.crop_padding == 8
    cifar_like = DataConfig(synthetic={"train_size": 20, "test_size": 4}, val_size=2)
    assert load_dataset(cifar_like).train.crop_padding == 4
    # batches() crops the 8-padded image: offsets up to 8 pixels, beyond padding 4's reach
    x = torch.rand(24, 3, 16, 16)
    data = ImageData((x * 255).round().to(torch.uint8), torch.zeros(24), ["a"], crop_padding=8)
    (out, _), *_ = batches(data, 24, shuffle=False, augment=True)
    clean = data.images.float().div(255)
    padded = F.pad(clean, (8, 8, 8, 8), mode="reflect")
    shifts = set()
    for i in range(len(out)):
        found = [
            (dy - 8, dx - 8)
            for dy in range(17)
            for dx in range(17)
            for crop in [padded[i, :, dy : dy + 16, dx : dx + 16]]
            if torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1))
        ]
        assert found, i
        shifts.update(found)
    assert max(max(abs(a), abs(b)) for a, b in shifts) > 4


def test_tinyimagenet_hash_changes_other_datasets_keep_theirs() -> None:
    """Padding 8 changes Tiny-ImageNet's results, so its hashes (values from before the field
    existed); every other dataset keeps padding 4 and its hashes."""
    tiny = stage_hashes(SweepConfig.model_validate({"data": {"dataset": "tinyimagenet"}}))
    assert tiny["adv_train"] != "5c9653a5a0f6"
    assert stage_hashes(SweepConfig())["adv_train"] == "d1014feeaadb"
    explicit = SweepConfig.model_validate({"data": {"crop_padding": 4}})
    assert stage_hashes(explicit) == stage_hashes(SweepConfig())


# ---------------------------------------------------------------- model heads


def _reference_resnet_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RiFT/models/resnet.py ResNet.forward, on our modules (plus our input normalization)."""
    out = F.relu(m.bn1(m.conv1(m.normalize(x))))
    out = m.layer4(m.layer3(m.layer2(m.layer1(out))))
    out = F.avg_pool2d(out, 4)
    return m.linear(out.reshape(out.size(0), -1))


def _reference_wrn_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RiFT/models/wide_resnet.py WideResNet.forward."""
    out = m.block3(m.block2(m.block1(m.conv1(m.normalize(x)))))
    out = F.avg_pool2d(m.relu(m.bn1(out)), 8)
    return m.fc(out.view(out.size(0), -1))


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_head_matches_the_reference(size: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 200, image_size=size).eval()
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # CIFAR-style stem
    assert model.linear.in_features == 512 * (size // 32) ** 2  # the reference's nn.Linear
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        feats = model.layer4(model.layer3(model.layer2(model.layer1(model._stem(x)))))
        assert feats.shape[-2:] == (size // 8, size // 8)  # 8x8 for Tiny-ImageNet
        torch.testing.assert_close(model(x), _reference_resnet_forward(model, x))


@pytest.mark.parametrize("size", [32, 64])
def test_wrn_head_matches_the_reference(size: int) -> None:
    torch.manual_seed(0)
    model = build_model("wrn", 200, depth=10, widen_factor=2, image_size=size).eval()
    assert model.conv1.stride == (1, 1)
    assert model.fc.in_features == 64 * 2 * (size // 32) ** 2  # nChannels[3] * (size//32)**2
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_wrn_forward(model, x))


def test_tinyimagenet_models_keep_the_reference_names_and_shapes() -> None:
    """The state dict of a 64x64 ResNet18: the same keys as for 32x32 (module names as in the
    reference), the classifier as in a reference Tiny-ImageNet checkpoint ([200, 2048])."""
    small, tiny = build_model("resnet18", 200), build_model("resnet18", 200, image_size=64)
    assert list(small.state_dict()) == list(tiny.state_dict())
    assert tiny.state_dict()["linear.weight"].shape == (200, 2048)
    assert "layer3.1.conv2.weight" in tiny.state_dict()  # the paper's Tiny-ImageNet module
    # the sweep builds it from the data's image size
    spec = ModelSpec(200, (0.5,) * 3, (0.5,) * 3, (3, 64, 64))
    cfg = SweepConfig.model_validate({"model": {"arch": "resnet18"}})
    assert new_model(cfg, spec).linear.in_features == 2048


def test_32px_heads_pool_exactly_as_before() -> None:
    """On CIFAR's 4x4 (ResNet) / 8x8 (WRN) last maps the window is the whole map: global
    pooling, bit for bit, so CIFAR results and hashes stay those of before."""
    x = torch.randn(3, 16, 4, 4)
    assert torch.equal(reference_pool(x, 4), global_pool(x))
    torch.testing.assert_close(reference_pool(x, 4), F.avg_pool2d(x, 4).flatten(1))
    assert reference_pool(torch.randn(3, 16, 8, 8), 4).shape == (3, 64)
