"""Stage 4 with ``interpolate.search: monotone`` against the full grid, on a local Ray."""

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
    grid_cfg = load_config(None, SETTINGS)
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
