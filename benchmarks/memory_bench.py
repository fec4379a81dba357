"""Peak memory of one interpolation point, as the sweep records it (``peak_mem_bytes``).

    nice python -m benchmarks.memory_bench                    # sweeps/smoke.yaml's settings

Calls the interpolation stage's task function directly (no Ray) for the AT model (alpha 0)
and one interpolated point on the sweep's synthetic data, under ``resources.track_memory``:
on CPU the peak bytes of the tensors the task allocates (``rift_ray.memory.PeakMemory``),
on a GPU ``torch.cuda.max_memory_allocated``. Also prints the parameter bytes of the
model, so the figure can be read as "states + activations".
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import ROOT, machine
from rift_ray.config import load_config
from rift_ray.data import load_dataset
from rift_ray.stages import alpha_points
from rift_ray.stages.common import ModelSpec, new_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(ROOT / "sweeps/smoke.yaml"))
    args = p.parse_args()
    cfg = load_config(args.sweep, overrides=["resources.torch_threads=1"])
    splits = load_dataset(cfg.data, seed=cfg.seed)
    spec = ModelSpec.of(splits)
    model = new_model(cfg, spec)
    at = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v + 0.01 if v.is_floating_point() else v for k, v in at.items()}
    params = sum(v.numel() * v.element_size() for v in at.values())
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    print(
        f"{args.sweep}: {cfg.model.arch}, state {params / 2**20:.2f} MiB, eval batch {cfg.eval.batch_size}\n"
    )
    print("| point | images (val + test) | peak MiB | method | seconds |")
    print("|---|---|---|---|---|")
    for alpha, ft_state in ((0.0, None), (0.5, ft)):
        t0 = time.perf_counter()
        rows = alpha_points._alpha_task._function(
            cfg.to_dict(), spec, splits, at, ft_state, [alpha]
        )
        n = sum(r["n"] for r in rows)
        r = rows[0]
        print(
            f"| alpha {alpha} | {n} | {r['peak_mem_bytes'] / 2**20:.1f} | {r['mem_method']} | "
            f"{time.perf_counter() - t0:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
