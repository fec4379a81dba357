"""Stage 2: Module Robust Criticality of every candidate module, one Ray Tune trial each.

The fixed adversarial set is generated once (a Ray task on the validation split,
never the test split), saved to the sweep's storage and shared with every trial
through the object store. With ``mrc.fast`` a second task computes what every trial
would compute identically before its weight moves (:func:`rift_ray.rift.mrc_base`: the
unperturbed loss and the first ascent step's gradient of every module), also stored.
Each trial is a plain Tune function trial computing
:func:`rift_ray.rift.module_robust_criticality` for one module on its CPU/GPU share.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import sys
import time
import traceback
from typing import Any

import ray
import torch
from ray import tune

from rift_ray.config import SweepConfig
from rift_ray.rift import (
    MRCBase,
    adversarial_set,
    decode_adversarial_set,
    encode_adversarial_set,
    module_robust_criticality,
    mrc_base,
)
from rift_ray.stages.common import (
    attack_kwargs,
    device_name,
    fault,
    fault_sleep,
    new_model,
    peak_memory,
    setup_worker,
)
from rift_ray.stages.tuning import run_tune
from rift_ray.store import Store


def select_modules(all_modules: list[str], include: list[str], exclude: list[str]) -> list[str]:
    """Candidates filtered by fnmatch patterns (empty include = all), forward order kept."""
    chosen = [
        m for m in all_modules if not include or any(fnmatch.fnmatchcase(m, p) for p in include)
    ]
    return [m for m in chosen if not any(fnmatch.fnmatchcase(m, p) for p in exclude)]


@ray.remote
def _adv_set_task(
    cfg_dict: dict[str, Any], splits: Any, at_state: dict[str, torch.Tensor]
) -> bytes:
    cfg = SweepConfig.model_validate(cfg_dict)
    device = setup_worker(cfg, cfg.resources.mrc.cpu, cfg.seed)
    model = new_model(cfg, splits)
    model.load_state_dict(at_state)
    data = splits.val
    if cfg.mrc.adv_set_size is not None and len(data) > cfg.mrc.adv_set_size:
        data = data.subset(torch.arange(cfg.mrc.adv_set_size))
    x, y = adversarial_set(
        model.to(device),
        data,
        **{k: v for k, v in attack_kwargs(cfg).items() if k != "random_start"},
        batch_size=cfg.eval.batch_size,
        device=device,
        seed=cfg.seed,
    )
    buf = io.BytesIO()
    blob = encode_adversarial_set(x.cpu(), cfg.mrc.adv_set_format)
    torch.save(blob | {"targets": y.cpu()}, buf)
    return buf.getvalue()


def build_adversarial_set(
    cfg: SweepConfig,
    store: Store,
    splits_ref: Any,
    at_state: dict[str, torch.Tensor],
    stage_hash: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed adversarial set: from storage when valid, else generated once by a Ray task."""
    from rift_ray.store import ADV_SET

    if store.valid(ADV_SET, stage_hash):
        blob = store.get(ADV_SET)
    else:
        r = cfg.resources.mrc
        blob = ray.get(
            _adv_set_task.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(
                cfg.to_dict(), splits_ref, at_state
            )
        )
        store.put(ADV_SET, blob, stage_hash=stage_hash)
    d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return decode_adversarial_set(d), d["targets"]


@ray.remote
def _mrc_base_task(
    cfg_dict: dict[str, Any],
    model_spec: Any,
    at_state: dict[str, torch.Tensor],
    adv: tuple[torch.Tensor, torch.Tensor],
    modules: list[str],
) -> bytes:
    cfg = SweepConfig.model_validate(cfg_dict)
    device = setup_worker(cfg, cfg.resources.mrc.cpu, cfg.seed)
    model = new_model(cfg, model_spec)
    model.load_state_dict(at_state)
    kw = ascent_kwargs(cfg)
    base = mrc_base(
        model.to(device),
        modules,
        adv[0],
        adv[1],
        batch_size=kw["batch_size"],
        shuffle=kw["shuffle"],
        seed=kw["seed"],
        device=device,
        channels_last=kw["channels_last"],
        amp=cfg.compute.amp,
    )
    buf = io.BytesIO()
    torch.save(vars(base), buf)
    return buf.getvalue()


