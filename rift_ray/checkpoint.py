"""The one checkpoint format, and loading of foreign state dicts.

    save_checkpoint("at.pt", model.state_dict(), arch="resnet18", num_classes=10,
                    dataset="cifar10", mean=mean, std=std)
    state, meta = load_checkpoint("at.pt")            # also plain / wrapped state dicts
    load_into_model(model, state, source="at.pt")

A file is ``{"format": "rift-ray/1", "state_dict": {name: tensor}, "meta": {...}}`` written
by ``torch.save``. Loading always uses ``weights_only=True``: a pickle that needs code to
load is refused, never executed.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

FORMAT = "rift-ray/1"
_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_FOREIGN_NORMALIZE = ("normalizer.", "norm.")

PathOrFile = str | os.PathLike[str] | IO[bytes]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file or source."""


def _version() -> str:
    try:
        from rift_ray import __version__

        return str(__version__)
    except Exception:  # a partial install must not stop a save
        return "0"


def _check_plain(value: Any, where: str) -> None:
    """Reject values ``torch.load(weights_only=True)`` would refuse, at save time rather than load time."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or type(value) in (str, int, float, bool) or isinstance(value, Tensor)):
        raise TypeError(
            f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint"
        )


def save_checkpoint(
    path_or_fileobj: PathOrFile,
    state_dict: Mapping[str, Tensor],
    *,
    arch: str,
    num_classes: int,
    dataset: str,
    mean: Sequence[float],
    std: Sequence[float],
    config_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write tensors (moved to CPU) and metadata; a path is written atomically (temp file + rename).

    ``extra`` must hold only weights-only-loadable values (str, int, float, bool, None,
    lists/dicts of them, tensors).
    """
    meta = {
        "arch": arch,
        "num_classes": int(num_classes),
        "dataset": dataset,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "config_hash": config_hash,
        "extra": dict(extra or {}),
        "rift_ray_version": _version(),
        "torch_version": str(torch.__version__),
    }
    _check_plain(meta, "meta")
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": meta,
    }
    if not isinstance(path_or_fileobj, str | os.PathLike):
        torch.save(payload, path_or_fileobj)
        return
    path = Path(path_or_fileobj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """Drop DataParallel/compile/wrapper prefixes shared by every key (repeatedly: ``module._orig_mod.``)."""
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _unwrap(obj: Any, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, meta) from our format, a plain state dict, or a dict wrapping one."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT:
        return dict(obj["state_dict"]), dict(obj.get("meta") or {})
    meta: dict[str, Any] = {"format": "foreign"}
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        meta |= {k: v for k, v in obj.items() if isinstance(v, str | int | float | bool)}
        meta["wrapper_key"] = key
        obj = obj[key]
    sd = dict(obj)
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad or not sd:
        keys = ", ".join(map(str, list(sd)[:5]))
        raise CheckpointError(f"{name}: no state dict found (keys: {keys or 'none'})")
    return sd, meta


def load_checkpoint(
    path_or_fileobj: PathOrFile, map_location: Any = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` from our format or a (wrapped) plain state dict, weights-only.

    Wrapper keys ``state_dict``/``model``/``net``/``model_state_dict`` are unwrapped and
    prefixes ``module.``, ``_orig_mod.``, ``model.`` shared by every key are stripped.
    Raises :class:`CheckpointError` for a missing, truncated or non-torch file and for a
    pickle that would need code to load (refused, not run).
    """
    is_path = isinstance(path_or_fileobj, str | os.PathLike)
    name = (
        str(path_or_fileobj) if is_path else str(getattr(path_or_fileobj, "name", "<file object>"))
    )
    if is_path and not Path(path_or_fileobj).is_file():  # type: ignore[arg-type]
        raise CheckpointError(f"{name}: no such checkpoint file")
    try:
        obj = torch.load(path_or_fileobj, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise CheckpointError(
                f"{name}: refused: not a weights-only checkpoint (it needs code to load: {m.group(1)})"
            ) from None
        raise CheckpointError(
            f"{name}: not a readable checkpoint (truncated or not a torch file)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, io.UnsupportedOperation):
        raise CheckpointError(
            f"{name}: not a readable checkpoint (truncated or not a torch file)"
        ) from None
    sd, meta = _unwrap(obj, name)
    return _strip_prefixes(sd), meta


def load_into_model(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "checkpoint",
    normalization: str = "dataset",
) -> None:
    """``model.load_state_dict(strict=True)`` after reconciling normalization and BN counters.

    - ``normalizer.mean/std`` or ``norm.mean/std`` (foreign names) become ``normalize.mean/std``.
    - Without normalization keys, ``normalization`` says what the network was trained on:
      ``"dataset"`` (it normalized outside itself with the dataset mean/std, as most CIFAR
      code does): the model keeps its own ``normalize.mean/std``, which ``build_model``
      set from the config; ``"none"`` (it took raw [0, 1] images, as the TRADES and MART
      reference code do): mean 0, std 1. With normalization keys in the state dict they win.
    - Missing BatchNorm ``num_batches_tracked`` counters (old checkpoints) keep the model's.
    Raises :class:`CheckpointError` listing up to 5 missing, 5 unexpected and 5 mis-shaped keys.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    for prefix in _FOREIGN_NORMALIZE:
        for stat in ("mean", "std"):
            if (
                f"{prefix}{stat}" in sd
                and f"normalize.{stat}" not in sd
                and f"normalize.{stat}" in own
            ):
                sd[f"normalize.{stat}"] = sd.pop(f"{prefix}{stat}")
    if normalization not in ("dataset", "none"):
        raise ValueError(f"normalization must be 'dataset' or 'none', got {normalization!r}")
    for key, value in own.items():
        if key not in sd and key in ("normalize.mean", "normalize.std") and normalization == "none":
            sd[key] = torch.zeros_like(value) if key.endswith("mean") else torch.ones_like(value)
        elif key not in sd and (
            key in ("normalize.mean", "normalize.std") or key.endswith("num_batches_tracked")
        ):
            sd[key] = value
        elif key.startswith("normalize.") and key in sd and sd[key].numel() == value.numel():
            sd[key] = sd[key].reshape(value.shape)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", shapes),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(f"{source}: state dict does not match the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
