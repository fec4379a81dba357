"""Models, by name, with the module names RiFT results refer to.

    model = build_model("resnet18", num_classes=10, mean=splits.mean, std=splits.std)
    names = mrc_candidates(model)          # ["conv1", "layer1.0.conv1", ..., "linear"]
    module = module_by_name(model, "layer2.1.conv2")

Every model takes images in [0, 1] ([B, C, H, W]) and normalizes them itself with its
first submodule ``normalize``; the output is logits [B, num_classes].
To add an architecture: write it in a module here, then add it to ``_BUILDERS``; give it a
``blocks()`` method (:mod:`rift_ray.models.blocks`) so MRC can skip its frozen prefix.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rift_ray.models.blocks import Block, block_index, model_blocks, run_blocks
from rift_ray.models.preact_resnet import PreActResNet, preact_resnet18
from rift_ray.models.resnet import Normalize, ResNet, resnet18, resnet34
from rift_ray.models.small import SmallCNN, small_cnn, small_resnet
from rift_ray.models.wide_resnet import WideResNet

__all__ = [
    "ARCHITECTURES",
    "Block",
    "Normalize",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "block_index",
    "build_model",
    "model_blocks",
    "module_by_name",
    "mrc_candidates",
    "run_blocks",
    "select_modules",
]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "wrn": WideResNet,
    "preact_resnet18": preact_resnet18,
    "small_resnet": small_resnet,
    "small_cnn": small_cnn,
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    arch: str,
    num_classes: int,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    depth: int = 34,
    widen_factor: int = 10,
    image_size: int | Sequence[int] = 32,
) -> nn.Module:
    """A freshly initialised model; ``depth`` and ``widen_factor`` apply to ``wrn`` only.

    ``mean``/``std`` (per channel, for images in [0, 1]) set the input normalization and,
    by their length, the number of input channels. ``image_size`` (H, or (H, W)) sizes the
    classifier of the reference architectures (resnet18/34, wrn, preact_resnet18), whose
    heads pool as the reference code does: 64x64 inputs leave 2x2 cells, so 4x the inputs.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch == "wrn":
        return WideResNet(
            depth, num_classes, widen_factor, mean=mean, std=std, image_size=image_size
        )
    if arch in ("small_resnet", "small_cnn"):  # global pooling: any input size
        return _BUILDERS[arch](num_classes, mean=mean, std=std)
    return _BUILDERS[arch](num_classes, mean=mean, std=std, image_size=image_size)


def mrc_candidates(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32)) -> list[str]:
    """Qualified names of every Conv2d and Linear, in the order the forward pass calls them.

    Runs one forward pass on zeros of ``input_shape`` (eval mode, no grad; the training
    flag is restored). Modules the forward pass never calls are left out; a module
    called twice is listed once.
    """
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):

            def hook(_m: nn.Module, _inp: object, _out: object, name: str = name) -> None:
                if name not in order:
                    order.append(name)

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def select_modules(all_modules: list[str], include: list[str], exclude: list[str]) -> list[str]:
    """Candidates filtered by fnmatch patterns (empty include = all), forward order kept."""
    chosen = [
        m for m in all_modules if not include or any(fnmatch.fnmatchcase(m, p) for p in include)
    ]
    return [m for m in chosen if not any(fnmatch.fnmatchcase(m, p) for p in exclude)]


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (e.g. ``layer2.1.conv2``); ValueError naming close matches."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else f"some valid names: {', '.join(names[:8])}"
    )
    raise ValueError(f"no module {name!r} in {type(model).__name__} ({len(names)} modules); {hint}")
