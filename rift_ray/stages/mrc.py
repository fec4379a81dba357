"""Stage 2: Module Robust Criticality of every candidate module, one Ray Tune trial each.

The fixed adversarial set is generated once (a Ray task on the validation split,
never the test split), saved to the sweep's storage and shared with every trial
through the object store. With ``mrc.fast`` a second task computes what every trial
would compute identically before its weight moves (:func:`rift_ray.rift.mrc_base`: the
unperturbed loss and the first ascent step's gradient of every module), also stored.
Each trial is a plain Tune function trial computing
:func:`rift_ray.rift.robust_criticality` for one module on its CPU/GPU share. How the set
is stored: :mod:`rift_ray.advset`.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
import traceback
from typing import Any

import ray
import torch
from ray import tune

from rift_ray.advset import adversarial_set_bytes, read_adversarial_set
from rift_ray.config import SweepConfig
from rift_ray.errors import StageFailed, one_line
from rift_ray.progress import TrialBoard
from rift_ray.rift import MRCBase, MRCOptions, adversarial_set, mrc_base, robust_criticality
from rift_ray.rift.selection import SelectionInput, strategy_sets
from rift_ray.stages.base import Stage, SweepContext, SweepState, failures
from rift_ray.stages.common import (
    attack_kwargs,
    device_name,
    fault,
    fault_sleep,
    peak_memory,
    start_worker,
)
from rift_ray.stages.tuning import LiveTrials, run_tune
from rift_ray.store import MRC_TABLE, Store, experiment_name


@ray.remote
def _adv_set_task(
    cfg_dict: dict[str, Any], splits: Any, at_state: dict[str, torch.Tensor]
) -> bytes:
    cfg, device, model = start_worker(cfg_dict, "mrc", splits, at_state, compute=False)
    assert model is not None
    data = splits.val
    if cfg.mrc.adv_set_size is not None and len(data) > cfg.mrc.adv_set_size:
        data = data.subset(torch.arange(cfg.mrc.adv_set_size))
    x, y = adversarial_set(
        model,
        data,
        **{k: v for k, v in attack_kwargs(cfg).items() if k != "random_start"},
        batch_size=cfg.eval.batch_size,
        device=device,
        seed=cfg.seed,
    )
    return adversarial_set_bytes(x, y, cfg.mrc.adv_set_format)


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
    return read_adversarial_set(blob)


@ray.remote
def _mrc_base_task(
    cfg_dict: dict[str, Any],
    model_spec: Any,
    at_state: dict[str, torch.Tensor],
    adv: tuple[torch.Tensor, torch.Tensor],
    modules: list[str],
) -> bytes:
    cfg, device, model = start_worker(cfg_dict, "mrc", model_spec, at_state, compute=False)
    assert model is not None
    base = mrc_base(model, modules, adv[0], adv[1], mrc_options(cfg), device=device)
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
            f"[rift-ray] warning: the MRC trials' shared first step failed ({one_line(e, typed=True)}); "
            "each trial computes its own",
            file=sys.stderr,
        )
        return None
    store.put(MRC_BASE, blob, stage_hash=stage_hash)
    return _read_base(blob)


def _read_base(blob: bytes) -> MRCBase:
    d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return MRCBase(**d | {"key": tuple(d["key"])})


def mrc_options(cfg: SweepConfig) -> MRCOptions:
    """The MRC ascent's options from the config (single-module and joint MRC, the shared base)."""
    m, c = cfg.mrc, cfg.compute
    return MRCOptions(
        epsilon=m.epsilon,
        epochs=m.epochs,
        batch_size=m.batch_size,
        lr=m.lr,
        projection=m.projection,
        shuffle=m.shuffle,
        seed=cfg.seed,
        fast=m.fast,
        channels_last=m.channels_last or c.channels_last,
        amp=c.amp,
        compile=c.compile,
    )


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
    name = config["module"]
    t0 = time.time()
    device = None
    try:  # a GPU that torch cannot use fails the trial here, with the cause in its row
        cfg, device, model = start_worker(cfg_dict, "mrc", model_spec, at_state, compute=False)
        assert model is not None
        fault_sleep("mrc_sleep", module=name)
        if fault("mrc_raise", module=name):
            raise RuntimeError(f"injected fault (RIFT_RAY_FAULTS) in the MRC trial of {name}")
        shared = None
        if base is not None and name in base["first_grads"]:
            grad = ray.get(base["first_grads"][name])
            shared = MRCBase(**base | {"first_grads": {name: grad}})
        mem = peak_memory(cfg, device)
        with mem:
            res = robust_criticality(
                model, name, adv[0], adv[1], mrc_options(cfg), base=shared, device=device
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
            "error": one_line(e, typed=True),
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


def _mrc_result(ctx: SweepContext) -> Any:
    """A finished MRC trial's row goes to the stage's W&B run as it arrives."""

    def on_result(config: dict[str, Any], result: dict[str, Any]) -> None:
        ctx.tracker.mrc_row({"module": config.get("module"), **result})

    return on_result


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MRC rows lowest MRC first, failed ones last (in the order given)."""
    return sorted(
        rows, key=lambda r: (r["status"] != "done", r["mrc"] if r.get("mrc") is not None else 0.0)
    )


def run_mrc(
    ctx: SweepContext, at_state: dict[str, torch.Tensor], experiment: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One trial per module of ``ctx.modules`` in the Tune experiment ``experiment`` (default
    ``mrc-<hash>``); return (rows sorted by MRC, failed ones last; trials computed now)."""
    cfg, store, splits_ref, model_spec = ctx.cfg, ctx.store, ctx.splits_ref, ctx.spec
    modules, stage_hash, run_token = ctx.modules, ctx.hashes["mrc"], ctx.run_token
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
    with TrialBoard("mrc", len(modules), "mrc") as board:
        name = experiment or experiment_name("mrc", stage_hash)
        live = LiveTrials(name, board, lambda c: c["module"], "mrc", on_result=_mrc_result(ctx))
        results = run_tune(
            trainable,
            {"module": tune.grid_search(modules)},
            store=store,
            name=name,
            resources={"cpu": r.cpu, "gpu": r.gpu},
            max_concurrent=cfg.resources.max_concurrent_trials,
            callbacks=[live],
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
                "error": one_line(err, typed=True) if err else "trial did not report",
            }
        if met.get("run_token") == run_token:
            computed += 1
        by_module[module] = {c: met.get(c) for c in MRC_COLUMNS}
        by_module[module]["error"] = by_module[module]["error"] or ""  # a string column always
    for mod in modules:
        rows.append(by_module.get(mod) or {"module": mod, "status": "failed", "error": "no result"})
    return sort_rows(rows), computed


class MRCStage(Stage):
    """Stage 2: the MRC of every candidate module, one Tune trial each."""

    name = "mrc"
    reuses = MRC_TABLE

    def load(self, ctx: SweepContext, st: SweepState) -> None:
        st.mrc_rows = ctx.store.get_table(MRC_TABLE).to_pylist()

    def compute(self, ctx: SweepContext, st: SweepState) -> dict[str, Any]:
        self.say(f"{len(ctx.modules)} modules, one Tune trial each")
        t0 = time.time()
        st.mrc_rows, computed = run_mrc(ctx, st.at_state)
        ctx.store.put_table(MRC_TABLE, st.mrc_rows, stage_hash=ctx.hashes[self.name])
        failed = [r for r in st.mrc_rows if r["status"] != "done"]
        record = {
            "seconds": time.time() - t0,
            "computed": computed,
            "failed": [r["module"] for r in failed],
        }
        if failed:
            self.say(
                f"{len(failed)} module(s) failed and are left out: "
                + "; ".join(failures(st.mrc_rows, "module"))
            )
        if len(failed) == len(st.mrc_rows):
            self.track(ctx, st)
            raise StageFailed(
                f"MRC failed for every module (first: {failures(st.mrc_rows, 'module')[0]}); "
                "see tables/mrc.parquet for the errors",
                **record,
            )
        return record

    def track(self, ctx: SweepContext, st: SweepState) -> None:
        ctx.tracker.log_mrc(st.mrc_rows)

    def load_failed(self, ctx: SweepContext, st: SweepState) -> bool:
        if not ctx.store.exists(MRC_TABLE):
            return False
        self.load(ctx, st)
        return True

    def retry(self, ctx: SweepContext, st: SweepState) -> bool | None:
        """The failed modules again, alone, in ``mrc-<hash>-retry<n>``; merged into the stored
        table. True when the modules the strategies select change (fine-tuning and
        interpolation are then recomputed)."""
        store, h = ctx.store, ctx.hashes[self.name]
        failed = [r["module"] for r in st.mrc_rows if r["status"] != "done"]
        if not failed:
            self.say("--retry-failed: no failed module")
            return None
        before = _selection(ctx, st.mrc_rows)
        rec = store.read_stage(self.name) or {}
        retries = list(rec.get("retries") or [])
        self.say(
            f"--retry-failed: {len(failed)} failed module(s) again, alone: {', '.join(failed)}"
        )
        experiment = experiment_name("mrc", h, retry=len(retries) + 1)
        rows, computed = run_mrc(dataclasses.replace(ctx, modules=failed), st.at_state, experiment)
        new = {r["module"]: r for r in rows}
        st.mrc_rows = sort_rows([new.get(r["module"], r) for r in st.mrc_rows])
        store.put_table(MRC_TABLE, st.mrc_rows, stage_hash=h)
        done = [m for m in failed if new.get(m, {}).get("status") == "done"]
        still = [r["module"] for r in st.mrc_rows if r["status"] != "done"]
        retries.append({"modules": failed, "done": done, "computed": computed,
                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
        ok = {"status": "done", "error": None} if len(still) < len(st.mrc_rows) else {}
        store.write_stage(self.name, failed=still, retries=retries, **ok)
        self.say(f"--retry-failed: {len(done)} of {len(failed)} module(s) now done"
                 + (f"; still failed: {'; '.join(failures(st.mrc_rows, 'module'))}" if still else ""))  # fmt: skip
        self.track(ctx, st)
        if not done:
            return False
        after = _selection(ctx, st.mrc_rows)
        if after is not None and after == before:
            self.say("--retry-failed: the strategies select the same modules; fine-tuning is kept")
            return False
        return True


def _selection(ctx: SweepContext, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the strategies select from MRC ``rows`` (None when it needs the greedy joint MRC,
    which is only computed by the fine-tuning stage)."""

    def greedy() -> list[str]:
        raise LookupError

    ranked = [r["module"] for r in rows if r["status"] == "done"]
    inp = SelectionInput(ranked, ctx.modules, ctx.cfg.finetune, ctx.cfg.seed, greedy)
    try:
        return strategy_sets(inp)[0]
    except LookupError:
        return None
