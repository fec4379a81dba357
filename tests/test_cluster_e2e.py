"""The cluster path as users run it, on real Ray processes on this machine.

A cluster is `ray start --head --num-cpus=0` plus `ray start --address` worker nodes (what
`ray up` starts), each test's processes on ports of their own and under a Ray temp dir of
their own (``RAY_TMPDIR``), stopped by pid at the end. Storage on S3 is a moto server on
127.0.0.1. The sweeps are run the way users run them: `rift-ray sweep` with no address (as
`ray exec` runs it), a Ray Job (`ray job submit`), and `rift-ray status --follow` beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.ray]

# the smoke sweep, smaller: every stage, a few seconds of compute each
TINY = [
    "--set", "adv_train.epochs=1", "--set", "adv_train.lr_milestones=[1]",
    "--set", "adv_train.checkpoint_every=1",
    "--set", "data.synthetic.train_size=256", "--set", "data.val_size=64",
    "--set", "data.synthetic.test_size=64",
    "--set", "mrc.epochs=1", "--set", "mrc.adv_set_size=64",
    "--set", "mrc.include=[conv1,layer1.0.conv1,layer2.0.conv1,linear]",
    "--set", "finetune.top_k=1", "--set", "finetune.lrs=[0.01]", "--set", "finetune.epochs=1",
    "--set", "finetune.lr_milestones=[1]", "--set", "finetune.metric_subset=64",
    "--set", "finetune.metric_alphas=[1.0]",
    "--set", "interpolate.alphas=[0.0,0.5,1.0]",
    "--set", "resources.torch_threads=1",
    "--set", "wandb.enabled=false",
]  # fmt: skip


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this session: the OS may give a just-closed
    port again, and Ray refuses a node whose components share one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def _pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds ``key=value`` (Ray's agents rename their command
    line, so only their environment tells which cluster they belong to)."""
    want = f"{key}={value}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    out.append(int(pid))
        except OSError:
            continue
    return out


