"""The Ray cluster a sweep runs on: which one to join, what its nodes hold, and whether
every stage's resource bundle fits one of them, checked before any compute.

Which cluster (:func:`resolve_address`), as Ray users expect:

1. ``--address`` or ``$RAY_ADDRESS`` when given (``local``: a private instance, for tests);
2. else the running cluster this machine is a node of, the one ``ray start`` recorded and
   ``ray.init(address="auto")`` finds (``ray exec cluster.yaml "rift-ray sweep ..."`` runs on
   the head with no ``RAY_ADDRESS``);
3. else a local instance sized to the machine.

What the cluster can hold (:func:`cluster_shape`): the alive nodes, and for an autoscaling
cluster every node type it can launch, with its resources and maximum count. Ray exposes
the node types in its cluster state (autoscaler v2: ``GlobalState.get_cluster_config``); the
default (v1) autoscaler of ``ray up`` does not, so they are read from the autoscaling config
that the head's monitor process was started with (``~/ray_bootstrap_config.yaml`` there).

The bundle arithmetic (:func:`stage_bundles`, :func:`per_node`, :func:`check_fits`,
:func:`packing_lines`) is plain Python and needs no Ray.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from rift_ray.config import ConfigError, SweepConfig
from rift_ray.rift.selection import max_trials

LOCAL = "local"
"""``--address local``: always a private instance of our own."""

_EPS = 1e-9


@dataclass(frozen=True)
class NodeShape:
    """A kind of node: its logical resources, how many are alive, how many there can be."""

    name: str
    cpu: float
    gpu: float
    alive: int = 1
    max_count: int = 1
    accelerator: str | None = None
    """GPU model as Ray reports it (``accelerator_type:A10G`` -> ``A10G``), where it does."""

    def text(self) -> str:
        gpu = f", GPU: {self.gpu:g}" if self.gpu else ""
        model = f" {self.accelerator}" if self.accelerator and self.gpu else ""
        return f"{self.name} {{CPU: {self.cpu:g}{gpu}}}{model}"


@dataclass(frozen=True)
class ClusterShape:
    """What the connected cluster can run: one entry per kind of node."""

    nodes: tuple[NodeShape, ...]
    address: str = ""
    autoscaling: bool = False
    private: bool = False
    """A local instance rift-ray started itself (one node)."""
    declared: bool = False
    """Node types a ``ray up`` config declares (``--dry-run --cluster``), nothing running."""

    @property
    def multi_node(self) -> bool:
        return sum(n.max_count for n in self.nodes) > 1

    def largest(self) -> NodeShape | None:
        return max(self.nodes, key=lambda n: (n.gpu, n.cpu), default=None)

    def describe(self) -> str:
        if self.declared:
            return f"the node types of {self.address}: " + ", ".join(
                f"{n.text()} up to {n.max_count}" for n in self.nodes
            )
        alive = [n for n in self.nodes if n.alive]
        n_nodes = sum(n.alive for n in alive)
        cpus = sum(n.cpu * n.alive for n in alive)
        gpus = sum(n.gpu * n.alive for n in alive)
        models = sorted({n.accelerator for n in alive if n.accelerator and n.gpu})
        where = "a local Ray instance" if self.private else f"Ray cluster at {self.address}"
        text = (
            f"{where}: {n_nodes} node{'s' if n_nodes != 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs"
            + (f" ({', '.join(models)})" if models else "")
        )
        if self.autoscaling:
            kinds = [n for n in self.nodes if n.max_count > n.alive or not n.alive]
            text += "; autoscaling: " + ", ".join(
                f"{n.text()} up to {n.max_count}" for n in kinds or self.nodes
            )
        return text


@dataclass(frozen=True)
class Bundle:
    """The resources one unit of a stage asks Ray for, and how many units the stage has."""

    stage: str
    field: str
    unit: str
    cpu: float
    gpu: float
    units: int
    """How many units the stage runs (trials, tasks; AT workers)."""
    gang: bool = False
    """All units must be placed at once (the DDP workers of adversarial training)."""

    def text(self) -> str:
        gpu = f", GPU: {self.gpu:g}" if self.gpu else ""
        return f"{{CPU: {self.cpu:g}{gpu}}}"


def stage_bundles(cfg: SweepConfig, n_modules: int, *, adv_train: bool = True) -> list[Bundle]:
    """Every bundle a sweep asks Ray for, per stage (``adv_train=False``: stage 1 is skipped,
    it starts from a checkpoint or is done)."""
    r = cfg.resources
    out: list[Bundle] = []
    if adv_train:
        a = r.adv_train
        gpu = (a.gpus_per_worker or 1.0) if a.use_gpu else 0.0
        out.append(
            Bundle("adv_train", "resources.adv_train", "AT worker", a.cpus_per_worker, gpu,
                   a.num_workers, gang=True)
        )  # fmt: skip
    trials = max_trials(cfg.finetune)
    out.append(Bundle("mrc", "resources.mrc", "trial", r.mrc.cpu, r.mrc.gpu, n_modules))
    out.append(Bundle("finetune", "resources.finetune", "trial", r.finetune.cpu, r.finetune.gpu,
                      trials))  # fmt: skip
    alphas = len([a for a in cfg.interpolate.alphas if a > 0])
    tasks = 1 + trials * math.ceil(alphas / cfg.interpolate.alphas_per_task)
    out.append(
        Bundle("interpolate", "resources.interpolate", "task", r.interpolate.cpu,
               r.interpolate.gpu, tasks)
    )  # fmt: skip
    return out


def per_node(bundle: Bundle, node: NodeShape) -> int:
    """How many units of ``bundle`` one node of this shape holds at once."""
    if bundle.cpu > node.cpu + _EPS or bundle.gpu > node.gpu + _EPS:
        return 0
    k = math.floor(node.cpu / bundle.cpu + _EPS)
    if bundle.gpu > 0:
        k = min(k, math.floor(node.gpu / bundle.gpu + _EPS))
    return k


def idle_gpu(bundle: Bundle, node: NodeShape) -> float:
    """The fraction of a node's GPUs left unused when it is full of ``bundle`` (0 on no GPU)."""
    k = per_node(bundle, node)
    if not node.gpu or not k:
        return 0.0
    return max(0.0, (node.gpu - k * bundle.gpu) / node.gpu)


