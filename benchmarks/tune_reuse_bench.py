"""Tune actor reuse: the MRC stage of the smoke sweep with and without ``reuse_actors``.

    RAY_AUTH_MODE=disabled python -m benchmarks.tune_reuse_bench [--rounds 2]

One local Ray instance (2 CPUs, 1 per trial); the MRC stage (``run_mrc``: adversarial set,
one Tune trial per module of small_resnet, smoke.yaml settings, random-init model) runs
in fresh storage, alternately with ``rift_ray.stages.tuning.REUSE_ACTORS`` True and False.
Reports the stage's wall time, the MRC compute inside it, and whether the MRC table is the
same bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid

import ray
import torch

from benchmarks.common import machine
from rift_ray.config import load_config
from rift_ray.data import load_dataset
from rift_ray.models import build_model, mrc_candidates
from rift_ray.stages import tuning
from rift_ray.stages.common import ModelSpec
from rift_ray.stages.mrc import run_mrc
from rift_ray.store import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config("sweeps/smoke.yaml", ["wandb.enabled=false", "resources.torch_threads=1"])
    splits = load_dataset(cfg.data, seed=cfg.seed)
    spec = ModelSpec.of(splits)
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, spec.num_classes, mean=spec.mean, std=spec.std)
    at_state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = mrc_candidates(model)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    splits_ref = ray.put(splits)
    walls: dict[bool, list[float]] = {True: [], False: []}
    compute: dict[bool, list[float]] = {True: [], False: []}
    tables: dict[bool, list[tuple]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for reuse in (True, False) if r % 2 == 0 else (False, True):
                tuning.REUSE_ACTORS = reuse
                store = Store.open(tmp, f"bench-{uuid.uuid4().hex[:8]}")
                t0 = time.perf_counter()
                rows, _ = run_mrc(cfg, store, splits_ref, spec, modules, at_state, "h", "tok")
                walls[reuse].append(time.perf_counter() - t0)
                compute[reuse].append(sum(row["seconds"] for row in rows))
                tables[reuse] = [(row["module"], row["mrc"], row["status"]) for row in rows]
    ray.shutdown()
    print(f"machine: {machine()}; {len(modules)} MRC trials, 2 slots, {args.rounds} round(s)\n")
    print("| reuse_actors | stage wall s (median) | trial compute s | wall / (compute / 2) |")
    print("|---|---|---|---|")
    for reuse in (True, False):
        w, c = statistics.median(walls[reuse]), statistics.median(compute[reuse])
        print(f"| {reuse} | {w:.1f} | {c:.1f} | {w / (c / 2):.2f} |")
    ratio = statistics.median(walls[False]) / statistics.median(walls[True])
    print(
        f"\nwithout / with reuse: {ratio:.2f}x; MRC tables identical: {tables[True] == tables[False]}"
    )


if __name__ == "__main__":
    main()
