"""``--restart [STAGE]`` keeps what it replaces: outputs move to ``history/<stage>-<hash>/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import make_sweep

from rift_ray import store as layout
from rift_ray.cli import main
from rift_ray.pipeline import restart_stages
from rift_ray.store import Store

ROOT = Path(__file__).resolve().parents[1]


def finished_sweep(tmp_path: Path) -> Store:
    """A finished sweep (tests/test_report.py) with an AT checkpoint, Ray experiment
    directories, a fine-tuning checkpoint and W&B run ids."""
    store = make_sweep(tmp_path)
    store.put(layout.AT_CHECKPOINT, b"days of GPU work", stage_hash="h1")
    store.put(layout.finetune_checkpoint("conv1_lr0.01"), b"delta", stage_hash="h3")
    for name in ("at-h1", "mrc-h2", "finetune-h3", "finetune-h3-greedy"):
        store.write_file(f"ray/{name}/experiment_state.json", b"{}")
    runs = {f"{n}@h": {"id": n, "stage": st, "step": 3} for n, st in (
        ("adv_train", "adv_train"), ("mrc", "mrc"), ("ft-conv1_lr0.01", "finetune"),
        ("interpolate", "interpolate"))}  # fmt: skip
    store.write_file(layout.WANDB_RUNS, json.dumps({"token": "t", "runs": runs}).encode())
    return store


def test_restart_mrc_keeps_at_and_moves_the_rest_to_history(tmp_path: Path) -> None:
    store = finished_sweep(tmp_path)
    at = Path(store.path(layout.AT_CHECKPOINT)).read_bytes()
    moved = restart_stages(store, "mrc")
    assert moved == ["history/mrc-h2", "history/finetune-h3", "history/interpolate-h4"]
    # stage 1 is untouched and still done; the others are gone from their places ...
    assert Path(store.path(layout.AT_CHECKPOINT)).read_bytes() == at
    assert store.stage_done("adv_train", "h1") and store.exists("ray/at-h1")
    for rel in (layout.MRC_TABLE, layout.FINETUNE_TABLE, layout.SUMMARY, "ray/mrc-h2",
                "ray/finetune-h3-greedy", layout.stage_record("mrc")):  # fmt: skip
        assert not store.exists(rel), rel
    assert not store.stage_done("mrc", "h2")
    assert not any(k.startswith(("tables/mrc", "summary")) for k in store.manifest())
    # ... and whole, byte for byte, under history/
    h = Path(store.path("history"))
    assert json.loads((h / "mrc-h2/stages/mrc.json").read_text())["hash"] == "h2"
    assert (h / "finetune-h3/checkpoints/finetune/conv1_lr0.01.pt").read_bytes() == b"delta"
    assert (h / "finetune-h3/ray/finetune-h3-greedy/experiment_state.json").is_file()
    assert (h / "interpolate-h4/summary.json").is_file()
    assert store.history() == ["finetune-h3", "interpolate-h4", "mrc-h2"]
    # the W&B runs of the restarted stages start afresh; stage 1's keeps its steps
    runs = json.loads(Path(store.path(layout.WANDB_RUNS)).read_text())["runs"]
    assert {v["stage"] for v in runs.values()} == {"adv_train"}


def test_restart_again_keeps_both_histories(tmp_path: Path) -> None:
    store = finished_sweep(tmp_path)
    restart_stages(store, "interpolate")
    store.put_json(layout.SUMMARY, {"second": True}, stage_hash="h4")
    store.write_stage("interpolate", status="done", hash="h4", seconds=1.0)
    assert restart_stages(store, "interpolate") == ["history/interpolate-h4-2"]
    assert json.loads(Path(store.path("history/interpolate-h4-2/summary.json")).read_text()) == {
        "second": True
    }
    assert Path(store.path("history/interpolate-h4/summary.json")).is_file()


def test_restart_of_everything_needs_a_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a terminal to ask on and without --yes: exit 2, one line, nothing moved."""
    store = finished_sweep(tmp_path / "s")
    argv = ["sweep", str(ROOT / "sweeps/smoke.yaml"), "--storage", str(tmp_path / "s"),
            "--name", store.root.rsplit("/", 1)[1], "--restart"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rift-ray: error: --restart alone recomputes")
    assert store.exists(layout.AT_CHECKPOINT) and not store.exists("history")
    with pytest.raises(SystemExit):  # argparse: not a stage
        main([*argv[:-1], "--restart", "mcr"])


# -- one driver per sweep ----------------------------------------------------------------------


def test_a_second_driver_is_refused_and_a_stale_lease_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from rift_ray.lease import LeaseHeld, SweepLease, read_lease
    from rift_ray.status import status_lines, sweep_status

    store = finished_sweep(tmp_path)
    with SweepLease(store) as first:
        assert read_lease(store)["token"] == first.token
        (line,) = [ln for ln in status_lines(sweep_status(store)) if ln.startswith("  run by ")]
        assert f"pid {first.lease['pid']}" in line
        with pytest.raises(LeaseHeld, match=r"is being run by another driver: .* pid \d+"):
            with SweepLease(store):
                pass
        assert read_lease(store)["token"] == first.token  # the refused one changed nothing
        # the first driver dies without releasing: its heartbeat stops
        stale = read_lease(store) | {"heartbeat": time.time() - 3600}
        store.write_file(layout.LEASE, json.dumps(stale).encode())
        first._stop.set()
        with SweepLease(store) as second:
            assert read_lease(store)["token"] == second.token
        assert (
            "taking over the lease of a driver that stopped renewing it" in capsys.readouterr().err
        )
    assert read_lease(store) is None  # released: neither left it behind
    # a driver of this machine that was killed: its lease is fresh, but its process is gone
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    fresh = {"host": first.lease["host"], "pid": int(dead.stdout), "started": time.time(),
             "heartbeat": time.time(), "token": "killed"}  # fmt: skip
    store.write_file(layout.LEASE, json.dumps(fresh).encode())
    with SweepLease(store) as third:
        assert read_lease(store)["token"] == third.token
    assert "taking over the lease of a driver that is gone" in capsys.readouterr().err


def test_the_lease_is_renewed(tmp_path: Path) -> None:
    import time

    from rift_ray.lease import SweepLease, read_lease

    store = finished_sweep(tmp_path)
    with SweepLease(store, timeout=0.4):
        first = read_lease(store)["heartbeat"]
        time.sleep(0.5)
        assert read_lease(store)["heartbeat"] > first


def test_two_drivers_started_together_one_runs(tmp_path: Path) -> None:
    """Two ``rift-ray sweep`` processes on one sweep at once: exactly one gets past the lease;
    the other exits 2 with one line naming the holder (refused before it starts Ray)."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from rift_ray.lease import SweepLease, LeaseHeld\n"
        "from rift_ray.store import Store\n"
        "try:\n"
        "    with SweepLease(Store.open(sys.argv[1], 'x')):\n"
        "        print('ran', flush=True); time.sleep(2)\n"
        "except LeaseHeld as e:\n"
        "    print(f'rift-ray: error: {e}', file=sys.stderr); sys.exit(2)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(err for (out, err), p in zip(outs, procs) if p.returncode == 2)
    assert refused.strip().startswith("rift-ray: error: sweep ") and "pid " in refused
    assert len(refused.strip().splitlines()) == 1


def test_the_lease_on_s3(
    s3: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same lease on an object store (a moto S3 server on 127.0.0.1): held, refused,
    taken over when stale, released; two drivers started together, exactly one runs."""
    import subprocess
    import sys
    import time

    from rift_ray.lease import LeaseHeld, SweepLease, read_lease

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    store = Store.open("s3://sweeps/leases", "x")
    assert not store.is_local
    with SweepLease(store) as first:
        assert read_lease(store)["token"] == first.token
        with pytest.raises(LeaseHeld, match=r"s3://sweeps/leases/x is being run by another"):
            with SweepLease(store):
                pass
        assert read_lease(store)["token"] == first.token
        first._stop.set()
        stale = read_lease(store) | {"heartbeat": time.time() - 3600}
        store.write_file(layout.LEASE, json.dumps(stale).encode())
        with SweepLease(store) as second:
            assert read_lease(store)["token"] == second.token
    assert "stopped renewing it" in capsys.readouterr().err
    assert read_lease(store) is None and not store.exists(layout.LEASE)
    script = (
        "import sys, time\n"
        "from rift_ray.lease import SweepLease, LeaseHeld\n"
        "from rift_ray.store import Store\n"
        "try:\n"
        "    with SweepLease(Store.open('s3://sweeps/leases', 'race')):\n"
        "        print('ran', flush=True); time.sleep(2)\n"
        "except LeaseHeld as e:\n"
        "    print(f'rift-ray: error: {e}', file=sys.stderr); sys.exit(2)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=60) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outs


def test_sweep_command_refused_while_another_driver_holds_the_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    store = Store.open(str(tmp_path), "busy")
    lease = {"host": "other-host", "pid": 4242, "started": time.time(), "heartbeat": time.time(),
             "token": "someone-else"}  # fmt: skip
    store.write_file(layout.LEASE, json.dumps(lease).encode())
    argv = ["sweep", str(ROOT / "sweeps/smoke.yaml"), "--storage", str(tmp_path), "--name", "busy"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being run by another driver: other-host pid 4242" in err[0]
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["lease.json"]  # untouched


# -- a changed config says what it recomputes, and keeps what it replaces -----------------------


def test_a_changed_config_says_what_it_recomputes_and_why(tmp_path: Path) -> None:
    from rift_ray.config import load_config, to_yaml
    from rift_ray.hashing import stage_hashes
    from rift_ray.pipeline import announce_changes

    smoke = str(ROOT / "sweeps/smoke.yaml")
    cfg = load_config(smoke)
    store = Store.open(str(tmp_path), cfg.name)
    store.put_text(layout.CONFIG, to_yaml(cfg))
    for stage, h in stage_hashes(cfg).items():
        store.write_stage(stage, status="done", hash=h)
    assert announce_changes(cfg, store) == []  # the same config: nothing
    assert announce_changes(load_config(smoke, ["resources.mrc.cpu=2", "wandb.enabled=false"]),
                            store) == []  # fmt: skip
    lines = announce_changes(load_config(smoke, ["interpolate.alphas=[0.0,1.0]"]), store)
    assert len(lines) == 1 and lines[0].startswith("stage 4/4 interpolate: config changed "
                                                   "(interpolate.alphas): the stored result")  # fmt: skip
    lines = announce_changes(
        load_config(smoke, ["finetune.lrs=[0.1]", "keep_history=false"]), store
    )
    assert [ln.split(":")[0] for ln in lines] == ["stage 3/4 finetune", "stage 4/4 interpolate"]
    assert "(finetune.lrs)" in lines[0] and "(the stage before it)" in lines[1]
    assert lines[0].endswith("it is deleted (keep_history: false)")


# -- a replaced result, rendered: rift-ray report --history -----------------------------------


def test_report_of_a_history_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rift_ray.history import config_key, history_view
    from rift_ray.pipeline import keep_config
    from rift_ray.store import StorageError

    store = finished_sweep(tmp_path)
    for stage, before in (("mrc", "h1"), ("finetune", "h2"), ("interpolate", "h3")):
        store.write_stage(
            stage, after=before, config=config_key(store.read_bytes("config.yaml").decode())
        )
    old_config = store.read_bytes(layout.CONFIG).decode()
    old_mrc = store.get_table(layout.MRC_TABLE).to_pylist()
    # a changed config (mrc settings): the old config is kept, MRC and what follows move away
    new_config = old_config.replace("epochs: 3", "epochs: 4")
    assert new_config != old_config
    keep_config(store, new_config, keep=True)
    store.put_text(layout.CONFIG, new_config)
    restart_stages(store, "mrc")
    # ... and are computed again: MRC at h2b; fine-tuning not yet (stopped after MRC)
    store.put_table(layout.MRC_TABLE, [{"module": "fc", "mrc": 0.01, "status": "done",
                                        "error": "", "node": "n1"}])  # fmt: skip
    store.write_stage("mrc", status="done", hash="h2b", after="h1", computed=1, failed=[])
    assert store.history() == ["finetune-h3", "interpolate-h4", "mrc-h2"]  # no config file

    view, entry = history_view(store, "h2", root=str(tmp_path / "view"))
    assert entry == "mrc-h2"
    assert view.read_stage("adv_train")["hash"] == "h1"  # the current stage 1: unchanged
    assert view.read_stage("mrc")["hash"] == "h2"
    assert view.get_table(layout.MRC_TABLE).to_pylist() == old_mrc
    # the later stages computed from it, found in history/ by their `after`
    assert view.read_stage("finetune")["hash"] == "h3"
    assert view.read_stage("interpolate")["hash"] == "h4" and view.exists(layout.SUMMARY)
    assert view.read_bytes(layout.CONFIG).decode() == old_config  # the config it ran with
    # from the last stage's entry: the stages it was computed from, from history/ (the
    # current MRC, h2b, is not one of them)
    view, _ = history_view(store, "interpolate-h4", root=str(tmp_path / "view2"))
    assert [view.read_stage(s)["hash"] for s in layout.STAGES] == ["h1", "h2", "h3", "h4"]
    assert view.get_table(layout.MRC_TABLE).to_pylist() == old_mrc
    with pytest.raises(StorageError, match="--history h: matches several history entry"):
        history_view(store, "h")
    with pytest.raises(StorageError, match="--history nope: matches no history entry"):
        history_view(store, "nope")

    assert main(["report", store.root, "--history", "mrc-h2"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == Path(store.root) / "report-mrc-h2.html"
    html = out.read_text()
    assert "As it was with history/mrc-h2" in html
    assert main(["report", store.root, "--history", "zzz"]) == 2
    assert "--history zzz: matches no history entry" in capsys.readouterr().err
