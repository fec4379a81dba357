"""FGSM-RS (``adv_train.method: fgsm_rs``) and free AT (``free``): the attack, a few training
steps, the best-epoch rule against catastrophic overfitting, the config fields and the stage
hashes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.attacks import evaluate
from rift_ray.config import ConfigError, load_config
from rift_ray.data import batches, load_dataset
from rift_ray.hashing import config_hash, stage_hashes
from rift_ray.models import build_model
from rift_ray.rift.train import (
    COLLAPSE_DROP,
    FGSM_STEP,
    adversarial_train_epoch,
    best_epoch,
    collapsed,
    fgsm_rs_attack,
    free_replay_batch,
)
from rift_ray.stages.at import judge_epoch

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
EPS = 8 / 255


def linear_model(zero: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    if zero:  # no input gradient: the attack's result is its random start
        nn.init.zeros_(model[1].weight)
    return model


def images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels at 0, 1 and in between, so the [0,1] clamp is exercised."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 4, 4, generator=g)
    x[:, 0] = 0.0
    x[:, 1, :2] = 1.0
    return x, torch.arange(n) % 3


def test_fgsm_rs_stays_in_the_eps_ball_and_the_image_range() -> None:
    x, y = images()
    for step in (0.5, FGSM_STEP, 2.0):
        x_adv = fgsm_rs_attack(linear_model(), x, y, eps=EPS, fgsm_step=step)
        assert (x_adv - x).abs().max() <= EPS + 1e-7
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_fgsm_rs_starts_uniformly_in_the_ball() -> None:
    """With no input gradient the one step moves nothing: what comes back is the start."""
    x = torch.full((64, 3, 4, 4), 0.5)
    y = torch.zeros(64, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    delta = fgsm_rs_attack(linear_model(zero=True), x, y, eps=EPS, generator=gen) - x
    assert delta.abs().max() <= EPS + 1e-7
    assert abs(float(delta.mean())) < 0.05 * EPS
    assert abs(float(delta.std()) - EPS / 3**0.5) < 0.05 * EPS  # the std of U[-eps, eps]
    again = fgsm_rs_attack(linear_model(zero=True), x, y, eps=EPS, generator=gen) - x
    assert not torch.equal(delta, again)  # a fresh start per call


def test_fgsm_rs_is_one_step_of_1_25_eps_by_default() -> None:
    """By hand: the same start, one signed-gradient step of 1.25 eps, then the projection."""
    model, (x, y) = linear_model(), images()
    x_adv = fgsm_rs_attack(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(3))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    start = (x + (2 * u - 1) * EPS).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(start), y), start)
    step = start.detach() + 1.25 * EPS * grad.sign()
    expected = torch.min(torch.max(step, x - EPS), x + EPS).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-7)
    assert FGSM_STEP == 1.25 and load_config().adv_train.fgsm_step == 1.25


def test_fgsm_rs_training_lowers_the_adversarial_loss() -> None:
    """small_cnn on synthetic images: a few FGSM-RS epochs lower the PGD loss."""
    cfg = load_config(SMOKE, overrides=["data.synthetic.train_size=256", "data.val_size=64"]).data
    splits = load_dataset(cfg)
    train = splits.train.subset(torch.arange(128))
    torch.manual_seed(0)
    model = build_model("small_cnn", splits.num_classes, mean=splits.mean, std=splits.std)
    pgd = {"eps": EPS, "step_size": 2 / 255, "steps": 3}
    before = evaluate(model, train, batch_size=128, attack=pgd)["robust_loss"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(3):
        it = batches(train, 32, shuffle=True, augment=False, seed=0, epoch=epoch)
        stats = adversarial_train_epoch(
            model, it, opt, eps=EPS, step_size=2 / 255, steps=7, method="fgsm_rs", generator=gen
        )
    after = evaluate(model, train, batch_size=128, attack=pgd)["robust_loss"]
    assert after < before
    assert stats["images"] == 128 and 0 <= stats["clean_acc"] <= 100


class StepCounter:
    """Stands in for a per-iteration scheduler: counts the optimizer steps."""

    steps = 0

    def step(self) -> None:
        self.steps += 1


def test_free_replays_each_minibatch_and_carries_the_perturbation() -> None:
    model, (x, y) = linear_model(), images()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = StepCounter()
    delta, loss, correct = free_replay_batch(
        model, x, y, opt, None, eps=EPS, replays=3, scheduler=counter
    )
    assert counter.steps == 3 and loss > 0 and 0 <= correct <= len(y)
    assert delta.abs().max() <= EPS + 1e-7 and delta.abs().max() > 0  # moved, inside the ball
    again, _, _ = free_replay_batch(model, x, y, opt, delta, eps=EPS, replays=1)
    assert (again - delta).abs().max() <= EPS + 1e-7  # one step of eps from the carried delta
    stats = adversarial_train_epoch(
        model, [(x, y), (x, y)], opt, eps=EPS, step_size=0.0, steps=0, method="free",
        free_replays=2, scheduler=counter,
    )  # fmt: skip
    assert counter.steps == 3 + 4 and stats["images"] == 2 * len(y)


@pytest.mark.parametrize("method", ["fgsm_rs", "free"])
def test_fast_training_lowers_the_adversarial_loss_of_a_tiny_model(method: str) -> None:
    model, (x, y) = linear_model(), images(32)
    pgd = {"eps": EPS, "step_size": 2 / 255, "steps": 3}
    before = evaluate(model, [(x, y)], attack=pgd)["robust_loss"]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(5):
        adversarial_train_epoch(
            model, [(x[:16], y[:16]), (x[16:], y[16:])], opt, eps=EPS, step_size=0.0, steps=0,
            method=method, free_replays=2, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert evaluate(model, [(x, y)], attack=pgd)["robust_loss"] < before


def test_best_epoch_never_keeps_a_collapsed_epoch() -> None:
    assert best_epoch([]) == 0
    assert best_epoch([30.0, 41.0, 2.0, 1.5]) == 2  # collapse at epoch 3: epoch 2 is kept
    assert best_epoch([30.0, 30.0, 29.0]) == 1  # ties: the earliest
    assert collapsed(41.0 - COLLAPSE_DROP - 0.1, 41.0) and not collapsed(25.0, 41.0)
    assert not collapsed(0.0, -1.0)  # the first epoch has nothing to collapse from
    rng = random.Random(0)
    for _ in range(300):
        accs = [rng.choice([rng.uniform(0, 5), rng.uniform(20, 60)]) for _ in range(8)]
        kept = best_epoch(accs)
        before = max(accs[: kept - 1], default=-1.0)
        assert not collapsed(accs[kept - 1], before)
        assert accs[kept - 1] == max(accs)  # a collapse is never the best anyway; kept = max
        best, best_acc = 0, -1.0  # the AT stage's loop (stages/at.judge_epoch) agrees
        for epoch, acc in enumerate(accs, start=1):
            better, _ = judge_epoch(acc, best_acc, validated=True)
            if better:
                best, best_acc = epoch, acc
        assert best == kept


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adv_train.fgsm_step=0"], "adv_train.fgsm_step: must be > 0"),
        (["adv_train.fgsm_step=2.5"], "adv_train.fgsm_step: must be <= 2"),
        (["adv_train.method=fgsm"], "adv_train.method: must be one of"),
        (["adv_train.method=fgsm_rs", "data.val_size=0"], "adv_train.method: fgsm_rs needs a"),
        (["adv_train.method=fgsm_rs", "attack.steps=1"], "adv_train.method: fgsm_rs checks"),
        (["adv_train.free_replays=0"], "adv_train.free_replays: must be >= 1"),
        (["adv_train.method=free", "data.val_size=0"], "adv_train.method: free needs a"),
    ],
)
def test_bad_fast_at_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, overrides=overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_fgsm_rs_changes_the_adv_train_hash_only_when_selected() -> None:
    base = load_config(SMOKE, overrides=["finetune.asha.mode=async", "finetune.score=penalised"])
    pinned = stage_hashes(base)
    assert pinned["adv_train"] == "b8a6f920c317"  # tests/test_seeds.py's pin, unchanged
    step = load_config(
        SMOKE,
        overrides=["finetune.asha.mode=async", "finetune.score=penalised", "adv_train.fgsm_step=1"],
    )
    assert stage_hashes(step) == pinned  # PGD-AT does not use the FGSM step
    default = load_config(SMOKE)
    fast = stage_hashes(load_config(SMOKE, overrides=["adv_train.method=fgsm_rs"]))
    fast_1 = stage_hashes(
        load_config(SMOKE, overrides=["adv_train.method=fgsm_rs", "adv_train.fgsm_step=1"])
    )
    assert len({stage_hashes(default)["adv_train"], fast["adv_train"], fast_1["adv_train"]}) == 3
    free = [stage_hashes(load_config(SMOKE, overrides=["adv_train.method=free", f"adv_train.free_replays={m}"]))["adv_train"] for m in (8, 4)]  # fmt: skip
    assert stage_hashes(load_config(SMOKE, overrides=["adv_train.free_replays=4"])) == stage_hashes(
        default
    )
    assert len({*free, fast["adv_train"], stage_hashes(default)["adv_train"]}) == 4
    assert config_hash(load_config(SMOKE, overrides=["adv_train.fgsm_step=1.25"])) == config_hash(
        default
    )


def test_the_stage_names_the_method_and_flags_a_collapse() -> None:
    from rift_ray.stages.at import _epoch_line, start_line

    cfg = load_config(SMOKE, overrides=["adv_train.method=fgsm_rs"])
    assert start_line(cfg).startswith("fgsm_rs (step 1.25 x eps) for 4 epochs")
    row = {
        "epoch": 3, "lr": 0.1, "train_loss": 1.0, "train_adv_acc": 80.0, "val_clean_acc": 60.0,
        "val_robust_acc": 1.0, "images_per_s": 100.0, "best_epoch": 2, "collapsed": True,
    }  # fmt: skip
    assert "COLLAPSED (catastrophic overfitting" in _epoch_line(row, 4)
    assert "COLLAPSED" not in _epoch_line({**row, "collapsed": False}, 4)


def test_the_dry_run_cost_counts_the_fast_methods_steps() -> None:
    """rift_ray.cost: FGSM-RS attacks with one step, free AT takes the replays' training steps."""
    from rift_ray.cost import PGD_STEP, TRAIN_STEP, ModelFlops, Sizes, stage_flops

    sizes, mf = Sizes(100, 0, 10), ModelFlops(1.0, {"conv": 1.0})

    def at_flops(*overrides: str) -> float:
        return stage_flops(load_config(SMOKE, list(overrides)), sizes, mf)["adv_train"]

    epochs, k = load_config(SMOKE).adv_train.epochs, load_config(SMOKE).attack.steps
    assert at_flops() == epochs * 100 * (PGD_STEP * k + TRAIN_STEP)
    assert at_flops("adv_train.method=fgsm_rs") == epochs * 100 * (PGD_STEP + TRAIN_STEP)
    free = at_flops("adv_train.method=free", "adv_train.free_replays=4")
    assert free == epochs * 100 * 4 * TRAIN_STEP


def test_trainers_poll_fast_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's controller polls every 2 s by default: the sweep asks for 0.2 s (it passes
    the variable on to the controller), but a value the user exported wins."""
    from rift_ray.stages.at import HEALTH_CHECK_INTERVAL_S, fast_polling

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    fast_polling()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == HEALTH_CHECK_INTERVAL_S == "0.2"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    fast_polling()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in ENV_VARS_TO_PROPAGATE  # reaches the controller
    # stages.at.warm_up starts this Ray-internal actor early; a Ray release that moves it
    # should fail here rather than silently cost every small sweep ~2.5 s again
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (  # noqa: F401
        get_or_create_autoscaling_coordinator,
    )
