"""Shared fixtures: offline W&B in a temp dir, no Ray token auth, one Ray instance per session."""

from __future__ import annotations

import os
import tempfile
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
