"""Stage 4's measurements: alpha points of the interpolation, evaluated by Ray tasks.

Two phases, so that the expensive evaluations run only where the answer needs them:

1. **Validation**, what alpha* is chosen on: the AT model (alpha 0) once on every set, then
   each trial's alphas by ``interpolate.search``: ``grid`` (PGD at every alpha, in tasks of
   ``alphas_per_task``), ``monotone`` (a binary search, one task per trial) or
   ``clean_first`` (clean accuracy at every alpha, PGD down the clean-gain order until the
   rule is met: :mod:`rift_ray.rift.clean_first`; the grid's alpha* always).
2. **Test**, what is reported: test PGD and corruptions at each trial's alpha* (every alpha
   with ``interpolate.test_curve``), and the held-out ``confirm`` images at the winner's.

Every row keeps its images' results until :mod:`rift_ray.stages.per_image` stores them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
import torch

from rift_ray.attacks import corruption_accuracy, evaluate
from rift_ray.config import SweepConfig
from rift_ray.data import DatasetSplits, ImageData
from rift_ray.progress import Progress
from rift_ray.rift import interpolate, search_alpha
from rift_ray.rift.clean_first import search_clean_first
from rift_ray.stages.common import device_name, evaluate_pgd, peak_memory, start_worker
from rift_ray.stages.per_image import PER_IMAGE_KEYS

Rows = list[dict[str, Any]]


def eval_sets(cfg: SweepConfig, splits: DatasetSplits) -> dict[str, ImageData]:
    """The validation and test sets the interpolation grid is measured on (subsets as
    configured); with ``interpolate.confirm_size`` N, ``confirm`` is the first N validation
    images and ``val`` (selection) the ones after them."""
    out = {}
    val, k = splits.val, min(cfg.interpolate.confirm_size, len(splits.val))
    if k:
        out["confirm"] = val.subset(torch.arange(k))
        val = val.subset(torch.arange(k, len(val)))
    for split, data, n in (
        ("val", val, cfg.eval.val_subset),
        ("test", splits.test, cfg.eval.test_subset),
    ):
        if n is not None and len(data) > n:
            data = data.subset(torch.arange(n))
        if len(data):
            out[split] = data
    return out


def evaluate_state(
    cfg: SweepConfig,
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    sets: dict[str, ImageData],
    cdata: dict[Any, ImageData] | None,
    device: torch.device,
    attack: bool = True,
) -> dict[str, dict[str, Any]]:
    """Clean / PGD (/ corruption) accuracy of one state dict on each named set; with
    ``attack=False`` clean accuracy only (``robust_acc`` None)."""
    model.load_state_dict(state)
    model.to(device)
    out: dict[str, dict[str, Any]] = {}
    for split, data in sets.items():
        if attack:
            row: dict[str, Any] = evaluate_pgd(cfg, model, data, device, cfg.eval.restarts, True)
        else:
            m = evaluate(model, data, batch_size=cfg.eval.batch_size, device=device,
                         amp=cfg.compute.amp, per_image=True)  # fmt: skip
            row = {"clean_acc": m["clean_acc"], "robust_acc": None, "n": m["n"],
                   "clean_correct": m["clean_correct"], "robust_correct": None}  # fmt: skip
        row["corruption_acc"] = None  # same columns in every row (measured on test only)
        row["corruption_cells"] = None
        if cdata and split == "test":
            c = corruption_accuracy(
                model, cdata, batch_size=cfg.eval.batch_size, device=device,
                amp=cfg.compute.amp, per_image=True,
            )  # fmt: skip
            row["corruption_acc"], row["corruption_correct"] = c["mean"], c["per_image"]
            # each <corruption>-<severity> cell's accuracy (the report's heatmap), as JSON
            cells = {k: v for k, v in c.items() if k not in ("mean", "per_image")}
            row["corruption_cells"] = json.dumps(cells, sort_keys=True)
        out[split] = row
    return out


def evaluate_point(
    cfg: SweepConfig,
    model: torch.nn.Module,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor] | None,
    alpha: float,
    sets: dict[str, ImageData],
    cdata: dict[Any, ImageData] | None,
    device: torch.device,
    attack: bool = True,
) -> Rows:
    """The rows (one per set) of one alpha point, with its time and peak memory."""
    t0 = time.time()
    mem = peak_memory(cfg, device)
    with mem:  # the interpolated state and every evaluation
        state = at_state if ft_state is None else interpolate(at_state, ft_state, alpha)
        metrics = evaluate_state(cfg, model, state, sets, cdata, device, attack)
    return [
        {
            "alpha": alpha,
            "split": split,
            **m,
            "seconds": time.time() - t0,
            "peak_mem_bytes": mem.peak_bytes,
            "mem_method": mem.method,
            "device": device_name(device),
        }
        for split, m in metrics.items()
    ]


def _sets(cfg: SweepConfig, splits: DatasetSplits, which: tuple[str, ...] | None) -> dict[str, Any]:
    return {k: v for k, v in eval_sets(cfg, splits).items() if which is None or k in which}


@ray.remote
def _alpha_task(
    cfg_dict: dict[str, Any],
    spec: Any,
    splits: DatasetSplits,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor] | None,
    alphas: list[float],
    cdata: dict[Any, ImageData] | None = None,
    which: tuple[str, ...] | None = None,
) -> Rows:
    """``alphas`` on the sets named in ``which`` (None: every set)."""
    cfg, device, model = start_worker(cfg_dict, "interpolate", spec)
    assert model is not None
    sets = _sets(cfg, splits, which)
    rows: Rows = []
    for alpha in alphas:
        rows += evaluate_point(cfg, model, at_state, ft_state, alpha, sets, cdata, device)
    return rows


@ray.remote
def _search_task(
    cfg_dict: dict[str, Any],
    spec: Any,
    splits: DatasetSplits,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor],
    baseline: dict[str, Any],
) -> Rows:
    """``interpolate.search: monotone`` or ``clean_first`` on validation for one trial:
    the rows of every alpha it measured (clean-only rows have ``robust_acc`` None)."""
    cfg, device, model = start_worker(cfg_dict, "interpolate", spec)
    assert model is not None
    sets = _sets(cfg, splits, ("val",))
    rows: dict[tuple[float, bool], dict[str, Any]] = {}

    def measure(alpha: float, attack: bool) -> dict[str, Any]:
        point = evaluate_point(cfg, model, at_state, ft_state, alpha, sets, None, device, attack)
        rows[alpha, attack] = point[0]
        return _vectors(point[0])

    alphas = [a for a in cfg.interpolate.alphas if a > 0]
    if alphas and cfg.interpolate.search == "monotone":
        search_alpha(lambda a: measure(a, True), [0.0, *alphas], cfg.interpolate.tolerance,
                     baseline=baseline)  # fmt: skip
    elif alphas:
        search_clean_first(
            lambda a: measure(a, False), lambda a: measure(a, True), alphas,
            _vectors(baseline), cfg.interpolate.tolerance, cfg.interpolate.rule,
        )  # fmt: skip
    # where PGD ran, its row (the same clean figures) replaces the clean-only one
    return [r for (a, attack), r in rows.items() if attack or (a, True) not in rows]


def _vectors(row: dict[str, Any]) -> dict[str, Any]:
    """A measured row for the search functions: figures plus per-image ``clean`` / ``robust``
    numpy bools (the rules' paired intervals need them)."""
    out = {k: v for k, v in row.items() if k not in PER_IMAGE_KEYS}
    for key, field in (("clean_correct", "clean"), ("robust_correct", "robust")):
        if row.get(key) is not None:
            out[field] = row[key].numpy()
    return out


class Points:
    """Submits alpha-point tasks and gathers their rows by trial ("AT" for the AT model),
    passing each task's rows to ``on_rows`` and counting them on a progress bar."""

    def __init__(self, cfg: SweepConfig, spec: Any, splits_ref: Any, at_state: Any) -> None:
        r = cfg.resources.interpolate
        self.opts = {"num_cpus": r.cpu, "num_gpus": r.gpu}
        self.cfg, self.spec, self.splits_ref = cfg, spec, splits_ref
        self.cfg_dict = cfg.to_dict()
        self.at_ref = ray.put(at_state)
        self.jobs: dict[Any, str] = {}

    def alphas(
        self, trial: str, ft_ref: Any, alphas: list[float], cdata: Any = None,
        which: tuple[str, ...] | None = None,
    ) -> None:  # fmt: skip
        k = self.cfg.interpolate.alphas_per_task
        for i in range(0, len(alphas), k):
            job = _alpha_task.options(**self.opts).remote(
                self.cfg_dict, self.spec, self.splits_ref, self.at_ref, ft_ref,
                alphas[i : i + k], cdata, which,
            )  # fmt: skip
            self.jobs[job] = trial

    def search(self, trial: str, ft_ref: Any, baseline: dict[str, Any]) -> None:
        job = _search_task.options(**self.opts).remote(
            self.cfg_dict, self.spec, self.splits_ref, self.at_ref, ft_ref, baseline
        )
        self.jobs[job] = trial

    def gather(self, bar: Progress, on_rows: Callable[[Rows], None] | None) -> dict[str, Rows]:
        """Every submitted task's rows by trial, as they end; the jobs are cleared."""
        out: dict[str, Rows] = {}
        pending = list(self.jobs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                rows, trial = ray.get(ref), self.jobs[ref]
                out.setdefault(trial, []).extend(rows)
                if on_rows is not None:
                    on_rows([{**row, "trial": trial} for row in rows])
                bar.advance(len({row["alpha"] for row in rows}))
        self.jobs = {}
        return out


def validation_points(
    pts: Points, trials: list[dict[str, Any]], cdata: Any, on_rows: Any = None
) -> tuple[Rows, dict[str, Rows], dict[str, Any]]:
    """Phase 1: the AT model's rows on every set, each trial's validation rows, and the
    trials' state refs (for phase 2)."""
    cfg = pts.cfg
    alphas = [a for a in cfg.interpolate.alphas if a > 0]
    c_ref = ray.put(cdata) if cdata else None
    refs = {t["trial"]: ray.put(t["state"]) for t in trials}
    grid = cfg.interpolate.search == "grid"
    with Progress("interpolate (validation)", 1 + len(alphas) * len(trials), "alpha points") as bar:
        pts.alphas("AT", None, [0.0], c_ref)
        if grid:  # the grid needs no baseline: its tasks run beside the AT model's
            for t in trials:
                pts.alphas(t["trial"], refs[t["trial"]], alphas, which=("val",))
        per_trial = pts.gather(bar, on_rows)
        at_rows = per_trial.pop("AT")
        base = next((r for r in at_rows if r["split"] == "val"), None)
        for t in trials if not grid else []:
            if base is not None:
                pts.search(t["trial"], refs[t["trial"]], base)
        per_trial |= pts.gather(bar, on_rows)
        if bar.done < bar.total:  # a search skips alphas: the bar ends at its total
            bar.advance(bar.total - bar.done)
    return at_rows, {t["trial"]: per_trial.get(t["trial"], []) for t in trials}, refs


def points_on_test(
    pts: Points,
    plan: dict[str, list[float]],
    refs: dict[str, Any],
    cdata: Any,
    best: Mapping[str, Any] | None,
    on_rows: Any = None,
) -> dict[str, Rows]:
    """Phase 2: test (and corruptions) at the alphas of ``plan`` (trial -> alphas > 0:
    :func:`plan_on_test`); the held-out ``confirm`` images at the winner's alpha*. alpha 0 is
    the AT model's, measured in phase 1."""
    c_ref = ray.put(cdata) if cdata else None
    confirm = best is not None and pts.cfg.interpolate.confirm_size > 0 and best["alpha"] > 0
    total = sum(len(v) for v in plan.values()) + int(confirm)
    with Progress("interpolate (test)", total, "alpha points") as bar:
        for trial, alphas in plan.items():
            pts.alphas(trial, refs[trial], alphas, c_ref, ("test",))
        if confirm:
            assert best is not None
            alpha = [float(best["alpha"])]
            pts.alphas(best["trial"], refs[best["trial"]], alpha, None, ("confirm",))
        return pts.gather(bar, on_rows)


def plan_on_test(
    cfg: SweepConfig, choices: list[dict[str, Any]], best: Mapping[str, Any] | None
) -> dict[str, list[float]]:
    """The alphas (> 0) measured on test per trial: its alpha* (every alpha with
    ``interpolate.test_curve``), and for the winner the alphas AutoAttack reports too
    (``eval.autoattack.alphas``), so each AutoAttack figure sits beside its PGD one."""
    every = [a for a in cfg.interpolate.alphas if a > 0]
    plan = {}
    for c in choices:
        alphas = set(every) if cfg.interpolate.test_curve else {float(c["alpha"] or 0.0)}
        if best is not None and c["trial"] == best["trial"] and cfg.eval.autoattack.enabled:
            alphas |= set(cfg.eval.autoattack.alphas)
        plan[c["trial"]] = sorted(a for a in alphas if a > 0)
    return plan
