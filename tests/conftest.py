"""Shared fixtures: offline W&B in a temp dir, no Ray token auth, one Ray instance per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_WANDB = tempfile.mkdtemp(prefix="rift-wandb-")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ[var] = _WANDB
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Ray Train's spot-preemption watcher is one more actor process per training run, and no
# test drains a node: off, to keep the suite within its time on 2 cores.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

ROOT = Path(__file__).resolve().parents[1]

# The test files with the most work (seconds of setup and calls on the 2-core box, measured with
# `pytest -v --durations=0`), heaviest first. pytest-xdist (`--dist loadfile
# --no-loadscope-reorder` in pyproject) hands files to whichever worker frees up first, in
# collection order: starting with the longest files and filling in with the short ones
# balances the two workers (longest-processing-time first). Unlisted files keep their order.
HEAVY_FIRST = (
    "test_faults.py",  # ~390 s
    "test_sweep.py",  # ~215 s
    "test_cluster_e2e.py",  # ~205 s
    "test_console.py",  # ~100 s
    "test_rung_order.py",  # ~80 s
    "test_perf_paths.py",
    "test_tracking.py",
    "test_cluster_yaml.py",
    "test_autoattack.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))


CIFAR10_ARCHIVE = Path(
    os.environ.get("RIFT_CIFAR10_ARCHIVE", ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs one (ray.init costs seconds here)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=500 * 1024**2,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def cifar10_archive() -> Path:
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    return CIFAR10_ARCHIVE


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a shared 2-core box run far faster single-threaded (no oversubscription)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with a bucket; the environment that reaches it."""
    pytest.importorskip("moto")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    moto = str(Path(sys.executable).parent / "moto_server")
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     ).create_bucket(Bucket="sweeps")  # fmt: skip
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
