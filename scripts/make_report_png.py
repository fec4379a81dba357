"""Regenerate docs/report.png: the HTML report of a small synthetic sweep where RiFT moved
something (alpha* > 0), rendered by headless Chromium.

    RAY_AUTH_MODE=disabled WANDB_MODE=offline .venv/bin/python scripts/make_report_png.py

runs, on CPU in about 3 minutes (2 cores), exactly this sweep (synthetic data only,
nothing from a real dataset):

    rift-ray sweep sweeps/smoke.yaml --storage <tmp> --name report-example \\
        --set seed=1 --set interpolate.search=grid --set interpolate.test_curve=true \\
        --set eval.corruptions=[gaussian_noise,shot_noise,defocus_blur,fog,brightness,contrast,pixelate,jpeg_compression] \\
        --set eval.severities=[1,3,5] --set eval.corruption_source=generated \\
        --set eval.autoattack.enabled=true --set eval.autoattack.subset=16 \\
        --set eval.autoattack.alphas=[1.0]

(seed 1 fine-tunes ``conv1`` at lr 0.01 and picks alpha* = 1: clean +1.5 and PGD +2.0
points on validation; the shipped smoke sweep, seed 0, keeps the AT model, alpha* = 0).
``search: grid`` and ``test_curve`` measure whole curves, so the trade-off figure and the
corruption heatmap have every alpha. Then ``rift-ray report`` and

    chromium --headless --screenshot=... --window-size=1200,16000 file://.../report.html

cropped to the page. ``--sweep DIR`` renders an existing finished sweep instead; the
script stops if the sweep's alpha* is 0 (the picture would show RiFT doing nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "seed=1",
    "interpolate.search=grid",
    "interpolate.test_curve=true",
    "eval.corruptions=[gaussian_noise,shot_noise,defocus_blur,fog,brightness,contrast,"
    "pixelate,jpeg_compression]",
    "eval.severities=[1,3,5]",
    "eval.corruption_source=generated",
    "eval.autoattack.enabled=true",
    "eval.autoattack.subset=16",
    "eval.autoattack.alphas=[1.0]",
]


def run_sweep(storage: str) -> Path:
    """The example sweep under ``storage``; its directory."""
    from rift_ray.cli import main

    args = ["sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--storage", storage,
            "--name", "report-example"]  # fmt: skip
    for s in SETTINGS:
        args += ["--set", s]
    if main(args) != 0:
        sys.exit("the example sweep failed")
    return Path(storage) / "report-example"


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 16000) -> None:
    """``page`` as a PNG of ``width`` pixels, cropped below the page's last content."""
    from PIL import Image, ImageChops

    browser = shutil.which("chromium") or sys.exit("no chromium on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--force-device-scale-factor=1", f"--user-data-dir={tmp}/profile",
             f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        img = Image.open(shot).convert("RGB")
    box = ImageChops.difference(img, Image.new("RGB", img.size, "white")).getbbox()
    if box is None:
        sys.exit(f"{page}: the screenshot is blank")
    img = img.crop((0, 0, width, min(img.height, box[3] + 20)))
    img.quantize(colors=256).save(out, optimize=True)  # a palette keeps the file small


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", help="a finished sweep to render (default: run the example)")
    p.add_argument("--storage", help="where the example sweep runs (default: a temp dir)")
    p.add_argument("-o", "--out", default=str(ROOT / "docs" / "report.png"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "offline")
    sweep = Path(args.sweep) if args.sweep else run_sweep(args.storage or tempfile.mkdtemp())
    summary = json.loads((sweep / "summary.json").read_text())
    if not summary.get("alpha"):
        sys.exit(f"{sweep}: alpha* = 0, RiFT moved nothing; pick other settings")
    from rift_ray.report import write_report
    from rift_ray.results import open_sweep

    page = Path(write_report(open_sweep(str(sweep))))
    screenshot(page, Path(args.out))
    print(f"{args.out}: report of {sweep} (alpha* = {summary['alpha']:g})")


if __name__ == "__main__":
    main()
