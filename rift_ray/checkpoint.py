"""The one checkpoint format, and loading of foreign state dicts.

    save_checkpoint("at.pt", model.state_dict(), arch="resnet18", num_classes=10,
                    dataset="cifar10", mean=mean, std=std)
    state, meta = load_checkpoint("at.pt")            # also plain / wrapped state dicts
    load_into_model(model, state, source="at.pt")

A file is ``{"format": "rift-ray/1", "state_dict": {name: tensor}, "meta": {...}}`` written
by ``torch.save``. Loading always uses ``weights_only=True``: a pickle that needs code to
load is refused, never executed.

Foreign robust models (``adv_train.checkpoint``) go through one function:

    fit_checkpoint(model, "~/models/Carmon2019Unlabeled", dataset="cifar10",
                   normalization="robustbench")    # a file, or RobustBench's model_dir/name

``normalization`` names how the network normalized its inputs (:data:`NORMALIZATIONS`); the
known sources' conventions, read from their code, are :data:`RIFT_REFERENCE_STATS` and
:data:`ROBUSTBENCH_STATS` (see docs/checkpoints.md).
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
# "last": RobustBench files that keep two models ({"last": ..., "best": ...}); it loads "last"
_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "last")
_PREFIXES = ("module.", "_orig_mod.", "model.")
# foreign names of the input normalization -> ours; "mu"/"sigma": RobustBench's model classes
_FOREIGN_STATS = {
    "normalizer.mean": "normalize.mean",
    "normalizer.std": "normalize.std",
    "norm.mean": "normalize.mean",
    "norm.std": "normalize.std",
    "mu": "normalize.mean",
    "sigma": "normalize.std",
}
# A second first stage of WideResNet, built but never called by forward(), in the RiFT
# reference code's WideResNet and RobustBench's WideResNet(sub_block1=True): dropped.
_UNUSED_PREFIXES = ("sub_block1.",)

NORMALIZATIONS = ("dataset", "none", "rift_reference", "robustbench")
"""How a checkpoint's network normalized its [0, 1] inputs, when its file does not say:
``dataset``: with the sweep dataset's mean/std, outside the model; ``none``: not at all;
``rift_reference``: as the RiFT reference code did (:data:`RIFT_REFERENCE_STATS`);
``robustbench``: as RobustBench's model class does (:data:`ROBUSTBENCH_STATS`, else none)."""

Stats = tuple[tuple[float, ...], tuple[float, ...]]
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RAW_STATS: Stats = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

RIFT_REFERENCE_STATS: dict[str, Stats] = {
    "cifar10": CIFAR10_STATS,
    "cifar100": CIFAR10_STATS,  # sic: the reference code normalizes CIFAR-100 with CIFAR-10's
    "tinyimagenet": IMAGENET_STATS,
}
"""The ``transforms.Normalize`` of microsoft/robustlearn RiFT/main.py, dataloader.py and
utils.py (evaluate_*_robustness) per dataset; its models hold no normalization."""

_C10_RB = ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),
           (0.24703225141799082, 0.24348516474564, 0.26158783926049628))  # fmt: skip
_C100_RB = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
            (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))  # fmt: skip
_HALF: Stats = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ROBUSTBENCH_STATS: dict[tuple[str, str], Stats] = {
    ("cifar10", "Rice2020Overfitting"): CIFAR10_STATS,  # Linf WRN-34-20; L2 PreActResNet18
    ("cifar10", "Hendrycks2019Using"): _HALF,  # forward: 2x - 1
    ("cifar10", "Chen2020Efficient"): CIFAR10_STATS,
    ("cifar10", "Augustin2020Adversarial_34_10"): _C10_RB,
    ("cifar10", "Augustin2020Adversarial_34_10_extra"): _C10_RB,
    ("cifar10", "Rony2019Decoupling"): ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    ("cifar10", "Hendrycks2020AugMix_WRN"): _HALF,
    ("cifar10", "Kireev2021Effectiveness_Gauss50percent"): CIFAR10_STATS,
    ("cifar10", "Kireev2021Effectiveness_AugMixNoJSD"): CIFAR10_STATS,
    ("cifar10", "Kireev2021Effectiveness_RLAT"): CIFAR10_STATS,
    ("cifar10", "Kireev2021Effectiveness_RLATAugMixNoJSD"): CIFAR10_STATS,
    ("cifar10", "Kireev2021Effectiveness_RLATAugMix"): CIFAR10_STATS,
    ("cifar100", "Chen2020Efficient"): ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    ("cifar100", "Wu2020Adversarial"): _C100_RB,
    ("cifar100", "Rice2020Overfitting"): _C100_RB,
    ("cifar100", "Hendrycks2019Using"): _HALF,
    ("cifar100", "Hendrycks2020AugMix_WRN"): _HALF,
}
"""RobustBench model-zoo entries (robustbench/model_zoo/cifar10.py, cifar100.py) of our
architectures whose normalization is in the model class's code (``mu``/``sigma`` buffers,
absent from most of these files); every other entry of our architectures takes [0, 1]
inputs unnormalized. Looked up by the file name, as RobustBench stores it (``<name>.pt``)."""

