"""What determinism costs: the smoke sweep's fine-tuning stage under ``finetune.asha.mode``
``sync`` and ``async``, side by side.

    RAY_AUTH_MODE=disabled python -m benchmarks.asha_mode_bench [--rounds 2]

Runs ``rift-ray sweep sweeps/smoke.yaml --until mrc`` once, then per round copies that sweep
twice and runs its fine-tuning stage (``--until finetune``) once per mode, alternating which
goes first. Reports the stage's wall time (its record's ``seconds``), the trials' epochs
and the trial each mode picked (the best by ASHA score), and the sync/async ratio per round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import machine

SMOKE = "sweeps/smoke.yaml"


def sweep(storage: Path, name: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "rift_ray.cli", "sweep", SMOKE, "--storage", str(storage),
           "--name", name, "--set", "wandb.enabled=false", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def finetune(storage: Path, base: str, mode: str, n: int) -> dict[str, object]:
    name = f"{mode}-{n}"
    shutil.copytree(storage / base, storage / name)
    sweep(storage, name, "--set", f"finetune.asha.mode={mode}", "--until", "finetune")
    rec = json.loads((storage / name / "stages/finetune.json").read_text())
    rows = pq.read_table(storage / name / "tables/finetune.parquet").to_pylist()
    return {
        "seconds": float(rec["seconds"]),
        "epochs": {r["trial"]: r["epochs"] for r in rows},
        "best": rows[0]["trial"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        sweep(storage, "base", "--until", "mrc")
        ratios = []
        for n in range(args.rounds):
            order = ("sync", "async") if n % 2 == 0 else ("async", "sync")
            got = {mode: finetune(storage, "base", mode, n) for mode in order}
            ratios.append(got["sync"]["seconds"] / got["async"]["seconds"])
            for mode in ("sync", "async"):
                g = got[mode]
                print(f"round {n} {mode:5s} {g['seconds']:6.1f} s  best {g['best']}  "
                      f"epochs {json.dumps(g['epochs'], sort_keys=True)}")  # fmt: skip
            print(f"round {n} sync/async wall time: {ratios[-1]:.2f}")
        print(f"median sync/async: {statistics.median(ratios):.2f} over {len(ratios)} round(s)")


if __name__ == "__main__":
    main()
