"""cluster.yaml: Ray's own schema (no cloud calls), what it syncs, and its setup commands run
for real against a clean checkout in a fresh venv."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def raw() -> dict:
    return dict(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_cluster_yaml_validates() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(raw())
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0, "GPU": 0}  # no trials on the head
    assert types["gpu_worker"]["resources"] == {"CPU": 4, "GPU": 1}  # g5.xlarge
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "g5.xlarge"


def test_cluster_yaml_syncs_the_project_and_nothing_local() -> None:
    c = raw()
    assert c["file_mounts"] == {"~/rift-ray": "."}
    for heavy in (".venv", ".git", "results", "wandb"):
        assert heavy in c["rsync_exclude"]
    assert c["rsync_filter"] == [".gitignore"]
    # Ray starts from the venv that the setup commands made
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        assert cmd.startswith("~/rift-venv/bin/ray ")


@pytest.mark.slow
def test_setup_commands_install_the_project_in_a_fresh_venv(tmp_path: Path) -> None:
    """cluster.yaml's setup commands, run as on a new node: HOME with the synced tree at
    ~/rift-ray (the tracked files: a clean checkout), a fresh venv at ~/rift-venv. The venv
    reuses this one's installed packages through a .pth file instead of downloading torch again
    (``RIFT_TORCH_INDEX=pypi``, the installed torch version); the project itself is installed
    from the checkout, and ``rift-ray --help`` works afterwards."""
    from importlib.metadata import version

    home = tmp_path / "home"
    src = home / "rift-ray"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for rel in files.stdout.decode().split("\0"):
        if rel and (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    venv = home / "rift-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (purelib,) = {p for p in (venv / "lib").glob("python*/site-packages")}
    (purelib / "reuse.pth").write_text(site.getsitepackages()[0] + "\n")
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "RIFT_TORCH": f"torch=={version('torch')} torchvision=={version('torchvision')}",
        "RIFT_TORCH_INDEX": "pypi",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for cmd in raw()["setup_commands"]:
        proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                              timeout=600, cwd=home)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installed in" in proc.stderr and "torch " in proc.stderr
    help_ = subprocess.run([str(venv / "bin" / "rift-ray"), "--help"], env=env,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert help_.returncode == 0 and "sweep" in help_.stdout, help_.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import rift_ray; print(rift_ray.__file__)"],
                           env=env, capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)  # fmt: skip
    assert where.stdout.strip().startswith(str(src)), where.stdout + where.stderr
    assert f"source {venv}/bin/activate" in (home / ".bashrc").read_text().splitlines()
