"""Joint MRC of several modules and the module-selection strategies, on tiny CPU models (no Ray)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_rift import CANDIDATES, blobs, snapshot, tiny_cnn
from torch import nn

from rift_ray.config import ConfigError, load_config
from rift_ray.models import build_model
from rift_ray.rift import (
    MRCOptions,
    adversarial_set,
    greedy_joint_selection,
    random_modules,
    robust_criticality,
)


@pytest.fixture(scope="module")
def adv() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = tiny_cnn()
    x, y = blobs(48, num_classes=3)
    xa, ya = adversarial_set(model, [(x[:32], y[:32]), (x[32:], y[32:])], steps=3, seed=0)
    return model, xa, ya


def _same(single: object, joint: object) -> None:
    a, b = dataclasses.asdict(single), dataclasses.asdict(joint)  # type: ignore[call-overload]
    for k in ("mrc", "loss_before", "loss_after", "acc_before", "acc_after", "epoch_losses",
              "best_epoch", "num_params", "cached_block", "cache_bytes"):  # fmt: skip
        assert a[k] == b[k], k  # bit for bit


@pytest.mark.parametrize("projection", ["epoch", "step"])
def test_one_module_set_reproduces_the_module_alone(
    adv: tuple[nn.Module, torch.Tensor, torch.Tensor], projection: str
) -> None:
    model, xa, ya = adv
    kw = dict(epochs=3, batch_size=16, lr=20.0, projection=projection, seed=5)
    for name in CANDIDATES:
        single = robust_criticality(model, name, xa, ya, MRCOptions(**kw))  # type: ignore[arg-type]
        joint = robust_criticality(model, [name], xa, ya, MRCOptions(**kw))  # type: ignore[arg-type]
        _same(single, joint)
        assert joint.modules == (name,)


def test_one_module_set_reproduces_the_fast_path_of_a_resnet() -> None:
    """small_resnet has blocks: the fast path caches a block's input; both functions agree."""
    torch.manual_seed(0)
    model = build_model("small_resnet", 4).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(12, 3, 32, 32, generator=g), torch.randint(0, 4, (12,), generator=g)
    kw = dict(epochs=2, batch_size=8, lr=5.0, seed=1)
    for name in ("layer2.0.conv2", "linear"):
        for fast in (True, False):
            single = robust_criticality(model, name, x, y, MRCOptions(fast=fast, **kw))  # type: ignore[arg-type]
            joint = robust_criticality(model, [name], x, y, MRCOptions(fast=fast, **kw))  # type: ignore[arg-type]
            _same(single, joint)
            assert bool(joint.cached_block) == fast
    # a set caches the input of its earliest block, and is the same with or without the cache
    names = ["linear", "layer2.0.conv2"]
    fast = robust_criticality(model, names, x, y, MRCOptions(**kw))  # type: ignore[arg-type]
    slow = robust_criticality(model, names, x, y, MRCOptions(fast=False, **kw))  # type: ignore[arg-type]
    assert fast.cached_block == "layer2.0" and slow.cached_block == ""
    assert fast.mrc == pytest.approx(slow.mrc, rel=1e-5, abs=1e-6)
    assert fast.num_params == sum(model.get_submodule(n).weight.numel() for n in names)


