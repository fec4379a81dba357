"""PGD, TRADES attack and evaluation on tiny CPU models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.attacks import corruption_accuracy, evaluate, pgd_attack, trades_attack

EPS = 8 / 255


def tiny_cnn(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def images(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[0] = 0.0  # pixels on the [0, 1] boundary must stay inside
    x[1] = 1.0
    return x, torch.randint(0, 3, (n,), generator=g)


def test_pgd_stays_in_ball_and_range() -> None:
    model, (x, y) = tiny_cnn(), images()
    x_adv = pgd_attack(
        model, x, y, eps=EPS, step_size=2 / 255, steps=5, generator=torch.Generator().manual_seed(1)
    )
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


def test_pgd_raises_loss() -> None:
    model, (x, y) = tiny_cnn(), images(64)
    model.eval()
    x_adv = pgd_attack(model, x, y, eps=0.1, step_size=0.02, steps=10, random_start=False)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_pgd_restores_modes_and_leaves_no_grads() -> None:
    model, (x, y) = tiny_cnn(), images()
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    model[0].bias.requires_grad_(False)
    pgd_attack(model, x, y, eps=EPS, step_size=2 / 255, steps=3)
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad


def test_pgd_attack_runs_in_eval_mode() -> None:
    model, (x, y) = tiny_cnn(), images()
    model.train()
    before = model[1].running_mean.clone()
    pgd_attack(model, x, y, eps=EPS, step_size=2 / 255, steps=3)
    assert torch.equal(model[1].running_mean, before)  # BN statistics untouched by the attack


def test_pgd_zero_steps_is_clean_and_seeded_runs_repeat() -> None:
    model, (x, y) = tiny_cnn(), images()
    assert torch.equal(pgd_attack(model, x, y, eps=EPS, step_size=1.0, steps=0), x)
    a = pgd_attack(
        model, x, y, eps=EPS, step_size=2 / 255, steps=3, generator=torch.Generator().manual_seed(5)
    )
    b = pgd_attack(
        model, x, y, eps=EPS, step_size=2 / 255, steps=3, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b)


def test_pgd_restarts_keep_the_worst_case() -> None:
    model, (x, y) = tiny_cnn(), images(64)
    kw = dict(eps=0.05, step_size=0.01, steps=2)
    one = pgd_attack(model, x, y, **kw, restarts=1, generator=torch.Generator().manual_seed(3))
    three = pgd_attack(model, x, y, **kw, restarts=3, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        l1, l3 = model(one), model(three)
    wrong1, wrong3 = l1.argmax(1) != y, l3.argmax(1) != y
    assert (wrong3 | ~wrong1).all()  # every example fooled by the first restart stays fooled
    same = wrong1 == wrong3
    ce1, ce3 = F.cross_entropy(l1, y, reduction="none"), F.cross_entropy(l3, y, reduction="none")
    assert (ce3[same] >= ce1[same] - 1e-6).all()
    assert (three - x).abs().max() <= 0.05 + 1e-6


def test_trades_attack_stays_in_ball() -> None:
    model, (x, _) = tiny_cnn(), images()
    x_adv = trades_attack(
        model, x, eps=EPS, step_size=2 / 255, steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_evaluate_clean_and_robust() -> None:
    model, (x, y) = tiny_cnn(), images(40)
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    model.train()
    out = evaluate(model, batches, attack={"eps": 0.1, "step_size": 0.02, "steps": 5})
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert out["n"] == 40
    assert out["clean_acc"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    assert out["clean_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert out["robust_loss"] > out["clean_loss"]
    assert 0 <= out["robust_acc"] <= 100
    again = evaluate(model, batches, attack={"eps": 0.1, "step_size": 0.02, "steps": 5})
    assert again == out  # seeded


def test_evaluate_image_data() -> None:
    data = pytest.importorskip("rift_ray.data")
    model, (x, y) = tiny_cnn(), images(10)
    d = data.ImageData((x * 255).round().to(torch.uint8), y, ["a", "b", "c"])
    out = evaluate(model, d, batch_size=4)
    assert out["n"] == 10 and 0 <= out["clean_acc"] <= 100


def test_corruption_accuracy_mean_over_cells() -> None:
    model, (x, y) = tiny_cnn(), images(20)
    cdata = {("fog", 1): [(x[:10], y[:10])], ("fog", 2): [(x[10:], y[10:])]}
    out = corruption_accuracy(model, cdata, batch_size=8)
    assert set(out) == {"fog-1", "fog-2", "mean"}
    assert out["mean"] == pytest.approx((out["fog-1"] + out["fog-2"]) / 2)