def capacity(bundle: Bundle, cluster: ClusterShape) -> int:
    """Units of ``bundle`` the whole cluster holds at once (autoscaled to its maximum)."""
    return sum(per_node(bundle, n) * n.max_count for n in cluster.nodes)


def check_fits(cluster: ClusterShape, bundles: list[Bundle]) -> None:
    """ConfigError (one line: the stage's field, the bundle, the largest node) unless every
    bundle fits at least one node, and adversarial training's workers fit all at once."""
    largest = cluster.largest()
    biggest = largest.text() if largest else "none"
    for b in bundles:
        if not any(per_node(b, n) for n in cluster.nodes):
            raise ConfigError(
                f"{b.field}: one {b.unit} of stage {b.stage} needs {b.text()}, more than any node "
                f"of the {'cluster' if not cluster.private else 'local Ray instance'} holds "
                f"(largest: {biggest}); Ray would wait for it forever"
            )
        if b.gang and capacity(b, cluster) < b.units:
            raise ConfigError(
                f"{b.field}: stage {b.stage} runs {b.units} {b.unit}s x {b.text()} at once, but the "
                f"cluster holds at most {capacity(b, cluster)} (largest node: {biggest}); "
                f"Ray would wait for them forever"
            )


def packing_lines(cluster: ClusterShape, bundles: list[Bundle]) -> list[str]:
    """``--dry-run``: per stage, how its units pack onto the cluster's kinds of node."""
    lines = []
    for b in bundles:
        fits = [(n, k) for n in cluster.nodes if (k := per_node(b, n))]
        if not fits:
            lines.append(f"{b.stage:<11} {b.units} x {b.text()}: fits no node")
            continue
        cap = capacity(b, cluster)
        per = "; ".join(
            f"{k} per {n.name}" + (f" (GPU idle {idle_gpu(b, n):.0%})" if n.gpu else "")
            for n, k in fits
        )
        at_once = min(b.units, cap)
        lines.append(
            f"{b.stage:<11} {b.units} {b.unit}{'s' if b.units != 1 else ''} x {b.text()}: "
            f"{per}; {at_once} at once"
            + (f" ({math.ceil(b.units / cap)} waves)" if cap and b.units > cap else "")
        )
    return lines


