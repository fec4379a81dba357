"""``rift-ray export``: a finished sweep's final model (``checkpoints/rift.pt``) as a
safetensors file or a RobustBench-style state dict, with a model card beside it.

    rift-ray export results/smoke --format safetensors     # results/smoke/export/model.safetensors
    rift-ray export results/smoke --format robustbench -o models/cifar10/Linf/MyRiFT.pt
    rift-ray export s3://bucket/sweeps/wrn --format robustbench   # written back to the bucket

:mod:`rift_ray.export` does the work.
"""

from __future__ import annotations

import argparse
from typing import Any

from rift_ray.export import FORMATS


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="the final model of a sweep as safetensors or a RobustBench .pt, with a card"
    )
    p.add_argument(
        "sweep_dir", help="<storage>/<name> (s3:// and gs:// too), or a name under ./results"
    )
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="safetensors: a .safetensors file; robustbench: a bare state dict .pt that "
        "RobustBench's loaders and torch.load(weights_only=True) read",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="the file (or a directory for model.<ext>); default <sweep_dir>/export/model."
        "safetensors or model.pt; <stem>.card.json and <stem>.card.md go beside it",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from rift_ray.export import export_sweep

    res = export_sweep(args.sweep_dir, args.format, args.output)
    r = res.card["rift"]
    print(f"{res.path} ({res.size} bytes; trial {r['trial']}, alpha* {r['alpha']:g})")
    print(res.card_json)
    print(res.card_md)
    return 0
