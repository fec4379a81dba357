"""Foreign robust models: the RiFT reference code's and RobustBench's files, their key layouts
and the input normalization each source used (finding F5, issue 14).

State dicts are built from our own (small) models, then renamed, prefixed and wrapped the way
those sources store them: the reference code saves ``{"model": DataParallel state dict,
"acc", "epoch"}`` with no normalization and (WideResNet) an unused ``sub_block1``; RobustBench
stores ``<model_dir>/<dataset>/<threat model>/<name>.pt``, often ``{"state_dict": ...}`` with
``module.`` keys, some with ``mu``/``sigma`` buffers, Kireev2021Effectiveness under ``last``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rift_ray.checkpoint import (
    CIFAR10_STATS,
    IMAGENET_STATS,
    RAW_STATS,
    ROBUSTBENCH_STATS,
    CheckpointError,
    Stats,
    fit_checkpoint,
    implied_stats,
    load_into_model,
)
from rift_ray.data import _STATS as DATASET_STATS
from rift_ray.models import PreActResNet, ResNet, WideResNet

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def resnet(num_classes: int = 10, stats: Stats = ((0.5,) * 3, (0.5,) * 3), seed: int = 0) -> ResNet:
    """ResNet18's layout (names of the reference code and RobustBench's ResNet), small widths."""
    torch.manual_seed(seed)
    return ResNet((2, 2, 2, 2), num_classes, widths=(8, 16, 32, 64), mean=stats[0], std=stats[1])


def wrn(stats: Stats = ((0.5,) * 3, (0.5,) * 3), seed: int = 0) -> WideResNet:
    torch.manual_seed(seed)
    return WideResNet(10, 10, 2, mean=stats[0], std=stats[1])


def preact(stats: Stats = ((0.5,) * 3, (0.5,) * 3), seed: int = 0) -> PreActResNet:
    torch.manual_seed(seed)
    return PreActResNet((1, 1, 1, 1), 10, base_width=8, mean=stats[0], std=stats[1])


def bare(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as foreign code holds them: no normalization inside the model."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}


def with_sub_block1(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the second first-stage WideResNet of the reference / RobustBench code (never called)."""
    extra = {
        "sub_block1." + k[len("block1.") :]: v + 1 for k, v in sd.items() if k.startswith("block1.")
    }
    return {**sd, **extra}


