"""How the fixed adversarial set of the MRC stage is stored (``artifacts/adv_set.pt``) and
shipped to trials; no Ray. Making the set is the method's (:func:`rift_ray.rift.adversarial_set`).

    data = adversarial_set_bytes(x_adv, y, "uint16")  # what the stage stores
    x, y = read_adversarial_set(data)                 # what the trials get back

The artifact is ``torch.save`` of ``encode_adversarial_set(x_adv, fmt) | {"targets": y}``.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import torch
from torch import Tensor

AdvSetFormat = Literal["float32", "uint16", "uint8"]


def encode_adversarial_set(x_adv: Tensor, fmt: AdvSetFormat = "uint16") -> dict[str, Any]:
    """A compact form of a fixed adversarial set (float32 [N,C,H,W] in [0,1]) for storage
    and transport; :func:`decode_adversarial_set` inverts it.

    - ``float32``: as is (4 bytes per value, exact).
    - ``uint16``: 16-bit fixed point, ``round(65535 x_adv)`` stored as int16 offset by
      32768 (2 bytes per value); every value within 1/131070 = 7.6e-6 of the original.
    - ``uint8``: ``round(255 x_adv)`` (1 byte per value): the perturbation rounded to the
      1/255 grid, an error of up to 1/510 = 2e-3 per value (a quarter of a PGD step).
    """
    if fmt == "float32":
        return {"format": fmt, "inputs": x_adv.float()}
    if fmt == "uint8":
        return {"format": fmt, "inputs": (x_adv * 255).round().to(torch.uint8)}
    if fmt == "uint16":
        q = (x_adv.double().clamp(0, 1) * 65535).round() - 32768
        return {"format": fmt, "inputs": q.to(torch.int16)}
    raise ValueError(f"format: must be float32, uint16 or uint8 (got {fmt!r})")


def decode_adversarial_set(blob: dict[str, Any]) -> Tensor:
    """The images of an :func:`encode_adversarial_set` blob: float32 in [0,1] (uint8 stays
    uint8, which :func:`rift_ray.rift.robust_criticality` takes as is)."""
    fmt, x = blob.get("format", "float32"), blob["inputs"]
    if fmt == "uint16":
        return ((x.double() + 32768) / 65535).float()
    return x


def adversarial_set_bytes(x_adv: Tensor, targets: Tensor, fmt: AdvSetFormat) -> bytes:
    """The stored artifact of the set ``(x_adv, targets)`` in format ``fmt``."""
    buf = io.BytesIO()
    torch.save(encode_adversarial_set(x_adv.cpu(), fmt) | {"targets": targets.cpu()}, buf)
    return buf.getvalue()


def read_adversarial_set(data: bytes) -> tuple[Tensor, Tensor]:
    """``(x_adv, targets)`` of an :func:`adversarial_set_bytes` artifact, on CPU."""
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return decode_adversarial_set(blob), blob["targets"]