@pytest.mark.parametrize("projection", ["epoch", "step"])
def test_every_perturbation_stays_in_its_own_ball(
    adv: tuple[nn.Module, torch.Tensor, torch.Tensor], projection: str
) -> None:
    model, xa, ya = adv
    before = snapshot(model)
    res = robust_criticality(
        model,
        CANDIDATES,
        xa,
        ya,
        MRCOptions(epochs=3, batch_size=16, lr=50.0, projection=projection),
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert res.radii == pytest.approx(
        [0.1 * model[int(m)].weight.norm().item() for m in CANDIDATES]
    )
    assert len(res.delta_norms) == 3
    for norms in res.delta_norms:
        for norm, radius in zip(norms, res.radii, strict=True):
            assert norm <= radius * (1 + 1e-5)
    assert max(res.delta_norms[-1]) > 0  # lr 50 leaves every ball: all projected to its sphere
    assert res.mrc >= 0 and res.mrc == res.loss_after - res.loss_before
    assert res.loss_after == max(res.epoch_losses) == res.epoch_losses[res.best_epoch - 1]


def test_zero_radius_moves_nothing(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, xa, ya = adv
    res = robust_criticality(
        model, CANDIDATES, xa, ya, MRCOptions(epsilon=0.0, epochs=2, batch_size=16)
    )
    assert res.mrc == 0.0 and res.acc_after == res.acc_before
    assert all(n == 0.0 for norms in res.delta_norms for n in norms)


class TwoLinear(nn.Module):
    """f(x) = A x[:, :3] + B x[:, 3:]: two modules whose worst joint perturbation is known."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def test_joint_mrc_matches_closed_form_for_two_linear_modules() -> None:
    """One sample, 2 classes: CE = softplus(m), m = l_other - l_y. Each ball ||dA|| <= r_a,
    ||dB|| <= r_b adds at most sqrt(2) r ||x_part|| to the margin, along u v^T, which is where
    the CE gradient points, so ascent + projection reaches the joint maximum:
    MRC = softplus(m + sqrt(2) (r_a ||x_a|| + r_b ||x_b||)) - softplus(m), larger than either alone."""
    torch.manual_seed(3)
    model = TwoLinear()
    x, y = torch.randn(1, 5), torch.tensor([1])
    with torch.no_grad():
        logits = model(x)[0].double()
    m = (logits[0] - logits[1]).item()
    ra, rb = 0.1 * model.a.weight.norm().item(), 0.1 * model.b.weight.norm().item()
    lift = math.sqrt(2) * (ra * x[0, :3].norm().item() + rb * x[0, 3:].norm().item())
    expected = F.softplus(torch.tensor(m + lift)).item() - F.softplus(torch.tensor(m)).item()
    for projection in ("step", "epoch"):
        res = robust_criticality(
            model, ["a", "b"], x, y, MRCOptions(epochs=3, lr=100.0, projection=projection)
        )
        assert res.mrc == pytest.approx(expected, rel=1e-4)
        alone = [
            robust_criticality(
                model, n, x, y, MRCOptions(epochs=3, lr=100.0, projection=projection)
            )
            for n in ("a", "b")
        ]
        assert res.mrc > max(a.mrc for a in alone)


def test_joint_mrc_rejects_bad_sets(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, xa, ya = adv
    with pytest.raises(ValueError, match="at least one"):
        robust_criticality(model, [], xa, ya)
    with pytest.raises(ValueError, match="4: listed twice"):
        robust_criticality(model, ["4", "0", "4"], xa, ya)
    with pytest.raises(ValueError, match="layer9"):
        robust_criticality(model, ["0", "layer9"], xa, ya)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shares its weight"):
        robust_criticality(tied, ["0", "1"], torch.rand(2, 4), torch.tensor([0, 1]))


# ---------------------------------------------------------------- greedy selection


def _scorer(table: dict[frozenset[str], float | None], calls: list[list[tuple[str, ...]]]):
    def score(sets: list[tuple[str, ...]]) -> list[float | None]:
        calls.append(list(sets))
        return [table[frozenset(s)] for s in sets]

    return score


def test_greedy_adds_the_candidate_with_the_lowest_joint_mrc() -> None:
    ranked = ["a", "b", "c", "d", "e"]
    table: dict[frozenset[str], float | None] = {
        frozenset("ab"): 0.5, frozenset("ac"): 0.3, frozenset("ad"): 0.9,
        frozenset("acb"): 0.8, frozenset("acd"): 0.6, frozenset("ace"): 0.7,
    }  # fmt: skip
    calls: list[list[tuple[str, ...]]] = []
    steps: list[int] = []
    chosen, records = greedy_joint_selection(
        ranked, 3, 3, _scorer(table, calls), first_mrc=0.1, on_step=lambda r: steps.append(len(r))
    )
    assert chosen == ("a", "c", "d")
    # one call per step, the `candidates` next-lowest modules not chosen yet
    assert calls == [
        [("a", "b"), ("a", "c"), ("a", "d")],
        [("a", "c", "b"), ("a", "c", "d"), ("a", "c", "e")],
    ]
    assert [(r.step, r.modules, r.mrc, r.chosen) for r in records] == [
        (1, ("a",), 0.1, True),
        (2, ("a", "b"), 0.5, False), (2, ("a", "c"), 0.3, True), (2, ("a", "d"), 0.9, False),
        (3, ("a", "c", "b"), 0.8, False), (3, ("a", "c", "d"), 0.6, True),
        (3, ("a", "c", "e"), 0.7, False),
    ]  # fmt: skip
    assert steps == [1, 4, 7]
    assert [r.added for r in records if r.step == 3] == ["b", "d", "e"]


def test_greedy_ties_failures_and_running_out() -> None:
    calls: list[list[tuple[str, ...]]] = []
    # ties go to the lower-ranked candidate; a failed (None / NaN) set is never kept
    table: dict[frozenset[str], float | None] = {
        frozenset("ab"): None, frozenset("ac"): 0.2, frozenset("ad"): 0.2, frozenset("ae"): math.nan,
    }  # fmt: skip
    chosen, records = greedy_joint_selection("abcde", 2, 4, _scorer(table, calls))
    assert chosen == ("a", "c") and [r.chosen for r in records] == [True, False, True, False, False]
    # every candidate of a step fails: the set stops growing
    table = {frozenset("ab"): None}
    chosen, records = greedy_joint_selection("ab", 3, 2, _scorer(table, calls))
    assert chosen == ("a",) and len(records) == 2
    # fewer modules than the size: as many as there are
    table = {frozenset("ab"): 1.0}
    chosen, _ = greedy_joint_selection("ab", 4, 2, _scorer(table, calls))
    assert chosen == ("a", "b")
    with pytest.raises(ValueError, match="size"):
        greedy_joint_selection("ab", 0, 1, _scorer(table, calls))


def test_greedy_with_the_real_joint_mrc(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, xa, ya = adv
    kw = dict(epochs=2, batch_size=16, lr=5.0)
    single = {m: robust_criticality(model, m, xa, ya, MRCOptions(**kw)).mrc for m in CANDIDATES}  # type: ignore[arg-type]
    ranked = sorted(CANDIDATES, key=single.__getitem__)

    def score(sets: list[tuple[str, ...]]) -> list[float | None]:
        return [robust_criticality(model, s, xa, ya, MRCOptions(**kw)).mrc for s in sets]  # type: ignore[arg-type]

    chosen, records = greedy_joint_selection(ranked, 2, 2, score, first_mrc=single[ranked[0]])
    assert chosen[0] == ranked[0] and chosen[1] in ranked[1:]
    pair = [r for r in records if r.step == 2]
    assert [r.modules[1] for r in pair] == ranked[1:]
    kept = next(r for r in pair if r.chosen)
    assert kept.mrc == min(r.mrc for r in pair if r.mrc is not None)
    assert all(r.mrc is not None and r.mrc >= 0 for r in pair)


def test_random_modules_are_seeded_and_distinct() -> None:
    mods = [f"m{i}" for i in range(10)]
    assert random_modules(mods, 3, 0) == random_modules(mods, 3, 0)
    assert len(set(random_modules(mods, 10, 1))) == 10
    assert {tuple(random_modules(mods, 1, s)) for s in range(20)} != {
        tuple(random_modules(mods, 1, 0))
    }
    with pytest.raises(ValueError, match="cannot draw"):
        random_modules(mods, 11, 0)


# ---------------------------------------------------------------- config and hashes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.strategies=[lowest,bogus]"], "finetune.strategies[1]: must be one of"),
        (["finetune.strategies=[]"], "finetune.strategies: must not be empty"),
        (["finetune.strategies=[lowest,random,lowest]"], "finetune.strategies: 'lowest' is listed twice"),
        (["finetune.strategies=[greedy,random]"], "finetune.primary: 'lowest' is not one of finetune.strategies"),
        (["finetune.greedy.size=1"], "finetune.greedy.size: must be >= 2"),
        (["finetune.greedy.candidates=0"], "finetune.greedy.candidates: must be > 0"),
        (["finetune.greedy.bogus=1"], "finetune.greedy.bogus: unknown key"),
        (["finetune.random_draws=0"], "finetune.random_draws: must be > 0"),
    ],
)  # fmt: skip
def test_selection_config_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_default_selection_keeps_the_stage_hashes() -> None:
    """The default (strategies [lowest]) hashes as before the option existed, so finished
    sweeps are reused; a strategy changes the fine-tuning hash, the primary only stage 4's."""
    from rift_ray.hashing import stable_hash as _hash
    from rift_ray.hashing import stage_hashes

    cfg = load_config(None)
    h = stage_hashes(cfg)
    d = cfg.to_dict()
    old_ft = {
        k: v
        for k, v in d["finetune"].items()
        if k not in ("strategies", "primary", "greedy", "random_draws")
    }
    assert h["finetune"] == _hash(["finetune", h["mrc"], old_ft, d["interpolate"]["tolerance"]])
    more = stage_hashes(load_config(None, ["finetune.strategies=[lowest,greedy]"]))
    assert more["mrc"] == h["mrc"] and more["finetune"] != h["finetune"]
    size3 = stage_hashes(
        load_config(None, ["finetune.strategies=[lowest,greedy]", "finetune.greedy.size=3"])
    )
    assert size3["finetune"] != more["finetune"]
    # greedy settings do not matter when greedy is not run
    assert stage_hashes(load_config(None, ["finetune.greedy.size=3"])) == h
    prim = stage_hashes(
        load_config(None, ["finetune.strategies=[lowest,greedy]", "finetune.primary=greedy"])
    )
    assert prim["finetune"] == more["finetune"] and prim["interpolate"] != more["interpolate"]


# ---------------------------------------------------------------- strategies -> module sets


def _mrc_rows(names: list[str]) -> list[dict[str, object]]:
    return [{"module": m, "mrc": 0.1 * i, "status": "done"} for i, m in enumerate(names)]


def test_module_groups_of_the_strategies_without_greedy() -> None:
    from rift_ray.rift.selection import SelectionInput, strategy_sets

    forward = ["conv1", "l1", "l2", "l3", "linear"]
    ranked = ["l2", "l1", "linear", "conv1", "l3"]  # by MRC
    rows = _mrc_rows(ranked) + [{"module": "bad", "status": "failed"}]

    def groups(*overrides: str) -> tuple[dict[str, list[list[str]]], list[list[str]]]:
        cfg = load_config(None, list(overrides))
        ranked_done = [r["module"] for r in rows if r["status"] == "done"]
        return strategy_sets(SelectionInput(ranked_done, forward, cfg.finetune, cfg.seed))

    by, sets = groups()  # the default: the paper's single lowest-MRC module
    assert by == {"lowest": [["l2"]]} and sets == [["l2"]]
    by, sets = groups(  # top_k / joint: the lowest_k strategy
        "finetune.top_k=2", "finetune.joint=true", "finetune.strategies=[lowest_k]",
        "finetune.primary=lowest_k",
    )  # fmt: skip
    assert by == {"lowest_k": [["l2"], ["l1"], ["l2", "l1"]]}
    by, sets = groups(
        "finetune.strategies=[lowest,highest,random]", "finetune.random_draws=5", "seed=3"
    )
    assert by["highest"] == [["l3"]] and sorted(g[0] for g in by["random"]) == sorted(forward)
    assert sets == [["l2"], ["l3"]] + [g for g in by["random"] if g[0] not in ("l2", "l3")]
    assert by["random"] == [[m] for m in random_modules(forward, 5, 3)]  # seeded, forward order


def test_compare_strategies_picks_each_strategys_best_trial() -> None:
    from rift_ray.stages.selection import compare_strategies

    by = {"lowest": [["a"]], "greedy": [["a", "b"]], "highest": [["z"]]}

    def choice(trial: str, gain: float, feasible: bool = True) -> dict[str, object]:
        return {"trial": trial, "alpha": 0.5, "clean_gain": gain, "robust_drop": 0.0,
                "feasible": feasible, "reason": ""}  # fmt: skip

    choices = [choice("a_lr0.1", 1.0), choice("a_lr0.2", 2.0), choice("a+b_lr0.1", 3.0),
               choice("z_lr0.1", 5.0, feasible=False)]  # fmt: skip
    table = [
        {"trial": t, "lr": lr, "alpha": a, "split": sp, "clean_acc": 50.0 + a + lr,
         "robust_acc": 30.0, "corruption_acc": 40.0 if sp == "test" else None}
        for t, lr in (("a_lr0.1", 0.1), ("a_lr0.2", 0.2), ("a+b_lr0.1", 0.1), ("z_lr0.1", 0.1))
        for a in (0.0, 0.5) for sp in ("val", "test")
    ]  # fmt: skip
    rows = compare_strategies(by, "lowest", [0.1, 0.2], choices, table, {"a": 0.01, "a+b": 0.03})
    assert [r["strategy"] for r in rows] == ["lowest", "greedy", "highest"]
    low, greedy, high = rows
    assert low["primary"] and not greedy["primary"]
    assert (low["trial"], low["lr"], low["alpha"], low["set_mrc"]) == ("a_lr0.2", 0.2, 0.5, 0.01)
    assert low["val_clean_acc"] == 50.7 and low["test_corruption_acc"] == 40.0
    assert low["val_corruption_acc"] is None and low["trials"] == 2
    assert (greedy["modules"], greedy["set_mrc"], greedy["clean_gain_val"]) == ("a+b", 0.03, 3.0)
    assert high["trial"] is None and high["module_sets"] == "z" and high["trials"] == 1


def test_report_and_printed_summary_show_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_report import make_sweep

    from rift_ray import store as layout
    from rift_ray.cli import main, print_summary

    store = make_sweep(tmp_path)
    summary = store.get_json(layout.SUMMARY)
    base = {"val_corruption_acc": None, "test_corruption_acc": 62.0, "clean_gain_val": 2.0,
            "robust_drop_val": 0.0, "trials": 1}  # fmt: skip
    summary["primary"] = "lowest"
    summary["strategies"] = [
        {**base, "strategy": "lowest", "primary": True, "module_sets": "conv1", "modules": "conv1",
         "set_mrc": 0.05, "trial": "conv1_lr0.01", "lr": 0.01, "alpha": 0.5, "val_clean_acc": 72.0,
         "val_robust_acc": 40.0, "test_clean_acc": 71.5, "test_robust_acc": 38.9},
        {**base, "strategy": "greedy", "primary": False, "module_sets": "conv1+fc",
         "modules": "conv1+fc", "set_mrc": 0.31, "trial": "conv1+fc_lr0.01", "lr": 0.01,
         "alpha": 0.7, "val_clean_acc": 73.0, "val_robust_acc": 39.95, "test_clean_acc": 72.25,
         "test_robust_acc": 38.5},
        {**base, "strategy": "highest", "primary": False, "module_sets": "fc", "modules": None,
         "set_mrc": None, "trial": None, "lr": None, "alpha": None, "val_clean_acc": None,
         "val_robust_acc": None, "test_clean_acc": None, "test_robust_acc": None},
    ]  # fmt: skip
    store.put_json(layout.SUMMARY, summary)
    store.put_table(layout.STRATEGIES_TABLE, summary["strategies"])
    joint = [
        {"step": 1, "modules": "conv1", "added": "conv1", "size": 1, "mrc": 0.05, "chosen": True,
         "status": "done", "error": ""},
        {"step": 2, "modules": "conv1+fc", "added": "fc", "size": 2, "mrc": 0.31, "chosen": True,
         "status": "done", "error": ""},
    ]  # fmt: skip
    store.put_table(layout.JOINT_MRC_TABLE, joint)
    out = tmp_path / "r.html"
    assert main(["report", store.root, "-o", str(out)]) == 0
    capsys.readouterr()
    text = out.read_text()
    assert "Module selection strategies" in text and "lowest (primary)" in text
    assert "conv1+fc" in text and "72.25" in text and "Greedy joint selection" in text
    assert main(["report", store.root, "--format", "json", "-o", "-"]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in tables["strategies"]] == ["lowest", "greedy", "highest"]
    assert len(tables["joint_mrc"]) == 2
    print_summary(summary)
    printed = capsys.readouterr().out
    assert "Module selection strategies" in printed and "lowest *" in printed
    assert "highest: no feasible trial" in printed and "72.25" in printed
    assert "greedy: conv1+fc (MRC 0.31)" in printed


def test_selection_larger_than_the_model_is_refused_before_compute() -> None:
    from rift_ray.checks import check_selection

    mods = ["a", "b", "c"]
    check_selection(load_config(None, ["finetune.strategies=[lowest,greedy,random]"]), mods)
    bad = load_config(None, ["finetune.strategies=[lowest,greedy]", "finetune.greedy.size=4"])
    with pytest.raises(ConfigError, match=r"^finetune.greedy.size: 4 exceeds the 3 candidate"):
        check_selection(bad, mods)
    bad = load_config(None, ["finetune.strategies=[random]", "finetune.primary=random",
                             "finetune.random_draws=5"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^finetune.random_draws: 5 exceeds"):
        check_selection(bad, mods)
    # greedy settings are not checked when greedy does not run
    check_selection(load_config(None, ["finetune.greedy.size=9"]), mods)


# ---------------------------------------------------------------- the greedy stage, Ray faked


class _Ref:
    def __init__(self, value: object) -> None:
        self.value = value


class _FakeRay:
    """The few Ray calls run_greedy makes, run in this process (a real Ray run is in test_sweep)."""

    def __init__(self) -> None:
        self.sets: list[list[str]] = []

    def put(self, x: object) -> object:
        return x

    def get(self, ref: _Ref) -> object:
        return ref.value

    def wait(self, refs: list[_Ref], num_returns: int = 1) -> tuple[list[_Ref], list[_Ref]]:
        return refs[:num_returns], refs[num_returns:]

    def get_runtime_context(self) -> object:
        import types

        return types.SimpleNamespace(get_node_id=lambda: "fake-node-0123456")


def test_greedy_stage_stores_every_set_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rift_ray.stages.selection as sel
    from rift_ray.hashing import joint_mrc_hash
    from rift_ray.models import mrc_candidates
    from rift_ray.stages.base import SweepContext
    from rift_ray.stages.common import ModelSpec, new_model
    from rift_ray.store import JOINT_MRC_TABLE, Store

    fake = _FakeRay()
    task = sel._joint_mrc_task._function  # the plain function behind the Ray task

    class Task:
        def options(self, **_: object) -> Task:
            return self

        def remote(self, *args: object) -> _Ref:
            fake.sets.append(list(args[-1]))  # type: ignore[call-overload]
            return _Ref(task(*args))

    monkeypatch.setattr(sel, "ray", fake)
    monkeypatch.setattr(sel, "_joint_mrc_task", Task())
    g = torch.Generator().manual_seed(0)
    adv = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    monkeypatch.setattr(sel, "build_adversarial_set", lambda *a: adv)

    cfg = load_config(None, ["model.arch=small_cnn", "mrc.epochs=1", "mrc.batch_size=8",
                             "finetune.strategies=[lowest,greedy]", "finetune.greedy.size=3",
                             "finetune.greedy.candidates=2", "resources.torch_threads=1"])  # fmt: skip
    spec = ModelSpec(10, (0.5,) * 3, (0.25,) * 3, (3, 32, 32))
    torch.manual_seed(0)
    at_state = new_model(cfg, spec).state_dict()
    modules = mrc_candidates(new_model(cfg, spec))
    mrc_rows = [{"module": m, "mrc": 0.01 * i, "status": "done", "robust_acc_drop": 1.0}
                for i, m in enumerate(modules)]  # fmt: skip
    store = Store.open(str(tmp_path), "s")
    ctx = SweepContext(cfg, store, None, None, spec, {"mrc": "h2"}, modules, None, "t", 0)  # type: ignore[arg-type]
    chosen, rows, computed = sel.run_greedy(ctx, at_state, mrc_rows)
    assert len(chosen) == 3 and chosen[0] == modules[0] and computed == 4 == len(fake.sets)
    assert [(r["step"], r["size"]) for r in rows] == [(1, 1), (2, 2), (2, 2), (3, 3), (3, 3)]
    assert [r["added"] for r in rows[1:3]] == modules[1:3]
    assert all(r["status"] == "done" for r in rows)
    assert all(r["node"] == "fake-node-01" for r in rows[1:])
    assert rows[0]["mrc"] == 0.0 and rows[0]["robust_acc_drop"] == 1.0  # from mrc.parquet
    h = joint_mrc_hash(cfg, "h2")
    assert store.get_table(JOINT_MRC_TABLE).to_pylist() == rows and store.valid(JOINT_MRC_TABLE, h)
    # a re-run scores nothing again; one lost set (say the driver died mid-step) is rescored
    fake.sets.clear()
    assert sel.run_greedy(ctx, at_state, mrc_rows) == (chosen, rows, 0)
    store.put_table(JOINT_MRC_TABLE, rows[:-1], stage_hash=h)
    again = sel.run_greedy(ctx, at_state, mrc_rows)
    assert again[2] == 1 and fake.sets == [rows[-1]["modules"].split("+")]
    assert [r["mrc"] for r in again[1]] == [r["mrc"] for r in rows]  # deterministic
    # a joint MRC that fails is a row with its error, and is never kept
    bad = [{**r, "module": "nope"} if i == 2 else r for i, r in enumerate(mrc_rows)]
    store.delete(JOINT_MRC_TABLE)
    chosen2, rows2, _ = sel.run_greedy(ctx, at_state, bad)
    failed = [r for r in rows2 if r["status"] == "failed"]
    assert failed and all("nope" in r["modules"] and "nope" in r["error"] for r in failed)
    assert "nope" not in chosen2 and not any(r["chosen"] for r in failed)


def test_mrc_stage_shared_base_is_stored_reused_and_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """build_mrc_base (Ray faked): computed once and stored; a re-run reads it; a stored base
    missing a module is recomputed; a failing task only warns; mrc.fast=false skips it."""
    import rift_ray.stages.mrc as mrc_stage
    from rift_ray.models import mrc_candidates
    from rift_ray.stages.common import ModelSpec, new_model
    from rift_ray.store import MRC_BASE, Store

    fake = _FakeRay()
    task = mrc_stage._mrc_base_task._function
    calls: list[list[str]] = []

    class Task:
        fail = False

        def options(self, **_: object) -> Task:
            return self

        def remote(self, *args: object) -> _Ref:
            calls.append(list(args[-1]))  # type: ignore[call-overload]
            if self.fail:
                raise RuntimeError("worker died\nsecond line")
            return _Ref(task(*args))

    fake_task = Task()
    monkeypatch.setattr(mrc_stage, "ray", fake)
    monkeypatch.setattr(mrc_stage, "_mrc_base_task", fake_task)
    cfg = load_config(None, ["model.arch=small_cnn", "mrc.epochs=2", "mrc.batch_size=8",
                             "resources.torch_threads=1"])  # fmt: skip
    spec = ModelSpec(10, (0.5,) * 3, (0.25,) * 3, (3, 32, 32))
    torch.manual_seed(0)
    model = new_model(cfg, spec)
    at_state = model.state_dict()
    modules = mrc_candidates(model)
    g = torch.Generator().manual_seed(0)
    adv = torch.rand(20, 3, 32, 32, generator=g), torch.randint(0, 10, (20,), generator=g)
    store = Store.open(str(tmp_path), "s")

    base = mrc_stage.build_mrc_base(cfg, store, spec, at_state, adv, modules, "h2")
    assert base is not None and calls == [modules] and store.valid(MRC_BASE, "h2")
    opts = mrc_stage.mrc_options(cfg)
    for name in modules:  # what the trials get from it: the reference's answer
        ref = robust_criticality(model, name, *adv, dataclasses.replace(opts, fast=False))
        got = robust_criticality(model, name, *adv, opts, base=base)
        assert (got.mrc, got.epoch_losses) == (ref.mrc, ref.epoch_losses), name
    again = mrc_stage.build_mrc_base(cfg, store, spec, at_state, adv, modules, "h2")
    assert calls == [modules] and again is not None  # read back, not recomputed
    assert again.key == base.key and again.loss_before == base.loss_before
    assert all(torch.equal(again.first_grads[m], base.first_grads[m]) for m in modules)
    mrc_stage.build_mrc_base(cfg, store, spec, at_state, adv, modules[:2], "h2")
    assert calls == [modules]  # a subset of what is stored: reused
    store.put(MRC_BASE, b"not a torch file", stage_hash="h2")  # unreadable: computed again
    assert mrc_stage.build_mrc_base(cfg, store, spec, at_state, adv, modules, "h2") is not None
    assert calls == [modules, modules]
    fake_task.fail = True
    assert mrc_stage.build_mrc_base(cfg, store, spec, at_state, adv, modules, "h3") is None
    assert (
        "shared first step failed (RuntimeError: worker died second line)"
        in capsys.readouterr().err
    )
    off = load_config(None, ["model.arch=small_cnn", "mrc.fast=false"])
    assert mrc_stage.build_mrc_base(off, store, spec, at_state, adv, modules, "h2") is None
