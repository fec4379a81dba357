"""Compute switches for the hot loops (config section ``compute``): bf16 autocast,
channels_last memory format, torch.compile. Meant for GPUs; all three also run on CPU.

    model = prepare_model(build_model(...).to(device), channels_last=True, compile=False)
    with autocast("bf16", device):
        loss = F.cross_entropy(model(x), y)       # convs and matmuls in bf16, the loss in fp32

The defaults (``amp="none"``, no channels_last, no compile) change nothing: results are
bit-identical to code that never heard of this module. bf16 needs no gradient scaler
(it has fp32's exponent range). Where they are applied: adversarial training
(attack + step), PGD / clean evaluation, fine-tuning and the MRC ascent and its
evaluation passes (``amp`` arguments of those functions); the stages read the config.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch
from torch import nn

Amp = Literal["none", "bf16"]
AMP_MODES: tuple[str, ...] = get_args(Amp)


def autocast(amp: Amp, device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` to bf16 on ``device``'s type for ``amp="bf16"``; a no-op for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"amp: must be one of {AMP_MODES} (got {amp!r})")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def prepare_model(
    model: nn.Module, *, channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """``model`` IN PLACE in channels_last layout and/or compiled; returned for chaining.

    channels_last: 4-D parameters and buffers are re-strided (values unchanged); the
    convolutions then run NHWC whatever the input layout (faster with cuDNN and oneDNN).
    compile: ``nn.Module.compile()``, so module names, ``state_dict`` keys and the
    module object stay the same (checkpoints and MRC module names are unaffected).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model
