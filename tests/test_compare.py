"""`rift-ray compare` and the report's RiFT views on small hand-made tables (fast tier)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from rift_ray import store as layout
from rift_ray.cli import main
from rift_ray.compare import (
    config_diff,
    flatten,
    labels,
    load_finished,
    mrc_table,
    summary_figures,
    winning_curves,
)
from rift_ray.figures_rift import (
    corruption_cells,
    fig_compare_curves,
    fig_corruption_heatmap,
    fig_mrc_layers,
    fig_mrc_params,
    fig_tradeoff,
    module_order,
)
from rift_ray.provenance import device_rows, git_text, wandb_rows
from rift_ray.results import SweepResults
from rift_ray.store import StorageError, Store
from rift_ray.version import git_info


def summary(alpha: float, clean: float) -> dict[str, Any]:
    return {
        "modules": ["conv1"],
        "lr": 0.01,
        "trial": "conv1_lr0.01",
        "alpha": alpha,
        "choices": [{"trial": "conv1_lr0.01", "alpha": alpha, "feasible": True}],
        "at": {"val": {"clean_acc": 70.0, "robust_acc": 40.0}, "test": {"clean_acc": 69.0}},
        "rift": {"val": {"clean_acc": clean, "robust_acc": 40.0}, "test": {"clean_acc": 71.0}},
        "autoattack": {"at": {"robust_acc": 30.0}, "rift": {"robust_acc": 29.0}},
    }


def interp_rows(alpha_star: float, seed: int | None = None) -> list[dict[str, Any]]:
    cells = {0.0: {"fog-1": 50.0, "fog-3": 30.0}, alpha_star: {"fog-1": 52.0, "fog-3": 29.0}}
    return [
        {
            **({"seed": seed} if seed is not None else {}),
            "trial": "conv1_lr0.01",
            "split": split,
            "alpha": a,
            "clean_acc": 70.0 + 4 * a,
            "robust_acc": 40.0 - a,
            "corruption_acc": 40.0 if split == "test" else None,
            "autoattack_acc": 30.0 - a if split == "test" and a in (0.0, alpha_star) else None,
            "corruption_cells": json.dumps(cells[a]) if split == "test" and a in cells else None,
            "device": "cpu",
        }
        for split in ("val", "test")
        for a in (0.0, 0.5, 1.0)
    ]


MRC = [
    {"module": "layer2.conv", "mrc": 0.3, "num_params": 2000, "status": "done", "device": "cpu"},
    {"module": "conv1", "mrc": 0.1, "num_params": 400, "status": "done", "device": "cpu"},
    {"module": "layer10.conv", "mrc": 0.2, "num_params": 900, "status": "done", "device": "cpu"},
    {"module": "fc", "mrc": None, "num_params": 100, "status": "failed", "device": None},
]


def fake_sweep(root: Path, name: str, *, seed: int, alpha: float, finished: bool = True) -> str:
    """A finished sweep directory as the pipeline lays it out (what compare reads)."""
    store = Store.open(str(root), name)
    cfg = {"name": name, "seed": seed, "model": {"arch": "small_resnet"},
           "finetune": {"lrs": [0.01], "asha": {"mode": "sync"}}}  # fmt: skip
    store.put_text(layout.CONFIG, json.dumps(cfg))  # JSON is YAML
    store.put_table(layout.MRC_TABLE, MRC)
    store.put_table(layout.INTERPOLATION_TABLE, interp_rows(alpha))
    wandb = [{"stage": "mrc", "name": f"{name}-mrc", "id": "abc", "mode": "offline"},
             {"stage": "mrc", "name": f"{name}-mrc", "id": "abc", "mode": "offline",
              "dir": "/x/wandb/offline-run-1-abc"}]  # fmt: skip
    store.write_stage("mrc", status="done", hash="h", wandb=wandb)
    if finished:
        env = {"environment": {"git": {"sha": "f" * 40, "dirty": True}}}
        store.put_json(layout.SUMMARY, {**summary(alpha, 72.0), **env})
    return str(root / name)


def test_config_diff_keeps_only_differing_keys() -> None:
    a = {"name": "a", "seed": 0, "finetune": {"lrs": [0.01], "asha": {"mode": "sync"}}}
    b = {"name": "b", "seed": 0, "finetune": {"lrs": [0.01, 0.1], "asha": {"mode": "sync"}},
         "seeds": [0, 1]}  # fmt: skip
    assert flatten(b)["finetune.asha.mode"] == "sync"
    rows = config_diff({"a": a, "b": b})
    assert [r["key"] for r in rows] == ["finetune.lrs", "name", "seeds"]
    assert rows[0] == {"key": "finetune.lrs", "a": "[0.01]", "b": "[0.01, 0.1]"}
    assert rows[2] == {"key": "seeds", "a": "-", "b": "[0, 1]"}
    assert config_diff({"a": a, "a2": dict(a)}) == []


def test_summary_figures_of_one_and_of_seeds() -> None:
    one = summary_figures(summary(0.5, 73.0))
    assert one["alpha*"] == 0.5 and one["modules"] == "conv1" and one["lr"] == 0.01
    assert one["val clean: RiFT - AT"] == pytest.approx(3.0)
    assert one["test AutoAttack: AT"] == 30.0 and one["test AutoAttack: RiFT - AT"] == -1.0
    assert one["test clean: RiFT - AT"] == 2.0 and "test PGD: AT" not in one
    seeds = {
        "per_seed": [{}, {}],
        "n": 2,
        "chosen": {"modules": {"conv1": 2}, "lr": {"0.01": 1, "0.1": 1}},
        "mean": {"alpha": 0.25, "at": {"test": {"robust_acc": 40.0}},
                 "rift": {"test": {"robust_acc": 41.0}}},
    }  # fmt: skip
    s = summary_figures(seeds)
    assert s["seeds"] == 2 and s["modules"] == "conv1 (2/2)" and s["lr"] == "0.01 (1/2), 0.1 (1/2)"
    assert s["alpha*"] == 0.25 and s["test PGD: RiFT - AT"] == 1.0


def test_mrc_rankings_side_by_side() -> None:
    other = [{"module": "conv1", "mrc": 0.5}, {"module": "layer2.conv", "mrc": 0.05},
             {"module": "head", "mrc": 0.2}]  # fmt: skip
    seeds = [{"module": "conv1", "mrc": 0.2, "seed": 0}, {"module": "conv1", "mrc": 0.4, "seed": 1}]
    rows = mrc_table({"a": MRC, "b": other, "c": seeds})
    assert [r["module"] for r in rows] == ["conv1", "layer10.conv", "layer2.conv", "head"]
    assert rows[0] == {"module": "conv1", "a mrc": 0.1, "a rank": 1, "b mrc": 0.5, "b rank": 3,
                       "c mrc": pytest.approx(0.3), "c rank": 1}  # fmt: skip
    assert rows[3]["a mrc"] is None and rows[3]["b rank"] == 2  # failed / absent: no rank


def test_labels_are_unique(tmp_path: Path) -> None:
    res = [SweepResults(Store.open(str(tmp_path / d), "s")) for d in ("x", "y")]
    assert labels(res) == ["x/s", "y/s"]
    res[1].config = {"name": "other"}
    assert labels(res) == ["s", "other"]


def test_winning_curves_and_the_shared_axes_figure(tmp_path: Path) -> None:
    res = SweepResults(Store.open(str(tmp_path), "a"), summary=summary(0.5, 72.0))
    rows = interp_rows(0.5) + [{**interp_rows(0.5)[0], "trial": "fc_lr0.01"}]
    res.tables["interpolation"] = pa.Table.from_pylist(rows)
    curve = winning_curves(res)
    assert len(curve) == 6 and {r["alpha_star"] for r in curve} == {0.5}
    assert {r["trial"] for r in curve} == {"conv1_lr0.01"}
    fig = fig_compare_curves([{"sweep": "a", **r} for r in curve] + [
        {"sweep": "b", **r, "clean_acc": 60.0} for r in curve], ["a", "b"])  # fmt: skip
    axes = fig.axes
    assert len(axes) == 2 * 4  # val/test x clean, PGD, corruption, AutoAttack
    assert len(axes[0].lines) == 2 * 2  # a line and a star per sweep
    assert any(t.get_text() == "not measured" for t in axes[2].texts)  # val corruption
    assert fig_compare_curves([], ["a"]) is None


def test_tradeoff_marks_at_and_alpha_star() -> None:
    fig = fig_tradeoff(interp_rows(0.5), [{"trial": "conv1_lr0.01", "alpha": 0.5,
                                           "feasible": True}], "conv1_lr0.01")  # fmt: skip
    assert [a.get_title() for a in fig.axes] == [
        "val: clean vs PGD along alpha",
        "test: clean vs PGD along alpha",
        "test: clean vs AutoAttack along alpha",
    ]
    ax = fig.axes[0]
    xy = {tuple(ln.get_xydata()[0]) for ln in ax.lines if len(ln.get_xydata()) == 1}
    assert xy == {(39.5, 72.0), (40.0, 70.0)}  # alpha* star, AT square
    assert fig_tradeoff([{**r, "robust_acc": None, "autoattack_acc": None}
                         for r in interp_rows(0.5)]) is None  # fmt: skip


def test_mrc_views() -> None:
    fig = fig_mrc_params(MRC, ["conv1"])
    assert len(fig.axes[0].lines) == 3 and fig.axes[0].get_xscale() == "log"
    assert fig_mrc_params([{**r, "num_params": None} for r in MRC]) is None
    by_name = fig_mrc_layers(MRC)
    ticks = [t.get_text() for t in by_name.axes[0].get_xticklabels()]
    assert ticks == ["conv1", "layer2.conv", "layer10.conv"]  # numbers compared as numbers
    ordered = fig_mrc_layers(MRC, ["layer10.conv", "conv1", "layer2.conv"])
    assert [t.get_text() for t in ordered.axes[0].get_xticklabels()][0] == "layer10.conv"
    order = module_order({"model": {"arch": "small_resnet"}, "data": {"dataset": "synthetic"}})
    assert order[0] == "conv1" and order[-1] == "linear" and len(order) == len(set(order))
    assert module_order({"model": {"arch": "nope"}}) == []


def test_corruption_heatmap() -> None:
    at = corruption_cells(
        {"corruption_cells": json.dumps({"fog-1": 50.0, "jpeg_compression-3": 30.0})}
    )
    assert at == {("fog", 1): 50.0, ("jpeg_compression", 3): 30.0}
    assert corruption_cells({"corruption_cells": None}) == {}
    rift = {k: v + 2.0 for k, v in at.items()}
    fig = fig_corruption_heatmap(at, rift, "regenerated")
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["AT", "RiFT", "RiFT - AT (points)"]
    assert "+2.0" in [t.get_text() for t in panels[2].texts]
    assert fig_corruption_heatmap({}, {}) is None


def test_provenance(tmp_path: Path) -> None:
    path = fake_sweep(tmp_path, "a", seed=0, alpha=0.5)
    res = SweepResults.load(Store.open(str(tmp_path), "a"))
    (run,) = wandb_rows(res)
    assert run["url"] is None and run["where"] == "wandb sync /x/wandb/offline-run-1-abc"
    devices = {(r["stage"], r["device"]): r["n"] for r in device_rows(res)}
    assert devices == {("mrc", "cpu"): 3, ("mrc", "not recorded"): 1, ("interpolate", "cpu"): 1}
    assert git_text(res.summary) == "f" * 40 + " + uncommitted changes"
    assert git_text({}) == "not recorded"
    sha = git_info()
    assert sha is None or re.fullmatch(r"[0-9a-f]{40}", sha["sha"])
    assert git_info(str(tmp_path)) is None  # not a checkout
    assert Path(path).is_dir()


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = fake_sweep(tmp_path, "a", seed=0, alpha=0.5)
    b = fake_sweep(tmp_path, "b", seed=1, alpha=1.0)
    out = tmp_path / "c.html"
    assert main(["compare", a, b, "-o", str(out)]) == 0
    text = out.read_text()
    assert '<figure id="fig-compare-interpolation">' in text and 'id="fig-compare-mrc"' in text
    assert text.count('src="data:image/png;base64,') == 2
    assert '<td class="l">seed</td>' in text and "finetune.lrs" not in text  # same in both
    assert main(["compare", a, b, "--format", "csv", "-o", str(tmp_path / "csv")]) == 0
    diff = (tmp_path / "csv/config_diff.csv").read_text().splitlines()
    assert diff == ["key,a,b", "name,a,b", "seed,0,1"]
    summ = (tmp_path / "csv/summary.csv").read_text()
    assert "alpha*,0.5,1.0" in summ
    unfinished = fake_sweep(tmp_path, "c", seed=2, alpha=0.5, finished=False)
    with pytest.raises(StorageError, match=r"c: not a finished sweep"):
        load_finished(unfinished)
    capsys.readouterr()
    assert main(["compare", a, unfinished]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rift-ray: error: ") and unfinished in err and "\n" not in err
