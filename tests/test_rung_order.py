"""The same sweep picks the same model, whichever fine-tuning trial reports first
(``finetune.asha.mode: sync``): two drivers, each delaying another trial."""

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
    # the grid's first two trials (lr 0.001 and 0.005) take the two CPU slots together; each
    # driver delays one of them, so the other reaches the first rung before it
    slow = {"a": "finetune_sleep@lr=0.005", "b": "finetune_sleep@lr=0.001"}
    for name, faults in slow.items():  # one after the other: the slots are theirs alone
        log = tmp_path / f"{name}.log"
        proc = start_driver(address, [[*args, "--name", name]], log, RIFT_RAY_FAULTS=faults,
                            RIFT_RAY_FAULT_SLEEP_S="6")  # fmt: skip
        text = finish(proc, log)
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
    # ... although the trials reached the rung in other orders
    a_order, b_order = report_order(tmp_path / "a"), report_order(tmp_path / "b")
    assert a_order.index("conv1_lr0.001") < a_order.index("conv1_lr0.005"), a_order
    assert b_order.index("conv1_lr0.005") < b_order.index("conv1_lr0.001"), b_order


def report_order(sweep: Path) -> list[str]:
    """The trials in the order their results reached the first rung."""
    rows = [r for r in table(sweep, "tables/finetune_rungs.parquet") if r["rung"] == 1]
    assert sorted(r["arrival"] for r in rows) == [1, 2, 3, 4]
    return [r["trial"] for r in sorted(rows, key=lambda r: r["arrival"])]
