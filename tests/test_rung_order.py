"""The same sweep picks the same model, whichever fine-tuning trial reports first
(``finetune.asha.mode: sync``): two drivers at once, each delaying other trials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_faults import (  # noqa: F401 - fixtures
    NO_WANDB,
    TINY,
    address,
    exit_codes,
    finish,
    start_ckpt,
    start_driver,
    table,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# four trials, rungs at epochs 1 and 2: two go on from the first, one from the second
GRID = [
    "--set", "mrc.include=[conv1]", "--set", "finetune.lrs=[0.001,0.005,0.02,0.05]",
    "--set", "finetune.epochs=3", "--set", "finetune.asha.grace_period=1",
]  # fmt: skip


def test_trials_reporting_in_other_orders_make_the_same_decisions(
    address: str,  # noqa: F811
    start_ckpt: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    args = [*TINY, *GRID, *NO_WANDB, "--storage", str(tmp_path),
            "--set", f"adv_train.checkpoint={start_ckpt}"]  # fmt: skip
    slow = {"a": "finetune_sleep@lr=0.001;finetune_sleep@lr=0.005",  # the small lrs start late
            "b": "finetune_sleep@lr=0.02;finetune_sleep@lr=0.05"}  # fmt: skip
    procs = {
        name: start_driver(address, [[*args, "--name", name]], tmp_path / f"{name}.log",
                           RIFT_RAY_FAULTS=faults, RIFT_RAY_FAULT_SLEEP_S="4")
        for name, faults in slow.items()
    }  # fmt: skip
    for name, proc in procs.items():
        text = finish(proc, tmp_path / f"{name}.log")
        assert exit_codes(text) == [0], text[-4000:]

    def outcome(name: str) -> dict[str, Any]:
        sweep = tmp_path / name
        ft = table(sweep, "tables/finetune.parquet")
        rungs = table(sweep, "tables/finetune_rungs.parquet")
        summary = json.loads((sweep / "summary.json").read_text())
        return {
            "trials": sorted(
                (r["trial"], r["status"], r["epochs"], r["best_val_score"]) for r in ft
            ),
            "rungs": sorted((r["trial"], r["rung"], r["score"], r["decision"]) for r in rungs),
            "summary": {k: summary[k] for k in ("trial", "lr", "alpha", "at", "rift")},
        }

    a, b = outcome("a"), outcome("b")
    assert a == b
    # successive halving: 4 -> 2 after epoch 1 -> 1 after epoch 2, which runs all 3 epochs
    assert sorted(e for _, _, e, _ in a["trials"]) == [1, 1, 2, 3]
    assert [d for _, r, _, d in a["rungs"] if r == 1].count("kept") == 2
    assert [d for _, r, _, d in a["rungs"] if r == 2].count("kept") == 1
    # ... although the trials reported in other orders
    assert report_order(tmp_path / "a") != report_order(tmp_path / "b")


def report_order(sweep: Path) -> list[str]:
    """The trials in the order their results reached the first rung."""
    rows = [r for r in table(sweep, "tables/finetune_rungs.parquet") if r["rung"] == 1]
    assert sorted(r["arrival"] for r in rows) == [1, 2, 3, 4]
    return [r["trial"] for r in sorted(rows, key=lambda r: r["arrival"])]
