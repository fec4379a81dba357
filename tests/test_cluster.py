"""The cluster checks without a cluster: bundles against node shapes, the shipped sweeps
against cluster.yaml, storage, address resolution, and a GPU that torch cannot use."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from rift_ray import cluster as cl
from rift_ray.cli import main
from rift_ray.config import ConfigError, load_config
from rift_ray.errors import SweepError
from rift_ray.hashing import config_hash

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")
G5 = cl.NodeShape("gpu_worker", 4, 1, alive=0, max_count=8)
HEAD = cl.NodeShape("head", 0, 0)


def shape(*nodes: cl.NodeShape, private: bool = False) -> cl.ClusterShape:
    return cl.ClusterShape(tuple(nodes), address="10.0.0.1:6379", autoscaling=True,
                           private=private)  # fmt: skip


def test_per_node_packing_and_idle_gpu() -> None:
    b = cl.Bundle("mrc", "resources.mrc", "trial", cpu=1, gpu=0.25, units=10)
    assert cl.per_node(b, G5) == 4 and cl.idle_gpu(b, G5) == 0.0
    b = cl.Bundle("finetune", "resources.finetune", "trial", cpu=4, gpu=0.5, units=12)
    assert cl.per_node(b, G5) == 1 and cl.idle_gpu(b, G5) == 0.5  # half the A10G idle
    b = cl.Bundle("x", "resources.x", "trial", cpu=0.5, gpu=0.0, units=1)
    assert cl.per_node(b, G5) == 8 and cl.per_node(b, HEAD) == 0
    assert cl.capacity(b, shape(HEAD, G5)) == 64  # 8 per node x 8 nodes
    # a third of a GPU: three per GPU, not two (floating-point sums)
    third = cl.Bundle("x", "resources.x", "trial", cpu=1, gpu=1 / 3, units=1)
    assert cl.per_node(third, G5) == 3


def test_bundle_that_fits_no_node_is_one_line_naming_stage_bundle_and_largest_node() -> None:
    cfg = load_config(SMOKE, overrides=[
        "resources.adv_train.use_gpu=true", "resources.adv_train.cpus_per_worker=6",
        "resources.adv_train.gpus_per_worker=1"])  # fmt: skip
    with pytest.raises(ConfigError) as e:
        cl.check_fits(shape(HEAD, G5), cl.stage_bundles(cfg, 4))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "resources.adv_train: one AT worker of stage adv_train needs {CPU: 6, GPU: 1}"
    )
    assert "largest: gpu_worker {CPU: 4, GPU: 1}" in msg
    # the same sweep starting from a checkpoint: stage 1 asks for nothing
    cl.check_fits(shape(HEAD, G5), cl.stage_bundles(cfg, 4, adv_train=False))


def test_gang_of_at_workers_must_fit_at_once() -> None:
    cfg = load_config(SMOKE, overrides=[
        "resources.adv_train.num_workers=3", "resources.adv_train.cpus_per_worker=4"])  # fmt: skip
    two = cl.NodeShape("gpu_worker", 4, 1, alive=0, max_count=2)
    with pytest.raises(
        ConfigError,
        match=r"runs 3 AT workers x \{CPU: 4\} at once, but the cluster holds at most 2",
    ):
        cl.check_fits(shape(HEAD, two), cl.stage_bundles(cfg, 4))
    cl.check_fits(shape(HEAD, G5), cl.stage_bundles(cfg, 4))


def test_fractional_gpu_above_one_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"resources.finetune.gpu: must be at most 1"):
        load_config(SMOKE, overrides=["resources.finetune.gpu=1.5"])
    assert load_config(SMOKE, overrides=["resources.finetune.gpu=2"]).resources.finetune.gpu == 2


def test_cluster_yaml_declares_every_node_type() -> None:
    c = cl.shape_of_cluster_yaml(str(ROOT / "cluster.yaml"))
    by = {n.name: n for n in c.nodes}
    assert (by["head"].cpu, by["head"].gpu, by["head"].max_count) == (0, 0, 1)
    assert (by["gpu_worker"].cpu, by["gpu_worker"].gpu, by["gpu_worker"].max_count) == (4, 1, 8)
    assert c.multi_node


@pytest.mark.parametrize("sweep", sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_fits_the_shipped_cluster(sweep: str) -> None:
    """Every stage's bundle fits cluster.yaml's worker type; GPU stages fill its GPU."""
    cfg = load_config(str(ROOT / "sweeps" / sweep))
    c = cl.shape_of_cluster_yaml(str(ROOT / "cluster.yaml"))
    bundles = cl.stage_bundles(cfg, 20)
    cl.check_fits(c, bundles)
    worker = next(n for n in c.nodes if n.gpu)
    for b in bundles:
        if b.gpu:
            assert cl.idle_gpu(b, worker) == 0.0, (sweep, b)
            assert b.cpu * cl.per_node(b, worker) == worker.cpu, (sweep, b)  # CPUs used too


def test_local_storage_on_a_multi_node_cluster() -> None:
    multi = shape(HEAD, G5)
    local = load_config(SMOKE)
    with pytest.raises(ConfigError, match=r"^storage: '\./results' is a local path"):
        cl.check_storage(local, multi)
    cl.check_storage(load_config(SMOKE, overrides=["shared_storage=true"]), multi)
    cl.check_storage(load_config(SMOKE, storage="s3://bucket/x"), multi)
    cl.check_storage(local, shape(cl.NodeShape("local", 2, 0), private=True))
    # not part of any hash: declaring the storage shared recomputes nothing
    assert config_hash(load_config(SMOKE, overrides=["shared_storage=true"])) == config_hash(local)


def test_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    assert cl.resolve_address(None) is None  # nothing running: a local instance
    assert cl.resolve_address("local") is None
    assert cl.resolve_address("10.1.2.3:6379") == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert cl.resolve_address(None) == "10.9.9.9:6379"
    assert cl.resolve_address("local") is None  # --address local wins over the environment
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cl.resolve_address(None) is None
    monkeypatch.delenv("RAY_ADDRESS")
    with socket.socket() as server:  # a cluster `ray start` recorded, still answering
        server.bind(("127.0.0.1", 0))
        server.listen()
        addr = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: addr)
        assert cl.resolve_address(None) == addr
    # the same record once that cluster is gone: stale, so a local instance
    assert cl.resolve_address(None) is None


def test_node_types_of_an_autoscaling_config() -> None:
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cl.node_types_of(raw) == [("head", 0.0, 0.0, 1), ("gpu_worker", 4.0, 1.0, 8)]
    raw["available_node_types"]["gpu_worker"].pop("max_workers")
    assert cl.node_types_of(raw)[1] == ("gpu_worker", 4.0, 1.0, 8)  # the cluster's max_workers


def test_gpu_assigned_but_unusable_fails_with_node_and_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray
    import torch

    from rift_ray.stages.common import GPUUnavailableError, trial_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # outside Ray: the GPUs CUDA_VISIBLE_DEVICES names
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert trial_device() == torch.device("cpu")  # no GPU given: the CPU, silently right
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(GPUUnavailableError):
        trial_device()
    # in a Ray worker: the GPUs Ray assigned, whatever the environment says
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert trial_device() == torch.device("cpu")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(GPUUnavailableError) as e:
        trial_device()
    msg = str(e.value)
    assert msg.startswith(f"node {socket.gethostname()}: Ray assigned GPU 0 but torch")
    assert f"built for CUDA {torch.version.cuda or 'none'}" in msg and "\n" not in msg


def test_dry_run_shows_packing_on_cluster_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["sweep", SMOKE, "--dry-run", "--cluster", str(ROOT / "cluster.yaml"),
            "--storage", str(tmp_path), "--set", "shared_storage=true",
            "--set", "resources.mrc.gpu=0.25",
            "--set", "resources.finetune.cpu=4", "--set", "resources.finetune.gpu=0.5"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "packing on the node types of " in out
    assert "head {CPU: 0} up to 1, gpu_worker {CPU: 4, GPU: 1} up to 8:" in out
    assert "mrc         " in out and "4 per gpu_worker (GPU idle 0%)" in out
    assert "1 per gpu_worker (GPU idle 50%)" in out  # finetune: 4 CPUs leave half the GPU
    # a bundle no node type holds: the packing, then exit 2 with the one line
    assert main([*args, "--set", "resources.interpolate.cpu=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rift-ray: error: resources.interpolate: one task")
    assert main(["sweep", SMOKE, "--cluster", "cluster.yaml"]) == 2  # only with --dry-run


def test_cluster_yaml_without_resources_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_worker"].pop("resources")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="node type gpu_worker declares no resources.CPU"):
        cl.shape_of_cluster_yaml(str(path))


def test_node_types_from_ray_cluster_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autoscaler v2 reports the node groups to the GCS; they come first when present."""
    from ray._private import state
    from ray.core.generated import autoscaler_pb2

    groups = [
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 0}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 2}, max_count=-1),
    ]
    config = autoscaler_pb2.ClusterConfig(node_group_configs=groups)
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: config)
    assert cl.autoscaler_node_types("127.0.0.1:1") == [
        ("head", 0.0, 0.0, 1),
        ("gpu", 8.0, 2.0, 10**6),  # -1: no limit
    ]
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    assert cl.autoscaler_node_types("127.0.0.1:1") == []  # no v2, no monitor for that port


def test_gpu_failure_marks_the_running_stages_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU torch cannot use, met in a Ray task, ends the sweep with its one line; the stage
    records that say running (the top level's and each seed's) say failed, done ones stay."""
    from rift_ray import pipeline
    from rift_ray.stages.common import GPUUnavailableError
    from rift_ray.store import Store

    cfg = load_config(SMOKE, storage=str(tmp_path))
    top = Store.open(cfg.storage, cfg.name)
    top.write_stage("adv_train", status="done", hash="h")
    seed = top.for_seed(3)
    seed.write_stage("mrc", status="running", hash="h")

    def broken(*args: object, **kwargs: object) -> None:
        raise GPUUnavailableError("node n1: Ray assigned GPU 0 but torch cannot use it")

    monkeypatch.setattr(pipeline, "_run_sweep", broken)
    with pytest.raises(SweepError, match=r"^node n1: Ray assigned GPU 0 but torch"):
        pipeline.run_sweep(cfg)
    assert top.read_stage("adv_train")["status"] == "done"
    rec = seed.read_stage("mrc")
    assert rec["status"] == "failed" and rec["error"].startswith("node n1: Ray assigned GPU 0")
