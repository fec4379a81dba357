"""Whole smoke sweep: wall time against the compute inside it (= what Ray and the pipeline add).

    RAY_AUTH_MODE=disabled nice python -m benchmarks.sweep_bench          # sweeps/smoke.yaml

Runs ``rift-ray sweep sweeps/smoke.yaml`` once in a fresh process (fresh storage, a fresh
local Ray), timing it from outside, then reads what the sweep recorded about itself:

- stage wall times: ``summary.json`` ``seconds``;
- compute inside each stage: adversarial training = each epoch's training ``seconds`` plus
  its validation ``val_seconds`` in ``stages/adv_train.json`` history; MRC = the ``seconds``
  of every trial in ``tables/mrc.parquet``; fine-tuning = every epoch's training ``seconds``
  plus its ASHA metric evaluation ``metric_seconds`` in ``tables/finetune_epochs.parquet``;
  interpolation = each alpha point's ``seconds`` in ``tables/interpolation.parquet``.

Trials run concurrently (``resources``): the ideal stage time is then compute / slots,
so the table gives both the plain difference and ``wall - compute / slots``. Do not run
this next to another Ray job on a small machine (several local Ray instances disturb
each other).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import ROOT, machine


def _sum(path: Path, column: str) -> float:
    if not path.exists():
        return 0.0
    df = pq.read_table(path).to_pandas()
    return float(df[column].fillna(0).sum()) if column in df else 0.0


def _interpolation_seconds(path: Path) -> float:
    """Each alpha point's time once: its val and test rows both carry it (a few microseconds
    apart), and the AT point (alpha 0) is evaluated once but repeated for every trial."""
    if not path.exists():
        return 0.0
    df = pq.read_table(path).to_pandas()
    keys = [c for c in ("trial", "alpha") if c in df]
    df = df.sort_values("seconds").drop_duplicates(subset=keys, keep="last")
    at_rows = df[df["alpha"] == 0]
    return float(df[df["alpha"] != 0]["seconds"].sum() + at_rows["seconds"].max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(ROOT / "sweeps/smoke.yaml"))
    p.add_argument("--slots", type=int, default=2, help="concurrent trials (CPUs / trial CPU)")
    args = p.parse_args()
    if Path("/tmp/RIFT_REAL_AT").exists():
        sys.exit("another Ray job is running on this machine (/tmp/RIFT_REAL_AT); not started")
    with tempfile.TemporaryDirectory() as storage:
        name = f"sweep-bench-{int(time.time())}"
        cmd = [sys.executable, "-m", "rift_ray.cli", "sweep", args.sweep]
        cmd += ["--storage", storage, "--name", name]
        env = os.environ | {"RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        d = Path(storage) / name
        summary = json.loads((d / "summary.json").read_text())
        at = json.loads((d / "stages/adv_train.json").read_text())
        at_compute = sum(h.get("seconds", 0.0) + h.get("val_seconds", 0.0) for h in at["history"])
        compute = {
            "adv_train": at_compute,
            "mrc": _sum(d / "tables/mrc.parquet", "seconds"),
            "finetune": _sum(d / "tables/finetune_epochs.parquet", "seconds")
            + _sum(d / "tables/finetune_epochs.parquet", "metric_seconds"),
            "interpolate": _interpolation_seconds(d / "tables/interpolation.parquet"),
        }
    stage_s = summary["seconds"]
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    print(f"{args.sweep}: wall {wall:.1f} s from outside, {stage_s.get('total', 0):.1f} s inside\n")
    print(
        "| stage | wall s | compute s | wall - compute | wall - compute / slots | compute / wall |"
    )
    print("|---|---|---|---|---|---|")
    slots = {"adv_train": 1, "mrc": args.slots, "finetune": args.slots, "interpolate": args.slots}
    tot_w = tot_c = tot_ideal = 0.0
    for stage, c in compute.items():
        w = float(stage_s.get(stage, 0.0))
        ideal = c / slots[stage]
        tot_w, tot_c, tot_ideal = tot_w + w, tot_c + c, tot_ideal + ideal
        print(f"| {stage} | {w:.1f} | {c:.1f} | {w - c:.1f} | {w - ideal:.1f} | {c / w:.2f} |")
    print(
        f"| **stages** | {tot_w:.1f} | {tot_c:.1f} | {tot_w - tot_c:.1f} | "
        f"{tot_w - tot_ideal:.1f} | {tot_c / tot_w:.2f} |"
    )
    print(
        f"| **whole command** | {wall:.1f} | {tot_c:.1f} | {wall - tot_c:.1f} | | {tot_c / wall:.2f} |"
    )


if __name__ == "__main__":
    main()
