"""The ``rift-ray`` command.

    rift-ray sweep sweeps/smoke.yaml                  # run (or resume) a sweep
    rift-ray sweep sweeps/wrn.yaml --dry-run          # the plan, without computing
    rift-ray sweep sweeps/wrn.yaml --dry-run --gpu a100 --price 1.8   # and its cost
    rift-ray sweep sweeps/wrn.yaml --until mrc        # stop once MRC is done
    rift-ray sweep sweeps/smoke.yaml --set finetune.lrs=[0.001,0.005] --name try2
    rift-ray validate sweeps/wrn.yaml                 # print the resolved config
    rift-ray validate sweeps/wrn.yaml --diff          # only what differs from the defaults
    rift-ray status results/smoke                     # what is done
    rift-ray data cifar10-c                           # the official CIFAR-10-C files, once

Bad input (config, data, checkpoint, storage, arguments) exits with code 2 and one
line naming the problem; a sweep that fails while computing exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from rift_ray.config import ConfigError, SweepConfig, load_config, to_yaml
from rift_ray.rift.selection import set_label
from rift_ray.version import VersionAction


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.print_usage(sys.stderr)
        print(f"rift-ray: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _fail(msg: str, code: int = 2) -> int:
    print(f"rift-ray: error: {msg}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace) -> SweepConfig:
    fields = {"storage": getattr(args, "storage", None), "name": getattr(args, "name", None)}
    return load_config(args.sweep, overrides=args.set, **fields)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.diff:
        from rift_ray.config_text import nested_diff

        changed = nested_diff(cfg.to_dict(), SweepConfig().to_dict())
        print(yaml.safe_dump(changed, sort_keys=False, default_flow_style=None, width=100), end="")
        return 0
    print(to_yaml(cfg), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rift_ray.errors import SweepError
    from rift_ray.pipeline import run_sweep

    cfg = _config(args)
    if args.cluster and not args.dry_run:
        return _fail("--cluster: only with --dry-run (a sweep checks the cluster it joins)")
    costing = {"--gpu": args.gpu, "--gpus": args.gpus, "--price": args.price,
               "--utilisation": args.utilisation}  # fmt: skip
    given = [flag for flag, v in costing.items() if v is not None]
    if given and not args.dry_run:
        return _fail(f"{given[0]}: only with --dry-run (it prices the plan)")
    if args.dry_run:
        from rift_ray import cluster as cl
        from rift_ray.plan import print_plan

        opts = _cost_options(args)
        if isinstance(opts, str):
            return _fail(opts)

        if args.cluster:
            shape = cl.shape_of_cluster_yaml(args.cluster)
        elif cl.resolve_address(args.address) is not None:
            shape = cl.connect(cfg, args.address)
        else:
            shape = cl.local_shape(cfg)
        print_plan(cfg, shape, opts)
        return 0
    if args.restart == "all" and not args.yes and not _confirm_restart():
        return _fail(
            "--restart alone recomputes every stage, adversarial training included (what it "
            "replaces moves to <sweep>/history/): add --yes, or name the first stage to redo "
            "(--restart mrc keeps the adversarially trained model)"
        )
    try:
        summary = run_sweep(
            cfg, address=args.address, restart=args.restart, until=args.until,
            verbose=args.verbose, retry_failed=args.retry_failed,
        )  # fmt: skip
    except SweepError as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume where it stopped", 130)
    if summary.get("stopped_after"):
        print(
            f"rift-ray: stopped after {summary['stopped_after']} as asked (--until); "
            f"rift-ray status {summary['storage']} shows what is done"
        )
        return 0
    print_summary(summary)
    return 0


def _cost_options(args: argparse.Namespace) -> Any:
    """``--dry-run``'s pricing flags as ``plan.CostOptions``, or the one-line error text."""
    from rift_ray.cost import DEFAULT_UTILISATION, GPUS
    from rift_ray.plan import CostOptions

    if args.gpu is not None and args.gpu.lower() not in GPUS:
        return f"--gpu: unknown card {args.gpu!r}; choose one of {', '.join(GPUS)}"
    if args.price is not None and args.price < 0:
        return f"--price: must be >= 0 dollars per GPU-hour (got {args.price:g})"
    if args.utilisation is not None and not 0 < args.utilisation <= 1:
        return f"--utilisation: must be in (0, 1], e.g. 0.35 (got {args.utilisation:g})"
    if args.gpus is not None and args.gpus < 1:
        return f"--gpus: must be >= 1 (got {args.gpus})"
    return CostOptions(
        gpu=args.gpu.lower() if args.gpu else None,
        utilisation=DEFAULT_UTILISATION if args.utilisation is None else args.utilisation,
        price=args.price, gpus=args.gpus,
    )  # fmt: skip