# -- storage ---------------------------------------------------------------------------------


def check_storage(cfg: SweepConfig, cluster: ClusterShape) -> None:
    """A local storage path on a cluster of more than one node is refused (one line), unless
    the config says every node mounts it (``shared_storage: true``, e.g. NFS): Ray Train and
    Tune write their checkpoints from the node a worker runs on."""
    from rift_ray.store import is_local_storage

    storage = cfg.storage
    if is_local_storage(storage) and cluster.multi_node and not cfg.shared_storage:
        raise ConfigError(
            f"storage: {storage!r} is a local path, but the Ray cluster has more than one node "
            "and each writes its checkpoints there; use s3://... or gs://..., or set "
            "shared_storage: true if every node mounts that path (NFS)"
        )


# -- joining ---------------------------------------------------------------------------------


def resolve_address(address: str | None) -> str | None:
    """The cluster to join, or None to start a private local instance (see the module doc)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        return None if address == LOCAL else address
    return running_cluster_address()


def running_cluster_address() -> str | None:
    """The GCS address of the cluster ``ray start`` last started or joined on this machine,
    when it still answers (a stale record after a crash is ignored)."""
    from ray._private.services import find_bootstrap_address

    addr = find_bootstrap_address(None)
    if not addr:
        return None
    host, _, port = addr.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        return None
    return str(addr)


def cluster_shape(*, private: bool = False) -> ClusterShape:
    """The connected cluster's kinds of node (``ray.init`` done): alive nodes, plus the node
    types an autoscaler can launch."""
    import ray

    alive: dict[tuple[float, float, str | None, bool], int] = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        key = (float(res.get("CPU", 0)), float(res.get("GPU", 0)), accel,
               "node:__internal_head__" in res)  # fmt: skip
        alive[key] = alive.get(key, 0) + 1
    address = ""
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:
        pass
    types = [] if private else autoscaler_node_types(address)
    if not types:
        nodes = tuple(
            NodeShape("head" if head else "worker", cpu, gpu, k, k, accel)
            for (cpu, gpu, accel, head), k in sorted(
                alive.items(), key=lambda kv: kv[0][3] is False
            )
        )
        return ClusterShape(nodes, address, autoscaling=False, private=private)
    shapes = []
    unclaimed = dict(alive)
    for name, cpu, gpu, max_count in types:
        k = 0
        for key in list(unclaimed):
            if abs(key[0] - cpu) < _EPS and abs(key[1] - gpu) < _EPS:
                k += unclaimed.pop(key)
        accel = next((key[2] for key in alive if key[1] == gpu and key[2]), None)
        shapes.append(NodeShape(name, cpu, gpu, k, max(max_count, k), accel))
    for (cpu, gpu, accel, head), k in unclaimed.items():  # nodes added by hand
        shapes.append(NodeShape("head" if head else "worker", cpu, gpu, k, k, accel))
    return ClusterShape(tuple(shapes), address, autoscaling=True)


def autoscaler_node_types(gcs_address: str) -> list[tuple[str, float, float, int]]:
    """``(name, CPUs, GPUs, max count)`` of every node type the cluster's autoscaler can
    launch (the head type counts one), or [] when the cluster does not autoscale."""
    try:
        from ray._private.state import state

        cfg = state.get_cluster_config()
    except Exception:
        cfg = None
    if cfg is not None and cfg.node_group_configs:  # autoscaler v2
        return [
            (g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
             g.max_count if g.max_count >= 0 else 10**6)
            for g in cfg.node_group_configs
        ]  # fmt: skip
    path = _monitor_config_path(gcs_address)
    if path is None:
        return []
    try:
        import yaml

        with open(path) as f:
            return node_types_of(yaml.safe_load(f))
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def node_types_of(config: dict[str, Any]) -> list[tuple[str, float, float, int]]:
    """The node types of a ``ray up`` / autoscaling config: ``(name, CPUs, GPUs, max count)``
    from each type's ``resources`` and ``max_workers`` (default: the cluster's; the head
    type: the head, plus its own ``max_workers`` if given)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    default_max = int(config.get("max_workers", 0) or 0)
    out = []
    for name, t in types.items():
        res = t.get("resources") or {}
        if name == head:  # the head itself, plus workers of its type only when asked for
            n = 1 + int(t.get("max_workers", 0) or 0)
        else:
            n = int(t.get("max_workers", default_max) or 0)
        out.append((str(name), float(res.get("CPU", 0)), float(res.get("GPU", 0)), n))
    return out