def build_mrc_base(
    cfg: SweepConfig,
    store: Store,
    model_spec: Any,
    at_state: dict[str, torch.Tensor],
    adv: tuple[torch.Tensor, torch.Tensor],
    modules: list[str],
    stage_hash: str,
) -> MRCBase | None:
    """The stage's shared :class:`MRCBase`: from storage when valid (and covering ``modules``),
    else computed once by a Ray task. None (each trial then computes its own) when
    ``mrc.fast`` is off or the task fails; a failure only warns."""
    from rift_ray.store import MRC_BASE

    if not cfg.mrc.fast or not modules:
        return None
    if store.valid(MRC_BASE, stage_hash):
        try:
            stored = _read_base(store.get(MRC_BASE))
        except Exception:  # noqa: BLE001 - unreadable: computed again
            stored = None
        if stored is not None and set(modules) <= set(stored.first_grads):
            return stored
    r = cfg.resources.mrc
    try:
        blob = ray.get(
            _mrc_base_task.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(
                cfg.to_dict(), model_spec, at_state, adv, modules
            )
        )
    except Exception as e:  # noqa: BLE001 - the trials can compute it themselves
        print(
            f"[rift-ray] warning: the MRC trials' shared first step failed ({_one_line(e)}); "
            "each trial computes its own",
            file=sys.stderr,
        )
        return None
    store.put(MRC_BASE, blob, stage_hash=stage_hash)
    return _read_base(blob)


def _read_base(blob: bytes) -> MRCBase:
    d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return MRCBase(**d | {"key": tuple(d["key"])})


def ascent_kwargs(cfg: SweepConfig) -> dict[str, Any]:
    """The MRC ascent's settings from the config (single-module and joint MRC alike)."""
    m = cfg.mrc
    return {
        "epsilon": m.epsilon,
        "epochs": m.epochs,
        "batch_size": m.batch_size,
        "lr": m.lr,
        "projection": m.projection,
        "shuffle": m.shuffle,
        "seed": cfg.seed,
        "fast": m.fast,
        "channels_last": m.channels_last or cfg.compute.channels_last,
    }


def mrc_trial(
    config: dict[str, Any],
    cfg_dict: dict[str, Any] | None = None,
    model_spec: Any = None,
    at_state: dict[str, torch.Tensor] | None = None,
    adv: tuple[torch.Tensor, torch.Tensor] | None = None,
    run_token: str = "",
    base: dict[str, Any] | None = None,
) -> None:
    """Tune function trial: MRC of ``config["module"]``; reports one row.

    ``base``: the stage's :class:`MRCBase` with each module's gradient as an object ref
    (a trial fetches only its own), or None."""
    assert cfg_dict is not None and at_state is not None and adv is not None
    cfg = SweepConfig.model_validate(cfg_dict)
    name = config["module"]
    t0 = time.time()
    device = None
    try:  # a GPU that torch cannot use fails the trial here, with the cause in its row
        device = setup_worker(cfg, cfg.resources.mrc.cpu, cfg.seed)
        fault_sleep("mrc_sleep", module=name)
        if fault("mrc_raise", module=name):
            raise RuntimeError(f"injected fault (RIFT_RAY_FAULTS) in the MRC trial of {name}")
        model = new_model(cfg, model_spec)
        model.load_state_dict(at_state)
        shared = None
        if base is not None and name in base["first_grads"]:
            grad = ray.get(base["first_grads"][name])
            shared = MRCBase(**base | {"first_grads": {name: grad}})
        mem = peak_memory(cfg, device)
        with mem:
            res = module_robust_criticality(
                model.to(device),
                name,
                adv[0],
                adv[1],
                **ascent_kwargs(cfg),
                device=device,
                amp=cfg.compute.amp,
                compile=cfg.compute.compile,
                base=shared,
            )
        if fault("mrc_nan", module=name):
            res = dataclasses.replace(res, mrc=float("nan"))
        if not torch.isfinite(torch.tensor(res.mrc)):
            raise FloatingPointError(f"MRC of {name} is not finite ({res.mrc})")
        row = {
            "module": name,
            "mrc": res.mrc,
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "acc_before": res.acc_before,
            "acc_after": res.acc_after,
            "robust_acc_drop": res.acc_before - res.acc_after,
            "best_epoch": res.best_epoch,
            "num_params": res.num_params,
            "cached_block": res.cached_block,
            "cache_bytes": res.cache_bytes,
            "cached_inside": res.cached_inside,
            "peak_mem_bytes": mem.peak_bytes,
            "mem_method": mem.method,
            "seconds": time.time() - t0,
            "status": "done",
        }
    except Exception as e:  # noqa: BLE001 - a failed module is a row in the table, not a dead sweep
        row = {
            "module": name,
            "seconds": time.time() - t0,
            "status": "failed",
            "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
            "traceback": traceback.format_exc()[-2000:],
        }
    row["run_token"] = run_token
    row["node"] = ray.get_runtime_context().get_node_id()[:12]
    row["device"] = device_name(device) if device is not None else None
    tune.report(row)


