"""Fast paths give the reference answers: cached-activation MRC, model blocks, alpha search."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
from torch import nn

from rift_ray.models import ARCHITECTURES, build_model, model_blocks, mrc_candidates, run_blocks
from rift_ray.models.preact_resnet import PreActResNet
from rift_ray.rift.interpolate import search_alpha, select_alpha
from rift_ray.rift.mrc import MRCOptions, MRCResult, mrc_base, robust_criticality
from rift_ray.rift.mrc_fast import freeze_batch_norms

GRID = [round(0.1 * i, 1) for i in range(11)]


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "preact_resnet18":  # its layout (names, blocks, shortcuts) at 1/8 of the width
        model: nn.Module = PreActResNet((2, 2, 2, 2), 5, base_width=8)
    else:
        extra = {"depth": 10, "widen_factor": 1} if arch == "wrn" else {}
        model = build_model(arch, 5, **extra)  # type: ignore[arg-type]
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model(torch.rand(16, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def fixed_set() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(40, 3, 32, 32, generator=g), torch.randint(0, 5, (40,), generator=g)


def _mrc(model: nn.Module, name: str, data: tuple[torch.Tensor, torch.Tensor], **kw: object):
    args = {"epochs": 2, "batch_size": 16, "lr": 5.0, "seed": 3} | kw
    base = args.pop("base", None)
    return robust_criticality(model, name, *data, MRCOptions(**args), base=base)  # type: ignore[arg-type]


def _assert_same(a: MRCResult, b: MRCResult, tol: float = 1e-5) -> None:
    assert b.epoch_losses == pytest.approx(a.epoch_losses, rel=tol, abs=tol)
    assert b.loss_before == pytest.approx(a.loss_before, rel=tol, abs=tol)
    assert b.mrc == pytest.approx(a.mrc, rel=tol, abs=tol)
    assert (b.acc_before, b.acc_after, b.best_epoch) == (a.acc_before, a.acc_after, a.best_epoch)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_compose_to_the_forward_pass(arch: str) -> None:
    model = _model(arch)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(run_blocks(model_blocks(model), x), model(x))
    owned = [n for b in model_blocks(model) for n in b.modules]
    for child, _ in model.named_children():  # every submodule runs in some block
        assert any(n == child or f"{n}.".startswith(f"{child}.") for n in owned), child


@pytest.mark.parametrize(
    "arch, module, cached, inside",
    [
        ("small_resnet", "conv1", "", False),  # the stem: nothing before it to cache
        ("small_resnet", "layer1.0.conv1", "layer1.0", False),  # identity shortcut: no split
        ("small_resnet", "layer1.0.conv2", "layer1.0", True),  # conv1 branch + shortcut cached
        ("small_resnet", "layer2.0.conv1", "layer2.0", True),  # projection shortcut cached
        ("small_resnet", "layer2.0.shortcut.0", "layer2.0", True),  # residual branch cached
        ("small_resnet", "linear", "linear", False),  # pooled features cached
        ("small_cnn", "conv3", "conv3", False),
        ("wrn", "block1.layer.0.conv1", "block1.layer.0", True),
        ("wrn", "block2.layer.0.convShortcut", "block2.layer.0", True),
        ("wrn", "block3.layer.0.conv2", "block3.layer.0", True),
        ("wrn", "fc", "fc", False),
        ("preact_resnet18", "layer1.1.conv1", "layer1.1", True),
        ("preact_resnet18", "layer3.0.shortcut.0", "layer3.0", True),
        ("preact_resnet18", "layer4.0.conv2", "layer4.0", True),
    ],
)
@pytest.mark.parametrize("projection", ["epoch", "step"])
def test_fast_mrc_matches_reference(
    arch: str,
    module: str,
    cached: str,
    inside: bool,
    projection: str,
    fixed_set: tuple[torch.Tensor, torch.Tensor],
) -> None:
    model = _model(arch)
    ref = _mrc(model, module, fixed_set, projection=projection, fast=False)
    fast = _mrc(model, module, fixed_set, projection=projection, fast=True)
    assert ref.cached_block == "" and fast.cached_block == cached
    assert fast.cached_inside == inside and not ref.cached_inside
    assert (fast.cache_bytes > 0) == bool(cached)
    _assert_same(ref, fast)
    assert ref.mrc > 0  # the ascent did move the loss, so the comparison means something
    if inside:  # block-input caching alone gives the same answer too
        _assert_same(ref, _mrc(model, module, fixed_set, projection=projection, split_blocks=False))
    # without reusing the evaluation's first batch for the next ascent step: the same again
    _assert_same(ref, _mrc(model, module, fixed_set, projection=projection, reuse_eval=False))
    unshuffled = _mrc(model, module, fixed_set, projection=projection, shuffle=False)
    ref_unshuffled = _mrc(
        model, module, fixed_set, projection=projection, fast=False, shuffle=False
    )
    _assert_same(ref_unshuffled, unshuffled)


@pytest.mark.parametrize(
    "arch, shuffle, projections",
    [
        ("small_resnet", True, ("epoch", "step")),
        ("small_resnet", False, ("epoch",)),
        ("wrn", True, ("epoch",)),
        ("preact_resnet18", True, ("epoch",)),
    ],
)
def test_shared_base_gives_the_reference_bit_for_bit(
    arch: str,
    shuffle: bool,
    projections: tuple[str, ...],
    fixed_set: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # One mrc_base for every module: each trial then skips the unperturbed evaluation and
    # its first backward, and must still get exactly what the reference computes alone.
    model = _model(arch)
    modules = mrc_candidates(model)
    base = mrc_base(model, modules, *fixed_set, MRCOptions(batch_size=16, seed=3, shuffle=shuffle))
    assert set(base.first_grads) == set(modules)
    for name in modules:
        assert base.first_grads[name].shape == model.get_submodule(name).weight.shape
    for projection in projections:
        for name in modules:
            kw = {"projection": projection, "shuffle": shuffle}
            ref = _mrc(model, name, fixed_set, fast=False, **kw)
            got = _mrc(model, name, fixed_set, base=base, **kw)
            assert (got.loss_before, got.acc_before) == (base.loss_before, base.acc_before)
            assert (got.mrc, got.epoch_losses, got.acc_after, got.best_epoch) == (
                ref.mrc,
                ref.epoch_losses,
                ref.acc_after,
                ref.best_epoch,
            ), (projection, name)
            assert got.loss_before == ref.loss_before and ref.mrc > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_batch_norms_give_the_same_forward_and_input_gradient(channels_last: bool) -> None:
    import copy

    model = _model("small_resnet")
    for p in model.parameters():
        p.requires_grad_(False)
    model.layer1[0].bn2.weight.requires_grad_(True)  # a trainable BN is left as it is
    frozen = copy.deepcopy(model)
    # stem, 2 per block x 3 blocks, 2 projection shortcuts: 9 BNs, one of them trainable
    assert freeze_batch_norms(frozen) == 8
    assert "forward" in vars(frozen.layer1[0].bn1) and "forward" not in vars(frozen.layer1[0].bn2)
    assert frozen.state_dict().keys() == model.state_dict().keys()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(6, 3, 32, 32).contiguous(memory_format=fmt)
    grads = []
    for net in (model, frozen):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0])  # forward bit for bit
    assert torch.equal(grads[0][1], grads[1][1])  # input gradient bit for bit
    assert frozen.layer1[0].bn2.weight.grad is not None  # the trainable one still trains


def test_shared_base_must_match_the_trial(fixed_set: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _model("small_resnet")
    base = mrc_base(model, ["conv1", "linear"], *fixed_set, MRCOptions(batch_size=16, seed=3))
    with pytest.raises(ValueError, match="seed, shuffle"):
        _mrc(model, "conv1", fixed_set, base=base, seed=4)
    with pytest.raises(ValueError, match="seed, shuffle"):
        _mrc(model, "conv1", fixed_set, base=base, batch_size=8)
    with pytest.raises(ValueError, match="no first-step gradient for layer1.0.conv1"):
        _mrc(model, "layer1.0.conv1", fixed_set, base=base)
    with pytest.raises(ValueError, match="only the fast path"):
        _mrc(model, "conv1", fixed_set, base=base, fast=False)
    with pytest.raises(ValueError, match="normalize: no such module with a weight in the model"):
        mrc_base(model, ["normalize"], *fixed_set)
    # the weight it moved first is the gradient it was given: a wrong one changes the answer
    wrong = dataclasses.replace(
        base,
        first_grads={"conv1": base.first_grads["conv1"] * 2, "linear": base.first_grads["linear"]},
    )
    assert _mrc(model, "conv1", fixed_set, base=wrong).mrc != _mrc(model, "conv1", fixed_set).mrc


@pytest.mark.parametrize("arch", ["small_resnet", "wrn", "preact_resnet18"])
def test_block_splits_compose_to_the_block(arch: str) -> None:
    model = _model(arch)
    x = torch.rand(2, 3, 32, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    blocks, splits = model_blocks(model), 0
    with torch.no_grad():
        for block in blocks:
            for name in names:
                cut = block.split_at(name)
                if cut is not None:
                    splits += 1
                    assert torch.equal(cut[1](*cut[0](x.clone())), block.fn(x.clone())), name
            x = block.fn(x)
    assert splits >= 3


def test_fast_mrc_with_uint8_inputs_and_cache_limit(
    fixed_set: tuple[torch.Tensor, torch.Tensor],
) -> None:
    model = _model("small_resnet")
    data = ((fixed_set[0] * 255).round().to(torch.uint8), fixed_set[1])
    ref = _mrc(model, "layer3.0.conv1", data, fast=False)
    _assert_same(ref, _mrc(model, "layer3.0.conv1", data))
    # layer3.0's input is 32x8x8 floats (8 KiB) per image: 320 KiB for 40 images (with the
    # projection shortcut's output, 480 KiB: that does not fit, so the block input is
    # cached); every earlier block input is larger, so a smaller budget caches nothing
    split = _mrc(model, "layer3.0.conv1", data, max_cache_bytes=480 * 1024)
    assert split.cached_inside and split.cache_bytes == 480 * 1024
    _assert_same(ref, split)
    fits = _mrc(model, "layer3.0.conv1", data, max_cache_bytes=320 * 1024)
    assert fits.cached_block == "layer3.0" and fits.cache_bytes == 320 * 1024
    assert not fits.cached_inside
    none = _mrc(model, "layer3.0.conv1", data, max_cache_bytes=320 * 1024 - 1)
    assert none.cached_block == "" and none.cache_bytes == 0
    _assert_same(ref, none)


def test_channels_last_mrc_is_close(fixed_set: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _model("small_resnet")
    for name in ("conv1", "layer2.0.conv2"):
        ref = _mrc(model, name, fixed_set, fast=False)
        _assert_same(ref, _mrc(model, name, fixed_set, channels_last=True), tol=1e-4)


# ---------------------------------------------------------------- alpha search


def _curves(rng: random.Random, strict: bool) -> dict[float, dict[str, float]]:
    """Monotone clean (rising) and robust (falling) accuracy over GRID, AT = alpha 0."""
    clean, robust = 80.0, 50.0
    out = {}
    for a in GRID:
        out[a] = {"clean_acc": round(clean, 2), "robust_acc": round(robust, 2)}
        clean += rng.uniform(0.01 if strict else 0.0, 0.6)
        robust -= rng.choice([0.0, rng.uniform(0.0, 0.08), rng.uniform(0.0, 1.0)])
    return out


def _grid_choice(curves: dict[float, dict[str, float]], tolerance: float = 0.1) -> float | None:
    return select_alpha([{"alpha": a, **m} for a, m in curves.items()], tolerance).alpha


@pytest.mark.parametrize("with_baseline", [True, False])
def test_search_alpha_on_monotone_curves(with_baseline: bool) -> None:
    rng = random.Random(0)
    for _ in range(300):
        curves = _curves(rng, strict=True)
        calls: list[float] = []

        def evaluate(alpha: float, curves: dict = curves, calls: list = calls) -> dict:
            calls.append(alpha)
            return curves[alpha]

        res = search_alpha(evaluate, GRID, 0.1, baseline=curves[0.0] if with_baseline else None)
        assert res.choice.alpha == _grid_choice(curves)
        assert not res.used_grid and res.evaluations == len(calls) == len(set(calls))
        assert res.evaluations <= (5 if with_baseline else 6)


def test_search_alpha_with_ties_still_agrees() -> None:
    rng = random.Random(1)
    for _ in range(300):
        curves = _curves(rng, strict=False)
        res = search_alpha(lambda a, c=curves: c[a], GRID, 0.1, baseline=curves[0.0])
        assert res.choice.alpha == _grid_choice(curves)


def test_search_alpha_falls_back_to_the_grid_when_not_monotone() -> None:
    # the search evaluates 0.6, 0.9, 1.0, then 0.8, which is below 0.9: not monotone
    robust = [50, 50, 49.99, 49.98, 49.97, 49.0, 49.95, 49.5, 49.2, 49.96, 48]
    curves = {a: {"clean_acc": 80 + 10 * a, "robust_acc": r} for a, r in zip(GRID, robust)}
    res = search_alpha(lambda a: curves[a], GRID, 0.1, baseline=curves[0.0])
    assert res.used_grid and res.evaluations == 10
    assert res.choice.alpha == _grid_choice(curves) == 0.9


def test_search_alpha_keeps_at_model_when_nothing_is_feasible() -> None:
    curves = {a: {"clean_acc": 80 + a, "robust_acc": 50 - 5 * a} for a in GRID}
    res = search_alpha(lambda a: curves[a], GRID, 0.1, baseline=curves[0.0])
    assert res.choice.alpha == 0.0 == _grid_choice(curves)
    assert res.evaluations <= 4


# ---------------------------------------------------------------- compute switches


def _at_epoch(model: nn.Module, **kw: object) -> dict[str, float]:
    from rift_ray.rift.train import adversarial_train_epoch

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 5, (16,), generator=g))]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    return adversarial_train_epoch(
        model, data * 2, opt, eps=8 / 255, step_size=2 / 255, steps=3, generator=gen, **kw
    )  # type: ignore[arg-type]


def _eval(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], **kw: object) -> dict:
    from rift_ray.attacks import evaluate

    attack = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 3}
    return evaluate(model, [data], attack=attack, **kw)  # type: ignore[arg-type]


def test_compute_defaults_keep_results_and_hashes() -> None:
    from rift_ray.config import SweepConfig
    from rift_ray.hashing import config_hash, stage_hashes

    default = SweepConfig()
    explicit = SweepConfig.model_validate({"compute": {"amp": "none", "channels_last": False}})
    assert stage_hashes(explicit) == stage_hashes(default)
    assert config_hash(explicit) == config_hash(default)
    bf16 = SweepConfig.model_validate({"compute": {"amp": "bf16"}})
    assert all(a != b for a, b in zip(stage_hashes(bf16).values(), stage_hashes(default).values()))
    # amp="none" is a no-op: the same numbers as a call without the argument
    a, b = _at_epoch(_model("small_cnn")), _at_epoch(_model("small_cnn"), amp="none")
    assert (a["loss"], a["adv_acc"]) == (b["loss"], b["adv_acc"])


def test_bf16_autocast_is_close_on_cpu(fixed_set: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _model("small_resnet")
    # MRC: the fast path under bf16 vs the fp32 reference. bf16 keeps 8 significant bits;
    # on this near-uniform model (loss ~1.6, MRC ~0.01) the losses agree to ~1e-4 relative
    # and the MRC to ~1%; the bounds leave a margin: losses 1%, MRC 10% (+1e-4)
    for name in ("layer2.0.conv2", "layer3.0.conv2"):
        ref = _mrc(model, name, fixed_set, fast=False)
        bf = _mrc(model, name, fixed_set, amp="bf16")
        assert bf.epoch_losses != ref.epoch_losses  # autocast did run in bf16
        assert bf.epoch_losses == pytest.approx(ref.epoch_losses, rel=0.01)
        assert bf.mrc == pytest.approx(ref.mrc, rel=0.1, abs=1e-4)
        assert bf.best_epoch == ref.best_epoch
    # evaluation: losses within 2%, accuracies within 2 of 40 images (5 points)
    e32, e16 = _eval(model, fixed_set), _eval(model, fixed_set, amp="bf16")
    for k in ("clean_loss", "robust_loss"):
        assert e16[k] == pytest.approx(e32[k], rel=0.02)
    for k in ("clean_acc", "robust_acc"):
        assert abs(e16[k] - e32[k]) <= 5.0
    # one adversarial-training epoch (2 steps) and fine-tuning: the losses within 2%
    a32, a16 = _at_epoch(_model("small_resnet")), _at_epoch(_model("small_resnet"), amp="bf16")
    assert a16["loss"] == pytest.approx(a32["loss"], rel=0.02)
    from rift_ray.rift.finetune import finetune

    def ft(amp: str) -> float:
        rows = finetune(
            _model("small_resnet"), ["layer2.0.conv2"], lambda e: [fixed_set], epochs=2, amp=amp
        )  # type: ignore[arg-type]
        return [r["train_loss"] for r in rows][-1]

    assert ft("bf16") == pytest.approx(ft("none"), rel=0.02)


def test_channels_last_model_is_near_identical(
    fixed_set: tuple[torch.Tensor, torch.Tensor],
) -> None:
    from rift_ray.compute import prepare_model

    model = _model("small_resnet")
    cl = prepare_model(_model("small_resnet"), channels_last=True)
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(cl.state_dict()) == list(model.state_dict())  # same names, same checkpoints
    e, e_cl = _eval(model, fixed_set), _eval(cl, fixed_set)
    for k in ("clean_loss", "robust_loss"):
        assert e_cl[k] == pytest.approx(e[k], rel=1e-4)
    a, a_cl = _at_epoch(model), _at_epoch(cl)
    assert a_cl["loss"] == pytest.approx(a["loss"], rel=1e-4)


@pytest.mark.skipif(
    not os.environ.get("RIFT_TEST_COMPILE"),
    reason="torch.compile on this 2-core CPU box takes ~150 s for small_cnn's forward and "
    "~70 s more for its backward (inductor C++ codegen); set RIFT_TEST_COMPILE=1 to run",
)
def test_compiled_model_matches_eager(fixed_set: tuple[torch.Tensor, torch.Tensor]) -> None:
    from rift_ray.compute import prepare_model

    model = _model("small_cnn")
    compiled = prepare_model(_model("small_cnn"), compile=True)
    assert list(compiled.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(fixed_set[0]), model(fixed_set[0]), rtol=1e-5, atol=1e-5
        )


# ---------------------------------------------------------------- memory


def test_peak_memory_counts_live_tensor_bytes() -> None:
    from rift_ray.memory import PeakMemory

    keep = torch.zeros(1000)  # allocated before: not counted
    with PeakMemory("cpu") as mem:
        a = torch.empty(256, 1024)  # 1 MiB
        b = a.view(-1)[:10]  # a view: no new storage
        keep.add_(1)  # in place on an old tensor: nothing new
        del a, b
        c = torch.empty(128, 1024)  # 0.5 MiB, after the 1 MiB was freed
        del c
    assert mem.method == "cpu_tensor_bytes" and mem.peak_bytes == 1024 * 1024
    lin = nn.Linear(512, 512, bias=False)
    x = torch.rand(64, 512)
    with PeakMemory("cpu") as mem:  # backward ops are seen too (the 1 MiB weight gradient)
        lin(x).sum().backward()
    assert mem.peak_bytes >= 512 * 512 * 4


def test_mrc_peak_memory_is_measured_and_unchanged_results(
    fixed_set: tuple[torch.Tensor, torch.Tensor],
) -> None:
    from rift_ray.memory import PeakMemory

    model = _model("small_resnet")
    peaks = {}
    for fast in (False, True):
        with PeakMemory("cpu") as mem:
            res = _mrc(model, "layer2.0.conv2", fixed_set, fast=fast)
        assert res == dataclasses.replace(
            _mrc(model, "layer2.0.conv2", fixed_set, fast=fast), seconds=res.seconds
        )  # measuring does not change a single number
        peaks[fast] = mem.peak_bytes
    # both hold the model copy and activations; the fast path also holds its cache
    assert peaks[False] > 0 and peaks[True] > 0
    fast = _mrc(model, "layer2.0.conv2", fixed_set)
    assert peaks[True] >= fast.cache_bytes


def test_stage_rows_record_peak_memory() -> None:
    """The MRC and interpolation rows carry peak_mem_bytes (functions called without Ray)."""
    from rift_ray.config import SweepConfig
    from rift_ray.data import load_dataset
    from rift_ray.stages import alpha_points
    from rift_ray.stages.common import ModelSpec, new_model

    cfg = SweepConfig.model_validate(
        {
            "data": {
                "dataset": "synthetic",
                "val_size": 16,
                "synthetic": {"train_size": 48, "test_size": 16},
            },
            "model": {"arch": "small_cnn"},
            "attack": {"steps": 2},
            "resources": {"torch_threads": 1},
        }
    )
    splits = load_dataset(cfg.data)
    spec = ModelSpec.of(splits)
    at = new_model(cfg, spec).state_dict()
    ft = {k: v + 0.01 if v.is_floating_point() else v for k, v in at.items()}
    rows = alpha_points._alpha_task._function(cfg.to_dict(), spec, splits, at, ft, [0.5])
    assert {r["split"] for r in rows} == {"val", "test"}
    assert all(r["peak_mem_bytes"] > 0 and r["mem_method"] == "cpu_tensor_bytes" for r in rows)
    off = cfg.model_copy(
        update={"resources": cfg.resources.model_copy(update={"track_memory": False})}
    )
    rows = alpha_points._alpha_task._function(off.to_dict(), spec, splits, at, ft, [0.5])
    assert all(r["peak_mem_bytes"] is None for r in rows)


def test_compact_adversarial_set_formats(fixed_set: tuple[torch.Tensor, torch.Tensor]) -> None:
    from rift_ray.advset import decode_adversarial_set, encode_adversarial_set

    x = fixed_set[0]
    sizes, errors = {}, {}
    for fmt in ("float32", "uint16", "uint8"):
        blob = encode_adversarial_set(x, fmt)  # type: ignore[arg-type]
        sizes[fmt] = blob["inputs"].numel() * blob["inputs"].element_size()
        back = decode_adversarial_set(blob)
        errors[fmt] = float(
            (back.float() / (255 if back.dtype == torch.uint8 else 1) - x).abs().max()
        )
    assert sizes["float32"] == 2 * sizes["uint16"] == 4 * sizes["uint8"]
    assert errors["float32"] == 0
    assert errors["uint16"] <= 1 / 131070 + 1e-7  # fixed point: half a 1/65535 step
    assert errors["uint8"] <= 1 / 510 + 1e-7
    # MRC on the uint16 set: within 1e-4 of the float32 set's (benchmarks/README.md measures it)
    model = _model("small_resnet")
    full = _mrc(model, "layer2.0.conv2", fixed_set)
    half = _mrc(
        model, "layer2.0.conv2", (decode_adversarial_set(encode_adversarial_set(x)), fixed_set[1])
    )
    assert half.epoch_losses == pytest.approx(full.epoch_losses, abs=1e-4)
    assert half.mrc == pytest.approx(full.mrc, abs=1e-4)


def test_stage_models_follow_the_compute_section() -> None:
    from rift_ray.config import SweepConfig
    from rift_ray.stages.common import ModelSpec, worker_model

    spec = ModelSpec(10, (0.5,) * 3, (0.5,) * 3, (3, 32, 32))
    plain = worker_model(SweepConfig(), spec)
    assert not plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    cfg = SweepConfig.model_validate({"compute": {"channels_last": True, "amp": "bf16"}})
    assert worker_model(cfg, spec).conv1.weight.is_contiguous(memory_format=torch.channels_last)
