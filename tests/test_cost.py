"""The dry-run's cost estimate: counted FLOPs, pass counts per stage, the GPU arithmetic, the
flags, and the estimate stored with a sweep (no Ray, no data, CPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rift_ray.cli import main
from rift_ray.config import load_config
from rift_ray.cost import (
    GPUS,
    ModelFlops,
    Sizes,
    autoattack_passes,
    cost_rows,
    estimate_record,
    halving_epochs,
    interpolation_flops,
    meta_model_flops,
    model_flops,
    pgd_eval,
    report_rows,
    stage_flops,
    stage_gpus,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE, WRN = str(ROOT / "sweeps/smoke.yaml"), str(ROOT / "sweeps/wrn.yaml")
SIZES = Sizes(train=1000, val=200, test=300)
MF = ModelFlops(1e6, {"a": 1.0, "b": 0.5})


def test_linear_flops_are_two_in_out_per_image() -> None:
    mf = model_flops(nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False)), (3, 2, 2))
    assert mf.forward == 2 * 12 * 5


def test_conv_flops_on_the_meta_device_match_the_hand_count() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    assert model_flops(net, (3, 16, 16)).forward == 2 * 3 * 8 * 9 * 16 * 16


def test_wrn_is_counted_on_meta_in_a_blink() -> None:
    t0 = time.perf_counter()
    mf = meta_model_flops(load_config(WRN), 10, (3, 32, 32), ["conv1", "fc"])
    assert time.perf_counter() - t0 < 5
    assert mf.forward == pytest.approx(13.32e9, rel=1e-3)  # WRN-34-10: 6.66 GMAC
    assert mf.tails["conv1"] == 1.0 and 0 < mf.tails["fc"] < 1e-3


def test_successive_halving_expected_trial_epochs() -> None:
    assert halving_epochs(4, 10, 3, 2) == (4 * 3 + 2 * 3 + 1 * 4, 1)  # rungs 3, 6
    assert halving_epochs(3, 4, 1, 2) == (3 * 1 + 1 * 1 + 1 * 2, 1)  # rungs 1, 2
    assert halving_epochs(5, 2, 2, 2) == (10, 5)  # grace = epochs: no rung
    assert halving_epochs(9, 9, 1, 3) == (9 * 1 + 3 * 2 + 1 * 6, 1)  # rungs 1, 3


def test_stage_counts_scale_with_epochs_steps_and_images() -> None:
    cfg = load_config(SMOKE)
    base = stage_flops(cfg, SIZES, MF)
    twice = stage_flops(load_config(SMOKE, ["adv_train.epochs=8"]), SIZES, MF)
    assert twice["adv_train"] == pytest.approx(2 * base["adv_train"])
    assert {k: twice[k] for k in base if k != "adv_train"} == {
        k: v for k, v in base.items() if k != "adv_train"
    }
    # PGD-5 AT on 1,000 train images (2k+3 F) and PGD-5 on 200 validation images per epoch
    assert base["adv_train"] == pytest.approx(4 * (1000 * 13 + 200 * pgd_eval(5, 1)) * 1e6)
    assert pgd_eval(10, 3) == 2 + 60 + 3 and pgd_eval(10, 1) == 22
    more = stage_flops(cfg, Sizes(2000, 200, 300), MF)
    assert more["mrc"] == base["mrc"] and more["finetune"] > base["finetune"]
    assert (
        stage_flops(load_config(SMOKE, ["adv_train.checkpoint=x.pt"]), SIZES, MF)["adv_train"] == 0
    )
    seeds = stage_flops(load_config(SMOKE, ["seeds=[0,1,2]"]), SIZES, MF)
    assert seeds["adv_train"] == base["adv_train"]
    for k in ("mrc", "finetune", "interpolate"):
        assert seeds[k] == pytest.approx(3 * base[k])


def test_stage_four_counts_validation_and_test_points_separately() -> None:
    cfg = load_config(SMOKE)
    f = 1.0
    val_only = interpolation_flops(cfg, f, SIZES, 2, 10, 0)
    both = interpolation_flops(cfg, f, SIZES, 2, 10, 10)
    per_point = 300 * pgd_eval(5, 1)  # a test point: PGD-5 on 300 images
    assert both - val_only == pytest.approx(2 * 10 * per_point)
    # the default (clean_first): PGD at half the grid's 10 alphas on validation, clean
    # accuracy at all 10, test at alpha* only, for the one surviving trial
    assert stage_flops(cfg, SIZES, ModelFlops(f, {}))["interpolate"] == pytest.approx(
        interpolation_flops(cfg, f, SIZES, 1, 5, 1)
    )
    grid = load_config(SMOKE, ["interpolate.search=grid", "interpolate.test_curve=true"])
    assert stage_flops(grid, SIZES, ModelFlops(f, {}))["interpolate"] == pytest.approx(
        interpolation_flops(grid, f, SIZES, 1, 10, 10)
    )
    clean = interpolation_flops(cfg, f, SIZES, 1, 5, 1) - interpolation_flops(
        load_config(SMOKE, ["interpolate.search=grid"]), f, SIZES, 1, 5, 1
    )
    assert clean == pytest.approx(10 * 200)  # a clean forward of the 200 val images per alpha


def test_autoattack_counts_the_attacked_models_and_images() -> None:
    on = ["eval.autoattack.enabled=true", "eval.autoattack.subset=100"]
    flops = stage_flops(load_config(SMOKE, on), SIZES, MF)["autoattack"]
    assert flops == pytest.approx(2 * 100 * autoattack_passes() * 1e6)  # AT and alpha*
    assert 4000 < autoattack_passes() < 6000


def test_gpu_hours_wall_hours_and_dollars() -> None:
    h100 = GPUS["h100"]
    rows = cost_rows({"adv_train": 1e18}, {"adv_train": 4}, h100, "none", 0.5, price=2.0)
    hours = 1e18 / (494.5e12 * 0.5) / 3600
    assert rows[0]["gpu_hours"] == pytest.approx(hours)
    assert rows[0]["wall_hours"] == pytest.approx(hours / 4)
    assert rows[0]["dollars"] == pytest.approx(2 * hours) and rows[0]["pflop"] == 1000
    bf16 = cost_rows({"mrc": 1e18}, {"mrc": 1}, h100, "bf16", 0.5)[0]
    assert bf16["gpu_hours"] == pytest.approx(1e18 / (989e12 * 0.5) / 3600)
    assert "dollars" not in bf16


def test_stage_gpus_follow_the_resources() -> None:
    cfg = load_config(WRN)
    g = stage_gpus(cfg, 4, 35, 10000)
    assert g["adv_train"] == 4 and g["mrc"] == 4  # 35 trials x 0.25, capped by 4 GPUs
    assert g["finetune"] == 2  # 4 trials x 0.5
    assert stage_gpus(cfg, 64, 35, 10000)["mrc"] == 35 * 0.25


def _dry(args: list[str], tmp_path: Path) -> list[str]:
    return ["sweep", SMOKE, "--dry-run", "--storage", str(tmp_path), *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "v100"], "--gpu: unknown card 'v100'; choose one of a10g, l4, a100, h100, h200"),
        (["--price", "-1"], "--price: must be >= 0"),
        (["--utilisation", "1.5"], "--utilisation: must be in (0, 1]"),
    ],
)
def test_bad_cost_flags_are_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_dry(args, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rift-ray: error: {message}"), err


def test_cost_flags_need_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", SMOKE, "--gpu", "h100"]) == 2
    assert "--gpu: only with --dry-run" in capsys.readouterr().err


def test_wrn_dry_run_prices_the_plan_without_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No CIFAR-10, no AutoAttack here: the plan and its cost come from the config's published
    sizes, and the check's error still ends the command (exit 2, one line)."""
    t0 = time.perf_counter()
    args = ["sweep", WRN, "--dry-run", "--storage", str(tmp_path), "--gpu", "a100", "--price",
            "2.5", "--gpus", "8", "--set", f"data.root={tmp_path}", "--set", "data.download=false"]  # fmt: skip
    assert main(args) == 2
    assert time.perf_counter() - t0 < 15
    cap = capsys.readouterr()
    out = cap.out
    assert "train 45000 / val 5000 / test 10000" in out and "sizes from the config" in out
    assert "cost on NVIDIA A100 SXM 80GB (--gpu): 156 TFLOP/s dense TF32" in out
    assert "8 GPU(s) (--gpus)" in out and "renting 8 GPUs for the wall time" in out
    assert "fine-tuning 22 of 40 trial-epochs" in out and "4 autoattack" in out
    assert len(cap.err.strip().splitlines()) == 1