MRC_COLUMNS = [
    "module", "mrc", "loss_before", "loss_after", "acc_before", "acc_after", "robust_acc_drop",
    "best_epoch", "num_params", "cached_block", "cache_bytes", "cached_inside", "peak_mem_bytes",
    "mem_method", "seconds", "status", "error", "node", "device",
]  # fmt: skip


def run_mrc(
    cfg: SweepConfig,
    store: Store,
    splits_ref: Any,
    model_spec: Any,
    modules: list[str],
    at_state: dict[str, torch.Tensor],
    stage_hash: str,
    run_token: str,
) -> tuple[list[dict[str, Any]], int]:
    """Run one trial per module; return (rows sorted by MRC, failed ones last; trials computed now)."""
    adv = build_adversarial_set(cfg, store, splits_ref, at_state, stage_hash)
    base = build_mrc_base(cfg, store, model_spec, at_state, adv, modules, stage_hash)
    shared = None
    if base is not None:  # one object per module: a trial fetches only its own gradient
        shared = vars(base) | {"first_grads": {m: ray.put(base.first_grads[m]) for m in modules}}
    trainable = tune.with_parameters(
        mrc_trial,
        cfg_dict=cfg.to_dict(),
        model_spec=model_spec,
        at_state=at_state,
        adv=adv,
        run_token=run_token,
        base=shared,
    )
    r = cfg.resources.mrc
    results = run_tune(
        trainable,
        {"module": tune.grid_search(modules)},
        store=store,
        name=f"mrc-{stage_hash}",
        resources={"cpu": r.cpu, "gpu": r.gpu},
        max_concurrent=cfg.resources.max_concurrent_trials,
    )
    rows, computed = [], 0
    by_module = {}
    for res in results:
        met = dict(res.metrics or {})
        module = (res.config or {}).get("module") or met.get("module")
        if not met.get("status"):
            err = res.error
            met = {
                "module": module,
                "status": "failed",
                "error": _one_line(err) if err else "trial did not report",
            }
        if met.get("run_token") == run_token:
            computed += 1
        by_module[module] = {c: met.get(c) for c in MRC_COLUMNS}
        by_module[module]["error"] = by_module[module]["error"] or ""  # a string column always
    for mod in modules:
        rows.append(by_module.get(mod) or {"module": mod, "status": "failed", "error": "no result"})
    rows.sort(
        key=lambda row: (
            row["status"] != "done",
            row.get("mrc") if row.get("mrc") is not None else 0.0,
        )
    )
    return rows, computed


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]