class RayCluster:
    """Ray processes started by ``ray start`` under a temp dir of their own."""

    def __init__(self, **env: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard: str | None = None
        self.workers = 0
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the venv, as setup-node.sh does
            "RAY_TMPDIR": self.tmp,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
            **env,
        }
        for k in ("RAY_ADDRESS", "RIFT_RAY_FAULTS", "WANDB_SERVICE"):
            self.env.pop(k, None)

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(BIN / "ray"), *args], env={**self.env, **(env or {})}, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    @staticmethod
    def node_ports() -> list[str]:
        """Ports of a node's agents: free ones, not Ray's defaults, which another Ray instance
        on this machine (the test session's own) may hold; a head whose dashboard agent cannot
        bind its port takes no Ray Jobs ("No available agent to submit job")."""
        return ["--node-ip-address=127.0.0.1", "--object-store-memory=150000000",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}"]  # fmt: skip

    def start_head(self, *extra: str, dashboard: bool = False, env: dict[str, str] | None = None):
        args = ["start", "--head", "--num-cpus=0", f"--port={self.port}", *self.node_ports(),
                *extra]  # fmt: skip
        if dashboard:
            port = free_port()
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={port}"]  # fmt: skip
            self.dashboard = f"http://127.0.0.1:{port}"
        else:
            args.append("--include-dashboard=false")
        self.ray(*args, env=env)

    def add_worker(self, cpus: int) -> None:
        """A worker node with a temp dir of its own, as on a machine of its own (nodes sharing
        one session dir also share the runtime-env cache, and one node's clean-up of a Ray
        Job's working dir then deletes the driver's current directory on the head)."""
        self.workers += 1
        self.ray("start", f"--address={self.address}", f"--num-cpus={cpus}", *self.node_ports(),
                 f"--temp-dir={self.tmp}/w{self.workers}")  # fmt: skip

    def submit(self, *args: str, timeout: float = 600) -> str:
        """``ray job submit`` to the head's dashboard, once its job agent is up."""
        assert self.dashboard
        deadline = time.time() + 90
        while True:
            proc = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, *args],
                env=self.env, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            out = proc.stdout + proc.stderr
            if "No available agent to submit job" in out and time.time() < deadline:
                time.sleep(2)
                continue
            assert proc.returncode == 0, out[-5000:]
            return out

    def nodes(self) -> list[dict[str, Any]]:
        code = (
            "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
            "print('NODES ' + json.dumps([{'id': n['NodeID'], 'cpu': n['Resources'].get('CPU', 0), "
            "'alive': n['Alive']} for n in ray.nodes()]))"
        )
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        # the driver's stdout also carries Ray's own lines (e.g. the autoscaler's
        # "(autoscaler +0s) Resized to 0 CPUs."), before or after ours
        line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith("NODES "))
        return list(json.loads(line.removeprefix("NODES ")))

    def rift(self, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        """``rift-ray ARGS`` as a user on the head runs it: no --address, no RAY_ADDRESS."""
        return subprocess.run(
            [str(BIN / "rift-ray"), *args], env={**self.env, **env}, capture_output=True,
            text=True, timeout=timeout, cwd=ROOT,
        )  # fmt: skip

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_with_env("RAY_TMPDIR", self.tmp):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(1)
        shutil.rmtree(self.tmp, ignore_errors=True)


def table(path: Path) -> list[dict[str, Any]]:
    return list(pq.read_table(path).to_pylist())


# -- (a), (b): a head with 0 CPUs and a worker node with 2; (c), (d): Ray Jobs and S3 -----------


@pytest.fixture(scope="module")
def cluster(s3: dict[str, str]) -> Iterator[RayCluster]:
    """Head (0 CPUs, dashboard for Ray Jobs) + one worker node with 2 CPUs. Every node reaches
    the S3 server, as every node of cluster.yaml has the S3 instance profile."""
    c = RayCluster(**s3)
    try:
        c.start_head(dashboard=True)
        c.add_worker(cpus=2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A random-init stand-in for a robust model: stages 2-4 run on the cluster without a Ray
    Train start each time (adversarial training on cluster nodes is test (e)'s)."""
    import torch

    from rift_ray.checkpoint import save_checkpoint
    from rift_ray.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "at.pt"
    save_checkpoint(path, build_model("small_resnet", 10).state_dict(), arch="small_resnet",
                    num_classes=10, dataset="synthetic", mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    return ["--set", f"adv_train.checkpoint={path}"]


@pytest.fixture(scope="module")
def joined(
    cluster: RayCluster, start_ckpt: list[str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """(a)'s sweep: `rift-ray sweep` run on the head as `ray exec` runs it (no --address, no
    RAY_ADDRESS), storage a local path every node shares (they are one machine here)."""
    storage = tmp_path_factory.mktemp("joined")
    proc = cluster.rift("sweep", SMOKE, *TINY, *start_ckpt, "--storage", str(storage),
                        "--name", "a", "--set", "shared_storage=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    return storage / "a", proc.stderr


def test_sweep_joins_the_running_cluster(cluster: RayCluster, joined: tuple[Path, str]) -> None:
    """(a) The sweep joins the cluster: it finishes, and every MRC trial ran on the worker node
    (the head has no CPU); the tables record the device of every trial and task."""
    sweep, stderr = joined
    nodes = cluster.nodes()
    (worker,) = [n["id"] for n in nodes if n["cpu"] > 0]
    joined_line = rf"joined Ray cluster at [0-9.]+:{cluster.port}: 2 nodes, 2 CPUs, 0 GPUs\n"
    assert re.search(joined_line, stderr), stderr[-3000:]
    assert "started a local Ray instance" not in stderr
    assert json.loads((sweep / "summary.json").read_text())["alpha"] is not None
    rows = table(sweep / "tables/mrc.parquet")
    assert sorted(r["module"] for r in rows) == ["conv1", "layer1.0.conv1", "layer2.0.conv1",
                                                 "linear"]  # fmt: skip
    assert {r["node"] for r in rows} == {worker[:12]}, rows
    assert {r["device"] for r in rows} == {"cpu"}
    assert {r["device"] for r in table(sweep / "tables/interpolation.parquet")} == {"cpu"}
    assert {r["device"] for r in table(sweep / "tables/finetune.parquet")} == {"cpu"}


def test_bundle_too_big_is_refused_before_any_compute(cluster: RayCluster, tmp_path: Path) -> None:
    """(b) A bundle no node can hold: exit 2 at once, one line naming stage, bundle and the
    largest node; and local storage on a multi-node cluster is refused the same way."""
    t0 = time.time()
    proc = cluster.rift("sweep", SMOKE, *TINY, "--storage", str(tmp_path), "--name", "b",
                        "--set", "shared_storage=true", "--set", "resources.mrc.cpu=3",
                        timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("rift-ray: error: resources.mrc: one trial of stage mrc needs {CPU: 3}")
    assert "largest: worker {CPU: 2}" in err
    print(f"refused after {time.time() - t0:.1f} s")
    assert not (tmp_path / "b" / "config.yaml").exists()  # nothing written
    proc = cluster.rift("sweep", SMOKE, *TINY, "--storage", str(tmp_path), "--name", "b2",
                        timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "storage: " in proc.stderr and "more than one node" in proc.stderr
    assert "shared_storage: true" in proc.stderr.strip().splitlines()[-1]


def test_ray_job_on_s3_followed_from_a_laptop(
    cluster: RayCluster, s3: dict[str, str], start_ckpt: list[str], tmp_path: Path
) -> None:
    """(c) + (d) The README's cluster command: a Ray Job runs the smoke sweep with storage on S3;
    `rift-ray status --follow s3://...` follows it to the end; a re-run reuses every stage;
    status and report read from s3://."""
    assert cluster.dashboard
    uri = "s3://sweeps/rift"
    start = start_ckpt
    follow = subprocess.Popen(
        [str(BIN / "rift-ray"), "status", f"{uri}/job", "--follow", "--interval", "2"],
        env={**cluster.env, **s3}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out = cluster.submit(
            "--working-dir", str(ROOT), "--", "rift-ray", "sweep", "sweeps/smoke.yaml", *TINY,
            *start, "--storage", uri, "--name", "job",
            "--set", "wandb.enabled=true", "--set", "wandb.mode=offline",
        )  # fmt: skip
        followed, _ = follow.communicate(timeout=120)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert "succeeded" in out, out[-3000:]
    assert re.search(rf"joined Ray cluster at [0-9.]+:{cluster.port}", out)  # the job's driver
    assert follow.returncode == 0, followed
    for stage in ("adv_train", "mrc", "finetune", "interpolate"):
        assert f"{stage} done" in " ".join(followed.split()), followed
    assert "AT vs RiFT" in followed
    # the offline W&B runs, their ids and Ray's log were uploaded to the sweep on S3
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    keys = [
        o["Key"] for o in client.list_objects_v2(Bucket="sweeps", Prefix="rift/job/")["Contents"]
    ]
    assert "rift/job/wandb/runs.json" in keys and "rift/job/logs/ray.log" in keys
    runs = {k.split("/")[3] for k in keys if k.startswith("rift/job/wandb/offline-run-")}
    assert len(runs) >= 4, keys  # adv_train, mrc, a trial, interpolate, summary
    assert any(k.endswith(".wandb") for k in keys if "offline-run-" in k)
    assert "W&B runs were logged offline (stored in s3://sweeps/rift/job/wandb)" in out
    # a re-run (on the head, no address) reuses every stage from S3
    proc = cluster.rift("sweep", SMOKE, *TINY, *start, "--storage", uri, "--name", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n, stage in enumerate(("adv_train", "mrc", "finetune", "interpolate"), 1):
        assert f"stage {n}/4 {stage}: done earlier" in proc.stderr, proc.stderr[-3000:]
    status = cluster.rift("status", f"{uri}/job", "--json")
    assert status.returncode == 0, status.stderr
    assert [s["status"] for s in json.loads(status.stdout)["stages"]] == ["done"] * 4
    report = cluster.rift("report", f"{uri}/job", "--format", "csv", "-o", str(tmp_path / "csv"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "csv" / "mrc.csv").is_file()


# -- (e) an autoscaling cluster: Ray's fake multi-node provider ---------------------------------


def fake_autoscaling_config(port: int, worker: dict[str, Any]) -> dict[str, Any]:
    """An autoscaling config for Ray's fake provider whose node types mirror cluster.yaml."""
    return {
        "cluster_name": "fake",
        "max_workers": worker["max_workers"],
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{port}"},  # fmt: skip
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {**worker, "node_config": {}, "min_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }  # fmt: skip


def test_autoscaling_cluster_launches_workers_from_zero(tmp_path: Path) -> None:
    """(e) Worker nodes as cluster.yaml declares them (CPU count, a GPU stand-in), none running:
    the preflight checks the bundles against the node types, and adversarial training's
    two workers make the autoscaler launch two nodes. A bundle above the node type, or more
    AT workers than the type's max_workers can hold, is refused at once."""
    import yaml

    declared = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    worker = {"resources": {**declared["gpu_worker"]["resources"],
                            "object_store_memory": 150_000_000}, "max_workers": 2}  # fmt: skip
    c = RayCluster(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_autoscaling_config(c.port, worker)))
    cpus = int(worker["resources"]["CPU"])
    try:
        c.start_head(f"--autoscaling-config={config}")
        assert [n for n in c.nodes() if n["cpu"] > 0] == []  # no worker yet
        at = ["--set", f"resources.adv_train.cpus_per_worker={cpus}"]
        # more AT workers than two nodes hold: refused against the node types, no compute
        proc = c.rift("sweep", SMOKE, *TINY, *at, "--storage", str(tmp_path), "--name", "e",
                      "--set", "resources.adv_train.num_workers=3",
                      "--set", "shared_storage=true", timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "resources.adv_train: stage adv_train runs 3 AT workers" in proc.stderr
        assert "holds at most 2" in proc.stderr
        assert [n for n in c.nodes() if n["cpu"] > 0] == []
        proc = c.rift("sweep", SMOKE, *TINY, *at, "--storage", str(tmp_path), "--name", "e",
                      "--set", "resources.adv_train.num_workers=2",
                      "--set", "shared_storage=true", "--until", "adv_train")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert f"autoscaling: gpu_worker {{CPU: {cpus}, GPU: 1}} up to 2" in proc.stderr
        workers = [n["id"] for n in c.nodes() if n["cpu"] > 0]
        assert len(workers) == 2  # launched by the autoscaler for the two AT workers
        rec = json.loads((tmp_path / "e/stages/adv_train.json").read_text())
        ranks = rec["history"][-1]["devices"].split(",")
        assert sorted(d.split(":")[0] for d in ranks) == sorted(w[:12] for w in workers)
        # a trial given a (stand-in) GPU that torch cannot use fails, naming node and cause
        proc = c.rift("sweep", SMOKE, *TINY, *at, "--storage", str(tmp_path), "--name", "e",
                      "--set", "resources.adv_train.num_workers=2", "--set", "shared_storage=true",
                      "--set", "resources.mrc.gpu=0.5", "--until", "mrc")  # fmt: skip
        assert proc.returncode == 1, proc.stderr[-5000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert re.match(
            r"rift-ray: error: node \S+: Ray assigned GPU 0 but torch \S+ \(built "
            r"for CUDA [^)]*\) cannot use it; ",
            last,
        ), last
        print(last)
        mrc = json.loads((tmp_path / "e/stages/mrc.json").read_text())
        assert mrc["status"] == "failed" and "cannot use it" in mrc["error"]
    finally:
        c.stop()
