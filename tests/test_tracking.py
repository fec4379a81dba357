"""W&B tracking in offline mode, read back from the run files wandb writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wandb_offline import OfflineRun, offline_run_dirs, read_offline_run

from rift_ray.config import SweepConfig
from rift_ray.store import RIFT_CHECKPOINT, Store
from rift_ray.tracking import Tracker

KEY = "0123456789abcdef0123456789abcdef01234567"  # a made-up 40-character API key

HISTORY = [
    {
        "epoch": e,
        "lr": 0.1 / e,
        "train_loss": 2.0 / e,
        "train_clean_acc": 30.0 * e,
        "train_adv_acc": 20.0 * e,
        "images_per_s": 100.0 * e,
        "seconds": 1.5,
        "val_clean_acc": 40.0 * e,
        "val_robust_acc": 20.0 + e,
        "best_epoch": e,
    }
    for e in (1, 2)
]
MRC = [
    {"module": "conv1", "mrc": 0.1, "status": "done", "error": ""},
    {"module": "fc", "mrc": 0.3, "status": "done", "error": ""},
    {"module": "conv2", "mrc": None, "status": "failed", "error": "OOM"},
]
TRIALS = [
    {"trial": "conv1_lr0.01", "modules": "conv1", "lr": 0.01, "epochs": 2, "status": "finished",
     "best_epoch": 2, "best_val_score": 1.5, "best_val_gain": 1.5, "last_val_score": 1.5, "error": ""},
    {"trial": "conv1_lr0.1", "modules": "conv1", "lr": 0.1, "epochs": 1, "status": "stopped",
     "best_epoch": 1, "best_val_score": -1.0, "best_val_gain": 0.0, "last_val_score": -1.0, "error": ""},
    {"trial": "fc_lr0.1", "modules": "fc", "lr": 0.1, "epochs": 0, "status": "failed",
     "best_epoch": 0, "best_val_score": None, "best_val_gain": None, "last_val_score": None,
     "error": "FloatingPointError: nan"},
]  # fmt: skip
EPOCHS = [
    {"trial": "conv1_lr0.01", "epoch": 1, "train_loss": 0.9, "train_acc": 70.0, "val_score": 0.5},
    {"trial": "conv1_lr0.01", "epoch": 2, "train_loss": 0.8, "train_acc": 72.0, "val_score": 1.5,
     "images_per_s": float("inf")},
    {"trial": "conv1_lr0.1", "epoch": 1, "train_loss": 1.1, "train_acc": 65.0, "val_score": -1.0},
]  # fmt: skip
INTERP = [
    {"alpha": a, "split": s, "clean_acc": 70 + 2 * a, "robust_acc": 40 - a, "trial": t, "lr": lr,
     "selected": t == "conv1_lr0.01" and a == 0.5}
    for t, lr in (("conv1_lr0.01", 0.01), ("conv1_lr0.1", 0.1))
    for s in ("val", "test")
    for a in (0.0, 0.5, 1.0)
]  # fmt: skip
SUMMARY = {
    "trial": "conv1_lr0.01",
    "modules": ["conv1"],
    "lr": 0.01,
    "alpha": 0.5,
    "reason": "ok",
    "choices": [{"trial": "conv1_lr0.01", "alpha": 0.5, "feasible": True, "clean_gain": 1.0}],
    "at": {"val": {"clean_acc": 70.0, "robust_acc": 40.0}, "test": {"clean_acc": 69.0}},
    "rift": {"val": {"clean_acc": 71.0, "robust_acc": 39.5}, "test": {"clean_acc": 70.5}},
    "seconds": {"total": 12.0},
}


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every W&B file of the test under tmp_path; no key, no mode from the environment."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wb"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS",
                "WANDB_RUN_GROUP", "WANDB_DISABLED"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    yield tmp_path / "wb"
    from wandb.sdk import wandb_setup

    held = wandb_setup._singleton  # wandb keeps the settings (an API key too) per process
    if held is not None and held.settings.api_key:
        wandb_setup.teardown()


def tracker(tmp_path: Path, **wandb: Any) -> Tracker:
    cfg = SweepConfig.model_validate(
        {"name": "tiny", "storage": str(tmp_path), "finetune": {"top_k": 1}, "wandb": wandb}
    )
    return Tracker(cfg, Store.open(str(tmp_path), "tiny"))


def runs_by_name(sweep: Path) -> dict[str, OfflineRun]:
    """The offline runs under ``<sweep>/wandb/`` by name (the latest directory of each)."""
    runs = [read_offline_run(d, wait=30) for d in offline_run_dirs(str(sweep / "wandb"))]
    return {r.info["name"]: r for r in runs}


def test_settings_from_config_then_environment(
    tmp_path: Path, wandb_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tracker(tmp_path)
    assert (t.mode, t.project, t.group, t.tags, t.entity) == (
        "offline",
        "rift-ray",
        "tiny",
        [],
        None,
    )
    assert t._pending_notice == "no W&B credentials (WANDB_API_KEY or `wandb login`)"
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_PROJECT", "env-proj")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_TAGS", "a, b")
    monkeypatch.setenv("WANDB_RUN_GROUP", "g")
    t = tracker(tmp_path)
    assert (t.mode, t.project, t.entity, t.tags, t.group) == (
        "online",
        "env-proj",
        "team",
        ["a", "b"],
        "g",
    )
    t = tracker(tmp_path, project="cfg-proj", tags=["c"], group="cg", mode="offline")
    assert (t.mode, t.project, t.tags, t.group) == ("offline", "cfg-proj", ["c"], "cg")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not tracker(tmp_path).enabled
    monkeypatch.delenv("WANDB_MODE")
    assert not tracker(tmp_path, enabled=False).enabled
    monkeypatch.delenv("WANDB_API_KEY")
    t = tracker(tmp_path, mode="online")
    assert t.mode == "offline" and "no W&B credentials were found" in (t._pending_notice or "")


def write_netrc(path: Path, host: str = "api.wandb.ai") -> Path:
    """The entry ``wandb login`` writes, with the made-up key."""
    path.write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    path.chmod(0o600)
    return path


def test_netrc_credentials_count_like_wandb_login(
    tmp_path: Path, wandb_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETRC", str(write_netrc(tmp_path / "netrc")))
    assert tracker(tmp_path).mode == "online"  # no WANDB_API_KEY: the netrc entry counts
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # another host
    assert tracker(tmp_path).mode == "offline"


def test_stage_runs_logged_offline_and_read_back(
    tmp_path: Path, wandb_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = tracker(tmp_path, tags=["ci"])
    ckpt = Path(t.store.path(RIFT_CHECKPOINT))
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    t.log_adv_train(HISTORY)
    t.log_mrc(MRC)
    t.log_finetune(TRIALS, EPOCHS)
    t.log_interpolation(INTERP, SUMMARY)
    t.finish()
    err = capsys.readouterr().err
    assert err.count("warning: W&B: no W&B credentials (WANDB_API_KEY or `wandb login`)") == 1
    assert "wandb sync " + str(tmp_path / "tiny" / "wandb" / "offline-run-") in err

    runs = runs_by_name(tmp_path / "tiny")
    assert set(runs) == {
        "tiny-adv_train", "tiny-mrc", "tiny-ft-conv1_lr0.01", "tiny-ft-conv1_lr0.1",
        "tiny-ft-fc_lr0.1", "tiny-interpolate", "tiny-summary",
    }  # fmt: skip
    for r in runs.values():
        assert (r.info["group"], r.info["project"], r.info["tags"]) == ("tiny", "rift-ray", ["ci"])
        assert r.config["name"] == "tiny"

    at = runs["tiny-adv_train"]
    assert at.info["job_type"] == "adv_train"
    assert [r["epoch"] for r in at.history if "train/loss" in r] == [1, 2]
    assert at.values("train/loss") == [2.0, 1.0]
    assert at.values("val/robust_acc") == [21.0, 22.0]
    assert at.values("lr") == [0.1, 0.05]
    assert at.values("images_per_s") == [100.0, 200.0]
    assert at.summary["best/val_robust_acc"] == 22.0 and at.summary["best_epoch"] == 2
    assert at.summary["at/figure"]["_type"] == "image-file"

    mrc = runs["tiny-mrc"]
    assert [(r["module"], r["mrc"], r["status"]) for r in mrc.table("mrc/table")] == [
        (m["module"], m["mrc"], m["status"]) for m in MRC
    ]
    assert mrc.table("mrc/by_module_table") == [
        {"module": "conv1", "mrc": 0.1},
        {"module": "fc", "mrc": 0.3},
    ]
    assert "mrc/by_module" in mrc.config["_wandb"]["visualize"]  # the bar chart panel
    assert mrc.summary["least_critical"] == "conv1" and mrc.summary["failed"] == 1

    ft = runs["tiny-ft-conv1_lr0.01"]
    assert ft.info["job_type"] == "finetune"
    assert ft.config["trial"] == {"name": "conv1_lr0.01", "modules": "conv1", "lr": 0.01}
    assert ft.values("val/score") == [0.5, 1.5]
    assert ft.values("train/acc") == [70.0, 72.0]
    assert ft.values("images_per_s") == []  # inf is not logged
    assert ft.summary["asha/status"] == "finished" and ft.summary["best/val_score"] == 1.5
    assert runs["tiny-ft-conv1_lr0.1"].summary["asha/status"] == "stopped"
    failed = runs["tiny-ft-fc_lr0.1"]
    assert failed.summary["asha/status"] == "failed" and failed.exit_code == 1
    assert ft.exit_code == 0

    interp = runs["tiny-interpolate"]
    assert len(interp.table("interp/table")) == len(INTERP)
    curve = interp.table("interp/val/robust_acc_table")
    assert {r["lineKey"] for r in curve} == {
        "conv1_lr0.01",
        "conv1_lr0.1",
        "alpha* = 0.5 (conv1_lr0.01)",
    }
    assert [r["step"] for r in curve if r["lineKey"].startswith("alpha*")] == [0.5, 0.5]
    assert interp.summary["alpha"] == 0.5 and interp.summary["trial"] == "conv1_lr0.01"
    assert interp.summary["interp/figure"]["_type"] == "image-file"

    summ = runs["tiny-summary"]
    assert summ.info["job_type"] == "summary"
    assert (
        summ.summary["rift/val/clean_acc"] == 71.0 and summ.summary["delta/val/robust_acc"] == -0.5
    )
    assert [r["model"] for r in summ.table("summary/before_after")] == ["at", "at", "rift", "rift"]
    (art,) = summ.artifacts[-1:]
    assert (art["type"], list(art["files"])) == ("model", ["rift.pt"])
    assert art["metadata"]["alpha"] == 0.5

    rec = t.store.read_stage("finetune") or {}
    assert sorted(r["name"] for r in rec["wandb"]) == sorted(
        f"tiny-ft-{x['trial']}" for x in TRIALS
    )


def test_api_key_is_never_printed_or_written(
    tmp_path: Path,
    wandb_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    t = tracker(tmp_path, mode="offline")
    t.log_adv_train(HISTORY)
    t.finish()
    out, err = capfd.readouterr()
    assert KEY not in out + err
    for root in (wandb_dir, tmp_path / "tiny"):
        for dirpath, _, files in os.walk(root):
            for f in files:
                path = Path(dirpath, f)
                if not path.is_symlink():
                    assert KEY.encode() not in path.read_bytes(), path


ROUTE_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_tracking import HISTORY, tracker
t = tracker(Path(sys.argv[1]))
print("mode", t.mode)
t.log_adv_train(HISTORY)
t.finish()
"""