def _confirm_restart() -> bool:
    """Ask on a terminal before every stage is recomputed; never without one."""
    if not sys.stdin.isatty():
        return False
    answer = input(
        "rift-ray: --restart recomputes every stage, adversarial training included; what it "
        "replaces moves to <sweep>/history/. Go on? [y/N] "
    )
    return answer.strip().lower() in ("y", "yes")


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console

    from rift_ray.aggregate import is_seeds_summary

    if is_seeds_summary(summary):
        print_seeds_summary(summary)
        return
    from rich.markup import escape
    from rich.table import Table

    from rift_ray.paired import noise_lines
    from rift_ray.results import pct, strategy_columns, summary_corruption

    console = Console(highlight=False)
    mods = "+".join(summary["modules"])
    console.print(
        f"\n[bold]RiFT sweep {summary['name']}[/bold]: module {mods}, lr {summary['lr']:g}, "
        f"alpha* {summary['alpha']:g} ({summary['reason']})"
    )
    table = Table(title="AT vs RiFT (accuracy, %)")
    table.add_column("model")
    table.add_column("split")
    for col in ("clean", "PGD", summary_corruption(summary) or "corruption"):  # "regenerated"
        table.add_column(col, justify="right")
    for who, label in (("at", "AT"), ("rift", "RiFT")):
        for split in ("val", "test"):
            m = summary[who].get(split) or {}
            table.add_row(
                label,
                split,
                *(
                    pct(m.get(k), finite_only=False)
                    for k in ("clean_acc", "robust_acc", "corruption_acc")
                ),
            )
    console.print(table)
    for line in noise_lines(summary):  # paired intervals, noise floor, confirmation
        console.print(escape(line))
    strategies = summary.get("strategies") or []
    if len(strategies) > 1:  # the comparison of module selections (finetune.strategies)
        comp = Table(title="Module selection strategies (best trial each, accuracy %)")
        regen = summary_corruption(summary, "corruption_source") == "generated"
        first, *cols = [c for c in strategy_columns(regen) if c.short]  # the strategy, figures
        comp.add_column(first.short)
        for c in cols:
            comp.add_column(c.short, justify="right")
        for r in strategies:
            comp.add_row(
                r[first.key] + (" *" if r.get("primary") else ""),
                *(_strategy_cell(r.get(c.key), c.accuracy) for c in cols),
            )
        console.print(comp)
        for r in strategies:
            mrc = "" if r.get("set_mrc") is None else f" (MRC {r['set_mrc']:.4g})"
            mods = escape(set_label(r.get("modules") or "no feasible trial"))
            console.print(f"  {r['strategy']}: {mods}{mrc}")
        console.print("  * primary strategy: its best trial is the final RiFT model")
    for who, aa in (summary.get("autoattack") or {}).items():
        impl = aa["settings"].get("implementation", "torchattacks").split(" (")[0]  # older: none
        console.print(
            escape(f"AutoAttack ({aa['settings'].get('version')}, {impl}, test, n={aa['n']}): ")
            + f"{'AT' if who == 'at' else 'RiFT'} {aa['robust_acc']:.2f}"
        )
    failures = summary.get("failures")
    if failures:  # what is missing from the result, and why
        for f in failures:
            line = escape(f"{f['stage']} failed: {f['name']}: {f['error']}")
            console.print(f"[yellow]{line}[/yellow]")
    elif summary.get("failed_modules"):
        console.print(f"[yellow]MRC failed for: {', '.join(summary['failed_modules'])}[/yellow]")
    secs = summary.get("seconds", {})
    console.print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()))


