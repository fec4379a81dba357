"""Models: shapes, the module names RiFT results use, forward-order MRC candidates, normalization."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rift_ray.models import ARCHITECTURES, Normalize, build_model, module_by_name, mrc_candidates

SMALL_WRN = {"depth": 16, "widen_factor": 2}  # the full WRN-34-10 is only constructed on meta


def _build(arch: str, num_classes: int = 7, **kw: object) -> nn.Module:
    extra = SMALL_WRN if arch == "wrn" else {}
    return build_model(arch, num_classes, **extra, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape(arch: str, size: int) -> None:
    model = _build(arch, image_size=size).eval()  # sizes the reference heads' classifier
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7)
    assert isinstance(next(iter(model.children())), Normalize)


@pytest.mark.parametrize(
    "arch, names",
    [
        (
            "resnet18",
            [
                "conv1",
                "bn1",
                "layer2.1.conv2",
                "layer2.0.shortcut.0",
                "layer2.0.shortcut.1",
                "linear",
            ],
        ),
        ("resnet34", ["layer2.3.conv2", "layer3.5.conv2", "layer4.0.shortcut.0", "linear"]),
        (
            "preact_resnet18",
            ["conv1", "layer2.1.conv2", "layer2.0.shortcut.0", "layer4.1.bn2", "bn", "linear"],
        ),
        (
            "small_resnet",
            ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0", "linear"],
        ),
        ("small_cnn", ["conv1", "conv2", "conv3", "linear"]),
    ],
)
def test_module_names(arch: str, names: list[str]) -> None:
    modules = dict(_build(arch).named_modules())
    for name in names:
        assert name in modules, name
    assert "layer1.0.shortcut.0" not in modules  # identity shortcut: empty Sequential


def test_wrn_34_10_names_on_meta() -> None:
    with torch.device("meta"):
        model = build_model("wrn", 10)
    modules = dict(model.named_modules())
    for name in [
        "conv1",
        "block1.layer.3.conv2",
        "block2.layer.0.convShortcut",
        "block1.layer.0.convShortcut",
        "bn1",
        "fc",
    ]:
        assert name in modules, name
    assert "block1.layer.1.convShortcut" not in modules and "sub_block1" not in modules
    assert len(model.block1.layer) == 5 and model.fc.in_features == 640
    assert sum(p.numel() for p in model.parameters()) == 46_160_474  # the usual WRN-34-10 size
    layer = modules["block1.layer.0"]
    assert [n for n, _ in layer.named_children()] == [
        "bn1",
        "relu1",
        "conv1",
        "bn2",
        "relu2",
        "conv2",
        "convShortcut",
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mrc_candidates_forward_order(arch: str) -> None:
    model = _build(arch).train()
    names = mrc_candidates(model)
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert names[0] == "conv1"
    assert names[-1] == ("fc" if arch == "wrn" else "linear")
    assert len(names) == len(expected) and set(names) == expected
    assert model.training  # restored


def test_mrc_candidates_order_details() -> None:
    resnet = mrc_candidates(build_model("resnet18", 10))
    assert len(resnet) == 21
    assert resnet[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    i = resnet.index("layer2.0.shortcut.0")
    assert resnet[i - 2 : i + 2] == [
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer2.1.conv1",
    ]
    preact = mrc_candidates(build_model("preact_resnet18", 10))
    i = preact.index("layer2.0.shortcut.0")  # preact blocks apply the shortcut conv first
    assert preact[i + 1] == "layer2.0.conv1"
    wrn = mrc_candidates(build_model("wrn", 10, **SMALL_WRN))
    assert wrn.index("block2.layer.0.convShortcut") == wrn.index("block2.layer.0.conv2") + 1
    assert mrc_candidates(build_model("small_cnn", 10).eval()) == [
        "conv1",
        "conv2",
        "conv3",
        "linear",
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normalization_inside(arch: str) -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = _build(arch, mean=mean, std=std).eval()
    assert model.normalize.mean.shape == (1, 3, 1, 1) and "normalize.std" in model.state_dict()
    bare = copy.deepcopy(model)
    bare.normalize = nn.Identity()
    x = torch.rand(2, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare(manual))


def test_channels_follow_mean() -> None:
    model = build_model("small_resnet", 3, mean=(0.5,), std=(0.25,))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="resnet18, resnet34, wrn"):
        build_model("vgg16", 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model("wrn", 10, depth=30)


def test_module_by_name() -> None:
    model = build_model("resnet18", 10)
    assert module_by_name(model, "layer2.1.conv2") is model.layer2[1].conv2
    with pytest.raises(ValueError, match="layer2.1.conv2"):
        module_by_name(model, "layer2.1.conv3")