@pytest.mark.parametrize("route", ["netrc", "settings file"])
def test_key_from_netrc_or_settings_file_is_found_nowhere(
    route: str, tmp_path: Path, wandb_dir: Path
) -> None:
    """``wandb login`` (netrc) and wandb's settings file: the key counts (online is tried,
    here against a port where nothing listens), and it is in no output and no file written."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="3",
               WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(wandb_dir),
               WANDB_DATA_DIR=str(wandb_dir))  # fmt: skip
    if route == "netrc":
        write_netrc(home / ".netrc", "127.0.0.1:9")  # `wandb login --host http://127.0.0.1:9`
    else:
        (home / "wandb-config").mkdir()
        (home / "wandb-config/settings").write_text(f"[default]\napi_key = {KEY}\n")
    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", ROUTE_SCRIPT, str(tmp_path), tests], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "mode online" in out, out
    assert "cannot reach W&B" in out and KEY not in out and "Traceback" not in out
    assert runs_by_name(tmp_path / "tiny")["tiny-adv_train"].values("train/loss") == [2.0, 1.0]
    for dirpath, _, files in os.walk(tmp_path / "tiny"):
        for f in files:
            path = Path(dirpath, f)
            if not path.is_symlink():
                assert KEY.encode() not in path.read_bytes(), path


def test_unreachable_server_falls_back_to_offline_once(
    tmp_path: Path,
    wandb_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    t = tracker(tmp_path)
    t.init_timeout = 3
    assert t.mode == "online"
    t.log_adv_train(HISTORY)
    t.log_mrc(MRC)
    t.finish()
    err = capsys.readouterr().err
    assert err.count("warning: W&B") == 1 and "cannot reach W&B" in err
    assert t.mode == "offline" and "wandb sync" in err
    assert set(runs_by_name(tmp_path / "tiny")) == {"tiny-adv_train", "tiny-mrc"}


def test_netrc_only_against_an_unreachable_server_warns_once(
    tmp_path: Path,
    wandb_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NETRC", str(write_netrc(tmp_path / "netrc", "127.0.0.1:9")))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    t = tracker(tmp_path)
    t.init_timeout = 3
    assert t.mode == "online"
    t.log_adv_train(HISTORY)
    t.finish()
    out, err = capfd.readouterr()
    assert err.count("warning: W&B") == 1 and "cannot reach W&B" in err
    assert "Traceback" not in out + err and KEY not in out + err
    assert t.mode == "offline"
    assert runs_by_name(tmp_path / "tiny")["tiny-adv_train"].values("train/loss") == [2.0, 1.0]


def test_wandb_errors_never_fail_the_sweep(
    tmp_path: Path,
    wandb_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import wandb

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    t = tracker(tmp_path, mode="offline")
    t.log_adv_train(HISTORY)
    t.log_finetune(TRIALS, EPOCHS)
    t.finish()
    assert capsys.readouterr().err.count("warning: W&B") == 1


def test_disabled_writes_nothing(tmp_path: Path, wandb_dir: Path) -> None:
    t = tracker(tmp_path, enabled=False)
    t.log_adv_train(HISTORY)
    t.log_mrc(MRC)
    t.finish()
    assert not wandb_dir.exists() and not (tmp_path / "tiny" / "wandb").exists()


def test_forgotten_runs_get_new_ids_the_rest_keep_theirs(tmp_path: Path, wandb_dir: Path) -> None:
    """--retry-failed: the W&B runs of retried trials and of recomputed stages start afresh
    (a new id, a new generation) instead of resuming the failed run's steps."""
    t = tracker(tmp_path)
    t.hashes = {"mrc": "m1", "finetune": "f1", "interpolate": "i1"}
    ids = {}
    for key, stage in [("mrc", "mrc"), ("ft-a", "finetune"), ("ft-b", "finetune"),
                       ("interp", "interpolate")]:  # fmt: skip
        e = t._entry(key, stage)
        e["stage"], e["step"] = stage, 3  # as open() records them
        ids[key] = e["id"]
    assert len(set(ids.values())) == 4
    t.forget(names=["ft-a"])
    t.forget(stages=["interpolate"])
    again = {k: t._entry(k, s)["id"] for k, s in [("mrc", "mrc"), ("ft-a", "finetune"),
             ("ft-b", "finetune"), ("interp", "interpolate")]}  # fmt: skip
    assert again["mrc"] == ids["mrc"] and again["ft-b"] == ids["ft-b"]
    assert again["ft-a"] != ids["ft-a"] and again["interp"] != ids["interp"]
    assert t._entry("ft-a", "finetune")["step"] == 0  # nothing held yet in the new run
    # the generations are stored with the sweep; forgetting again gives a third id
    saved = t.store.read_json_file("wandb/runs.json")
    assert saved["generations"] == {"ft-a@f1": 1, "interp@i1": 1}
    t.forget(names=["ft-a"])
    third = t._entry("ft-a", "finetune")["id"]
    assert third not in (ids["ft-a"], again["ft-a"])