def test_smoke_dry_run_names_the_default_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_dry([], tmp_path)) == 0
    out = capsys.readouterr().out
    assert "cost on NVIDIA H100 SXM (default card; --gpu a10g|l4|a100|h100|h200)" in out
    assert "autoattack" not in out and "TFLOP" in out and "to run" in out


def test_estimate_is_stored_once_and_reported_next_to_the_seconds(tmp_path: Path) -> None:
    from rift_ray.pipeline import write_estimate
    from rift_ray.store import ESTIMATE, Store

    cfg = load_config(WRN, ["eval.autoattack.enabled=true"])
    est = estimate_record(cfg, Sizes(45000, 5000, 10000), MF, 4, 35)
    store = Store.open(str(tmp_path), "s")
    write_estimate(store, est)
    before = (tmp_path / "s" / ESTIMATE).stat().st_mtime_ns
    time.sleep(0.01)
    write_estimate(store, json.loads(json.dumps(est)))
    assert (tmp_path / "s" / ESTIMATE).stat().st_mtime_ns == before  # unchanged: not rewritten
    rows = report_rows(est, {"adv_train": 3600.0})
    assert [r["stage"] for r in rows] == [
        "adv_train", "mrc", "finetune", "interpolate (+ AutoAttack)"
    ]  # fmt: skip
    at = est["stages"]["adv_train"]["flops"]
    assert rows[0]["achieved TFLOP/s"] == pytest.approx(at / 3600 / 1e12, rel=5e-3)
    assert rows[1]["measured s"] is None
