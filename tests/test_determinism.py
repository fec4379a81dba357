"""Determinism on CPU: the same config and seed give the same MRC table and the same chosen module.

The method is run here without Ray (what every Ray trial runs, with one torch thread per
trial as the stages set it): one epoch of PGD adversarial training, the fixed adversarial
set, then the MRC of every module. Twice in this process and once in a fresh process, the
tables are bit-identical. End to end through Ray the same holds for a whole sweep:
tests/test_faults.py::test_driver_killed_during_mrc_and_finetune_resumes compares an
interrupted-and-resumed sweep with an uninterrupted one, table for table and bit for bit.
README "What survives what" says what is and is not bit-reproducible (GPU, thread counts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rift_ray.config import DataConfig, SyntheticConfig
from rift_ray.data import batches, load_dataset
from rift_ray.models import build_model, mrc_candidates
from rift_ray.rift import (
    MRCOptions,
    adversarial_set,
    adversarial_train_epoch,
    robust_criticality,
)

ATTACK = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 3}


def mrc_table(seed: int = 0, threads: int = 1) -> dict[str, object]:
    """AT for one epoch, the adversarial set, MRC of every module; floats as exact hex strings."""
    torch.set_num_threads(threads)
    data = DataConfig(
        dataset="synthetic", val_size=64, synthetic=SyntheticConfig(train_size=256, test_size=32)
    )
    splits = load_dataset(data, seed=seed)
    torch.manual_seed(seed)
    model = build_model("small_resnet", splits.num_classes, mean=splits.mean, std=splits.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    train = batches(
        splits.train, 64, shuffle=True, augment=True, seed=seed, epoch=0, drop_last=True
    )
    adversarial_train_epoch(model, train, opt, **ATTACK, generator=gen)
    x, y = adversarial_set(model, splits.val, **ATTACK, batch_size=64, seed=seed)
    rows = [
        robust_criticality(model, m, x, y, MRCOptions(epochs=2, batch_size=32, seed=seed))
        for m in mrc_candidates(model)
    ]
    rows.sort(key=lambda r: r.mrc)
    return {
        "weights": float(sum(p.double().sum() for p in model.state_dict().values())).hex(),
        "adv_set": float(x.double().sum()).hex(),
        "table": [[r.module, r.mrc.hex(), r.loss_before.hex(), r.acc_after.hex()] for r in rows],
        "chosen": rows[0].module,
    }


@pytest.fixture(scope="module")
def first() -> dict[str, object]:
    return mrc_table()


def test_same_seed_same_table_and_module(first: dict[str, object]) -> None:
    again = mrc_table()
    assert again == first
    assert len(first["table"]) == 10  # type: ignore[arg-type]


def test_fresh_process_same_table(first: dict[str, object]) -> None:
    """Another process (as another Ray worker would be) computes the same bits."""
    code = "import json, test_determinism as t; print(json.dumps(t.mrc_table()))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == first


def test_seed_matters(first: dict[str, object]) -> None:
    """Guard against a vacuous comparison: another seed gives another adversarial set and table."""
    other = mrc_table(seed=1)
    assert other["adv_set"] != first["adv_set"] and other["table"] != first["table"]