def test_mrc_modules_finished_while_no_driver_listened_are_logged_at_the_end(
    tmp_path: Path, wandb_dir: Path
) -> None:
    """A driver killed after logging conv1 live; the modules finished while it was down are
    logged by the next driver at the stage's end, conv1 not again; a retried module's new
    outcome is a step of its own."""
    first = tracker(tmp_path)
    assert first.mode == "offline"  # no key left behind by an earlier test's wandb setup
    first.mrc_row(MRC[0])
    first.finish()
    second = tracker(tmp_path)
    second.log_mrc(MRC)
    second.finish()
    dirs = offline_run_dirs(str(tmp_path / "tiny" / "wandb"))
    history = [h for d in dirs for h in read_offline_run(d, wait=30).history]  # both drivers'
    assert sorted(h["mrc"] for h in history if "mrc" in h) == [0.1, 0.3]  # conv1 once
    assert len(history) == len({h["_step"] for h in history})  # no step written twice
    entry = next(e for e in second._load_registry()["runs"].values() if e["name"] == "mrc")
    assert entry["modules"] == {"conv1": "done", "fc": "done", "conv2": "failed"}
    steps = entry["step"]
    third = tracker(tmp_path)
    third.mrc_row({**MRC[2], "mrc": 0.2, "status": "done"})  # conv2, retried
    third.mrc_row(MRC[1])  # fc: held already
    third.finish()
    entry = next(e for e in third._load_registry()["runs"].values() if e["name"] == "mrc")
    assert entry["step"] == steps + 1 and entry["modules"]["conv2"] == "done"
