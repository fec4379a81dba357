"""``rift-ray compare``: finished sweeps side by side (:mod:`rift_ray.compare`)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_compare(args: argparse.Namespace) -> int:
    from rift_ray.compare import export_compare, write_compare

    if args.format == "html":
        print(write_compare(args.sweep_dirs, args.output))
    else:
        print("\n".join(export_compare(args.sweep_dirs, args.output)))
    return 0


def register(sub: Any) -> None:
    """Add ``rift-ray compare SWEEP_DIR SWEEP_DIR... [-o FILE | --format csv [-o DIR]]``."""
    p = sub.add_parser(
        "compare",
        help="finished sweeps side by side: config differences, summaries, MRC, curves",
        description="Finished sweeps side by side in one self-contained HTML file: the "
        "config fields that differ, AT vs RiFT figures, the MRC rankings and the "
        "interpolation curves on shared axes (docs/report.md).",
    )
    p.add_argument(
        "sweep_dirs",
        nargs="+",
        metavar="SWEEP_DIR",
        help="<storage>/<name>, or a name under ./results",
    )
    p.add_argument(
        "--format",
        choices=["html", "csv"],
        default="html",
        help="html: one file (default); csv: config_diff, summary, mrc, interpolation .csv",
    )
    p.add_argument(
        "-o",
        "--output",
        help="html: the file (default ./compare.html); csv: a directory (default ./compare/)",
    )
    p.set_defaults(func=cmd_compare)