_ROBUSTBENCH_UNSUPPORTED = {
    "Ding2020MMA": "standardizes each image by its own mean/std",
}
ROBUSTBENCH_THREAT_MODELS = ("Linf", "L2", "corruptions")

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


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def implied_stats(
    normalization: str, dataset: str | None = None, name: str | None = None, *, source: str = ""
) -> Stats | None:
    """The (mean, std) a network took its inputs with, by the ``normalization`` convention,
    for a file that stores none; None for ``dataset`` (the model keeps what ``build_model``
    set from the sweep's data). ``name``: the RobustBench model name (the file's stem).

    Raises ValueError for an unknown ``normalization`` and :class:`CheckpointError` where
    the convention has no answer (``rift_reference`` on a dataset the reference code never
    trained, a RobustBench model whose normalization no mean/std can express).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}"
        )
    where = f"{source}: " if source else ""
    if normalization == "dataset":
        return None
    if normalization == "none":
        return RAW_STATS
    if normalization == "rift_reference":
        if dataset not in RIFT_REFERENCE_STATS:
            raise CheckpointError(
                f"{where}checkpoint_normalization rift_reference: the RiFT reference code "
                f"trains {', '.join(RIFT_REFERENCE_STATS)} only, not {dataset}"
            )
        return RIFT_REFERENCE_STATS[dataset]
    if name in _ROBUSTBENCH_UNSUPPORTED:
        raise CheckpointError(
            f"{where}RobustBench model {name} {_ROBUSTBENCH_UNSUPPORTED[name]}, "
            "which an input mean/std cannot express"
        )
    return ROBUSTBENCH_STATS.get((str(dataset), str(name)), RAW_STATS)


def _mismatch_hint(own: Mapping[str, Tensor], sd: Mapping[str, Tensor], missing: list[str]) -> str:
    """Why a known foreign layout cannot fit, where it is one we recognise; else ''."""
    for head in ("linear.weight", "fc.weight"):
        if head in own and head in sd and sd[head].dim() == own[head].dim() == 2:
            if sd[head].shape[1] == 4 * own[head].shape[1]:
                return (
                    f" ({head} takes 4x the features: its head keeps 2x2 cells, as the RiFT "
                    "reference code's Tiny-ImageNet (64x64) models do, this model's one cell)"
                )
    if missing and all(k.startswith("bn.") for k in missing):
        return (
            " (a RobustBench PreActResNet without bn_before_fc, e.g. Wong2020Fast or "
            "Andriushchenko2020Understanding; its shortcut also differs from preact_resnet18)"
        )
    return ""


def load_into_model(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "checkpoint",
    normalization: str = "dataset",
    dataset: str | None = None,
    name: str | None = None,
) -> None:
    """``model.load_state_dict(strict=True)`` after reconciling normalization and foreign names.

    - ``normalizer.mean/std``, ``norm.mean/std`` and RobustBench's ``mu``/``sigma`` become
      ``normalize.mean/std``; ``sub_block1.*`` (a WideResNet stage forward() never calls,
      in the RiFT reference and RobustBench code) is dropped.
    - Normalization keys in the file win. Without them, ``normalization``
      (:data:`NORMALIZATIONS`) says what the network was trained on: ``dataset``: the model
      keeps the ``normalize.mean/std`` ``build_model`` set from the sweep's data; ``none``:
      mean 0, std 1; ``rift_reference``/``robustbench``: :func:`implied_stats` for
      ``dataset`` (the sweep's dataset name) and ``name`` (the RobustBench model name).
    - Contradictions are errors: ``rift_reference`` with a file that stores other statistics
      (the reference code's files store none); ``dataset`` with a ``sub_block1`` file and no
      statistics (a RiFT reference or RobustBench WideResNet: it must say which).
    - Missing BatchNorm ``num_batches_tracked`` counters (old checkpoints) keep the model's.
    Raises :class:`CheckpointError` (one line) listing up to 5 missing, 5 unexpected and
    5 mis-shaped keys, with the reason where the layout is a known foreign one.
    """
    implied = implied_stats(normalization, dataset, name, source=source)
    own = model.state_dict()
    sd = dict(state_dict)
    for foreign, ours in _FOREIGN_STATS.items():
        if foreign in sd and ours not in sd and ours in own and foreign not in own:
            sd[ours] = sd.pop(foreign)
    dropped = [k for k in sd if k.startswith(_UNUSED_PREFIXES) and k not in own]
    for k in dropped:
        del sd[k]
    stats = ("normalize.mean", "normalize.std")
    stored = [k for k in stats if k in own and k in sd]
    if dropped and not stored and normalization == "dataset":
        raise CheckpointError(
            f"{source}: a WideResNet with sub_block1 (the RiFT reference code's or a RobustBench "
            "layout) stores no input normalization; set adv_train.checkpoint_normalization to "
            "rift_reference or robustbench"
        )
    if normalization == "rift_reference" and stored and implied is not None:
        for k, want in zip(stats, implied):
            got = sd[k].detach().flatten().float()
            if got.numel() != len(want) or not torch.allclose(got, torch.tensor(want), atol=1e-4):
                raise CheckpointError(
                    f"{source}: the file stores input normalization {k.split('.')[1]} "
                    f"{_fmt(got.tolist())}, but checkpoint_normalization rift_reference means "
                    f"{_fmt(want)} for {dataset}: not a RiFT reference checkpoint"
                )
    for key, value in own.items():
        if key in stats and key not in sd:
            if implied is None:
                sd[key] = value
            else:
                want = implied[stats.index(key)]
                sd[key] = torch.tensor(want, dtype=value.dtype).reshape(-1, 1, 1).unsqueeze(0)
                if sd[key].numel() != value.numel():
                    raise CheckpointError(
                        f"{source}: checkpoint_normalization {normalization} gives "
                        f"{len(want)} channels, the model has {value.numel()}"
                    )
        elif key not in sd and key.endswith("num_batches_tracked"):
            sd[key] = value
        if key in stats and sd[key].numel() == value.numel():
            sd[key] = sd[key].reshape(value.shape).to(value.dtype)
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
        raise CheckpointError(
            f"{source}: state dict does not match the model: "
            + "; ".join(parts)
            + _mismatch_hint(own, sd, missing)
        )
    model.load_state_dict(sd, strict=True)


def find_checkpoint(path: str | os.PathLike[str], dataset: str | None = None) -> Path | None:
    """The file ``path`` names: itself, or, where ``path`` is RobustBench's ``model_dir/name``
    (no such file), ``model_dir/<dataset>/<threat model>/<name>.pt`` as ``robustbench``
    stores it, for the one threat model (Linf, L2, corruptions) that has it; None when
    neither exists. Raises :class:`CheckpointError` when several threat models have it."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not dataset or p.suffix == ".pt":
        return None
    found = [
        c
        for tm in ROBUSTBENCH_THREAT_MODELS
        if (c := p.parent / dataset / tm / f"{p.name}.pt").is_file()
    ]
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: RobustBench model {p.name} is stored for several threat models "
            f"({', '.join(c.parent.name for c in found)}); give the .pt file's path"
        )
    return found[0] if found else None


def fit_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    normalization: str = "dataset",
) -> dict[str, Any]:
    """Load the robust model at ``path`` into ``model``: :func:`find_checkpoint`, then
    :func:`load_checkpoint`, then :func:`load_into_model` with the file's stem as the
    RobustBench model name. ``dataset``: the sweep's dataset name (``cifar100``...).
    Returns the file's metadata, with ``path`` (the file read) and ``input_mean``/
    ``input_std`` (the normalization the model now applies). Raises :class:`CheckpointError`.
    """
    file = find_checkpoint(path, dataset)
    if file is None:
        where = ""
        if dataset and Path(path).suffix != ".pt":
            p, tms = Path(path), ",".join(ROBUSTBENCH_THREAT_MODELS)
            where = f" (nor a RobustBench model {p.parent}/{dataset}/{{{tms}}}/{p.name}.pt)"
        raise CheckpointError(f"{path}: no such checkpoint file{where}")
    state, meta = load_checkpoint(file)
    load_into_model(
        model,
        state,
        source=str(path),
        normalization=normalization,
        dataset=dataset,
        name=file.stem,
    )
    norm = getattr(model, "normalize", None)
    meta = dict(meta, path=str(file))
    if norm is not None:
        meta["input_mean"] = [float(v) for v in norm.mean.flatten()]
        meta["input_std"] = [float(v) for v in norm.std.flatten()]
    return meta
