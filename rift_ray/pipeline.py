"""Runs the four RiFT stages in order, skipping finished ones and resuming interrupted ones.

A stage is skipped when its record in storage says done for the same stage hash
(the hash covers the config sections the stage depends on, chained with the hashes
of the stages before it) and its artifacts verify against the manifest checksums.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import platform
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rift_ray import __version__
from rift_ray import store as layout
from rift_ray.checkpoint import CheckpointError, load_checkpoint, load_into_model, save_checkpoint
from rift_ray.config import (
    SELECTION_FIELDS,
    ComputeConfig,
    ConfigError,
    SweepConfig,
    expand_path,
    to_yaml,
)
from rift_ray.data import DataError, DatasetSplits, load_dataset
from rift_ray.report import environment_info, summary_table
from rift_ray.store import Store

if TYPE_CHECKING:
    from rift_ray.tracking import Tracker


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message is one line for the user."""


def log(msg: str) -> None:
    print(f"[rift-ray] {msg}", file=sys.stderr, flush=True)


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]


NEW_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("compute",): ComputeConfig().model_dump(mode="json"),
    ("mrc", "adv_set_format"): "float32",
    ("adv_train", "checkpoint_normalization"): "dataset",
    ("interpolate", "search"): "grid",
    ("eval", "autoattack", "alphas"): [],
}
"""Fields added after sweeps were first stored, with their defaults: at the default they are
left out of the stage hashes, so results stored by an earlier version stay valid. A new
field that changes results must be added here (or change the hashes on purpose)."""


def _without_new_defaults(d: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))  # a deep copy
    for path, default in NEW_DEFAULTS.items():
        *head, key = path
        section = d
        for k in head:
            section = section.get(k) or {}
        if key in section and section[key] == default:
            del section[key]
    return d


def stage_hashes(cfg: SweepConfig, seed: int | None = None) -> dict[str, str]:
    """Chained hashes of what each stage's result depends on (never resources or W&B).

    ``seed``: one seed of ``cfg.seeds``; it enters the hashes of stages 2-4 (adversarial
    training keeps the hash of ``cfg.seed``, so every seed starts from the same AT model).
    """
    d = _without_new_defaults(cfg.to_dict())
    ev = d["eval"]
    compute = [d["compute"]] if "compute" in d else []  # its own list item, when not default
    h1 = _hash(
        [
            "adv_train",
            cfg.seed,
            d["data"],
            d["model"],
            d["attack"],
            d["adv_train"],
            ev["val_subset"],
            ev["restarts"],
            *compute,
        ]
    )
    h2 = _hash(
        ["mrc", h1, d["mrc"], ev["batch_size"], *compute]
        + ([] if seed is None else ["seed", seed])  # no seeds: the hashes of before
    )
    ft = {k: v for k, v in d["finetune"].items() if k not in SELECTION_FIELDS}
    sel = cfg.finetune.selection_settings()  # {} by default: the hashes of earlier versions
    h3 = _hash(["finetune", h2, ft, d["interpolate"]["tolerance"], *([sel] if sel else [])])
    primary = [] if cfg.finetune.primary == "lowest" else [cfg.finetune.primary]
    h4 = _hash(["interpolate", h3, d["interpolate"], ev, *primary])
    return {"adv_train": h1, "mrc": h2, "finetune": h3, "interpolate": h4}


def trial_name(modules: list[str] | tuple[str, ...], lr: float) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "+".join(modules)) + f"_lr{lr:g}"


@dataclass
class Prepared:
    cfg: SweepConfig
    store: Store
    splits: DatasetSplits
    hashes: dict[str, str]
    modules: list[str] = field(default_factory=list)
    start_state: dict[str, torch.Tensor] | None = None


