"""Stage 4's searches (``interpolate.search: monotone``, ``clean_first``) against the full
grid measured on validation and test, on a local Ray."""

from __future__ import annotations

import pytest
import torch

from rift_ray.config import load_config
from rift_ray.data import load_dataset
from rift_ray.rift import search_alpha, select_alpha
from rift_ray.stages.common import ModelSpec, cpu_state, new_model
from rift_ray.stages.interp import run_interpolation

pytestmark = [pytest.mark.ray]

SETTINGS = [
    "data.synthetic.train_size=200",
    "data.synthetic.test_size=60",
    "data.val_size=60",
    "model.arch=small_cnn",
    "attack.steps=2",
    "eval.batch_size=60",
    "interpolate.alphas_per_task=3",
]


def _key(row: dict) -> tuple:
    return (row["trial"], row["split"], row["alpha"])


def test_monotone_search_matches_the_grid(ray_session) -> None:
    grid_cfg = load_config(
        None, [*SETTINGS, "interpolate.search=grid", "interpolate.test_curve=true"]
    )
    search_cfg = load_config(None, [*SETTINGS, "interpolate.search=monotone"])
    splits = load_dataset(grid_cfg.data, seed=0)
    spec = ModelSpec.of(splits)
    torch.manual_seed(0)
    at_state = cpu_state(new_model(grid_cfg, spec))
    # a "fine-tuned" model: the AT weights moved along a random direction
    ft_state = {
        k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v.clone()
        for k, v in at_state.items()
    }
    trials = [{"trial": "t", "modules": ["conv1"], "lr": 0.01, "state": ft_state}]
    ref = ray_session.put(splits)
    g_rows, g_choice = run_interpolation(grid_cfg, spec, ref, at_state, trials, splits)
    s_rows, s_choice = run_interpolation(search_cfg, spec, ref, at_state, trials, splits)

    grid = {_key(r): r for r in g_rows}
    assert len({r["alpha"] for r in g_rows}) == 11
    # every point the search measured is the grid's point, to the last digit
    for r in s_rows:
        g = grid[_key(r)]
        assert (r["clean_acc"], r["robust_acc"]) == (g["clean_acc"], g["robust_acc"])
    # and its choice is what search_alpha makes of the grid's own curve
    val = {r["alpha"]: r for r in g_rows if r["split"] == "val"}
    expected = search_alpha(lambda a: val[a], sorted(val), 0.1, baseline=val[0.0])
    assert {r["alpha"] for r in s_rows if r["split"] == "val"} == {
        r["alpha"] for r in expected.rows
    }
    assert s_choice["best"]["alpha"] == expected.choice.alpha
    if not expected.used_grid:  # monotone curve: fewer evaluations, the grid's alpha*
        assert len(expected.rows) < 11
        assert s_choice["best"]["alpha"] == select_alpha(list(val.values()), 0.1).alpha
    assert (
        s_choice["best"]["alpha"]
        == select_alpha([r for r in s_rows if r["split"] == "val"], 0.1).alpha
    )
    assert g_choice["best"] is not None


def test_clean_first_gives_the_grids_choices_and_numbers(ray_session) -> None:
    """The default search (clean_first, test at alpha* only) against the whole grid measured
    on validation and test: the same alpha* per trial and winner, and every row it measured
    is the grid's to the last digit; PGD ran at fewer validation points."""
    tol = ["interpolate.tolerance=3"]
    grid_cfg = load_config(None, [*SETTINGS, *tol, "interpolate.search=grid",
                                  "interpolate.test_curve=true"])  # fmt: skip
    cf_cfg = load_config(None, [*SETTINGS, *tol])
    assert (cf_cfg.interpolate.search, cf_cfg.interpolate.test_curve) == ("clean_first", False)
    splits = load_dataset(grid_cfg.data, seed=0)
    spec = ModelSpec.of(splits)
    torch.manual_seed(0)
    at_state = cpu_state(new_model(grid_cfg, spec))
    trials = []
    for i, scale in enumerate((0.05, 0.3)):
        ft = {k: v + scale * torch.randn_like(v) if v.is_floating_point() else v.clone()
              for k, v in at_state.items()}  # fmt: skip
        trials.append({"trial": f"t{i}", "modules": ["conv1"], "lr": 0.01, "state": ft})
    ref = ray_session.put(splits)
    g_rows, g_choice = run_interpolation(grid_cfg, spec, ref, at_state, trials, splits)
    c_rows, c_choice = run_interpolation(cf_cfg, spec, ref, at_state, trials, splits)
    key = lambda c: (c["trial"], c["alpha"], c["feasible"])  # noqa: E731
    assert [key(c) for c in c_choice["choices"]] == [key(c) for c in g_choice["choices"]]
    assert c_choice["best"]["trial"] == g_choice["best"]["trial"]
    assert any(c["alpha"] > 0 for c in c_choice["choices"])  # a choice that moved
    grid = {_key(r): r for r in g_rows}
    for r in c_rows:
        g = grid[_key(r)]
        assert r["clean_acc"] == g["clean_acc"]
        assert r["robust_acc"] in (None, g["robust_acc"])
        assert r["selected"] == g["selected"]
    chosen = {c["trial"]: c["alpha"] for c in c_choice["choices"]}
    for t in chosen:  # test: the AT model and alpha* only; validation: clean at every alpha
        test = {r["alpha"] for r in c_rows if r["trial"] == t and r["split"] == "test"}
        assert test == {0.0, chosen[t]}
        assert len([r for r in c_rows if r["trial"] == t and r["split"] == "val"]) == 11
    c_pts, g_pts = c_choice["points"], g_choice["points"]
    assert g_pts == {"val_pgd": 20, "val_clean_only": 0, "test": 20}
    assert c_pts["val_pgd"] < 20 and c_pts["val_pgd"] + c_pts["val_clean_only"] == 20
    assert c_pts["test"] == sum(a > 0 for a in chosen.values())
    stored = {(r["trial"], r["split"], r["alpha"]) for r in c_choice["per_image"]}
    assert stored >= {(t, "test", a) for t, a in chosen.items() if a > 0}
