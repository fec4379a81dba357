"""Faults survived: killed workers, killed drivers, lost nodes, failing trials, bad artifacts, W&B.

Drivers that must die (SIGKILL) or need ``$RIFT_RAY_FAULTS`` in their workers run as
subprocesses connected to the session's Ray instance; the fault spec reaches the
workers through the job's ``runtime_env``. The lost-node test builds its own simulated
2-node cluster. Faults are injected with the test hook documented in
``rift_ray.stages.common.fault``.

Kept small (synthetic 256 images, a random-init starting checkpoint where adversarial
training is not under test, 3-4 MRC modules, 1-2 fine-tuning epochs, W&B off except in
the W&B test). See README "What survives what" for the table these tests back.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rift_ray.checkpoint import load_checkpoint, save_checkpoint
from rift_ray.cli import main
from rift_ray.models import build_model


def e2e(test: Callable[..., None]) -> Callable[..., None]:
    """An end-to-end test: runs sweeps on Ray (``-m "not slow"`` skips it)."""
    return pytest.mark.slow(pytest.mark.ray(test))


ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")
TINY = [
    "--set", "data.synthetic.train_size=256", "--set", "data.val_size=64",
    "--set", "data.synthetic.test_size=64",
    "--set", "mrc.epochs=1", "--set", "mrc.adv_set_size=64",
    "--set", "finetune.top_k=1", "--set", "finetune.metric_subset=64",
    "--set", "finetune.metric_alphas=[1.0]", "--set", "finetune.lr_milestones=[1]",
    "--set", "interpolate.alphas=[0.0,0.5,1.0]",
]  # fmt: skip
NO_WANDB = ["--set", "wandb.enabled=false"]
FOUR_MODULES = ["--set", "mrc.include=[conv1,layer1.0.conv1,layer2.0.conv1,linear]"]
# three trials and one rung (epoch 1) under sync halving: one goes on, two stop there, the
# same ones in an interrupted sweep as in an uninterrupted one (finetune.asha.mode: sync)
THREE_TRIALS = [
    "--set", "finetune.lrs=[0.001,0.005,0.02]", "--set", "finetune.epochs=2",
    "--set", "finetune.asha.grace_period=1",
]  # fmt: skip

# a driver process on the test session's Ray instance; RIFT_RAY_FAULTS goes to its workers
DRIVER = r"""
import json, os, sys
import ray
env = {k: os.environ[k] for k in ("RIFT_RAY_FAULTS", "RIFT_RAY_FAULT_SLEEP_S") if k in os.environ}
ray.init(address=sys.argv[1], runtime_env={"env_vars": env} if env else None)
from rift_ray.cli import main
for i, argv in enumerate(json.loads(sys.argv[2])):
    print(f"=== sweep {i} ===", file=sys.stderr, flush=True)
    code = main(argv)
    print(f"=== exit {code} ===", file=sys.stderr, flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    env.pop("RIFT_RAY_FAULTS", None)
    env.pop("RIFT_RAY_FAULT_SLEEP_S", None)
    # wandb points a process's children at its own service; a driver on this test process's
    # service finds a killed driver's run ids still "in use" there, as no user's driver would
    env.pop("WANDB_SERVICE", None)
    env.update(extra)
    return env


def start_driver(
    address: str, sweeps: list[list[str]], log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """``rift-ray sweep`` (several, one after the other) in a driver process of its own."""
    argvs = json.dumps([["sweep", SMOKE, *s] for s in sweeps])
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, address, argvs],
            stdout=f, stderr=subprocess.STDOUT, env=_env(**env), cwd=ROOT,
        )  # fmt: skip


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 900) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(errors="replace")


def exit_codes(text: str) -> list[int]:
    return [int(c) for c in re.findall(r"=== exit (-?\d+) ===", text)]


def snapshot_checkpoints(sweep: Path, stage: str) -> list[str]:
    """The latest checkpoint of every trial, as the newest experiment snapshot names it."""
    from ray.tune.utils.serialization import TuneFunctionDecoder

    (path,) = sorted(sweep.glob(f"ray/{stage}-*/experiment_state-*.json"))[-1:]
    data = json.loads(path.read_text())
    out = []
    for _state, meta in data["trial_data"]:
        manager = json.loads(meta, cls=TuneFunctionDecoder, allow_cloudpickle=True)  # our own files
        latest = manager["checkpoint_manager"]
        if latest.latest_checkpoint_result is not None:
            out.append(latest.latest_checkpoint_result.checkpoint.path)
    return out