def shape_of_cluster_yaml(path: str) -> ClusterShape:
    """The node types a ``ray up`` config declares (``resources`` of each type), as a cluster
    of zero alive nodes that can grow to each type's ``max_workers``; ConfigError if the file
    is unreadable or a type declares no CPU count."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
        types = node_types_of(raw)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"--cluster: cannot read {path}: {' '.join(str(e).split())}") from None
    if not types:
        raise ConfigError(f"--cluster: {path} declares no available_node_types")
    head = raw.get("head_node_type")
    for name, _cpu, _gpu, _n in types:
        if "CPU" not in ((raw["available_node_types"][name] or {}).get("resources") or {}):
            raise ConfigError(
                f"--cluster: {path}: node type {name} declares no resources.CPU (give each "
                "type's CPU and GPU count so that bundles can be checked against it)"
            )
    nodes = tuple(
        NodeShape(name, cpu, gpu, 1 if name == head else 0, n) for name, cpu, gpu, n in types
    )
    return ClusterShape(nodes, address=path, autoscaling=True, declared=True)


def _monitor_config_path(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` of this machine's autoscaler monitor for that GCS (the
    driver runs on the head under ``ray exec`` and Ray Jobs, where the monitor runs)."""
    port = gcs_address.rpartition(":")[2]
    if not port or not os.path.isdir("/proc"):
        return None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        if not any(re.fullmatch(rf"--gcs-address=.*:{port}", a) for a in args):
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                return os.path.expanduser(a.split("=", 1)[1])
    return None


def local_shape(cfg: SweepConfig) -> ClusterShape:
    """The one node a private local instance would have (no Ray started)."""
    r = cfg.resources
    gpus = r.num_gpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    node = NodeShape("local", float(r.num_cpus or os.cpu_count() or 1), float(gpus))
    return ClusterShape((node,), private=True)


def start_local(cfg: SweepConfig) -> None:
    """A new private Ray instance sized to the machine (``resources.num_cpus`` / ``num_gpus``)."""
    import ray

    r = cfg.resources
    # address="local": always a new instance of our own, even when other Ray instances run
    kwargs: dict[str, Any] = {
        "address": LOCAL,
        "num_cpus": r.num_cpus or os.cpu_count() or 1,
        "include_dashboard": r.dashboard,
        "runtime_env": {"worker_process_setup_hook": "rift_ray.stages.common.quiet_worker_logs"},
    }
    if r.num_gpus is not None:
        kwargs["num_gpus"] = r.num_gpus
    if r.object_store_memory:
        kwargs["object_store_memory"] = r.object_store_memory
    ray.init(**kwargs)


def connect(cfg: SweepConfig, address: str | None) -> ClusterShape:
    """Join or start Ray as :func:`resolve_address` says; return the cluster's shape."""
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) connected already
        return cluster_shape()
    target = resolve_address(address)
    if target is None:
        start_local(cfg)
        return cluster_shape(private=True)
    ray.init(address=target, log_to_driver=True)
    return cluster_shape()
