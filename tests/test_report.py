"""HTML report, table exports, `rift-ray status` and progress lines, on a fake sweep directory."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from rift_ray import store as layout
from rift_ray.cli import main
from rift_ray.config import SweepConfig, to_yaml
from rift_ray.figures import fig_interpolation
from rift_ray.progress import Progress
from rift_ray.report import render_html
from rift_ray.results import SUMMARY_SCHEMA, SweepResults, open_sweep, summary_table
from rift_ray.status import sweep_status
from rift_ray.store import SUMMARY_TABLE, Store

TRIALS = {"conv1_lr0.01": "finished", "conv1_lr0.1": "stopped", "fc_lr0.01": "failed"}


def fake_summary() -> dict[str, Any]:
    return {
        "name": "fake",
        "seed": 3,
        "config_hash": "abc123",
        "modules": ["conv1"],
        "lr": 0.01,
        "trial": "conv1_lr0.01",
        "alpha": 0.5,
        "clean_gain_val": 2.0,
        "robust_drop_val": 0.0,
        "reason": "largest clean gain within tolerance",
        "choices": [
            {
                "trial": "conv1_lr0.01",
                "alpha": 0.5,
                "clean_gain": 2.0,
                "robust_drop": 0.0,
                "feasible": True,
                "reason": "ok",
            }
        ],
        "at": {
            "val": {"clean_acc": 70.0, "robust_acc": 40.0},
            "test": {"clean_acc": 69.0, "robust_acc": 39.0, "corruption_acc": 60.0},
        },
        "rift": {
            "val": {"clean_acc": 72.0, "robust_acc": 40.0},
            "test": {"clean_acc": 71.5, "robust_acc": 38.9, "corruption_acc": 62.0},
        },
        "seconds": {"adv_train": 10.0, "mrc": 5.0, "finetune": 7.0, "interpolate": 3.0},
        "versions": {"rift_ray": "0.1.0", "torch": "2.x"},
    }


def make_sweep(root: Path, *, finished: bool = True) -> Store:
    """A small sweep directory as the pipeline writes it (finished, or running fine-tuning)."""
    cfg = SweepConfig.model_validate(
        {"name": "fake", "storage": str(root), "adv_train": {"epochs": 3}}
    )
    store = Store.open(str(root), "fake")
    store.put_text(layout.CONFIG, to_yaml(cfg))
    history = [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 2.0 - 0.2 * e,
            "train_clean_acc": 30.0 + 5 * e,
            "train_adv_acc": 20.0 + 3 * e,
            "images_per_s": 300.0,
            "seconds": 2.0,
            "val_clean_acc": 40.0 + 5 * e,
            "val_robust_acc": 25.0 + 3 * e,
            "val_clean_loss": 1.5,
            "best_epoch": e,
        }
        for e in (1, 2, 3)
    ]
    store.write_stage("adv_train", status="done", hash="h1", seconds=10.0, history=history)
    mrc = [
        {"module": "conv1", "mrc": 0.05, "status": "done", "error": "", "node": "n1"},
        {"module": "fc", "mrc": 0.2, "status": "done", "error": "", "node": "n1"},
        {"module": "conv2", "mrc": None, "status": "failed", "error": "OOM", "node": "n1"},
    ]
    store.put_table(layout.MRC_TABLE, mrc)
    store.write_stage("mrc", status="done", hash="h2", seconds=5.0, computed=3, failed=["conv2"])
    if not finished:
        store.write_stage("finetune", status="running", hash="h3", started=1.0)
        trial_dir = root / "fake/ray/finetune-h3/finetune_trial_0"
        trial_dir.mkdir(parents=True)
        lines = [
            {"trial": "conv1_lr0.01", "best_val_score": s, "best_epoch": 1} for s in (0.5, 1.5)
        ]
        (trial_dir / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        return store
    trials, epochs = [], []
    for i, (name, status) in enumerate(TRIALS.items()):
        n = {"finished": 3, "stopped": 1, "failed": 0}[status]
        trials.append(
            {
                "trial": name,
                "modules": name.split("_lr")[0],
                "lr": float(name.split("_lr")[1]),
                "epochs": n,
                "status": status,
                "best_epoch": n,
                "best_val_score": 1.0 - i if n else None,
                "best_val_gain": 1.0 - i if n else None,
                "error": "boom" if status == "failed" else "",
            }
        )
        epochs += [
            {
                "epoch": e,
                "trial": name,
                "train_loss": 1.0 / e,
                "train_acc": 60.0 + e,
                "val_score": 0.5 * e - i,
            }
            for e in range(1, n + 1)
        ]
    store.put_table(layout.FINETUNE_TABLE, trials)
    store.put_table(layout.FINETUNE_EPOCHS_TABLE, epochs)
    store.write_stage("finetune", status="done", hash="h3", seconds=7.0, survivors=["conv1_lr0.01"])
    interp = [
        {
            "alpha": a,
            "split": split,
            "clean_acc": 70.0 + 4 * a,
            "robust_acc": 40.0 - 2 * a * a,
            "corruption_acc": 60.0 + a if split == "test" else None,
            "trial": "conv1_lr0.01",
            "selected": a == 0.5,
        }
        for split in ("val", "test")
        for a in (0.0, 0.5, 1.0)
    ]
    store.put_table(layout.INTERPOLATION_TABLE, interp)
    store.put_json(layout.SUMMARY, fake_summary())
    store.write_stage("interpolate", status="done", hash="h4", seconds=3.0)
    return store


@pytest.fixture
def sweep(tmp_path: Path) -> Store:
    return make_sweep(tmp_path)


FIGURES = ["fig-before-after", "fig-adv-train", "fig-mrc", "fig-finetune", "fig-interpolation"]
FIGURES += ["fig-mrc-layers", "fig-tradeoff"]  # the RiFT views (rift_ray/figures_rift.py)


def test_html_report_is_self_contained(sweep: Store, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert main(["report", sweep.root, "-o", str(out)]) == 0
    text = out.read_text()
    for fid in FIGURES:
        assert f'<figure id="{fid}"><img alt=' in text
    assert text.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched from elsewhere
    for needle in ("Before / after", "+2.00", "alpha* = 0.5", "Run metadata", "abc123", "OOM"):
        assert needle in text


def test_report_of_an_unfinished_sweep(tmp_path: Path) -> None:
    text = render_html(SweepResults.load(make_sweep(tmp_path, finished=False)))
    assert "no summary yet" in text and 'id="fig-mrc"' in text
    assert 'id="fig-interpolation"' not in text


def _browser() -> str | None:
    return next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )


def test_report_renders_in_headless_chromium(sweep: Store, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium (.ci/run installs Debian's chromium)")
    out = tmp_path / "r.html"
    assert main(["report", sweep.root, "-o", str(out)]) == 0
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=10000", "--dump-dom", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "Before / after" in dom
    assert f'data-loaded="{len(FIGURES)}/{len(FIGURES)}"' in dom  # every figure decoded
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, "--window-size=1200,3000", f"--screenshot={shot}", out.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_tables(sweep: Store, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "export"
    assert main(["report", sweep.root, "--format", fmt, "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{n}.{fmt}" for n in ("mrc", "finetune", "finetune_epochs", "interpolation", "summary")
    )
    read = pd.read_csv if fmt == "csv" else pd.read_json
    mrc = read(out / f"mrc.{fmt}")
    assert list(mrc["module"]) == ["conv1", "fc", "conv2"]
    summary = read(out / f"summary.{fmt}")
    assert list(summary["model"]) == ["at", "at", "rift", "rift"]
    assert summary["clean_acc"].tolist() == [70.0, 69.0, 72.0, 71.5]


def test_export_json_to_stdout(sweep: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", sweep.root, "--format", "json", "-o", "-"]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert tables["finetune"][2]["best_val_score"] is None
    assert len(tables["interpolation"]) == 6


def test_tables_readable_by_pandas_and_polars(sweep: Store, tmp_path: Path) -> None:
    pq.write_table(summary_table(fake_summary()), sweep.path(SUMMARY_TABLE))
    assert pq.read_schema(sweep.path(SUMMARY_TABLE)).equals(SUMMARY_SCHEMA)
    polars = pytest.importorskip("polars")
    for rel in (
        layout.MRC_TABLE,
        layout.FINETUNE_TABLE,
        layout.FINETUNE_EPOCHS_TABLE,
        layout.INTERPOLATION_TABLE,
        SUMMARY_TABLE,
    ):
        a, b = pd.read_parquet(sweep.path(rel)), polars.read_parquet(sweep.path(rel))
        assert a.shape == b.shape and list(a.columns) == b.columns


def test_summary_table_keeps_its_schema_without_corruptions() -> None:
    s = fake_summary()
    for who in ("at", "rift"):
        s[who]["test"].pop("corruption_acc")
    t = summary_table(s)
    assert t.schema.equals(SUMMARY_SCHEMA)
    assert t.column("corruption_acc").null_count == 4


def test_status_of_a_finished_sweep(sweep: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", sweep.root]) == 0
    out = capsys.readouterr().out
    assert re.search(r"adv_train\s+done\s+10s\s+epoch 3/3; best epoch 3: val clean 55.00", out)
    assert "failed: conv2" in out
    assert (
        "3 trials (1 finished, 1 stopped, 1 failed); best conv1_lr0.01 (score +1.00 at epoch 3)"
        in out
    )
    assert "alpha* 0.5 on conv1_lr0.01; test clean 69.00 -> 71.50" in out
    assert "AT vs RiFT" in out
    assert main(["status", sweep.root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in data["stages"]] == ["done"] * 4
    assert data["summary"]["alpha"] == 0.5


def test_status_of_a_running_sweep_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_sweep(tmp_path / "results", finished=False)
    monkeypatch.chdir(tmp_path)
    assert main(["status", "fake"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"finetune\s+running\s+\S+ so far\s+1 trial\(s\) reporting; best so far", out)
    assert "interpolate  pending" in out
    st = sweep_status(open_sweep("fake"))
    assert st["stages"][2]["elapsed"] > 0


def test_status_of_a_missing_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status", "nope"]) == 2
    assert main(["report", str(tmp_path)]) == 2  # a directory, but not a sweep


def test_interpolation_figure_marks_alpha_star_and_constraint() -> None:
    rows = [
        {"alpha": a, "split": "val", "clean_acc": 70 + a, "robust_acc": 40 - a, "trial": t}
        for t in ("x", "y")
        for a in (0.0, 0.5, 1.0)
    ]
    choices = [{"trial": "x", "alpha": 0.5, "feasible": True}, {"trial": "y", "feasible": False}]
    fig = fig_interpolation(rows, choices, best="x", tolerance=0.1)
    labels = fig.legends[0].get_texts()
    assert {"alpha* = 0.5", "constraint: AT - tolerance", "x (alpha* chosen)"} <= {
        t.get_text() for t in labels
    }
    assert fig_interpolation([], None) is None


def test_progress_lines_when_not_a_terminal() -> None:
    buf = io.StringIO()
    with Progress("interpolate", total=40, unit="alpha points", stream=buf) as bar:
        assert not bar.live
        for _ in range(40):
            bar.advance()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[rift-ray] interpolate: 1/40 alpha points (2%)")
    assert lines[-1].startswith("[rift-ray] interpolate: 40/40 alpha points (100%)")
    assert len(lines) == 11  # the first item, then every 10 %


def test_online_wandb_runs_are_linked_from_the_report(tmp_path: Path) -> None:
    store = make_sweep(tmp_path)
    summary = store.get_json("summary.json")
    summary["wandb"] = {
        "group": "s",
        "runs": {"s-summary": "https://wandb.ai/team/rift-ray/runs/abc"},
    }
    store.put_json("summary.json", summary)
    text = render_html(SweepResults.load(store))
    assert "<a href='https://wandb.ai/team/rift-ray/runs/abc'>s-summary</a>" in text


def test_follow_prints_the_last_stage_done_before_the_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last stage writes summary.json just before its record says done: a follower that
    looks in between waits for the record, so "interpolate done" is printed, then the
    summary (it was missed once: the follower printed the summary and left)."""
    import rift_ray.results
    import rift_ray.status
    from rift_ray import cli

    def stage(name: str, status: str) -> dict[str, object]:
        return {"stage": name, "status": status, "elapsed": 1.0, "seconds": 2.0, "detail": "",
                "failed": [], "error": ""}  # fmt: skip

    looks = iter([
        [stage("mrc", "done"), stage("interpolate", "running")],
        [stage("mrc", "done"), stage("interpolate", "running")],  # summary already there
        [stage("mrc", "done"), stage("interpolate", "done")],
    ])  # fmt: skip
    summaries = iter([None, {"trial": "t"}, {"trial": "t"}])

    def fake_status(_store: object) -> dict[str, object]:
        return {"name": "s", "location": "here", "stages": next(looks), "summary": next(summaries)}

    monkeypatch.setattr(rift_ray.results, "open_sweep", lambda _d: None)
    monkeypatch.setattr(rift_ray.status, "sweep_status", fake_status)
    monkeypatch.setattr(cli, "print_summary", lambda s: print(f"SUMMARY {s['trial']}"))
    monkeypatch.setattr("time.sleep", lambda _s: None)
    assert cli.follow_status("here", 0.01) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[1:3] for ln in out[1:-1]] == [
        ["mrc", "done"], ["interpolate", "running"], ["interpolate", "done"]
    ]  # fmt: skip
    assert out[-1] == "SUMMARY t"
