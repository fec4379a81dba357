"""Issue 14, F3 and F7 (no Ray instance): SyncBatchNorm in multi-worker adversarial training
(``adv_train.sync_bn``: resolution, conversion, start-up line, stage hashes) and what
``eval.restarts`` computes (the per-image worst of the restarts)."""

from __future__ import annotations

import pytest
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.attacks import evaluate, pgd_attack
from rift_ray.config import (
    AdvTrainConfig,
    ATResources,
    ConfigError,
    SweepConfig,
    load_config,
)
from rift_ray.hashing import stage_hashes
from rift_ray.models import build_model
from rift_ray.stages.at import distributed_model, start_line
from rift_ray.stages.common import cpu_state

# stage_hashes(SweepConfig()) before adv_train.sync_bn existed
DEFAULT_AT_HASH = "d1014feeaadb"


def _cfg(workers: int = 1, gpu: bool = False, sync_bn: bool | None = None) -> SweepConfig:
    at_res = {"num_workers": workers, "use_gpu": gpu}
    return SweepConfig.model_validate(
        {"adv_train": {"sync_bn": sync_bn}, "resources": {"adv_train": at_res}}
    )


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize(
    ("sync_bn", "workers", "gpu", "on"),
    [
        (None, 1, False, False),  # single worker: the old behaviour
        (None, 1, True, False),
        (None, 4, True, True),  # several GPU workers: on by default
        (None, 2, False, False),  # CPU workers: SyncBatchNorm does not train there
        (False, 4, True, False),
        (True, 4, True, True),
        (True, 1, True, False),  # one worker: nothing to synchronise
    ],
)
def test_sync_bn_resolution(sync_bn: bool | None, workers: int, gpu: bool, on: bool) -> None:
    cfg = _cfg(workers, gpu, sync_bn)
    assert cfg.adv_train.uses_sync_bn(cfg.resources.adv_train) is on


def test_sync_bn_true_on_cpu_workers_is_an_error_naming_the_field() -> None:
    message = r"^adv_train\.sync_bn: true needs GPU workers"
    for workers in ("1", "2"):  # refused when the config is read, one line
        with pytest.raises(ConfigError, match=message):
            load_config(
                overrides=["adv_train.sync_bn=true", f"resources.adv_train.num_workers={workers}"]
            )
    with pytest.raises(ConfigError, match=message):
        AdvTrainConfig(sync_bn=True).uses_sync_bn(ATResources(num_workers=2))
    gpu = load_config(overrides=["adv_train.sync_bn=true", "resources.adv_train.use_gpu=true"])
    assert gpu.adv_train.sync_bn is True


# ---------------------------------------------------------------- conversion and checkpoints


def test_distributed_model_converts_batchnorm_and_keeps_state_dict_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several GPU workers: SyncBatchNorm, then DDP (faked here: no process group). The saved
    state has the plain model's keys and shapes and loads into it strictly, same outputs."""
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    torch.manual_seed(0)
    plain = build_model("small_resnet", 10)
    keys = {k: v.shape for k, v in plain.state_dict().items()}
    model = distributed_model(plain, _cfg(4, True), 4, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    # one training step (without a process group SyncBatchNorm normalises locally)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    F.cross_entropy(model.train()(x), y).backward()
    opt.step()
    saved = cpu_state(model)
    fresh = build_model("small_resnet", 10)
    fresh.load_state_dict(saved, strict=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    ("workers", "gpu", "sync_bn"), [(1, True, None), (2, False, None), (4, True, False)]
)
def test_distributed_model_keeps_batchnorm_where_sync_bn_is_off(
    monkeypatch: pytest.MonkeyPatch, workers: int, gpu: bool, sync_bn: bool | None
) -> None:
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    model = distributed_model(
        build_model("small_cnn", 10), _cfg(workers, gpu, sync_bn), workers, torch.device("cpu")
    )
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


# ---------------------------------------------------------------- the start-up line


def test_start_line_names_the_per_worker_batch_and_the_batchnorm() -> None:
    assert (
        start_line(_cfg(4, True)) == "pgd for 110 epochs, batch 128 = 4 workers x 32, SyncBatchNorm"
    )
    assert start_line(_cfg(1)) == "pgd for 110 epochs, batch 128 on 1 worker"
    assert start_line(_cfg(2)) == (
        "pgd for 110 epochs, batch 128 = 2 workers x 64, BatchNorm per worker "
        "(sync_bn ignored: SyncBatchNorm needs GPU workers)"
    )
    assert start_line(_cfg(4, True, sync_bn=False)).endswith(
        "4 workers x 32, BatchNorm per worker (adv_train.sync_bn: false)"
    )
    assert start_line(_cfg(3, True)) == (
        "pgd for 110 epochs, batch 126 = 3 workers x 42 "
        "(adv_train.batch_size 128 does not divide evenly), SyncBatchNorm"
    )


# ---------------------------------------------------------------- stage hashes


def test_sync_bn_enters_the_hash_only_where_it_changes_results() -> None:
    default = stage_hashes(SweepConfig())
    assert default["adv_train"] == DEFAULT_AT_HASH  # as before the field existed
    for off in (_cfg(1), _cfg(1, True), _cfg(2), _cfg(4, True, False), _cfg(1, True, True)):
        assert stage_hashes(off) == default  # resources never enter; off is the old behaviour
    # the smoke sweep (one CPU worker) keeps its pinned hash (tests/test_seeds.py)
    assert stage_hashes(load_config("sweeps/smoke.yaml"))["adv_train"] == "b8a6f920c317"
    multi = stage_hashes(_cfg(4, True))  # SyncBatchNorm changes the results: a new hash
    assert all(multi[k] != default[k] for k in default)
    assert stage_hashes(_cfg(4, True, True)) == multi  # explicit or by default: the same


# ---------------------------------------------------------------- eval.restarts (F7)


class _CoinFlip(nn.Module):
    """Class 0 when pixel (0, 0, 0) is below 0.5, else class 1: on images of 0.5 a random
    start within eps fools it with probability 1/2, independently per image and restart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0, 0, 0]
        return 10 * torch.stack([0.5 - p, p - 0.5], 1)


def test_restarts_give_the_per_image_worst_below_the_worst_run() -> None:
    """``restarts=3`` counts an image as robust only if all three restarts fail: the
    intersection of the three runs' robust sets, below the lowest run accuracy."""
    model, n = _CoinFlip(), 400
    x, y = torch.full((n, 1, 2, 2), 0.5), torch.zeros(n, dtype=torch.long)
    attack = {"eps": 0.1, "step_size": 0.0, "steps": 1}  # only the random start moves

    def robust(restarts: int, gen: torch.Generator) -> torch.Tensor:
        return (
            model(pgd_attack(model, x, y, **attack, restarts=restarts, generator=gen)).argmax(1)
            == y
        )

    gen = torch.Generator().manual_seed(0)
    runs = [robust(1, gen) for _ in range(3)]  # the same three random starts, one per run
    per_image = robust(3, torch.Generator().manual_seed(0))
    assert torch.equal(per_image, runs[0] & runs[1] & runs[2])
    worst_run = min(100.0 * float(r.float().mean()) for r in runs)
    per_image_acc = 100.0 * float(per_image.float().mean())
    assert per_image_acc < worst_run - 20  # ~12.5% against ~50%
    # evaluate() reports that per-image number
    got = evaluate(model, [(x, y)], attack=attack, restarts=3, seed=0)["robust_acc"]
    assert got == pytest.approx(per_image_acc)
