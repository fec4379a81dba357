"""Issue 21 without Ray: per-image rows as stage 4 stores them, the paired changes and the
lines a summary prints about its noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rift_ray.config import load_config
from rift_ray.paired import noise_lines, noise_warning
from rift_ray.plan import alpha_rule_line
from rift_ray.rift.confidence import paired_interval
from rift_ray.stages.per_image import (
    AT_TRIAL,
    alpha_choice,
    images_of,
    paired_changes,
    split_per_image,
)


def _row(split: str, alpha: float, clean: list[bool], robust: list[bool], corr=None) -> dict:
    c, r = torch.tensor(clean), torch.tensor(robust)
    row = {"alpha": alpha, "split": split, "n": len(clean), "clean_acc": 100 * sum(clean) / len(clean),
           "robust_acc": 100 * sum(robust) / len(robust), "clean_correct": c, "robust_correct": r,
           "corruption_correct": None if corr is None else torch.tensor(corr)}  # fmt: skip
    return row


def test_per_image_rows_round_trip_and_leave_the_table_rows_plain() -> None:
    rng = np.random.default_rng(0)
    clean, robust = (rng.random(1001) < 0.6).tolist(), (rng.random(1001) < 0.3).tolist()
    corr = rng.random(1001).astype(np.float32).tolist()
    plain, images = split_per_image([_row("test", 0.5, clean, robust, corr)], "t1")
    assert "clean_correct" not in plain[0] and plain[0]["clean_acc"] == pytest.approx(
        100 * np.mean(clean)
    )
    back = images_of(images[0])
    assert back["clean"].tolist() == clean and back["robust"].tolist() == robust
    assert np.allclose(back["corruption"], corr)
    assert (images[0]["trial"], images[0]["alpha"], images[0]["n"]) == ("t1", 0.5, 1001)
    assert len(images[0]["clean_bits"]) == 126  # ceil(1001 / 8)


def test_paired_changes_are_the_final_model_minus_at_on_the_same_images() -> None:
    n = 1000
    at_c = [i % 2 == 0 for i in range(n)]
    at_r = [i % 4 == 0 for i in range(n)]
    rift_c = [v or i % 10 == 1 for i, v in enumerate(at_c)]  # +100 images clean
    rift_r = [v and i % 100 != 0 for i, v in enumerate(at_r)]  # -10 images robust
    rows = split_per_image([_row("test", 0.0, at_c, at_r), _row("val", 0.0, at_c, at_r)], AT_TRIAL)[
        1
    ]
    rows += split_per_image(
        [_row("test", 0.4, rift_c, rift_r), _row("val", 0.4, rift_c, rift_r)], "w"
    )[1]
    out = paired_changes(rows, "w", 0.4)
    assert out["test"]["clean_acc"]["diff"] == pytest.approx(10.0)
    assert out["test"]["robust_acc"]["diff"] == pytest.approx(-1.0)
    lo, hi = out["test"]["robust_acc"]["lo"], out["test"]["robust_acc"]["hi"]
    iv = paired_interval(np.array(at_r), np.array(rift_r))
    assert (lo, hi) == (iv.lo, iv.hi) and hi < 0  # ten images all one way: resolved
    assert "bootstrap" in out["method"]
    at_only = paired_changes(rows, "w", 0.0)  # alpha* = 0: the AT model itself
    assert at_only["test"]["clean_acc"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": n}


def test_confident_choice_keeps_at_where_the_paper_rule_takes_a_lucky_alpha() -> None:
    """At 1,000 images a drop of 0.1 measured as 30 images worse and 29 better is noise."""
    n = 1000
    at_c, at_r = [i < 500 for i in range(n)], [i < 300 for i in range(n)]
    lucky_c = [i < 520 for i in range(n)]  # +2.0 clean
    lucky_r = [(i < 300 and i >= 30) or 300 <= i < 329 for i in range(n)]  # -30 +29
    val = [_row("val", 0.0, at_c, at_r), _row("val", 0.6, lucky_c, lucky_r)]
    plain, images = split_per_image(val, "t")
    by_alpha = {r["alpha"]: images_of(r) for r in images}
    paper = alpha_choice("t", plain, 0.1, "paper")
    sure = alpha_choice("t", plain, 0.1, "confident", by_alpha)
    assert paper["alpha"] == 0.6 and paper["robust_drop"] == pytest.approx(0.1)
    assert sure["alpha"] == 0.0 and "confident" in sure["reason"]


def test_noise_lines_warn_below_the_floor_and_report_the_confirmation() -> None:
    s = {
        "rule": "paper",
        "paired": {"method": "paired bootstrap over images, 2000 resamples, percentile 95%",
                   "test": {"clean_acc": {"diff": 0.32, "lo": -0.05, "hi": 0.7, "n": 2000},
                            "robust_acc": {"diff": -0.63, "lo": -1.1, "hi": -0.2, "n": 2000}}},
        "noise_floor": {"val_n": 1000, "robust_drop": 0.6, "tolerance": 0.1},
        "confirmation": {"confirmed": False, "alpha": 0.3, "n": 500, "reason": "drop above",
                         "clean_gain": {"diff": 0.2, "lo": -0.4, "hi": 0.8},
                         "robust_drop": {"diff": 1.0, "lo": 0.4, "hi": 1.6}},
    }  # fmt: skip
    lines = noise_lines(s)
    assert lines[0] == "alpha* rule: paper"
    assert "RiFT - AT on test" in lines[1] and "clean +0.32 [-0.05, +0.70]" in lines[1]
    assert "PGD -0.63 [-1.10, -0.20]" in lines[1] and "n=2,000" in lines[1]
    assert "tolerance 0.1 is below the validation noise floor 0.60" in lines[2]
    assert lines[3] == "alpha* 0.3 NOT confirmed on 500 held-out validation images: drop above"
    s["noise_floor"]["tolerance"] = 1.0
    assert noise_warning(s) is None


def test_dry_run_line_names_the_floor_of_the_selection_images() -> None:
    cfg = load_config(None, ["eval.val_subset=1000", "interpolate.confirm_size=500"])
    line = alpha_rule_line(cfg, 5000)
    assert "tolerance 0.1 points on 1,000 validation images, 500 more held out" in line
    assert "noise floor 0.60 points" in line and "the tolerance is below it" in line
    assert "noise floor 0.12" in alpha_rule_line(load_config(None, []), 5000)


def test_the_report_shows_the_paired_lines() -> None:
    from rift_ray.report import _headline_html

    s = {
        "modules": ["layer2.1.conv2"], "lr": 0.01, "alpha": 0.3, "reason": "alpha=0.3: ...",
        "at": {"val": {"clean_acc": 80.0, "robust_acc": 50.0}, "test": {"clean_acc": 79.0}},
        "rift": {"val": {"clean_acc": 81.0, "robust_acc": 49.95}, "test": {"clean_acc": 80.0}},
        "rule": "confident",
        "paired": {"method": "paired bootstrap", "test": {
            "clean_acc": {"diff": 1.0, "lo": 0.4, "hi": 1.6, "n": 10000}}},
    }  # fmt: skip
    html = "".join(_headline_html(s, lambda fid: ""))
    assert "alpha* rule: confident" in html
    assert (
        "RiFT - AT on test (points, 95% interval; paired bootstrap, n=10,000): clean +1.00 [+0.40, +1.60]"
        in html
    )


def test_a_seeds_summary_states_the_t_interval_of_the_change() -> None:
    from rift_ray.aggregate import aggregate
    from rift_ray.paired import seeds_interval_lines

    def seed(clean: float, robust: float) -> dict:
        return {"at": {"test": {"clean_acc": 44.6, "robust_acc": 30.1}},
                "rift": {"test": {"clean_acc": 44.6 + clean, "robust_acc": 30.1 + robust}}}  # fmt: skip

    agg = aggregate([seed(0.5, -2.7), seed(0.0, 0.0), seed(0.7, -1.2)])
    lo, hi = agg["ci95"]["delta"]["test"]["clean_acc"]
    assert (lo + hi) / 2 == pytest.approx(0.4) and hi - lo == pytest.approx(
        2 * 4.302652729749464 * 0.3605551275463989 / 3**0.5
    )
    (line,) = seeds_interval_lines(agg)
    assert line.startswith("RiFT - AT on test, 95% t interval over the seeds: clean [-0.50, +1.30]")
    assert "PGD [-4.66, +2.06]" in line


def test_a_held_out_confirmation_set_and_its_verdict() -> None:
    """``interpolate.confirm_size``: the first N validation images are held out (``confirm``),
    selection sees the ones after them, and alpha* is checked on the held-out ones."""
    from rift_ray.data import DatasetSplits, ImageData
    from rift_ray.stages.interp import eval_sets
    from rift_ray.stages.per_image import confirmation

    def data(n: int, first: int) -> ImageData:
        return ImageData(
            torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(first, first + n), ["c"]
        )

    splits = DatasetSplits(
        "x", data(10, 0), data(500, 0), data(50, 1000), 1, (0.5,) * 3, (0.5,) * 3
    )
    cfg = load_config(None, ["interpolate.confirm_size=200", "eval.val_subset=250"])
    sets = eval_sets(cfg, splits)
    assert sets["confirm"].labels.tolist() == list(range(200))
    assert sets["val"].labels.tolist() == list(range(200, 450))  # the next 250
    n = 1000
    at = [i < 500 for i in range(n)]
    rows = split_per_image([_row("confirm", 0.0, at, at)], AT_TRIAL)[1]
    same = split_per_image([_row("confirm", 0.5, at, at)], "t")[1]
    worse = split_per_image(
        [_row("confirm", 0.7, at, [v and i >= 30 for i, v in enumerate(at)])], "t"
    )[1]
    ok = confirmation(rows + same, {"trial": "t", "alpha": 0.5}, 0.1)
    assert ok["confirmed"] and (ok["n"], ok["alpha"]) == (1000, 0.5)
    bad = confirmation(rows + worse, {"trial": "t", "alpha": 0.7}, 0.1)
    assert not bad["confirmed"] and bad["robust_drop"]["diff"] == pytest.approx(3.0)
