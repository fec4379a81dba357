"""Small helpers shared by the Ray stages: devices, threads, seeds, model state transport."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from rift_ray.config import SweepConfig
from rift_ray.data import DatasetSplits
from rift_ray.models import build_model

FAULTS_ENV = "RIFT_RAY_FAULTS"


def fault_sleep(point: str, **where: Any) -> None:
    """Test hook: a trial that takes longer (``*_sleep`` faults, see :func:`fault`). With
    ``$RIFT_RAY_FAULT_MARKS`` set, it first writes ``<that dir>/<node id>`` (a trial is
    now running on that node)."""
    if fault(point, **where):
        marks = os.environ.get("RIFT_RAY_FAULT_MARKS")
        if marks:
            import ray

            os.makedirs(marks, exist_ok=True)
            open(os.path.join(marks, ray.get_runtime_context().get_node_id()), "a").close()
        time.sleep(float(os.environ.get("RIFT_RAY_FAULT_SLEEP_S", "5")))


def fault(point: str, **where: Any) -> bool:
    """Test hook for fault injection; always False unless ``$RIFT_RAY_FAULTS`` is set.

    ``RIFT_RAY_FAULTS`` is a ``;``-separated list of ``point@key=pattern[,key=pattern]``
    (fnmatch patterns against ``str(value)``, floats as ``%g``), plus optionally
    ``once=DIR``: each listed fault then fires at most once over all processes (the
    first caller creates a marker file in DIR). The call sites (tests/test_faults.py)::

        at_worker_exit@epoch=N     a Ray Train worker SIGKILLs itself after one batch of epoch N
        mrc_raise@module=M         the MRC trial of M raises
        mrc_nan@module=M           the MRC of M comes out NaN
        finetune_raise@lr=X        the fine-tuning trial with lr X raises
        finetune_nan@lr=X          its training loss comes out NaN
        mrc_sleep@module=M         the MRC trial of M first sleeps $RIFT_RAY_FAULT_SLEEP_S (5) s
        finetune_sleep@lr=X        the fine-tuning trial with lr X does, before its first epoch
    """
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return False
    items = [i.strip() for i in spec.split(";") if i.strip()]
    once = next((i[len("once=") :] for i in items if i.startswith("once=")), None)
    got = {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in where.items()}
    for item in items:
        name, _, conds = item.partition("@")
        want = dict(c.split("=", 1) for c in conds.split(",") if "=" in c)
        if name != point or not all(
            k in got and fnmatch.fnmatchcase(got[k], v) for k, v in want.items()
        ):
            continue
        if once:
            os.makedirs(once, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "._=@-" else "_" for c in item)
            marker = os.path.join(once, safe)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True
    return False


def setup_worker(cfg: SweepConfig, cpus: float, seed: int) -> torch.device:
    """Threads sized to the trial's CPU share, a seed, and the device Ray gave us."""
    threads = cfg.resources.torch_threads or max(1, int(cpus))
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return trial_device()


def start_worker(
    cfg_dict: dict[str, Any],
    cpus: float | str,
    spec: ModelSpec | None = None,
    state: dict[str, torch.Tensor] | None = None,
    *,
    compute: bool = True,
) -> tuple[SweepConfig, torch.device, torch.nn.Module | None]:
    """The prologue of a Ray task or trial: (the config, validated; the device Ray gave, with
    threads sized to ``cpus``, the CPU share it was scheduled with (a ``resources`` section
    name: that section's ``cpu``), and the seed set; the model, when ``spec`` is given, else
    None).

    The model is built with the ``compute`` switches applied (:func:`worker_model`; plain
    :func:`new_model` with ``compute=False``), loaded with ``state`` when given and moved to
    the device.
    """
    cfg = SweepConfig.model_validate(cfg_dict)
    share = float(getattr(cfg.resources, cpus).cpu) if isinstance(cpus, str) else cpus
    device = setup_worker(cfg, share, cfg.seed)
    if spec is None:
        return cfg, device, None
    model = worker_model(cfg, spec) if compute else new_model(cfg, spec)
    if state is not None:
        model.load_state_dict(state)
    return cfg, device, model.to(device)


def trial_device() -> torch.device:
    """cuda when Ray assigned this worker a GPU, else cpu.

    A GPU that Ray assigned but torch cannot use (no driver, a driver older than the CUDA
    build of torch, a broken device) is an error naming the node and the cause: computing
    on the CPU instead would turn days of GPU work into months without a word.
    """
    if not _assigned_gpus():
        return torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return torch.device("cuda", 0)
    raise GPUUnavailableError(gpu_failure(_assigned_gpus(), [str(w.message) for w in caught]))


class GPUUnavailableError(RuntimeError):
    """Ray gave this worker a GPU that torch cannot use."""


