"""The checkpoint format: round trips, foreign state dicts, refusal of unsafe or broken files."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from rift_ray.checkpoint import CheckpointError, load_checkpoint, load_into_model, save_checkpoint


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TinyNet(nn.Module):
    """Images in [0, 1] -> logits; normalization is the submodule ``normalize`` as in build_model."""

    def __init__(self, seed: int = 0, mean: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.normalize = Normalize([mean] * 3, [0.25] * 3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(self.normalize(x))).flatten(1))


def tiny_model(seed: int = 0, mean: float = 0.5) -> TinyNet:
    return TinyNet(seed, mean)


META = dict(
    arch="tiny", num_classes=2, dataset="synthetic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_path(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "sub" / "at.pt"
    save_checkpoint(path, model.state_dict(), **META, config_hash="abc", extra={"epoch": 3})
    state, meta = load_checkpoint(path)
    assert same(state, model.state_dict())
    assert meta["arch"] == "tiny" and meta["num_classes"] == 2 and meta["mean"] == [0.5] * 3
    assert meta["config_hash"] == "abc" and meta["extra"] == {"epoch": 3}
    assert meta["rift_ray_version"] and meta["torch_version"] == torch.__version__
    other = tiny_model(seed=1)
    load_into_model(other, state)
    assert same(other.state_dict(), model.state_dict())
    assert os.listdir(path.parent) == ["at.pt"]  # the temp file was renamed, none left over


def test_round_trip_file_object() -> None:
    buf = io.BytesIO()
    save_checkpoint(buf, tiny_model().state_dict(), **META)
    buf.seek(0)
    state, meta = load_checkpoint(buf)
    assert same(state, tiny_model().state_dict()) and meta["dataset"] == "synthetic"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "net", "model", "model_state_dict"])
def test_foreign_wrappers_and_prefixes(tmp_path: Path, wrap: str) -> None:
    sd = tiny_model().state_dict()
    prefixed = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    obj = prefixed if wrap == "plain" else {wrap: prefixed, "epoch": 7}
    torch.save(obj, tmp_path / "foreign.pt")
    state, meta = load_checkpoint(tmp_path / "foreign.pt")
    assert same(state, sd)
    assert meta["format"] == "foreign"
    if wrap != "plain":
        assert meta["epoch"] == 7 and meta["wrapper_key"] == wrap


@pytest.mark.parametrize(
    "content",
    [None, b"", b"not a torch file at all", "truncated"],
    ids=["missing", "empty", "garbage", "truncated"],
)
def test_unreadable_files_raise_checkpoint_error(
    tmp_path: Path, content: bytes | str | None
) -> None:
    path = tmp_path / "x.pt"
    if content == "truncated":
        save_checkpoint(path, tiny_model().state_dict(), **META)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


class _WritesMarker:
    """Unpickling this (without weights_only) would create a file: code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for name, blob in {
        "zip.pt": None,
        "raw.pt": pickle.dumps({"state_dict": {"w": _WritesMarker(str(marker))}}, protocol=2),
    }.items():
        path = tmp_path / name
        if blob is None:
            torch.save({"state_dict": {"w": _WritesMarker(str(marker))}}, path)
        else:
            path.write_bytes(blob)
        with pytest.raises(CheckpointError, match="refused.*weights-only"):
            load_checkpoint(path)
        assert not marker.exists()


def test_load_into_model_keeps_normalization_when_absent() -> None:
    # a foreign network that normalized outside itself has no mean/std in its state dict
    sd = {
        k: v
        for k, v in tiny_model(seed=1, mean=0.3).state_dict().items()
        if not k.startswith("normalize.")
    }
    model = tiny_model(seed=2, mean=0.4)
    load_into_model(model, sd)
    assert torch.allclose(model.normalize.mean, torch.full((1, 3, 1, 1), 0.4))
    assert torch.equal(model.conv.weight, sd["conv.weight"])


def test_load_into_model_raw_input_network() -> None:
    # TRADES/MART-style code feeds [0, 1] images straight into the network
    foreign = tiny_model(seed=1, mean=0.0)
    foreign.normalize.std.fill_(1.0)
    sd = {k: v for k, v in foreign.state_dict().items() if not k.startswith("normalize.")}
    model = tiny_model(seed=2, mean=0.4)
    load_into_model(model, sd, normalization="none")
    assert torch.equal(model.normalize.mean, torch.zeros(1, 3, 1, 1))
    assert torch.equal(model.normalize.std, torch.ones(1, 3, 1, 1))
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), foreign.eval()(x))
    # explicit normalization keys in the checkpoint win over the setting
    model = tiny_model(seed=2, mean=0.4)
    load_into_model(model, tiny_model(seed=1, mean=0.3).state_dict(), normalization="none")
    assert torch.allclose(model.normalize.mean, torch.full((1, 3, 1, 1), 0.3))
    with pytest.raises(ValueError, match="normalization"):
        load_into_model(model, sd, normalization="imagenet")


@pytest.mark.parametrize("prefix", ["normalizer.", "norm."])
def test_load_into_model_maps_foreign_normalizer_names(prefix: str) -> None:
    sd = {
        k.replace("normalize.", prefix): v
        for k, v in tiny_model(seed=1, mean=0.3).state_dict().items()
    }
    sd[f"{prefix}mean"] = sd[f"{prefix}mean"].flatten()  # shape [3] instead of [1,3,1,1]
    model = tiny_model(seed=2, mean=0.5)
    load_into_model(model, sd)
    assert torch.allclose(model.normalize.mean, torch.full((1, 3, 1, 1), 0.3))


def test_load_into_model_reports_mismatches_in_one_line() -> None:
    sd = tiny_model().state_dict()
    sd.pop("conv.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["fc.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        load_into_model(tiny_model(), sd, source="at.pt")
    msg = str(e.value)
    assert msg.startswith("at.pt:") and "\n" not in msg
    assert "conv.weight" in msg and "extra.weight" in msg and "fc.bias" in msg


def test_missing_bn_counters_are_filled() -> None:
    sd = {
        k: v
        for k, v in tiny_model(seed=1).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    model = tiny_model()
    load_into_model(model, sd)
    assert torch.equal(model.bn.weight, sd["bn.weight"]) and torch.equal(
        model.conv.weight, sd["conv.weight"]
    )