def prepare(cfg: SweepConfig) -> Prepared:
    """Every check that needs no compute: storage, data, checkpoint, module names, corruptions."""
    from rift_ray.models import mrc_candidates
    from rift_ray.stages.common import ModelSpec, new_model
    from rift_ray.stages.mrc import select_modules

    store = Store.open(cfg.storage, cfg.name)
    store.check_writable()
    if cfg.adv_train.checkpoint is not None:
        path = _field_call("adv_train.checkpoint", expand_path, cfg.adv_train.checkpoint)
        if not path or not os.path.isfile(path):
            raise ConfigError(f"adv_train.checkpoint: file not found: {cfg.adv_train.checkpoint}")
    if cfg.eval.corruptions and cfg.eval.corruption_source == "generated":
        from rift_ray.corruptions import AVAILABLE

        for c in cfg.eval.corruptions:
            if c not in AVAILABLE:
                raise ConfigError(
                    f"eval.corruptions: {c!r} cannot be generated (available: {', '.join(AVAILABLE)})"
                )
    elif cfg.eval.corruptions:
        root = _field_call("eval.cifar_c_root", expand_path, cfg.eval.cifar_c_root)
        if not root:
            raise ConfigError("eval.cifar_c_root: required when eval.corruptions is set")
        for c in [*cfg.eval.corruptions, "labels"]:
            if not os.path.isfile(os.path.join(root, f"{c}.npy")):
                raise ConfigError(f"eval.corruptions: {os.path.join(root, c + '.npy')} not found")
    if cfg.eval.autoattack.enabled:
        from rift_ray.autoattack import require_torchattacks

        try:
            require_torchattacks()
        except ImportError as e:
            raise ConfigError(f"eval.autoattack.enabled: {e}") from None
    splits = _field_call("data.root", load_dataset, cfg.data, seed=cfg.seed)
    if len(splits.val) == 0:
        raise ConfigError(
            "data.val_size: must be > 0 for a sweep (MRC, checkpoint and alpha* choice use validation)"
        )
    spec = ModelSpec.of(splits)
    found = mrc_candidates(new_model(cfg, spec), (1, *spec.image_shape))
    for pat in cfg.mrc.include:
        if not any(fnmatch.fnmatchcase(m, pat) for m in found):
            raise ConfigError(
                f"mrc.include: {pat!r} matches no Conv2d/Linear module of {cfg.model.arch}"
            )
    modules = select_modules(found, cfg.mrc.include, cfg.mrc.exclude)
    if not modules:
        raise ConfigError("mrc.exclude: every Conv2d/Linear module of the model is excluded")
    from rift_ray.stages.selection import check_selection

    check_selection(cfg, modules)
    start = (
        _field_call("adv_train.checkpoint", _load_start_checkpoint, cfg, spec)
        if cfg.adv_train.checkpoint
        else None
    )
    return Prepared(cfg, store, splits, stage_hashes(cfg), modules, start)