def tune_trials(sweep: Path, stage: str) -> list[dict[str, Any]]:
    """The trials in the newest experiment snapshot Tune wrote for ``stage`` (what a restore sees)."""
    files = sorted(sweep.glob(f"ray/{stage}-*/experiment_state-*.json"))
    if not files:
        return []
    try:
        data = json.loads(files[-1].read_text())
    except (ValueError, OSError):  # being rewritten
        return []
    out = []
    for state, meta in data["trial_data"]:
        s, m = json.loads(state), json.loads(meta)
        out.append(
            {"status": s["status"], "config": s["config"], "num_failures": m["num_failures"]}
        )
    return out


def wait_for(
    cond: Callable[[], bool],
    what: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 900,
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"driver exited before {what}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def wait_idle(ray: Any, cpus: float, timeout: float = 120) -> None:
    """After a driver dies Ray ends its job's trials; wait until their CPUs are free again."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= cpus:
            return
        time.sleep(0.5)
    pytest.fail("the killed driver's trials still hold CPUs")


def table(sweep: Path, rel: str) -> list[dict[str, Any]]:
    return pq.read_table(sweep / rel).to_pylist()


def stage(sweep: Path, name: str) -> dict[str, Any]:
    return json.loads((sweep / "stages" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def address(ray_session: Any) -> str:
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init robust-model stand-in: skips adversarial training where it is not under test."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "at.pt"
    save_checkpoint(path, build_model("small_resnet", 10).state_dict(), arch="small_resnet",
                    num_classes=10, dataset="synthetic", mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    return str(path)


# -- adversarial training worker killed, failing trials -------------------------------------------

FAULTS = "at_worker_exit@epoch=3;mrc_raise@module=layer1.0.conv1;mrc_nan@module=layer2.0.conv1;finetune_nan@lr=0.02"


@pytest.fixture(scope="module")
def faulted(address: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """One sweep with every in-worker fault: a Train worker SIGKILLed in epoch 3 of 3, an MRC
    trial that raises, one whose MRC is NaN, a fine-tuning trial whose loss is NaN."""
    tmp = tmp_path_factory.mktemp("faulted")
    args = [*TINY, *NO_WANDB, "--storage", str(tmp), "--name", "f",
            "--set", "adv_train.epochs=3", "--set", "adv_train.checkpoint_every=1",
            "--set", "adv_train.lr_milestones=[2]",
            "--set", "mrc.include=[conv1,layer1.0.conv1,layer2.0.conv1]",
            "--set", "finetune.lrs=[0.001,0.02]", "--set", "finetune.epochs=1"]  # fmt: skip
    log = tmp / "driver.log"
    proc = start_driver(address, [args], log, RIFT_RAY_FAULTS=f"once={tmp / 'fired'};{FAULTS}")
    text = finish(proc, log)
    assert exit_codes(text) == [0], text[-4000:]
    return tmp / "f", text, tmp / "fired"


@e2e
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(
    faulted: tuple[Path, str, Path],
) -> None:
    sweep, text, fired = faulted
    assert (fired / "at_worker_exit@epoch=3").exists(), "the worker was not killed"
    # Ray Train restarted the worker group from the last committed checkpoint: epoch 1 or 2
    # (a checkpoint is committed when the controller collects the report, every ~2 s)
    resumed = [int(e) for e in re.findall(r"resuming from the checkpoint of epoch (\d+)", text)]
    assert resumed and set(resumed) <= {1, 2}, text[-4000:]
    history = stage(sweep, "adv_train")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert load_checkpoint(sweep / "checkpoints/at.pt")[1]["arch"] == "small_resnet"


@e2e
def test_failed_trials_are_reported_and_the_sweep_goes_on(
    faulted: tuple[Path, str, Path],
) -> None:
    sweep, text, _ = faulted
    flat = " ".join(text.split())
    mrc = {r["module"]: r for r in table(sweep, "tables/mrc.parquet")}
    assert mrc["conv1"]["status"] == "done"
    assert mrc["layer1.0.conv1"]["status"] == "failed"
    assert mrc["layer1.0.conv1"]["error"].startswith("RuntimeError: injected fault")
    assert mrc["layer2.0.conv1"]["status"] == "failed"
    assert (
        mrc["layer2.0.conv1"]["error"]
        == "FloatingPointError: MRC of layer2.0.conv1 is not finite (nan)"
    )
    ft = {r["trial"]: r for r in table(sweep, "tables/finetune.parquet")}
    assert ft["conv1_lr0.001"]["status"] == "finished"
    assert ft["conv1_lr0.02"]["status"] == "failed"
    assert ft["conv1_lr0.02"]["error"] == "FloatingPointError: fine-tuning loss is nan at epoch 1"
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["modules"] == ["conv1"] and summary["trial"] == "conv1_lr0.001"
    assert {(f["stage"], f["name"]): f["error"] for f in summary["failures"]} == {
        ("mrc", "layer1.0.conv1"): mrc["layer1.0.conv1"]["error"],
        ("mrc", "layer2.0.conv1"): mrc["layer2.0.conv1"]["error"],
        ("finetune", "conv1_lr0.02"): ft["conv1_lr0.02"]["error"],
    }
    assert stage(sweep, "mrc")["failed"] == ["layer1.0.conv1", "layer2.0.conv1"]
    # the log and the printed summary say exactly what is missing
    assert (
        "stage 2/4 mrc: 2 module(s) failed and are left out: layer1.0.conv1 (RuntimeError" in flat
    )
    assert (
        "stage 3/4 finetune: 1 trial(s) failed and are left out: conv1_lr0.02 (FloatingPointError"
        in flat
    )
    for f in summary["failures"]:
        assert f"{f['stage']} failed: {f['name']}: {f['error']}" in flat


@e2e
def test_retry_failed_reruns_only_the_failed_trials(
    faulted: tuple[Path, str, Path], address: str, tmp_path: Path
) -> None:
    """``--retry-failed`` on a copy of the faulted sweep: first with the MRC faults still
    there (both modules fail again; the fine-tuning trial, fault gone, now finishes), then
    without (both MRC modules are computed)."""
    import shutil

    shutil.copytree(faulted[0], tmp_path / "f")
    sweep = tmp_path / "f"
    args = [*TINY, *NO_WANDB, "--storage", str(tmp_path), "--name", "f", "--retry-failed",
            "--set", "adv_train.epochs=3", "--set", "adv_train.checkpoint_every=1",
            "--set", "adv_train.lr_milestones=[2]",
            "--set", "mrc.include=[conv1,layer1.0.conv1,layer2.0.conv1]",
            "--set", "finetune.lrs=[0.001,0.02]", "--set", "finetune.epochs=1"]  # fmt: skip
    mrc0 = {r["module"]: r for r in table(sweep, "tables/mrc.parquet")}
    ft0 = {r["trial"]: r for r in table(sweep, "tables/finetune.parquet")}
    at0 = (sweep / "checkpoints/at.pt").read_bytes()
    interp_hash = stage(sweep, "interpolate")["hash"]

    log = tmp_path / "a.log"
    faults = "mrc_raise@module=layer1.0.conv1;mrc_nan@module=layer2.0.conv1"
    text = finish(start_driver(address, [args], log, RIFT_RAY_FAULTS=faults), log)
    assert exit_codes(text) == [0], text[-4000:]
    flat = " ".join(text.split())
    assert "--retry-failed: 2 failed module(s) again, alone: layer1.0.conv1, layer2.0.conv1" in flat
    assert "--retry-failed: 0 of 2 module(s) now done" in flat
    # exactly the failed trials ran, each in the stage's retry experiment
    (mrc_retry,) = sweep.glob("ray/mrc-*-retry1")
    (ft_retry,) = sweep.glob("ray/finetune-*-retry1")
    assert [p.name.split("_")[0] for p in ft_retry.glob("*_trial_*")] == ["finetune"]
    assert len(list(mrc_retry.glob("mrc_trial_*"))) == 2
    rec = stage(sweep, "mrc")
    assert rec["status"] == "done" and rec["failed"] == ["layer1.0.conv1", "layer2.0.conv1"]
    assert [(r["modules"], r["done"], r["computed"]) for r in rec["retries"]] == [
        (["layer1.0.conv1", "layer2.0.conv1"], [], 2)
    ]
    ft = {r["trial"]: r for r in table(sweep, "tables/finetune.parquet")}
    assert ft["conv1_lr0.001"] == ft0["conv1_lr0.001"]  # reused, not recomputed
    assert ft["conv1_lr0.02"]["status"] == "finished" and ft["conv1_lr0.02"]["error"] == ""
    epochs = table(sweep, "tables/finetune_epochs.parquet")
    assert sorted((e["trial"], e["epoch"]) for e in epochs) == [
        ("conv1_lr0.001", 1), ("conv1_lr0.02", 1)
    ]  # fmt: skip
    rec = stage(sweep, "finetune")
    assert rec["survivors"] == ["conv1_lr0.001", "conv1_lr0.02"]
    assert [(r["trials"], r["survivors"]) for r in rec["retries"]] == [
        (["conv1_lr0.02"], ["conv1_lr0.02"])
    ]
    assert (sweep / "checkpoints/finetune/conv1_lr0.02.pt").is_file()
    # a new survivor: interpolation was recomputed with it, the old result kept in history/
    assert (sweep / "history" / f"interpolate-{interp_hash}").is_dir()
    interp = table(sweep, "tables/interpolation.parquet")
    assert {r["trial"] for r in interp} == {"conv1_lr0.001", "conv1_lr0.02"}
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(f["stage"], f["name"]) for f in summary["failures"]] == [
        ("mrc", "layer1.0.conv1"), ("mrc", "layer2.0.conv1")
    ]  # fmt: skip
    assert (sweep / "checkpoints/at.pt").read_bytes() == at0

    # the stage records say what each was computed from, and `rift-ray report --history`
    # renders the replaced interpolation with the fine-tuning result it was computed from
    hashes = {s: stage(sweep, s)["hash"] for s in ("adv_train", "mrc", "finetune")}
    assert stage(sweep, "mrc")["after"] == hashes["adv_train"]
    assert stage(sweep, "interpolate")["after"] == hashes["finetune"]
    from rift_ray.history import history_view
    from rift_ray.results import open_sweep

    old = sweep / "history" / f"interpolate-{interp_hash}"
    view, entry = history_view(open_sweep(str(sweep)), interp_hash)
    assert view.get_table("tables/interpolation.parquet") == pq.read_table(
        old / "tables/interpolation.parquet"
    )
    assert {r["trial"] for r in view.get_table("tables/interpolation.parquet").to_pylist()} == {
        "conv1_lr0.001"
    }  # the faulted sweep's one survivor
    assert yaml.safe_load(view.read_bytes("config.yaml"))["finetune"]["lrs"] == [0.001, 0.02]
    assert main(["report", str(sweep), "--history", entry]) == 0
    assert "As it was with history/" in (sweep / f"report-{entry}.html").read_text()

    log = tmp_path / "b.log"
    text = finish(start_driver(address, [[*args, "--until", "mrc"]], log), log)
    assert exit_codes(text) == [0], text[-4000:]
    assert len(list(sweep.glob("ray/mrc-*-retry2/mrc_trial_*"))) == 2
    mrc = {r["module"]: r for r in table(sweep, "tables/mrc.parquet")}
    assert all(r["status"] == "done" for r in mrc.values()), mrc
    assert mrc["conv1"] == mrc0["conv1"]
    rec = stage(sweep, "mrc")
    assert rec["failed"] == [] and rec["retries"][-1]["done"] == [
        "layer1.0.conv1", "layer2.0.conv1"
    ]  # fmt: skip
    lowest = min(mrc, key=lambda m: mrc[m]["mrc"])
    # fine-tuning is kept when the lowest-MRC module is still conv1, else moved to history/
    moved = any(sweep.glob("history/finetune-*"))
    assert moved == (lowest != "conv1"), (lowest, text[-3000:])


@e2e
def test_stage_without_usable_result_stops_the_sweep(
    address: str, start_ckpt: str, tmp_path: Path
) -> None:
    common = [
        *TINY,
        *NO_WANDB,
        "--storage",
        str(tmp_path),
        "--set",
        f"adv_train.checkpoint={start_ckpt}",
    ]
    all_mrc_fail = [*common, "--name", "m", "--set", "mrc.include=[conv1]"]
    all_ft_fail = [*common, "--name", "t", "--set", "mrc.include=[linear]",
                   "--set", "finetune.lrs=[0.01]", "--set", "finetune.epochs=1"]  # fmt: skip
    log = tmp_path / "driver.log"
    faults = "mrc_raise@module=conv1;finetune_raise@lr=*"
    text = finish(
        start_driver(address, [all_mrc_fail, all_ft_fail], log, RIFT_RAY_FAULTS=faults), log
    )
    assert exit_codes(text) == [1, 1], text[-4000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("rift-ray: error:")]
    # each ends with where Ray's own output went (the sweep's logs/ray.log)
    for ln, name in zip(errors, ("m", "t")):
        assert ln.endswith(f" (Ray's log: {tmp_path / name / 'logs/ray.log'})"), ln
        assert (tmp_path / name / "logs/ray.log").is_file()
    errors = [re.sub(r" \(Ray's log: [^)]*\)$", "", ln) for ln in errors]
    assert errors == [
        "rift-ray: error: MRC failed for every module (first: conv1 (RuntimeError: injected fault "
        "(RIFT_RAY_FAULTS) in the MRC trial of conv1)); see tables/mrc.parquet for the errors",
        "rift-ray: error: fine-tuning produced no usable trial (first: linear_lr0.01 (RuntimeError: "
        "injected fault (RIFT_RAY_FAULTS) in fine-tuning trial linear_lr0.01)); see tables/finetune.parquet",
    ], text[-4000:]
    assert stage(tmp_path / "m", "mrc")["status"] == "failed"
    assert not (tmp_path / "m" / "stages" / "finetune.json").exists()
    assert stage(tmp_path / "t", "finetune")["status"] == "failed"
    assert table(tmp_path / "t", "tables/finetune.parquet")[0]["status"] == "failed"
    for name in ("m", "t"):
        assert not (tmp_path / name / "summary.json").exists()
    # --retry-failed, the fault gone: the failed stage is retried from its table, not redone
    text = finish(start_driver(address, [[*all_ft_fail, "--retry-failed", "--until", "finetune"]],
                               log), log)  # fmt: skip
    assert exit_codes(text) == [0], text[-4000:]
    assert "stage 3/4 finetune: --retry-failed: linear_lr0.01 finished" in " ".join(text.split())
    rec = stage(tmp_path / "t", "finetune")
    assert rec["status"] == "done" and rec["survivors"] == ["linear_lr0.01"]
    assert [r["trials"] for r in rec["retries"]] == [["linear_lr0.01"]]
    assert len(list((tmp_path / "t").glob("ray/finetune-*-retry1/finetune_trial_*"))) == 1
    assert table(tmp_path / "t", "tables/finetune.parquet")[0]["status"] == "finished"


# -- the driver killed twice, compared with an uninterrupted run -----------------------------------


def sweep_args(storage: Path, start_ckpt: str) -> list[str]:
    return [*TINY, *FOUR_MODULES, *THREE_TRIALS, "--storage", str(storage), "--name", "k",
            "--set", f"adv_train.checkpoint={start_ckpt}"]  # fmt: skip


# Every trial takes 2 s longer, so there is a moment when some but not all have finished
# (trials reuse their actors and take well under a second here otherwise).
SLOW_TRIALS = {
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    "RIFT_RAY_FAULTS": "mrc_sleep@module=*;finetune_sleep@lr=*",
    "RIFT_RAY_FAULT_SLEEP_S": "2",
}


@pytest.fixture(scope="module")
def chain(
    ray_session: Any, address: str, start_ckpt: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same command three times: SIGKILLed during MRC, SIGKILLed during fine-tuning, to the end.

    Each kill comes once Tune's experiment snapshot (what a restore sees) holds some but not all
    trials as finished. ``TUNE_GLOBAL_CHECKPOINT_S=1`` makes Tune snapshot every second instead of
    every >= 10 s, so the kill window is not missed on a slow machine.
    """
    tmp = tmp_path_factory.mktemp("chain")
    offline = ["--set", "wandb.mode=offline"]  # W&B runs resumed across the three drivers
    sweep, args = tmp / "k", [*sweep_args(tmp, start_ckpt), *offline]
    out: dict[str, Any] = {"sweep": sweep, "logs": []}
    for stage_name, n in (("mrc", 4), ("finetune", 3)):
        log = tmp / f"driver-{stage_name}.log"
        proc = start_driver(address, [args], log, **SLOW_TRIALS)

        def partly_done(stage_name: str = stage_name, n: int = n) -> bool:
            done = [t for t in tune_trials(sweep, stage_name) if t["status"] == "TERMINATED"]
            return 1 <= len(done) < n

        wait_for(partly_done, f"some {stage_name} trials to finish", proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out["logs"].append(log.read_text(errors="replace"))
        wait_idle(ray_session, 2)
        out[f"{stage_name}_kept"] = sum(
            t["status"] == "TERMINATED" for t in tune_trials(sweep, stage_name)
        )
        if stage_name == "finetune":  # what a restore will open must still be there
            named = snapshot_checkpoints(sweep, "finetune")
            out["finetune_snapshot_checkpoints"] = {p: os.path.isdir(p) for p in named}
    log = tmp / "driver-end.log"
    text = finish(start_driver(address, [args], log, **SLOW_TRIALS), log)
    assert exit_codes(text) == [0], text[-4000:]
    out["logs"].append(text)
    return out


@pytest.fixture(scope="module")
def reference(
    ray_session: Any, start_ckpt: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same sweep uninterrupted, in this process, with W&B failing all along: online with
    a made-up key against a port where nothing listens, then ``wandb.init`` raising mid-sweep."""
    import wandb

    from rift_ray.tracking import Tracker

    tmp = tmp_path_factory.mktemp("reference")
    real_init = wandb.init
    calls: list[str] = []

    def flaky_init(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("mode", ""))
        if calls.count("offline") > 1:  # the service dies after the first stage was logged
            raise RuntimeError("W&B went away mid-sweep")
        return real_init(*args, **kwargs)

    err, out = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "online")
        mp.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        mp.setattr(Tracker, "init_timeout", 5.0)  # wandb's own default wait is 60 s
        mp.setattr(wandb, "init", flaky_init)
        t0 = time.time()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            # wandb.mode unset (smoke.yaml says offline), so $WANDB_MODE decides
            code = main(["sweep", SMOKE, *sweep_args(tmp, start_ckpt), "--set", "wandb.mode=null"])
    # W&B's service in this process still holds the runs that tried the dead server: every
    # later run in this test worker then waited ~30 s to finish. A fresh service for them.
    wandb.teardown()
    return {"sweep": tmp / "k", "code": code, "err": err.getvalue(), "out": out.getvalue(),
            "calls": calls, "seconds": time.time() - t0}  # fmt: skip


def _same_results(a: Path, b: Path) -> None:
    def rows(sweep: Path, rel: str, keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return sorted(tuple(r.get(k) for k in keys) for r in table(sweep, rel))

    for rel, keys in (
        (
            "tables/mrc.parquet",
            ("module", "mrc", "loss_before", "loss_after", "acc_after", "status"),
        ),
        ("tables/finetune.parquet", ("trial", "status", "epochs", "best_epoch", "best_val_score")),
        ("tables/finetune_epochs.parquet", ("trial", "epoch", "train_loss", "val_score")),
        ("tables/interpolation.parquet", ("trial", "alpha", "split", "clean_acc", "robust_acc")),
        ("tables/finetune_rungs.parquet", ("trial", "rung", "score", "decision")),
    ):
        assert rows(a, rel, keys) == rows(b, rel, keys), rel
    sa, sb = (json.loads((s / "summary.json").read_text()) for s in (a, b))
    for key in ("modules", "lr", "trial", "alpha", "at", "rift", "mrc_ranking", "choices"):
        assert sa[key] == sb[key], key
    ra, rb = (load_checkpoint(s / "checkpoints/rift.pt")[0] for s in (a, b))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


@e2e
def test_driver_killed_during_mrc_and_finetune_resumes(
    chain: dict[str, Any], reference: dict[str, Any]
) -> None:
    sweep = chain["sweep"]
    killed_mrc, killed_ft, end = chain["logs"]
    assert "stage 2/4 mrc: 4 modules" in killed_mrc and "stage 3/4" not in killed_mrc
    assert "stage 1/4 adv_train: done earlier" in killed_ft
    assert "stage 2/4 mrc: done earlier" in end and "stage 3/4 finetune: done earlier" not in end
    # only what Tune had not recorded as finished ran again
    assert stage(sweep, "mrc")["computed"] == 4 - chain["mrc_kept"]
    # fine-tuning: only the trial kept at the rung goes on; a trial stopped there comes back
    # unfinished when Tune's snapshot had not caught up with its stop, and the stored rung
    # decision stops it again without running it (finetune_kept < 2 in that case)
    assert stage(sweep, "finetune")["computed"] <= 1, chain["finetune_kept"]
    # Tune's snapshot at the kill named only checkpoints that still existed (with num_to_keep,
    # Tune deleted the previous one before the snapshot caught up, and the resume failed) ...
    assert chain["finetune_snapshot_checkpoints"]
    assert all(chain["finetune_snapshot_checkpoints"].values()), chain
    # ... and once the grid is done, each trial keeps its last checkpoint only
    trial_dirs = list(sweep.glob("ray/finetune-*/finetune_trial_*"))
    assert len(trial_dirs) == 3
    assert all(len(list(d.glob("checkpoint_*"))) == 1 for d in trial_dirs)
    # the rung at epoch 1 was decided once, by rank: one trial on to epoch 2, two stopped
    # (the driver was killed between the rung and the end: the decision held)
    epochs = [(r["trial"], r["epoch"]) for r in table(sweep, "tables/finetune_epochs.parquet")]
    assert len({t for t, _ in epochs}) == 3 and sorted(e for _, e in epochs) == [1, 1, 1, 2]
    rungs = table(sweep, "tables/finetune_rungs.parquet")
    assert sorted(r["decision"] for r in rungs) == ["kept", "stopped", "stopped"]
    assert {r["rung"] for r in rungs} == {1}
    # and the result is the uninterrupted run's, bit for bit (CPU, one thread per trial)
    assert reference["code"] == 0, reference["err"][-4000:]
    _same_results(sweep, reference["sweep"])


@e2e
def test_killed_and_resumed_sweep_keeps_one_wandb_run_per_id(chain: dict[str, Any]) -> None:
    """Three drivers wrote the same runs: each name has one id (and each id one name), and the
    steps of a run's directories (one per driver that opened it) never repeat."""
    from wandb_offline import offline_run_dirs, read_offline_run

    # every driver has exited: what its run files hold is all there is (a SIGKILLed driver's
    # last records may be missing, a run it had just opened may hold no run record at all)
    dirs = offline_run_dirs(str(chain["sweep"] / "wandb"))
    files = [d for d in dirs if glob.glob(os.path.join(d, "run-*.wandb"))]  # killed: maybe none
    runs = [r for r in (read_offline_run(d) for d in files) if r.info]
    ids: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    steps: dict[str, list[int]] = {}
    for r in runs:
        ids.setdefault(r.info["name"], set()).add(r.info["id"])
        names.setdefault(r.info["id"], set()).add(r.info["name"])
        steps.setdefault(r.info["id"], []).extend(h["_step"] for h in r.history)
    assert all(len(v) == 1 for v in ids.values()), ids
    assert all(len(v) == 1 for v in names.values()), names
    assert all(len(s) == len(set(s)) for s in steps.values()), steps
    trials = {n for n in ids if n.startswith("k-ft-")}
    assert len(trials) == 3 and {n.rsplit("_lr", 1)[1] for n in trials} == {
        "0.001",
        "0.005",
        "0.02",
    }
    assert set(ids) - trials == {"k-adv_train", "k-mrc", "k-interpolate", "k-summary"}
    assert len(dirs) > len(ids)  # a killed driver's runs were opened again, not duplicated
    modules = [h for r in runs if r.info["name"] == "k-mrc" for h in r.history if "mrc" in h]
    assert len(modules) <= 4  # a module's row at most once, whichever driver logged it
    # (none readable when the driver that logged them was killed before closing its run; the
    # registry still says the MRC run holds a step per module, so none is logged again)
    reg = json.loads((chain["sweep"] / "wandb" / "runs.json").read_text())
    (mrc,) = [e for e in reg["runs"].values() if e["name"] == "mrc"]
    assert mrc["step"] >= 4, mrc


def test_finetune_checkpoint_holds_only_what_changed(tmp_path: Path) -> None:
    from ray import tune

    from rift_ray.stages.ft_trial import load_trial_state, state_delta

    torch.manual_seed(0)
    base = {
        "conv.weight": torch.randn(4, 3),
        "fc.weight": torch.randn(2, 4),
        "bn.n": torch.tensor(5),
    }
    ft = {**base, "conv.weight": base["conv.weight"] + 0.5, "bn.n": torch.tensor(6)}
    delta = state_delta(ft, base)
    assert delta is not None and sorted(delta) == ["bn.n", "conv.weight"]
    assert state_delta(None, base) is None
    new, old = tmp_path / "new", tmp_path / "old"
    for d, saved in (
        (new, {"model_delta": delta, "epoch": 2, "best": {"epoch": 1, "state_delta": delta}}),
        (old, {"model": ft, "epoch": 2, "best": {"epoch": 1, "state": ft}}),  # older sweeps
    ):
        d.mkdir()
        torch.save(saved, d / "state.pt")
        got = load_trial_state(tune.Checkpoint.from_directory(str(d)), base)
        for state in (got["model"], got["best"]["state"]):
            assert state.keys() == ft.keys() and all(torch.equal(state[k], ft[k]) for k in ft)
        assert (got["epoch"], got["best"]["epoch"]) == (2, 1)
        assert "model_delta" not in got and "state_delta" not in got["best"]
    torch.save({"model_delta": {}, "best": {"epoch": 0, "state_delta": None}}, new / "state.pt")
    assert load_trial_state(tune.Checkpoint.from_directory(str(new)), base)["best"]["state"] is None


@e2e
def test_wandb_faults_do_not_stop_the_sweep(reference: dict[str, Any]) -> None:
    err = reference["err"]
    assert reference["code"] == 0, err[-4000:]
    assert reference["calls"][:2] == ["online", "offline"]  # unreachable: fell back to offline
    warnings = [ln for ln in err.splitlines() if "warning: W&B" in ln]
    assert any("cannot reach W&B" in w and "logging offline" in w for w in warnings), err[-3000:]
    assert any("W&B went away mid-sweep" in w for w in warnings), err[-3000:]
    assert len(warnings) == len(set(warnings)) <= 3  # one line per kind of problem
    assert (reference["sweep"] / "summary.json").is_file()
    assert "0123456789abcdef0123456789abcdef01234567" not in err + reference["out"]


# -- corrupted / half-written artifacts ----------------------------------------------------------


@e2e
def test_corrupted_artifacts_are_recomputed(
    chain: dict[str, Any], start_ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged table and checkpoint fail their manifest checksum and are recomputed; the
    leftover of an interrupted write (a temp file that was never renamed) is ignored."""
    sweep = chain["sweep"]
    capsys.readouterr()
    mrc_before = table(sweep, "tables/mrc.parquet")
    rift_before = load_checkpoint(sweep / "checkpoints/rift.pt")[0]
    summary_before = json.loads((sweep / "summary.json").read_text())
    blob = (sweep / "tables/mrc.parquet").read_bytes()
    (sweep / "tables/mrc.parquet").write_bytes(blob[: len(blob) // 2])  # truncated
    blob = bytearray((sweep / "checkpoints/rift.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    (sweep / "checkpoints/rift.pt").write_bytes(bytes(blob))
    (sweep / "checkpoints/at.pt.tmp-0badc0de").write_bytes(b"half a checkpoint")

    code = main(["sweep", SMOKE, *sweep_args(sweep.parent, start_ckpt), *NO_WANDB])
    err = capsys.readouterr().err
    assert code == 0, err[-4000:]
    assert "stage 1/4 adv_train: done earlier" in err
    assert "stage 2/4 mrc: 4 modules" in err  # recomputed: rebuilt from Tune's stored results
    assert stage(sweep, "mrc")["computed"] == 0  # ... without running a trial again
    assert "stage 3/4 finetune: done earlier" in err
    assert "stage 4/4 interpolate: 3 alphas" in err
    assert table(sweep, "tables/mrc.parquet") == mrc_before
    rift = load_checkpoint(sweep / "checkpoints/rift.pt")[0]
    assert all(torch.equal(rift[k], rift_before[k]) for k in rift_before)
    summary = json.loads((sweep / "summary.json").read_text())
    assert (summary["trial"], summary["alpha"], summary["rift"]) == (
        summary_before["trial"], summary_before["alpha"], summary_before["rift"])  # fmt: skip
    from rift_ray.store import Store

    store = Store.open(str(sweep.parent), sweep.name)
    assert all(store.valid(rel) for rel in store.manifest())


def test_interrupted_write_is_never_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that dies before its rename leaves the old artifact whole (and no temp file); one
    that dies after the rename but before the manifest update is not trusted by a re-run."""
    from rift_ray.store import AT_CHECKPOINT, Store

    store = Store.open(str(tmp_path), "s")
    store.put(AT_CHECKPOINT, b"old weights", stage_hash="h")
    store.write_stage("adv_train", status="done", hash="h")

    def die(fd: int) -> None:
        raise KeyboardInterrupt  # the process is stopped halfway through the write

    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", die)
        with pytest.raises(KeyboardInterrupt):
            store.put(AT_CHECKPOINT, b"new weights", stage_hash="h")
    assert store.get(AT_CHECKPOINT) == b"old weights"
    assert store.stage_done("adv_train", "h")
    assert sorted(p.name for p in (tmp_path / "s/checkpoints").iterdir()) == ["at.pt"]
    (tmp_path / "s" / AT_CHECKPOINT).write_bytes(b"new weights")  # renamed, manifest not updated
    assert not store.stage_done("adv_train", "h")


# -- a node lost during MRC ------------------------------------------------------------------------

CLUSTER = r"""
import json, os, sys, threading, time
import ray
from ray.cluster_utils import Cluster
smoke, storage, out, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
info = {"nodes": [w.node_id for w in workers]}

def remove_a_node():  # once an MRC trial runs on the second node (it sleeps 6 s), drop it
    while not os.path.exists(os.path.join(os.environ["RIFT_RAY_FAULT_MARKS"], workers[1].node_id)):
        time.sleep(0.2)
    time.sleep(1)
    cluster.remove_node(workers[1], allow_graceful=False)
    info["removed"] = workers[1].node_id
    info["removed_at"] = time.time()

threading.Thread(target=remove_a_node, daemon=True).start()
from rift_ray.cli import main
info["code"] = main(["sweep", smoke, "--storage", storage, "--name", "n", *argv])
json.dump(info, open(out, "w"))
ray.shutdown()
cluster.shutdown()
"""


@e2e
def test_node_removed_during_mrc(start_ckpt: str, tmp_path: Path) -> None:
    args = [*TINY, *FOUR_MODULES, *NO_WANDB, "--set", f"adv_train.checkpoint={start_ckpt}",
            "--set", "shared_storage=true", "--until", "mrc"]  # fmt: skip
    info_file = tmp_path / "info.json"
    proc = subprocess.run(
        [sys.executable, "-c", CLUSTER, SMOKE, str(tmp_path), str(info_file), *args],
        # every MRC trial sleeps 6 s first: two are running when the node goes
        env=_env(RIFT_RAY_FAULTS="mrc_sleep@module=*", RIFT_RAY_FAULT_SLEEP_S="6",
                 RIFT_RAY_FAULT_MARKS=str(tmp_path / "marks")),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0 and info_file.is_file(), proc.stderr[-4000:]
    info = json.loads(info_file.read_text())
    assert info["code"] == 0 and "removed" in info, proc.stderr[-4000:]
    # MRC trials ran on both nodes (each marks its node when it starts)
    assert sorted(os.listdir(tmp_path / "marks")) == sorted(info["nodes"])
    sweep = tmp_path / "n"
    rows = table(sweep, "tables/mrc.parquet")
    assert sorted(r["module"] for r in rows) == [
        "conv1",
        "layer1.0.conv1",
        "layer2.0.conv1",
        "linear",
    ]
    assert all(r["status"] == "done" for r in rows), rows
    # the trial that ran on the lost node failed there and was rescheduled on the other one
    trials = tune_trials(sweep, "mrc")
    retried = [t["config"]["module"] for t in trials if t["num_failures"] >= 1]
    assert retried, trials
    by_module = {r["module"]: r for r in rows}
    assert all(by_module[m]["node"] != info["removed"][:12] for m in retried)
    # --until mrc: stage 2 is done and nothing after it ran
    assert stage(sweep, "mrc")["status"] == "done"
    assert not (sweep / "stages" / "finetune.json").exists()
    assert not (sweep / "summary.json").exists()
    assert "stopped after stage 2/4 mrc (--until mrc)" in proc.stderr