def prefixed(sd: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def stats_of(model: nn.Module) -> tuple[list[float], list[float]]:
    n = model.normalize  # type: ignore[union-attr]
    return n.mean.flatten().tolist(), n.std.flatten().tolist()


def assert_loaded(model: nn.Module, source: nn.Module, expected: Stats) -> None:
    """``model`` holds ``source``'s weights and normalizes with ``expected``: its buffers say so,
    and its logits equal those of ``source`` rebuilt with ``expected``."""
    mean, std = stats_of(model)
    assert mean == pytest.approx(expected[0], abs=1e-7) and std == pytest.approx(
        expected[1], abs=1e-7
    )
    source.normalize.mean.copy_(torch.tensor(expected[0]).view(1, 3, 1, 1))  # type: ignore[union-attr]
    source.normalize.std.copy_(torch.tensor(expected[1]).view(1, 3, 1, 1))  # type: ignore[union-attr]
    model.eval(), source.eval()
    with torch.no_grad():
        assert torch.allclose(model(X), source(X), atol=1e-6)


def one_line_error(excinfo: pytest.ExceptionInfo[CheckpointError]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---- the RiFT reference code (microsoft/robustlearn RiFT/) --------------------------------


def save_reference(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """As RiFT/main.py saves: DataParallel keys under "model", with acc and epoch."""
    torch.save({"model": prefixed(sd), "acc": 57.1, "epoch": 9}, path)
    return path


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("cifar10", CIFAR10_STATS), ("cifar100", CIFAR10_STATS), ("tinyimagenet", IMAGENET_STATS)],
)
def test_rift_reference_resnet_uses_the_reference_statistics(
    tmp_path: Path, dataset: str, expected: Stats
) -> None:
    source = resnet(100, seed=1)
    path = save_reference(tmp_path / "ResNet18_CIFAR100.pth", bare(source))
    model = resnet(100, DATASET_STATS[dataset])
    meta = fit_checkpoint(model, path, dataset=dataset, normalization="rift_reference")
    assert_loaded(model, source, expected)
    assert meta["acc"] == 57.1 and meta["wrapper_key"] == "model"
    assert meta["input_mean"] == pytest.approx(list(expected[0]))


def test_dataset_normalization_shifts_reference_cifar100_inputs(tmp_path: Path) -> None:
    # finding F5: `dataset` gives CIFAR-100's own statistics, not the CIFAR-10 ones it trained on
    source = resnet(100, seed=1)
    path = save_reference(tmp_path / "r18.pth", bare(source))
    model = resnet(100, DATASET_STATS["cifar100"])
    fit_checkpoint(model, path, dataset="cifar100", normalization="dataset")
    assert stats_of(model)[0] == pytest.approx(list(DATASET_STATS["cifar100"][0]))
    assert DATASET_STATS["cifar100"] != CIFAR10_STATS


def test_rift_reference_wrn_drops_sub_block1(tmp_path: Path) -> None:
    source = wrn(seed=2)
    path = save_reference(tmp_path / "WRN34_CIFAR100.pth", with_sub_block1(bare(source)))
    model = wrn(DATASET_STATS["cifar100"])
    fit_checkpoint(model, path, dataset="cifar100", normalization="rift_reference")
    assert_loaded(model, source, CIFAR10_STATS)
    assert not any(k.startswith("sub_block1.") for k in model.state_dict())


def test_sub_block1_without_a_named_source_is_an_error(tmp_path: Path) -> None:
    path = save_reference(tmp_path / "wrn.pth", with_sub_block1(bare(wrn())))
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(wrn(), path, dataset="cifar10", normalization="dataset")
    msg = one_line_error(e)
    assert "sub_block1" in msg and "rift_reference or robustbench" in msg


def test_reference_tinyimagenet_classifier_is_explained(tmp_path: Path) -> None:
    # the reference code's 64x64 models pool to 2x2: the classifier takes 4 x 64 features here
    sd = bare(resnet(200))
    sd["linear.weight"] = torch.zeros(200, 4 * 64)
    path = save_reference(tmp_path / "ResNet18_TinyImageNet.pth", sd)
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(resnet(200), path, dataset="tinyimagenet", normalization="rift_reference")
    msg = one_line_error(e)
    assert "shape mismatch 1: linear.weight (200, 256) vs (200, 64)" in msg and "2x2" in msg


def test_rift_reference_contradicted_by_stored_statistics(tmp_path: Path) -> None:
    source = resnet(seed=1, stats=DATASET_STATS["cifar100"])  # stores normalize.mean/std
    path = tmp_path / "ours.pt"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(resnet(), path, dataset="cifar100", normalization="rift_reference")
    msg = one_line_error(e)
    assert "stores input normalization mean (0.5071" in msg and "not a RiFT reference" in msg


def test_rift_reference_needs_a_reference_dataset() -> None:
    with pytest.raises(CheckpointError, match="trains cifar10, cifar100, tinyimagenet only"):
        load_into_model(
            resnet(), bare(resnet()), normalization="rift_reference", dataset="synthetic"
        )


# ---- RobustBench (models/<dataset>/<threat model>/<name>.pt) -------------------------------


def rb_file(root: Path, dataset: str, name: str, obj: object, threat: str = "Linf") -> Path:
    path = root / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_robustbench_wrn_from_model_dir_and_name(tmp_path: Path) -> None:
    # Carmon2019Unlabeled: WideResNet(sub_block1=True), {"state_dict": module.*}, [0, 1] inputs
    source = wrn(seed=3)
    rb_file(
        tmp_path,
        "cifar10",
        "Carmon2019Unlabeled",
        {"state_dict": prefixed(with_sub_block1(bare(source)))},
    )
    model = wrn(DATASET_STATS["cifar10"])
    meta = fit_checkpoint(
        model, tmp_path / "Carmon2019Unlabeled", dataset="cifar10", normalization="robustbench"
    )
    assert meta["path"] == str(tmp_path / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt")
    assert_loaded(model, source, RAW_STATS)


def test_robustbench_normalization_in_model_code(tmp_path: Path) -> None:
    # Chen2020Efficient (CIFAR-100): "model." keys, mu/sigma only in RobustBench's class
    source = wrn(seed=4)
    path = rb_file(
        tmp_path,
        "cifar100",
        "Chen2020Efficient",
        {"state_dict": prefixed(with_sub_block1(bare(source)), "model.")},
    )
    model = wrn(DATASET_STATS["cifar100"])
    fit_checkpoint(model, path, dataset="cifar100", normalization="robustbench")
    assert_loaded(model, source, ROBUSTBENCH_STATS[("cifar100", "Chen2020Efficient")])


def test_robustbench_mu_sigma_in_the_file_win(tmp_path: Path) -> None:
    stored = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    source = wrn(seed=5)
    sd = bare(source) | {
        "mu": torch.tensor(stored[0]).view(1, 3, 1, 1),
        "sigma": torch.tensor(stored[1]).view(1, 3, 1, 1),
    }
    path = rb_file(tmp_path, "cifar10", "Someone2024Model", prefixed(sd))
    model = wrn(DATASET_STATS["cifar10"])
    fit_checkpoint(model, path, dataset="cifar10", normalization="robustbench")
    assert_loaded(model, source, stored)
    with pytest.raises(CheckpointError) as e:  # the setting contradicts the file
        fit_checkpoint(wrn(), path, dataset="cifar10", normalization="rift_reference")
    assert "stores input normalization mean (0.1, 0.2, 0.3)" in one_line_error(e)


def test_robustbench_resnet18_and_preact_last(tmp_path: Path) -> None:
    source = resnet(seed=6)  # Sehwag2021Proxy_R18: a plain ResNet18 state dict
    path = rb_file(tmp_path, "cifar10", "Sehwag2021Proxy_R18", bare(source))
    model = resnet(stats=DATASET_STATS["cifar10"])
    fit_checkpoint(model, path, dataset="cifar10", normalization="robustbench")
    assert_loaded(model, source, RAW_STATS)

    source = preact(seed=7)  # Kireev2021Effectiveness: PreActBlockV2 + bn_before_fc, under "last"
    name = "Kireev2021Effectiveness_RLAT"
    other = {k: torch.zeros_like(v) for k, v in bare(source).items()}
    rb_file(tmp_path, "cifar10", name, {"last": bare(source), "best": other}, "corruptions")
    model = preact()
    fit_checkpoint(model, tmp_path / name, dataset="cifar10", normalization="robustbench")
    assert_loaded(model, source, CIFAR10_STATS)


def test_robustbench_preact_without_final_bn_is_explained(tmp_path: Path) -> None:
    sd = {k: v for k, v in bare(preact()).items() if not k.startswith("bn.")}  # Wong2020Fast
    path = rb_file(tmp_path, "cifar10", "Wong2020Fast", {"state_dict": prefixed(sd)})
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(preact(), path, dataset="cifar10", normalization="robustbench")
    msg = one_line_error(e)
    assert "missing 4: bn.weight, bn.bias" in msg and "bn_before_fc" in msg


def test_robustbench_lookup_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(
            wrn(), tmp_path / "Nobody2020", dataset="cifar10", normalization="robustbench"
        )
    assert "no such checkpoint file (nor a RobustBench model" in one_line_error(e)
    for threat in ("Linf", "L2"):
        rb_file(tmp_path, "cifar10", "Twice2021", bare(wrn()), threat)
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(
            wrn(), tmp_path / "Twice2021", dataset="cifar10", normalization="robustbench"
        )
    assert "several threat models (Linf, L2)" in one_line_error(e)
    with pytest.raises(CheckpointError, match="own mean/std"):
        implied_stats("robustbench", "cifar10", "Ding2020MMA")


def test_unknown_layout_names_the_keys(tmp_path: Path) -> None:
    sd = {k.replace("block", "stage"): v for k, v in bare(wrn()).items()}
    path = tmp_path / "other.pt"
    torch.save({"net": sd}, path)
    with pytest.raises(CheckpointError) as e:
        fit_checkpoint(wrn(), path, dataset="cifar10", normalization="none")
    msg = one_line_error(e)
    assert msg.startswith(f"{path}: state dict does not match the model: missing ")
    assert "block1.layer.0.bn1.weight" in msg and "unexpected " in msg and "stage1.layer.0" in msg
    assert "more)" in msg