def _field_call(field: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; a bad-input error it raises is re-raised led by ``field``.

    Errors that already name a field of the same section (``data.val_size: ...``) are kept.
    """
    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, CheckpointError) as e:
        msg = " ".join(str(e).split())
        if msg.startswith(field.split(".")[0] + "."):
            raise
        msg = msg.removesuffix(f" ({field})")
        raise type(e)(f"{field}: {msg}") from None


def init_ray(
    cfg: SweepConfig, address: str | None, *, n_modules: int = 1, adv_train: bool = True
) -> Any:
    """Join or start Ray (``rift_ray.cluster.resolve_address``), say which cluster, and check
    before any compute that every stage's bundle fits a node and that the storage is one
    every node reaches (ConfigError, one line, otherwise). Returns the cluster's shape."""
    from rift_ray import cluster as cl

    shape = cl.connect(cfg, address)
    log(("started " if shape.private else "joined ") + shape.describe())
    cl.check_fits(shape, cl.stage_bundles(cfg, n_modules, adv_train=adv_train))
    cl.check_storage(cfg, shape)
    return shape


def _load_start_checkpoint(cfg: SweepConfig, spec: Any) -> dict[str, torch.Tensor]:
    """The robust model the sweep starts from; CheckpointError when it does not fit the model."""
    from rift_ray.stages.common import cpu_state, new_model

    path = expand_path(cfg.adv_train.checkpoint)
    assert path is not None
    state, _meta = load_checkpoint(path)
    model = new_model(cfg, spec)
    load_into_model(model, state, source=path, normalization=cfg.adv_train.checkpoint_normalization)
    return cpu_state(model)


def _ckpt_bytes(
    cfg: SweepConfig, splits: DatasetSplits, state: dict[str, torch.Tensor], **extra: Any
) -> bytes:
    buf = io.BytesIO()
    save_checkpoint(
        buf,
        state,
        arch=cfg.model.arch,
        num_classes=splits.num_classes,
        dataset=cfg.data.dataset,
        mean=splits.mean,
        std=splits.std,
        config_hash=cfg.config_hash(),
        extra=extra or None,
    )
    return buf.getvalue()


def _state_from_ckpt(blob: bytes) -> dict[str, torch.Tensor]:
    state, _ = load_checkpoint(io.BytesIO(blob))
    return state


def _stopped(store: Store, stage: str) -> dict[str, Any]:
    """What a sweep run with ``until=stage`` returns once that stage is done."""
    n = layout.STAGES.index(stage) + 1
    log(
        f"stopped after stage {n}/4 {stage} (--until {stage}); "
        "the same command without --until goes on from there"
    )
    return {"stopped_after": stage, "storage": store.uri}


def run_sweep(
    cfg: SweepConfig,
    *,
    address: str | None = None,
    restart: bool = False,
    until: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole sweep; return the summary that is also written to summary.json.

    ``until``: stop once this stage (one of ``store.STAGES``) is done; the summary is then
    ``{"stopped_after": stage, "storage": ...}`` and a later run without it goes on.

    A task or worker that Ray gave a GPU torch cannot use stops the sweep with that one line
    (SweepError); the stage it was in is recorded as failed, finished stages are kept."""
    from rift_ray.stages.common import GPUUnavailableError

    try:
        return _run_sweep(cfg, address=address, restart=restart, until=until)
    except GPUUnavailableError as e:
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the worker's exception
        msg = " ".join(str(cause).split())
        top = Store.open(cfg.storage, cfg.name)
        for store in [top, *(top.for_seed(s) for s in top.seed_dirs())]:
            for stage in layout.STAGES:
                if (store.read_stage(stage) or {}).get("status") == "running":
                    store.write_stage(stage, status="failed", error=msg)
        raise SweepError(msg) from None


def _run_sweep(
    cfg: SweepConfig, *, address: str | None, restart: bool, until: str | None
) -> dict[str, Any]:
    import ray

    if until is not None and until not in layout.STAGES:
        raise SweepError(f"until: must be one of {', '.join(layout.STAGES)} (got {until!r})")

    t_start = time.time()
    prep = prepare(cfg)
    store, splits, hashes = prep.store, prep.splits, prep.hashes
    at_needed = not cfg.adv_train.checkpoint and not store.stage_done(
        "adv_train", hashes["adv_train"]
    )
    init_ray(cfg, address, n_modules=len(prep.modules), adv_train=at_needed or restart)
    if restart:
        log(f"--restart: removing earlier results under {store.uri}")
        for rel in (
            "stages",
            "tables",
            "checkpoints",
            "artifacts",
            "ray",
            layout.SEEDS_DIR,
            layout.MANIFEST,
            layout.SUMMARY,
        ):
            store.delete(rel)
    store.put_text(layout.CONFIG, to_yaml(cfg))
    run_token = uuid.uuid4().hex[:8]
    splits_ref = ray.put(splits)
    timings: dict[str, float] = {}
    from rift_ray.tracking import Tracker

    tracker = Tracker(cfg, store)

    # -- stage 1: adversarial training (or the given checkpoint) --------------------------
    t0 = time.time()
    if store.stage_done("adv_train", hashes["adv_train"]):
        log("stage 1/4 adv_train: done earlier, reusing checkpoints/at.pt")
        at_state = _state_from_ckpt(store.get(layout.AT_CHECKPOINT))
        at_history = (store.read_stage("adv_train") or {}).get("history", [])
    else:
        store.write_stage(
            "adv_train", status="running", hash=hashes["adv_train"], started=time.time()
        )
        if cfg.adv_train.checkpoint:
            log(f"stage 1/4 adv_train: starting from {cfg.adv_train.checkpoint}")
            assert prep.start_state is not None
            at_state, at_history = prep.start_state, []
        else:
            from rift_ray.stages.at import run_adv_train

            log(
                f"stage 1/4 adv_train: {cfg.adv_train.method} for {cfg.adv_train.epochs} epochs on "
                f"{cfg.resources.adv_train.num_workers} worker(s)"
            )
            try:
                at_state, at_history = run_adv_train(
                    cfg, store, splits_ref, f"at-{hashes['adv_train']}"
                )
            except Exception as e:
                store.write_stage("adv_train", status="failed", error=_one_line(e))
                raise SweepError(f"adversarial training failed: {_one_line(e)}") from e
        store.put(
            layout.AT_CHECKPOINT, _ckpt_bytes(cfg, splits, at_state), stage_hash=hashes["adv_train"]
        )
        store.write_stage("adv_train", status="done", seconds=time.time() - t0, history=at_history)
        tracker.log_adv_train(at_history)
    timings["adv_train"] = (store.read_stage("adv_train") or {}).get("seconds", time.time() - t0)
    if until == "adv_train":
        tracker.finish()
        return _stopped(store, until)

    if cfg.seeds is None:
        summary = run_rift_stages(
            cfg,
            store,
            prep,
            splits_ref,
            at_state,
            hashes,
            tracker,
            run_token,
            timings,
            t_start,
            until,
        )
    else:
        summary = _run_seeds(
            cfg, prep, splits_ref, at_state, tracker, run_token, timings, t_start, until
        )
    tracker.finish()
    if summary.get("stopped_after"):
        return _stopped(store, summary["stopped_after"])
    if not summary.get("reused"):
        log(f"report: rift-ray report {store.uri}")
    return summary


def run_rift_stages(
    cfg: SweepConfig,
    store: Store,
    prep: Prepared,
    splits_ref: Any,
    at_state: dict[str, torch.Tensor],
    hashes: dict[str, str],
    tracker: Tracker,
    run_token: str,
    timings: dict[str, float],
    t_start: float,
    until: str | None = None,
) -> dict[str, Any]:
    """Stages 2-4 (MRC, fine-tuning, interpolation) from ``at_state``; their summary, or
    ``{"stopped_after": stage}`` once stage ``until`` is done.

    A single-seed sweep calls this once with its own config, directory and hashes; a
    ``seeds`` sweep once per seed with ``cfg.for_seed(s)``, ``store.for_seed(s)`` and
    ``stage_hashes(cfg, s)``. ``timings`` gains the stages' durations; ``t_start`` is
    where the summary's total time counts from.
    """
    import ray

    from rift_ray.stages.common import ModelSpec

    splits = prep.splits
    spec = ModelSpec.of(splits)

    # -- stage 2: MRC ---------------------------------------------------------------------------
    t0 = time.time()
    if store.stage_done("mrc", hashes["mrc"]):
        log("stage 2/4 mrc: done earlier, reusing tables/mrc.parquet")
        mrc_rows = store.get_table(layout.MRC_TABLE).to_pylist()
    else:
        from rift_ray.stages.mrc import run_mrc

        log(f"stage 2/4 mrc: {len(prep.modules)} modules, one Tune trial each")
        store.write_stage("mrc", status="running", hash=hashes["mrc"], started=time.time())
        mrc_rows, computed = run_mrc(
            cfg, store, splits_ref, spec, prep.modules, at_state, hashes["mrc"], run_token
        )
        store.put_table(layout.MRC_TABLE, mrc_rows, stage_hash=hashes["mrc"])
        failed = [r["module"] for r in mrc_rows if r["status"] != "done"]
        status = "done" if len(failed) < len(mrc_rows) else "failed"
        store.write_stage(
            "mrc", status=status, seconds=time.time() - t0, computed=computed, failed=failed
        )
        tracker.log_mrc(mrc_rows)
        if failed:
            log(
                f"stage 2/4 mrc: {len(failed)} module(s) failed and are left out: "
                + "; ".join(_failures(mrc_rows, "module"))
            )
        if status == "failed":
            raise SweepError(
                f"MRC failed for every module (first: {_failures(mrc_rows, 'module')[0]}); "
                "see tables/mrc.parquet for the errors"
            )
    timings["mrc"] = (store.read_stage("mrc") or {}).get("seconds", time.time() - t0)
    if until == "mrc":
        return {"stopped_after": until}

    # -- stage 3: fine-tuning (ASHA over learning rates) ----------------------------------------
    t0 = time.time()
    if store.stage_done("finetune", hashes["finetune"]):
        survivors_prev = (store.read_stage("finetune") or {})["survivors"]
        log("stage 3/4 finetune: done earlier, reusing tables/finetune.parquet")
        ft_rows = store.get_table(layout.FINETUNE_TABLE).to_pylist()
        survivors = [
            {
                **r,
                "modules": r["modules"].split("+"),
                "state": _state_from_ckpt(store.get(layout.finetune_checkpoint(r["trial"]))),
            }
            for r in ft_rows
            if r["trial"] in survivors_prev
        ]
        by_strategy = (store.read_stage("finetune") or {}).get("strategies") or {
            "lowest": [m.split("+") for m in dict.fromkeys(r["modules"] for r in ft_rows)]
        }  # a record from before finetune.strategies: every set was `lowest`
    else:
        from rift_ray.stages.selection import finetune_strategies, module_groups

        store.write_stage(
            "finetune", status="running", hash=hashes["finetune"], started=time.time()
        )
        by_strategy, groups = module_groups(
            cfg, store, splits_ref, spec, at_state, mrc_rows, prep.modules, hashes["mrc"], log
        )
        log(
            f"stage 3/4 finetune: {len(groups)} module set(s) x {len(cfg.finetune.lrs)} lr(s) under ASHA"
            + (f" (strategies: {', '.join(by_strategy)})" if len(by_strategy) > 1 else "")
        )
        ft_rows, epoch_rows, survivors, computed = finetune_strategies(
            cfg, store, splits_ref, spec, at_state, by_strategy, hashes["finetune"], run_token, log
        )
        ft_failed = _failures(ft_rows, "trial")
        if ft_failed:
            log(
                f"stage 3/4 finetune: {len(ft_failed)} trial(s) failed and are left out: "
                + "; ".join(ft_failed)
            )
        if not survivors:
            store.put_table(layout.FINETUNE_TABLE, ft_rows, stage_hash=hashes["finetune"])
            store.write_stage("finetune", status="failed", error="no fine-tuning trial finished")
            first = f" (first: {ft_failed[0]})" if ft_failed else ""
            raise SweepError(
                f"fine-tuning produced no usable trial{first}; see tables/finetune.parquet"
            )
        for s in survivors:
            store.put(
                layout.finetune_checkpoint(s["trial"]),
                _ckpt_bytes(cfg, splits, s["state"], trial=s["trial"]),
                stage_hash=hashes["finetune"],
            )
        store.put_table(layout.FINETUNE_EPOCHS_TABLE, epoch_rows, stage_hash=hashes["finetune"])
        store.put_table(layout.FINETUNE_TABLE, ft_rows, stage_hash=hashes["finetune"])
        store.write_stage(
            "finetune",
            status="done",
            seconds=time.time() - t0,
            computed=computed,
            survivors=[s["trial"] for s in survivors],
            strategies=by_strategy,
        )
        tracker.log_finetune(ft_rows, epoch_rows)
    timings["finetune"] = (store.read_stage("finetune") or {}).get("seconds", time.time() - t0)
    if until == "finetune":
        return {"stopped_after": until}

    # -- stage 4: interpolation and alpha* ------------------------------------------------------
    t0 = time.time()
    if store.stage_done("interpolate", hashes["interpolate"]):
        log("stage 4/4 interpolate: done earlier, reusing summary.json")
        summary = store.get_json(layout.SUMMARY)
        summary["reused"] = True
        return summary
    from rift_ray.stages.interp import run_interpolation

    log(f"stage 4/4 interpolate: {len(cfg.interpolate.alphas)} alphas x {len(survivors)} trial(s)")
    store.write_stage(
        "interpolate", status="running", hash=hashes["interpolate"], started=time.time()
    )
    primary = cfg.finetune.primary  # its best trial is the final model; others are comparisons
    finalists = {trial_name(g, lr) for g in by_strategy.get(primary, []) for lr in cfg.finetune.lrs}
    table, choice = run_interpolation(
        cfg,
        spec,
        splits_ref,
        at_state,
        survivors,
        splits,
        data_seed=prep.cfg.seed,
        finalists=finalists or None,
    )
    best = choice["best"]
    if best is None:
        store.write_stage(
            "interpolate",
            status="failed",
            error="no alpha satisfies the robust-accuracy constraint",
        )
        raise SweepError(
            "no trial"
            + (f" of finetune.primary ({primary})" if len(by_strategy) > 1 else "")
            + " has an alpha within interpolate.tolerance of the AT robust accuracy"
        )
    winner = next(s for s in survivors if s["trial"] == best["trial"])
    from rift_ray.rift import interpolate

    rift_state = interpolate(at_state, winner["state"], best["alpha"])
    aa_curve: dict[float, dict[str, Any]] = {}
    if cfg.eval.autoattack.enabled:
        from rift_ray.stages.autoattack import autoattack_curve

        log(
            f"AutoAttack ({cfg.eval.autoattack.version}) of the AT model, alpha* and "
            f"{len(cfg.eval.autoattack.alphas)} more alpha(s) of {best['trial']}"
        )
        aa_curve = autoattack_curve(
            cfg, store, spec, splits_ref, at_state, winner["state"], best["alpha"], best["trial"]
        )
    for (
        row
    ) in table:  # AutoAttack is measured on test: alpha 0 for every trial, the rest for the winner
        hit = row["split"] == "test" and (row["alpha"] == 0.0 or row["trial"] == best["trial"])
        aa = aa_curve.get(row["alpha"]) if hit else None
        row["autoattack_acc"] = aa["robust_acc"] if aa else None
    store.put_table(layout.INTERPOLATION_TABLE, table, stage_hash=hashes["interpolate"])
    store.put(
        layout.RIFT_CHECKPOINT,
        _ckpt_bytes(cfg, splits, rift_state, trial=best["trial"], alpha=best["alpha"]),
        stage_hash=hashes["interpolate"],
    )
    timings["interpolate"] = time.time() - t0
    summary = build_summary(
        cfg, mrc_rows, ft_rows, table, choice, winner, timings, time.time() - t_start
    )
    from rift_ray.stages.selection import strategy_table

    summary["primary"] = primary
    summary["strategies"] = strategy_table(cfg, store, by_strategy, mrc_rows, choice, table, hashes)
    if aa_curve:
        keep = ("robust_acc", "clean_acc", "n", "after", "settings")
        summary["autoattack"] = {
            who: {k: aa_curve[a][k] for k in keep}
            for who, a in (("at", 0.0), ("rift", float(best["alpha"])))
        }
        summary["autoattack_curve"] = [
            {"alpha": a, "trial": best["trial"], **{k: r[k] for k in ("robust_acc", "n")}}
            for a, r in sorted(aa_curve.items())
        ]
        for who in ("at", "rift"):
            summary[who].setdefault("test", {})["autoattack_acc"] = summary["autoattack"][who][
                "robust_acc"
            ]
    summary["environment"] = environment_info(
        ray.cluster_resources(), sum(bool(n["Alive"]) for n in ray.nodes())
    )
    store.put_json(layout.SUMMARY, summary, stage_hash=hashes["interpolate"])
    store.put_table(layout.SUMMARY_TABLE, summary_table(summary), stage_hash=hashes["interpolate"])
    store.put_table(
        layout.STRATEGIES_TABLE, summary["strategies"], stage_hash=hashes["interpolate"]
    )
    store.write_stage("interpolate", status="done", seconds=timings["interpolate"])
    tracker.log_interpolation(table, summary)
    return summary


def _run_seeds(
    cfg: SweepConfig,
    prep: Prepared,
    splits_ref: Any,
    at_state: dict[str, torch.Tensor],
    tracker: Tracker,
    run_token: str,
    timings: dict[str, float],
    t_start: float,
    until: str | None = None,
) -> dict[str, Any]:
    """Stages 2-4 once per seed of ``cfg.seeds`` (each in ``seeds/<s>/``), then the aggregate
    (with ``until``: each seed up to that stage, and no aggregate)."""
    import ray

    from rift_ray.aggregate import seeds_summary
    from rift_ray.report import seeds_table

    assert cfg.seeds is not None
    store = prep.store
    per_seed, keys = [], []
    for i, seed in enumerate(cfg.seeds, 1):
        cfg_s, store_s, hashes_s = cfg.for_seed(seed), store.for_seed(seed), stage_hashes(cfg, seed)
        log(f"seed {seed} ({i}/{len(cfg.seeds)}): stages 2-4 in {store_s.uri}")
        try:
            s = run_rift_stages(
                cfg_s,
                store_s,
                prep,
                splits_ref,
                at_state,
                hashes_s,
                tracker.for_seed(cfg_s, store_s),
                run_token,
                {},
                time.time(),
                until,
            )
        except SweepError as e:  # the seeds before are kept; a re-run resumes from this one
            raise SweepError(f"seed {seed}: {e}") from e
        per_seed.append(s)
        keys.append(hashes_s["interpolate"])
    if until in ("mrc", "finetune"):
        return {"stopped_after": until}
    key = _hash(["seeds", keys])  # the aggregate is as fresh as every seed's last stage
    if all(s.get("reused") for s in per_seed) and store.valid(layout.SUMMARY, key):
        log(f"seeds: all {len(per_seed)} done earlier, reusing summary.json")
        summary = store.get_json(layout.SUMMARY)
        summary["reused"] = True
        return summary
    seconds = {
        "adv_train": timings["adv_train"],
        **{f"seed {s['seed']}": (s.get("seconds") or {}).get("total", 0.0) for s in per_seed},
        "total": time.time() - t_start,
    }
    base = {
        "name": cfg.name,
        "seed": cfg.seed,
        "seeds": list(cfg.seeds),
        "config_hash": cfg.config_hash(),
    }
    summary = seeds_summary(
        base, [{k: v for k, v in s.items() if k != "reused"} for s in per_seed], seconds
    )
    summary["versions"] = {
        "rift_ray": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    summary["environment"] = environment_info(
        ray.cluster_resources(), sum(bool(n["Alive"]) for n in ray.nodes())
    )
    store.put_json(layout.SUMMARY, summary, stage_hash=key)
    store.put_table(layout.SUMMARY_TABLE, summary_table(summary), stage_hash=key)
    store.put_table(layout.SEEDS_TABLE, seeds_table(summary), stage_hash=key)
    tracker.log_seeds(summary)
    return summary


def build_summary(
    cfg: SweepConfig,
    mrc_rows: list[dict[str, Any]],
    ft_rows: list[dict[str, Any]],
    table: list[dict[str, Any]],
    choice: dict[str, Any],
    winner: dict[str, Any],
    timings: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    best = choice["best"]

    def metrics(alpha: float, split: str) -> dict[str, Any]:
        row = next(
            (
                r
                for r in table
                if r["trial"] == best["trial"] and r["alpha"] == alpha and r["split"] == split
            ),
            None,
        )
        if row is None:
            return {}
        return {
            k: row.get(k)
            for k in ("clean_acc", "robust_acc", "corruption_acc")
            if row.get(k) is not None
        }

    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "config_hash": cfg.config_hash(),
        "modules": winner["modules"],
        "lr": winner["lr"],
        "trial": best["trial"],
        "alpha": best["alpha"],
        "clean_gain_val": best["clean_gain"],
        "robust_drop_val": best["robust_drop"],
        "reason": best["reason"],
        "mrc_ranking": [
            {"module": r["module"], "mrc": r.get("mrc"), "status": r["status"]} for r in mrc_rows
        ],
        "failed_modules": [r["module"] for r in mrc_rows if r["status"] != "done"],
        "finetune_trials": len(ft_rows),
        "failures": [
            {"stage": stage, "name": r[key], "error": r.get("error") or ""}
            for stage, rows, key in (("mrc", mrc_rows, "module"), ("finetune", ft_rows, "trial"))
            for r in rows
            if r["status"] not in ("done", "finished", "stopped")
        ],
        "choices": choice["choices"],
        "at": {s: metrics(0.0, s) for s in ("val", "test")},
        "rift": {s: metrics(best["alpha"], s) for s in ("val", "test")},
        "seconds": {**timings, "total": wall},
        "versions": {
            "rift_ray": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def _failures(rows: list[dict[str, Any]], key: str) -> list[str]:
    """``name (error)`` of every failed MRC module / fine-tuning trial row."""
    return [f"{r[key]} ({r.get('error') or 'no message'})" for r in rows if r["status"] == "failed"]


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


__all__ = ["Prepared", "SweepError", "prepare", "run_rift_stages", "run_sweep", "stage_hashes"]
