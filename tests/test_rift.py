"""The RiFT method (rift_ray.rift) on tiny CPU models: MRC, fine-tuning, interpolation, AT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.attacks import evaluate
from rift_ray.rift import (
    AlphaChoice,
    MRCOptions,
    adversarial_set,
    adversarial_train_epoch,
    finetune,
    interpolate,
    mrc_table,
    project_l2_ball,
    robust_criticality,
    select_alpha,
)

CANDIDATES = ["0", "4", "7"]  # the Conv2d, Conv2d and Linear of tiny_cnn


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def blobs(n: int = 64, seed: int = 0, num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy synthetic images: the class sets the brightness, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    level = 0.2 + 0.6 * y.float() / max(1, num_classes - 1)
    x = level.view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- projection


def test_projection_lands_on_the_ball() -> None:
    d = torch.randn(5, 7) * 10
    p = project_l2_ball(d, 2.0)
    assert p.norm().item() == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(p / p.norm(), d / d.norm(), atol=1e-6)  # same direction


def test_projection_leaves_inside_deltas_unchanged() -> None:
    d = torch.randn(3, 3)
    assert torch.equal(project_l2_ball(d, d.norm().item() * 1.01), d)
    assert torch.equal(project_l2_ball(torch.zeros(4), 0.0), torch.zeros(4))


# ---------------------------------------------------------------- MRC


@pytest.fixture(scope="module")
def adv() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = tiny_cnn()
    x, y = blobs(48, num_classes=3)
    xa, ya = adversarial_set(model, [(x[:32], y[:32]), (x[32:], y[32:])], steps=3, seed=0)
    return model, xa, ya


def test_adversarial_set_is_fixed_and_in_ball() -> None:
    model = tiny_cnn()
    x, y = blobs(20)
    model.train()
    a, ya = adversarial_set(model, [(x, y)], steps=3, seed=1)
    b, _ = adversarial_set(model, [(x, y)], steps=3, seed=1)
    assert model.training
    assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ya, y)
    assert (a - x).abs().max() <= 8 / 255 + 1e-6 and a.min() >= 0 and a.max() <= 1
    q, _ = adversarial_set(model, [(x, y)], steps=3, seed=1, dtype=torch.uint8)
    assert q.dtype == torch.uint8 and torch.equal(q, (a * 255).round().to(torch.uint8))


def test_mrc_nonnegative_and_exact_difference(
    adv: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, xa, ya = adv
    results = [
        robust_criticality(model, m, xa, ya, MRCOptions(epochs=3, batch_size=16))
        for m in CANDIDATES
    ]
    for r in results:
        assert r.mrc >= 0
        assert r.mrc == r.loss_after - r.loss_before  # exactly
        assert r.loss_after == max(r.epoch_losses) == r.epoch_losses[r.best_epoch - 1]
        assert len(r.epoch_losses) == 3
    assert results[0].num_params == 4 * 3 * 3 * 3
    table = mrc_table(results)
    assert [row["mrc"] for row in table] == sorted(r.mrc for r in results)
    assert "acc_drop" in table[0]


def test_mrc_leaves_callers_model_alone(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, xa, ya = adv
    model.train()
    model[0].bias.requires_grad_(False)
    before = snapshot(model)
    robust_criticality(model, "4", xa, ya, MRCOptions(epochs=2, batch_size=16, lr=10.0))
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and not model[0].bias.requires_grad and model[4].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model[0].bias.requires_grad_(True)
    model.eval()


def test_mrc_zero_radius_moves_nothing(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """With a zero-radius ball only a perturbation of something else could change the loss."""
    model, xa, ya = adv
    for name in CANDIDATES:  # bias, BN and running statistics would all show up here
        r = robust_criticality(
            model, name, xa, ya, MRCOptions(epsilon=0.0, epochs=2, batch_size=16)
        )
        assert r.mrc == 0.0 and r.loss_after == r.loss_before and r.acc_after == r.acc_before


def test_mrc_only_weight_moves_and_step_projection_stays_in_ball(
    adv: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    """Hooks are deep-copied with the model, so they observe the internal copy at every forward."""
    model, xa, ya = adv
    original = snapshot(model)
    w0 = original["4.weight"]
    radius = 0.1 * w0.norm().item()
    seen: list[float] = []
    changed: set[str] = set()

    def watch(net: nn.Module, _inputs: object) -> None:
        for k, v in net.state_dict().items():
            if not torch.equal(v, original[k]):
                changed.add(k)
        seen.append((net[4].weight - w0).norm().item())

    for projection, expect_inside in (("step", True), ("epoch", False)):
        seen.clear()
        handle = model.register_forward_pre_hook(watch)
        try:
            robust_criticality(
                model,
                "4",
                xa,
                ya,
                MRCOptions(epochs=2, batch_size=8, lr=50.0, projection=projection),
            )
        finally:
            handle.remove()
        assert seen and max(seen) > 0
        inside = max(seen) <= radius * (1 + 1e-5)
        assert inside == expect_inside  # per-epoch projection lets steps leave the ball in between
    assert changed == {"4.weight"}


def test_mrc_matches_closed_form_for_binary_linear_model() -> None:
    """f(x) = Wx + b, 2 classes, one sample (x, y): CE = softplus(m) with m = l_other - l_y.

    For ||dW||_F <= r the largest margin change is sqrt(2) r ||x|| (dW = r u v^T with
    u = (e_other - e_y)/sqrt(2), v = x/||x||), and the CE gradient always points along
    u v^T, so ascent + projection reaches the maximizer: MRC = softplus(m + sqrt(2) r ||x||) - softplus(m).
    """
    torch.manual_seed(3)
    model = nn.Linear(5, 2)
    x, y = torch.randn(1, 5), torch.tensor([1])
    with torch.no_grad():
        logits = model(x)[0].double()
    m = (logits[0] - logits[1]).item()
    r = 0.1 * model.weight.norm().item()
    expected = (
        F.softplus(torch.tensor(m + math.sqrt(2) * r * x.norm().item())).item()
        - F.softplus(torch.tensor(m)).item()
    )
    for projection in ("step", "epoch"):
        res = robust_criticality(
            model, "", x, y, MRCOptions(epochs=3, lr=100.0, projection=projection)
        )
        assert res.mrc == pytest.approx(expected, rel=1e-4)


def test_mrc_never_exceeds_the_bound_on_many_samples() -> None:
    """Binary linear model: mean softplus(m_i + sqrt(2) r ||x_i||) bounds the worst-case loss."""
    torch.manual_seed(4)
    model = nn.Linear(6, 2)
    x, y = torch.randn(40, 6), torch.randint(0, 2, (40,))
    with torch.no_grad():
        logits = model(x).double()
    m = logits.gather(1, (1 - y).view(-1, 1)).squeeze(1) - logits.gather(1, y.view(-1, 1)).squeeze(
        1
    )
    r = 0.1 * model.weight.norm().item()
    bound = F.softplus(m + math.sqrt(2) * r * x.double().norm(dim=1)).mean().item()
    res = robust_criticality(
        model, "", x, y, MRCOptions(epochs=5, batch_size=8, lr=5.0, projection="step")
    )
    assert 0 < res.mrc and res.loss_after <= bound + 1e-5


def test_mrc_is_reproducible(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, xa, ya = adv
    kw = dict(epochs=2, batch_size=16, lr=5.0)
    a = robust_criticality(model, "0", xa, ya, MRCOptions(shuffle=False, **kw))
    b = robust_criticality(model, "0", xa, ya, MRCOptions(shuffle=False, **kw))
    assert a.epoch_losses == b.epoch_losses and a.mrc == b.mrc
    c = robust_criticality(model, "0", xa, ya, MRCOptions(shuffle=True, seed=7, **kw))
    d = robust_criticality(model, "0", xa, ya, MRCOptions(shuffle=True, seed=7, **kw))
    assert c.epoch_losses == d.epoch_losses and c.acc_after == d.acc_after


def test_mrc_rejects_unknown_module(adv: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, xa, ya = adv
    with pytest.raises(ValueError, match="layer9"):
        robust_criticality(model, "layer9", xa, ya)
    with pytest.raises(ValueError, match="2"):  # ReLU: no weight
        robust_criticality(model, "2", xa, ya)


# ---------------------------------------------------------------- fine-tuning


def test_finetune_trains_only_the_named_module() -> None:
    model = tiny_cnn()
    x, y = blobs(32, num_classes=3)
    before = snapshot(model)
    modes_in_eval: list[bool] = []

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        modes_in_eval.append(m.training)
        return {"val_acc": evaluate(m, [(x, y)])["clean_acc"]}

    rows = list(
        finetune(
            model,
            ["4"],
            lambda epoch: [(x[:16], y[:16]), (x[16:], y[16:])],
            epochs=4,
            lr=0.05,
            lr_milestones=(2,),
            evaluate_fn=evaluate_fn,
        )
    )
    after = snapshot(model)
    params = {k for k, _ in model.named_parameters()}
    assert not torch.equal(before["4.weight"], after["4.weight"])
    for k in params - {"4.weight"}:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(
        before["1.running_mean"], after["1.running_mean"]
    )  # BN ran in train mode
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005, 0.005])
    assert all("val_acc" in r and r["images"] == 32 for r in rows) and modes_in_eval == [False] * 4
    assert all(p.requires_grad for p in model.parameters())  # flags restored when exhausted


def test_ablation_sets_train_every_weight_or_only_batchnorm_statistics() -> None:
    """``full`` (:all) moves every parameter; ``bn_stats`` (:bn_stats) moves no parameter, only
    the BatchNorm running statistics, with the same batches; both restore flags and modes."""
    from rift_ray.rift.finetune import ALL_WEIGHTS, BN_STATS

    x, y = blobs(32, num_classes=3)

    def batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x[:16], y[:16]), (x[16:], y[16:])]

    model = tiny_cnn()
    before = snapshot(model)
    list(finetune(model, [ALL_WEIGHTS], batches, epochs=2, lr=0.05))
    after = snapshot(model)
    for k, _ in model.named_parameters():
        assert not torch.equal(before[k], after[k]), k
    model = tiny_cnn()
    model.eval()
    before = snapshot(model)
    rows = list(finetune(model, [BN_STATS], batches, epochs=2, lr=0.05))
    after = snapshot(model)
    for k, _ in model.named_parameters():
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert [r["lr"] for r in rows] == [0.0, 0.0] and rows[0]["images"] == 32
    assert not model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no BatchNorm"):
        finetune(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), [BN_STATS], batches)


def test_finetune_resume_continues_the_same_run() -> None:
    """4 epochs in one go == 2 epochs, then a resume from (weights, optimizer state) for 2 more."""
    x, y = blobs(32, num_classes=3)

    def data(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x[:16], y[:16]), (x[16:], y[16:])]

    kw = dict(epochs=4, lr=0.05, lr_milestones=(3,))
    whole = tiny_cnn()
    rows_whole = list(finetune(whole, ["4"], data, **kw))
    part = tiny_cnn()
    rows = []
    for row in finetune(part, ["4"], data, with_optimizer_state=True, **kw):
        rows.append(row)
        if row["epoch"] == 2:
            break
    saved_state, saved_opt = snapshot(part), rows[-1]["optimizer_state"]
    resumed = tiny_cnn(seed=5)  # different init: everything must come from the saved state
    resumed.load_state_dict(saved_state)
    rows_rest = list(finetune(resumed, ["4"], data, start_epoch=2, optimizer_state=saved_opt, **kw))
    assert [r["epoch"] for r in rows_rest] == [3, 4]
    assert [r["lr"] for r in rows_rest] == pytest.approx([r["lr"] for r in rows_whole[2:]])
    for k, v in snapshot(whole).items():
        assert torch.allclose(v, snapshot(resumed)[k], atol=1e-6), k


def test_finetune_rejects_unknown_module_at_call_time() -> None:
    with pytest.raises(ValueError, match="layer2.1.conv2"):
        finetune(tiny_cnn(), ["layer2.1.conv2"], lambda e: [])
    with pytest.raises(ValueError, match="2"):
        finetune(tiny_cnn(), ["2"], lambda e: [])  # ReLU has no parameters


def test_finetune_image_data() -> None:
    data = pytest.importorskip("rift_ray.data")
    x, y = blobs(16, num_classes=3)
    d = data.ImageData((x * 255).round().to(torch.uint8), y, ["a", "b", "c"])
    rows = list(finetune(tiny_cnn(), ["7"], d, epochs=1, batch_size=8))
    assert rows[0]["images"] == 16


# ---------------------------------------------------------------- interpolation


def two_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    at, ft = snapshot(tiny_cnn(seed=0)), snapshot(tiny_cnn(seed=1))
    at["1.num_batches_tracked"] = torch.tensor(10)
    ft["1.num_batches_tracked"] = torch.tensor(20)
    return at, ft


def test_interpolate_endpoints_are_bit_exact_and_midpoint() -> None:
    at, ft = two_states()
    zero, one, half = interpolate(at, ft, 0.0), interpolate(at, ft, 1.0), interpolate(at, ft, 0.5)
    for k in at:
        assert torch.equal(zero[k], at[k]) and torch.equal(one[k], ft[k])
        if at[k].is_floating_point():
            assert torch.allclose(half[k], (at[k] + ft[k]) / 2, atol=1e-7)
    assert zero["0.weight"].data_ptr() != at["0.weight"].data_ptr()  # clones, not views
    assert interpolate(at, ft, 0.4)["1.num_batches_tracked"].item() == 10
    assert half["1.num_batches_tracked"].item() == 20
    assert half["1.num_batches_tracked"].dtype == torch.int64


def test_interpolate_rejects_mismatches() -> None:
    at, ft = two_states()
    with pytest.raises(ValueError, match="alpha"):
        interpolate(at, ft, 1.5)
    with pytest.raises(ValueError, match="7.bias"):
        interpolate(at, {k: v for k, v in ft.items() if k != "7.bias"}, 0.5)
    with pytest.raises(ValueError, match="7.weight"):
        interpolate(at, ft | {"7.weight": torch.zeros(2, 2)}, 0.5)


# ---------------------------------------------------------------- alpha selection


ROWS = [
    {"alpha": 0.0, "clean_acc": 80.0, "robust_acc": 50.0},
    {"alpha": 0.5, "clean_acc": 81.0, "robust_acc": 50.05},
    {"alpha": 0.7, "clean_acc": 82.0, "robust_acc": 49.9},  # exactly at the 0.1 tolerance
    {"alpha": 0.9, "clean_acc": 83.0, "robust_acc": 49.8},
    {"alpha": 1.0, "clean_acc": 84.0, "robust_acc": 45.0},
]


def test_select_alpha_picks_largest_feasible_gain() -> None:
    c = select_alpha(ROWS, tolerance=0.1)
    assert isinstance(c, AlphaChoice) and c.feasible and c.alpha == 0.7  # boundary is inclusive
    assert c.clean_gain == pytest.approx(2.0) and c.robust_drop == pytest.approx(0.1)
    assert c.row == ROWS[2] and "0.7" in c.reason
    assert select_alpha(ROWS, tolerance=0.2).alpha == 0.9
    assert select_alpha(ROWS, tolerance=0.09).alpha == 0.5


def test_select_alpha_ties_go_to_the_smaller_alpha() -> None:
    rows = ROWS[:2] + [{"alpha": 0.6, "clean_acc": 81.0, "robust_acc": 50.0}]
    assert select_alpha(rows).alpha == 0.5


def test_select_alpha_without_gain_keeps_the_at_model() -> None:
    rows = [ROWS[0], {"alpha": 0.5, "clean_acc": 79.0, "robust_acc": 50.0}, ROWS[4]]
    c = select_alpha(rows)
    assert c.feasible and c.alpha == 0.0 and c.clean_gain == 0.0 and "no clean gain" in c.reason


def test_select_alpha_baseline() -> None:
    with pytest.raises(ValueError, match="baseline"):
        select_alpha(ROWS[1:])
    c = select_alpha(ROWS[1:], baseline={"clean_acc": 80.0, "robust_acc": 50.0})
    assert c.alpha == 0.7
    c = select_alpha(ROWS[1:], baseline={"clean_acc": 80.0, "robust_acc": 60.0})
    assert not c.feasible and c.alpha is None and c.reason


# ---------------------------------------------------------------- adversarial training


def test_adversarial_training_lowers_adversarial_loss() -> None:
    model = tiny_cnn(num_classes=2)
    x, y = blobs(64)
    attack = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 3}
    before = evaluate(model, [(x, y)], attack=attack)["robust_loss"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(4):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(64, generator=g)
        batches = [(x[perm[i : i + 16]], y[perm[i : i + 16]]) for i in range(0, 64, 16)]
        stats = adversarial_train_epoch(model, batches, opt, **attack, generator=gen)
    after = evaluate(model, [(x, y)], attack=attack)["robust_loss"]
    assert after < before
    assert stats["images"] == 64 and 0 <= stats["adv_acc"] <= 100 and stats["images_per_s"] > 0
    assert model.training


def test_trades_epoch_runs() -> None:
    model = tiny_cnn(num_classes=2)
    x, y = blobs(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = snapshot(model)
    stats = adversarial_train_epoch(
        model,
        [(x[:16], y[:16]), (x[16:], y[16:])],
        opt,
        eps=8 / 255,
        step_size=2 / 255,
        steps=2,
        method="trades",
        generator=torch.Generator().manual_seed(0),
    )
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert 0 <= stats["clean_acc"] <= 100 and stats["images"] == 32
    assert not torch.equal(before["0.weight"], model[0].weight)