def print_seeds_summary(summary: dict[str, Any]) -> None:
    """The end-of-sweep summary of a ``seeds`` sweep: every figure as ``mean ± std (n=N)``."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rift_ray.aggregate import lookup
    from rift_ray.aggregate import mean_std_text as pm
    from rift_ray.paired import seeds_interval_lines
    from rift_ray.results import pct, summary_corruption

    console = Console(highlight=False, soft_wrap=True)
    n, chosen = summary.get("n"), summary.get("chosen") or {}

    def counts(key: str) -> str:
        return ", ".join(f"{k} ({v}/{n})" for k, v in (chosen.get(key) or {}).items())

    console.print(
        f"\n[bold]RiFT sweep {summary['name']}[/bold], seeds {', '.join(map(str, summary['seeds']))}: "
        f"module {counts('modules')}; lr {counts('lr')}; alpha* {pm(summary, 'alpha')}"
    )
    console.print(
        f"validation at alpha*: clean gain {pm(summary, 'clean_gain_val')}, "
        f"robust drop {pm(summary, 'robust_drop_val')} (points)"
    )
    table = Table(title=f"AT vs RiFT (accuracy, %: mean ± std over n={n} seeds)")
    for col in ("model", "split", "clean", "PGD", summary_corruption(summary) or "corruption"):
        table.add_column(col, justify="left" if col in ("model", "split") else "right")
    for who, label in (("at", "AT"), ("rift", "RiFT"), ("delta", "RiFT - AT")):
        for split in ("val", "test"):
            if lookup(summary.get("mean"), who, split) is None:
                continue
            table.add_row(
                label,
                split,
                *(
                    pm(summary, who, split, k, n=False)
                    for k in ("clean_acc", "robust_acc", "corruption_acc")
                ),
            )
    console.print(table)
    for line in seeds_interval_lines(summary):  # RiFT - AT: the t interval over seeds
        console.print(escape(line))
    _print_strategies_over_seeds(console, summary)
    for who in ("at", "rift"):
        if lookup(summary.get("mean"), "autoattack", who) is not None:
            console.print(
                f"AutoAttack (test): {'AT' if who == 'at' else 'RiFT'} "
                f"{pm(summary, 'autoattack', who, 'robust_acc')}"
            )
    for s in summary.get("per_seed") or []:
        rift, at = lookup(s, "rift", "test") or {}, lookup(s, "at", "test") or {}
        console.print(
            f"  seed {s.get('seed')}: {'+'.join(s.get('modules') or [])}, lr {s.get('lr'):g}, "
            f"alpha* {s.get('alpha'):g}; test clean {pct(at.get('clean_acc'), finite_only=False)} -> "
            f"{pct(rift.get('clean_acc'), finite_only=False)}, "
            f"PGD {pct(at.get('robust_acc'), finite_only=False)} -> "
            f"{pct(rift.get('robust_acc'), finite_only=False)}"
        )
    for f in summary.get("failures") or []:
        line = escape(f"seed {f.get('seed')}: {f['stage']} failed: {f['name']}: {f['error']}")
        console.print(f"[yellow]{line}[/yellow]")
    secs = summary.get("seconds", {})
    console.print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()))


def _print_strategies_over_seeds(console: Any, summary: dict[str, Any]) -> None:
    """The module-selection strategies of a ``seeds`` summary (finetune.strategies): change
    over AT per strategy and the paired difference primary - strategy with its 95% interval."""
    from rich.markup import escape
    from rich.table import Table

    from rift_ray.aggregate import strategy_seed_cells

    cells = strategy_seed_cells(summary)
    if not cells:
        return
    primary = summary["strategies"]["primary"]
    table = Table(
        title=f"Module selection strategies (test, points: mean ± std over seeds; "
        f"{primary} - strategy paired by seed, 95% t interval)"
    )
    shown = ["strategy", "metric", "change over AT", f"{primary} - strategy [95% CI]"]
    for col in shown:
        table.add_column(escape(col), justify="left" if col in ("strategy", "metric") else "right")
    for row in cells:
        table.add_row(*(escape(row[c]) for c in shown))
    console.print(table)


def _strategy_cell(v: float | None, accuracy: bool) -> str:
    """A cell of the printed strategy comparison (accuracies as in the AT vs RiFT table)."""
    from rift_ray.results import pct

    return pct(v, finite_only=False) if accuracy else "-" if v is None else f"{v:g}"


def cmd_status(args: argparse.Namespace) -> int:
    from rift_ray.results import open_sweep
    from rift_ray.status import status_lines, sweep_status

    if args.follow:
        return follow_status(args.sweep_dir, args.interval)
    status = sweep_status(open_sweep(args.sweep_dir))
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print("\n".join(status_lines(status)))
    if status.get("summary"):
        print_summary(status["summary"])
    return 0


def follow_status(sweep_dir: str, interval: float) -> int:
    """``rift-ray status --follow``: print each stage line when it changes (a laptop following
    a sweep that a Ray Job runs on a cluster, through its storage) until the sweep ends: exit 0
    with the summary once it is written, 1 when a stage failed."""
    import time

    from rift_ray.results import open_sweep
    from rift_ray.status import status_lines, sweep_status
    from rift_ray.store import StorageError

    seen: set[str] = set()
    waiting = False
    settle: float | None = None
    while True:
        try:
            status = sweep_status(open_sweep(sweep_dir))
        except StorageError as e:  # not written yet: the job may still be starting
            if not waiting:
                print(f"waiting for the sweep to write its records ({' '.join(str(e).split())})")
                waiting = True
            time.sleep(interval)
            continue
        lines = status_lines(status)
        if not seen:
            print(lines[0], flush=True)
        for r, line in zip(status["stages"], lines[1:]):  # one line per stage, in order
            key = f"{r.get('seed')}/{r['stage']}/{r['status']}"
            if r["status"] != "pending" and key not in seen:
                seen.add(key)
                print(f"{time.strftime('%H:%M:%S')} {line.strip()}", flush=True)
        if status.get("summary"):
            # the last stage writes the summary just before its record says done: wait for
            # that record (briefly), so its line is printed too
            running = any(r["status"] == "running" for r in status["stages"])
            settle = settle or time.monotonic() + 30
            if not running or time.monotonic() > settle:
                print_summary(status["summary"])
                return 0
            time.sleep(min(interval, 1.0))
            continue
        if any(r["status"] == "failed" for r in status["stages"]):
            return 1
        time.sleep(interval)


def cmd_report(args: argparse.Namespace) -> int:
    from rift_ray.report import export_tables, table_records, write_report
    from rift_ray.results import SweepResults, open_sweep

    store = open_sweep(args.sweep_dir)
    if args.format == "html":
        print(write_report(store, args.output, history=args.history))
    elif args.history:
        return _fail("--history: only with --format html")
    elif args.output == "-":
        if args.format != "json":
            return _fail("--output -: only with --format json")
        print(json.dumps(table_records(SweepResults.load(store)), indent=1))
    else:
        for path in export_tables(store, args.format, args.output):
            print(path)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from rift_ray.downloads import OFFICIAL, default_root, fetch

    spec = OFFICIAL[args.dataset]
    dest, downloaded = fetch(args.dataset, args.root, url=args.url, md5=args.md5)
    what = "downloaded, checked (md5) and extracted to" if downloaded else "already in"
    print(f"rift-ray: {spec.folder} {what} {dest}" + ("" if downloaded else "; nothing downloaded"))
    where = "by default" if dest.parent == default_root() else f"with data.root: {dest.parent}"
    print(
        f"sweeps on data.dataset {spec.name.removesuffix('-c')} read it {where} "
        f"(eval.corruption_source: files; or set eval.cifar_c_root: {dest})"
    )
    return 0


def _sweep_parser(s: argparse.ArgumentParser) -> None:
    """The arguments of ``rift-ray sweep``."""
    s.add_argument("sweep", help="sweep YAML file")
    s.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, else the running cluster this "
        "machine is a node of, else a new local instance; 'local' forces a new local instance)",
    )
    s.add_argument(
        "--cluster",
        metavar="CLUSTER_YAML",
        help="with --dry-run: check the bundles against the node types of this `ray up` "
        "config instead of the cluster the sweep would join",
    )
    s.add_argument("--storage", help="override storage (local path, s3://..., gs://...)")
    s.add_argument("--name", help="override the sweep name")
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    from rift_ray.store import STAGES

    s.add_argument(
        "--restart",
        nargs="?",
        const="all",
        choices=[*STAGES, "all"],
        metavar="STAGE",
        help="recompute STAGE and the stages after it (alone: every stage, which asks first "
        "or needs --yes); what they replace moves to <sweep>/history/",
    )
    s.add_argument("--yes", action="store_true", help="confirm --restart of every stage")
    s.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun failed MRC modules and fine-tuning trials alone, reusing everything else; "
        "later stages are recomputed only when the retried rows change their input",
    )
    s.add_argument(
        "--dry-run", action="store_true", help="print the plan and its cost (FLOPs, GPU-hours) only"
    )
    s.add_argument(
        "--gpu",
        metavar="CARD",
        help="with --dry-run: price on this card (a10g, l4, a100, h100, h200; default h100)",
    )
    s.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="with --dry-run: GPUs of the cluster (default: the cluster's, else the config's)",
    )
    s.add_argument(
        "--price",
        type=float,
        metavar="DOLLARS",
        help="with --dry-run: dollars per GPU-hour, for a dollar figure",
    )
    s.add_argument("--utilisation", type=float, metavar="U",
                   help="with --dry-run: achieved / peak FLOP/s assumed (default 0.35)")  # fmt: skip
    s.add_argument(
        "--until",
        choices=STAGES,
        help="stop once this stage is done (e.g. look at the MRC table first); "
        "the same command without it goes on from there",
    )
    s.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own output on the console too (it always goes to <sweep>/logs/ray.log)",
    )
    s.set_defaults(func=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rift-ray", description="RiFT (Robust Critical Fine-Tuning) sweeps on Ray")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _sweep_parser(sub.add_parser("sweep", help="run (or resume) a sweep"))

    v = sub.add_parser("validate", help="print the resolved config, or the first error")
    v.add_argument("sweep")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument(
        "--diff", action="store_true", help="only the fields that differ from the defaults"
    )
    v.set_defaults(func=cmd_validate)

    st = sub.add_parser("status", help="which stages of a sweep are done")
    st.add_argument("sweep_dir", help="<storage>/<name>, or a name under ./results")
    st.add_argument("--json", action="store_true")
    st.add_argument(
        "--follow",
        action="store_true",
        help="print each stage as it starts and ends, until the sweep is done (exit 0) or "
        "a stage fails (exit 1); works on s3:// / gs:// storage from any machine",
    )
    st.add_argument("--interval", type=float, default=10.0, help="--follow: seconds between looks")
    st.set_defaults(func=cmd_status)

    rp = sub.add_parser("report", help="an HTML report of a sweep, or its tables as CSV / JSON")
    rp.add_argument("sweep_dir", help="<storage>/<name>, or a name under ./results")
    rp.add_argument(
        "--format",
        choices=["html", "csv", "json"],
        default="html",
        help="html: one self-contained file (default); csv / json: one file per table",
    )
    rp.add_argument(
        "-o",
        "--output",
        help="html: the file (default <sweep_dir>/report.html); csv / json: a directory "
        "(default <sweep_dir>/export/); '-' prints every table as one JSON object",
    )
    rp.add_argument(
        "--history",
        metavar="ENTRY",
        help="the sweep as it was with this history/ entry (<stage>-<hash>, or its hash): "
        "what a restart or a changed config replaced; `rift-ray status` lists the entries",
    )
    rp.set_defaults(func=cmd_report)

    from rift_ray.downloads import OFFICIAL

    d = sub.add_parser(
        "data", help="download the official CIFAR-10-C / CIFAR-100-C files (checked, once)"
    )
    d.add_argument("dataset", choices=list(OFFICIAL))
    d.add_argument(
        "--root",
        metavar="DIR",
        help="put <DIR>/CIFAR-10-C/ (or CIFAR-100-C/) here; default: data.root's default "
        "($RIFT_DATA_ROOT, else ~/.cache/rift-ray/data), where sweeps look for it",
    )
    d.add_argument("--url", help="download from this mirror of the official tar instead of Zenodo")
    d.add_argument("--md5", help=argparse.SUPPRESS)  # with --url: another file (the tests)
    d.set_defaults(func=cmd_data)

    from rift_ray.commands import register_all

    register_all(sub)  # eval, export, compare, ...: rift_ray/commands/
    return p


def main(argv: list[str] | None = None) -> int:
    from rift_ray.checkpoint import CheckpointError
    from rift_ray.data import DataError
    from rift_ray.store import StorageError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, StorageError, CheckpointError) as e:
        return _fail(" ".join(str(e).split()))


if __name__ == "__main__":
    sys.exit(main())