def _assigned_gpus() -> list[str]:
    """The GPU ids Ray assigned to this worker ([] outside Ray or with no GPU)."""
    try:
        import ray

        if ray.is_initialized():
            return [str(g) for g in ray.get_gpu_ids()]
    except Exception:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [] if visible in ("", "-1") else visible.split(",")


def gpu_failure(gpu_ids: list[str], warned: list[str]) -> str:
    """One line: which node, which GPU, and why torch cannot use it."""
    import socket
    import subprocess

    driver = "no NVIDIA driver found (nvidia-smi missing)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        first = (out.stdout.strip().splitlines() or [""])[0]
        if out.returncode == 0 and first:
            name, _, version = first.rpartition(",")
            driver = f"{name.strip()} with driver {version.strip()}"
        else:
            driver = "nvidia-smi failed: " + " ".join((out.stderr or out.stdout).split())[:200]
    except (OSError, subprocess.SubprocessError):
        pass
    cause = " ".join(" ".join(warned).split())[:300] or "torch.cuda.is_available() is False"
    return (
        f"node {socket.gethostname()}: Ray assigned GPU {','.join(gpu_ids)} but torch "
        f"{torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU-only build'}) "
        f"cannot use it; {driver}; {cause}"
    )


def device_name(device: torch.device) -> str:
    """What a table records of where a trial ran: the GPU model, or cpu."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


@dataclass(frozen=True)
class ModelSpec:
    """What building a model needs from the data: a few numbers, cheap to ship to trials."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]

    @classmethod
    def of(cls, splits: DatasetSplits) -> ModelSpec:
        c, h, w = splits.train.images.shape[1:]
        return cls(
            splits.num_classes, tuple(splits.mean), tuple(splits.std), (int(c), int(h), int(w))
        )


def new_model(cfg: SweepConfig, splits: DatasetSplits | ModelSpec) -> torch.nn.Module:
    spec = splits if isinstance(splits, ModelSpec) else ModelSpec.of(splits)
    return build_model(
        cfg.model.arch,
        spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        depth=cfg.model.depth,
        widen_factor=cfg.model.widen_factor,
        image_size=spec.image_shape[1:],  # sizes the classifier (64x64: 2x2 pooled cells)
    )


def worker_model(cfg: SweepConfig, splits: DatasetSplits | ModelSpec) -> torch.nn.Module:
    """``new_model`` with the ``compute`` section's layout and compile switches applied."""
    from rift_ray.compute import prepare_model

    c = cfg.compute
    return prepare_model(new_model(cfg, splits), channels_last=c.channels_last, compile=c.compile)


class _NoMemory(contextlib.nullcontext):  # type: ignore[type-arg]
    """What ``peak_memory`` returns when nothing is measured: a no-op with empty results."""

    peak_bytes = None
    method = ""


def peak_memory(cfg: SweepConfig, device: torch.device) -> Any:
    """A ``PeakMemory`` for ``device``, or a no-op with ``peak_bytes`` None and ``method`` ""
    when ``resources.track_memory`` is off (or the CPU measurement would sit under
    torch.compile)."""
    from rift_ray.memory import PeakMemory

    if not cfg.resources.track_memory or (cfg.compute.compile and device.type != "cuda"):
        return _NoMemory()
    return PeakMemory(device)


def attack_kwargs(cfg: SweepConfig) -> dict[str, Any]:
    a = cfg.attack
    return {
        "eps": a.eps,
        "step_size": a.step_size,
        "steps": a.steps,
        "random_start": a.random_start,
    }


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def quiet_worker_logs() -> None:
    """Ray worker setup hook: silence a warning Ray Train repeats every few seconds when the
    local instance runs without a dashboard (its placement-group cleaner cannot use the
    state API and says so on every poll; nothing is wrong)."""
    import logging

    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def evaluate_pgd(
    cfg: SweepConfig,
    model: torch.nn.Module,
    data: Any,
    device: torch.device,
    restarts: int = 1,
    per_image: bool = False,
) -> dict[str, Any]:
    """Clean and PGD accuracy (percent) of ``model`` on ``data`` with the sweep's attack
    (``per_image``: with the per-image ``clean_correct`` / ``robust_correct`` bool tensors)."""
    from rift_ray.attacks import evaluate

    m = evaluate(
        model,
        data,
        batch_size=cfg.eval.batch_size,
        device=device,
        attack=attack_kwargs(cfg),
        restarts=restarts,
        seed=cfg.seed,
        amp=cfg.compute.amp,
        per_image=per_image,
    )
    keys = ("clean_acc", "robust_acc", "n") + (
        ("clean_correct", "robust_correct") if per_image else ()
    )
    return {k: m[k] for k in keys}
