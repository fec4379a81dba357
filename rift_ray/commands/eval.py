"""``rift-ray eval``: a checkpoint measured with a sweep's evaluation protocol.

    rift-ray eval results/smoke/checkpoints/at.pt                     # config.yaml beside it
    rift-ray eval ~/models/at.pt --config sweeps/wrn.yaml --split test --autoattack
    rift-ray eval model.pt --config sweeps/smoke.yaml --json --set eval.test_subset=100

The numbers are the ones the sweep would report for that model as its AT model
(``summary.json``'s ``at``): :mod:`rift_ray.evaluation_cmd` runs the same code.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rift_ray.evaluation_cmd import SPLITS


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="clean / PGD (/ corruption / AutoAttack) accuracy of a checkpoint, with a "
        "sweep's evaluation protocol",
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint the sweep could start from (adv_train.checkpoint): rift-ray's, a "
        "plain or wrapped state dict, or RobustBench's model_dir/<name>",
    )
    p.add_argument(
        "--config",
        metavar="SWEEP_YAML",
        help="the sweep whose protocol to use (default: the config.yaml of the sweep whose "
        "checkpoints/ holds CHECKPOINT)",
    )
    p.add_argument(
        "--split", choices=SPLITS, help="one split only (default: val and test, as the sweep)"
    )
    p.add_argument(
        "--corruptions",
        action="store_true",
        help="also corruption accuracy on test (eval.corruptions, severities, source)",
    )
    p.add_argument(
        "--autoattack",
        action="store_true",
        help="also AutoAttack on the first eval.autoattack.subset test images",
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="a seeds sweep: PGD starts as seed N's stage 4 drew them (the data split stays "
        "the config's seed)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--address", help="Ray cluster address (as rift-ray sweep --address)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from rift_ray.evaluation_cmd import eval_config, evaluate_checkpoint, sweep_config_path

    cfg = eval_config(sweep_config_path(args.checkpoint, args.config), args.set)
    res = evaluate_checkpoint(
        cfg,
        args.checkpoint,
        splits=(args.split,) if args.split else SPLITS,
        corruptions=args.corruptions,
        autoattack=args.autoattack,
        address=args.address,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_result(res)
    return 0


def print_result(res: dict[str, Any]) -> None:
    """The figures as a table, like the sweep's final one (accuracy, %)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rift_ray.export import eps_text
    from rift_ray.metrics import METRICS
    from rift_ray.results import pct

    console = Console(highlight=False)
    m, a, p = res["model"], res["attack"], res["protocol"]
    console.print(
        escape(
            f"\n{res['checkpoint']}: {m['arch']}, {m['num_classes']} classes ({m['dataset']}); "
            f"PGD-{a['steps']} Linf eps {eps_text(a['eps'])}, step {eps_text(a['step_size'])}, "
            f"{a['restarts']} restart(s), seed {p['seed']}"
        )
    )
    keys = [k for k in METRICS if any(k in res.get(s, {}) for s in SPLITS)]
    table = Table(title="Evaluation (accuracy, %)")
    table.add_column("split")
    label = (p.get("corruptions") or {}).get("label")  # "regenerated" said where it is
    for k in keys:
        table.add_column(label if k == "corruption_acc" and label else METRICS[k], justify="right")
    table.add_column("n", justify="right")
    for split in SPLITS:
        if split in res:
            row = res[split]
            table.add_row(split, *(pct(row.get(k), finite_only=False) for k in keys), str(row["n"]))
    console.print(table)
    aa = res.get("autoattack")
    if aa:
        console.print(f"AutoAttack ({aa['settings']['version']}): first {aa['n']} test images")
    console.print(f"config hash {res['config_hash']}; {res['seconds']:.0f}s")
