"""Runs the four RiFT stages in order, skipping finished ones and resuming interrupted ones.

    checks.preflight(cfg)      every check that needs no compute (data, checkpoint, modules ...)
    init_ray(...)              join or start Ray; every stage's bundle fits a node
    for stage in STAGES:       stages.base.run_stage: reuse, or compute and store
        run_stage(stage, ctx, state)

A stage is skipped when its record in storage says done for the same stage hash
(:mod:`rift_ray.hashing`: the config sections the stage depends on, chained with the
hashes of the stages before it) and its artifacts verify against the manifest checksums.
With ``seeds`` the RiFT stages (2-4) run once per seed and the summary aggregates them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from rift_ray import store as layout
from rift_ray.checks import preflight
from rift_ray.config import SweepConfig, to_yaml
from rift_ray.console import RayOutput
from rift_ray.errors import SweepError, one_line
from rift_ray.hashing import config_hash, seeds_hash, stage_hashes
from rift_ray.history import config_key
from rift_ray.lease import SweepLease
from rift_ray.progress import log
from rift_ray.store import Store

if TYPE_CHECKING:
    from rift_ray.stages.base import SweepContext, SweepState


def init_ray(
    cfg: SweepConfig, address: str | None, *, n_modules: int = 1, adv_train: bool = True
) -> Any:
    """Join or start Ray (``rift_ray.cluster.resolve_address``), say which cluster, and check
    before any compute that every stage's bundle fits a node and that the storage is one
    every node reaches (ConfigError, one line, otherwise). Returns the cluster's shape."""
    from rift_ray import cluster as cl

    shape = cl.connect(cfg, address)
    log(("started " if shape.private else "joined ") + shape.describe())
    if adv_train:
        from rift_ray.stages.at import warm_up

        warm_up()  # the trainer's polling interval is set where it starts (run_adv_train)
    cl.check_fits(shape, cl.stage_bundles(cfg, n_modules, adv_train=adv_train))
    cl.check_storage(cfg, shape)
    return shape


def run_sweep(
    cfg: SweepConfig,
    *,
    address: str | None = None,
    restart: str | None = None,
    until: str | None = None,
    verbose: bool = False,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the whole sweep; return the summary that is also written to summary.json.

    ``until``: stop once this stage (one of ``store.STAGES``) is done; the summary is then
    ``{"stopped_after": stage, "storage": ...}`` and a later run without it goes on.
    ``verbose``: Ray's own output on the console too (it always goes to ``logs/ray.log``).
    ``restart``: a stage (recompute it and those after it) or ``"all"``; what is replaced
    moves to ``history/`` (:func:`restart_stages`). ``retry_failed``: rerun the failed MRC
    modules and fine-tuning trials of stored stages alone (``Stage.retry``).

    A task or worker that Ray gave a GPU torch cannot use stops the sweep with that one line
    (SweepError); the stage it was in is recorded as failed, finished stages are kept."""
    from rift_ray.stages.common import GPUUnavailableError

    try:
        return _run_sweep(cfg, address=address, restart=restart, until=until, verbose=verbose,
                          retry_failed=retry_failed)  # fmt: skip
    except GPUUnavailableError as e:
        msg = one_line(e)
        top = Store.open(cfg.storage, cfg.name)
        for store in [top, *(top.for_seed(s) for s in top.seed_dirs())]:
            for stage in layout.STAGES:
                if (store.read_stage(stage) or {}).get("status") == "running":
                    store.write_stage(stage, status="failed", error=msg)
        raise SweepError(msg) from None


def _run_sweep(
    cfg: SweepConfig, *, address: str | None, restart: str | None, until: str | None,
    verbose: bool, retry_failed: bool = False,
) -> dict[str, Any]:  # fmt: skip
    import ray

    from rift_ray.stages.at import AdvTrainStage
    from rift_ray.stages.base import SweepContext, SweepState, run_stage
    from rift_ray.stages.common import ModelSpec
    from rift_ray.tracking import Tracker

    if until is not None and until not in layout.STAGES:
        raise SweepError(f"until: must be one of {', '.join(layout.STAGES)} (got {until!r})")
    if restart is not None and restart != "all" and restart not in layout.STAGES:
        raise SweepError(
            f"restart: must be one of {', '.join(layout.STAGES)} or all (got {restart!r})"
        )
    prep = preflight(cfg)
    store, hashes = prep.store, stage_hashes(cfg)
    at_needed = not cfg.adv_train.checkpoint and not store.stage_done(
        "adv_train", hashes["adv_train"]
    )
    announce_changes(cfg, store)
    with SweepLease(store), RayOutput(store, verbose=verbose) as out:
        init_ray(
            cfg, address, n_modules=len(prep.modules),
            adv_train=at_needed or restart in ("all", "adv_train"),
        )  # fmt: skip
        out.attach_workers()
        if restart:
            restart_stages(store, restart, keep=cfg.keep_history)
        text = to_yaml(cfg)
        keep_config(store, text, keep=cfg.keep_history)
        store.put_text(layout.CONFIG, text)
        write_estimate(store, cost_estimate(cfg, prep))
        ctx = SweepContext(
            cfg=cfg,
            store=store,
            splits=prep.splits,
            splits_ref=ray.put(prep.splits),
            spec=ModelSpec.of(prep.splits),
            hashes=hashes,
            modules=prep.modules,
            tracker=Tracker(cfg, store, hashes),
            run_token=uuid.uuid4().hex[:8],
            data_seed=cfg.seed,
            start_state=prep.start_state,
            retry_failed=retry_failed,
            config_key=config_key(text),
        )
        st = SweepState()
        try:
            run_stage(AdvTrainStage(), ctx, st)
            if until == "adv_train":
                return _stopped(store, until)
            if cfg.seeds is None:
                summary = run_rift_stages(ctx, st, until)
            else:
                summary = _run_seeds(ctx, st, until)
        except SweepError as e:
            raise SweepError(f"{e} (Ray's log: {out.shown_path})") from e
        finally:
            ctx.tracker.finish()
    if summary.get("stopped_after"):
        return _stopped(store, summary["stopped_after"])
    if not summary.get("reused"):
        log(f"report: rift-ray report {store.uri}")
    return summary


def cost_estimate(cfg: SweepConfig, prep: Any) -> dict[str, Any]:
    """What ``--dry-run`` counts for this sweep (:func:`rift_ray.cost.estimate_record`)."""
    from rift_ray.cost import Sizes, config_gpus, estimate_record, meta_model_flops

    s = prep.splits
    shape = tuple(int(d) for d in s.train.images.shape[1:])
    mf = meta_model_flops(cfg, s.num_classes, shape, prep.modules)  # type: ignore[arg-type]
    sizes = Sizes(len(s.train), len(s.val), len(s.test))
    return estimate_record(cfg, sizes, mf, config_gpus(cfg), len(prep.modules))


def write_estimate(store: Store, estimate: dict[str, Any]) -> None:
    """``estimate.json``, rewritten only when it changes (a resumed sweep touches nothing)."""
    text = json.dumps(estimate, indent=1, sort_keys=True)
    if not store.exists(layout.ESTIMATE) or store.read_bytes(layout.ESTIMATE).decode() != text:
        store.put_text(layout.ESTIMATE, text)


def keep_config(store: Store, text: str, *, keep: bool) -> None:
    """Before a changed config replaces ``config.yaml``: the old one goes to
    ``history/config-<key>.yaml``, where ``rift-ray report --history`` finds the config a
    replaced stage ran with (its record's ``config``)."""
    if not keep or not store.exists(layout.CONFIG):
        return
    old = store.read_bytes(layout.CONFIG).decode()
    if old != text:
        store.write_file(f"{layout.HISTORY_DIR}/config-{config_key(old)}.yaml", old.encode())


def announce_changes(cfg: SweepConfig, store: Store) -> list[str]:
    """Before computing: each stored stage this config will recompute, and the config fields
    whose change altered its hash (compared with the sweep's stored config.yaml); what
    happens to the stored result. Returns the lines printed."""
    import yaml

    from rift_ray.hashing import changed_fields, stage_reasons

    if not store.exists(layout.CONFIG):
        return []
    try:
        old = yaml.safe_load(store.read_bytes(layout.CONFIG)) or {}
    except (yaml.YAMLError, OSError):
        return []
    changed = changed_fields(old, cfg.to_dict())
    runs: list[tuple[int | None, Store, dict[str, str]]] = [(None, store, stage_hashes(cfg))]
    runs += [(s, store.for_seed(s), stage_hashes(cfg, s)) for s in cfg.seeds or []]
    fate = "it moves to history/" if cfg.keep_history else "it is deleted (keep_history: false)"
    lines = []
    for seed, st, hs in runs:
        for n, stage in enumerate(layout.STAGES, 1):
            if (seed is None) != (stage == "adv_train" or cfg.seeds is None):
                continue  # a seeds sweep: stage 1 at the top, stages 2-4 per seed
            rec = st.read_stage(stage) or {}
            if not rec.get("hash") or rec["hash"] == hs[stage] or rec.get("status") != "done":
                continue
            why = ", ".join(stage_reasons(changed, stage)) or "the stage before it"
            of = "" if seed is None else f" (seed {seed})"
            lines.append(f"stage {n}/4 {stage}{of}: config changed ({why}): the stored result "
                         f"(hash {rec['hash']}) will be recomputed; {fate}")  # fmt: skip
    for line in lines:
        log(line)
    return lines


def restart_stages(store: Store, restart: str, *, keep: bool = True) -> list[str]:
    """Move the outputs of ``restart`` (a stage, or ``all``) and of every later stage to
    ``history/<stage>-<hash>/`` (per seed too), and forget their W&B runs' steps, so those
    stages are computed again; return the history entries made."""
    if restart != "all" and restart not in layout.STAGES:
        raise SweepError(f"--restart: must be one of {', '.join(layout.STAGES)} or all")
    stages = layout.STAGES[layout.STAGES.index("adv_train" if restart == "all" else restart) :]
    stores = [store, *(store.for_seed(s) for s in store.seed_dirs())]
    moved = [d for st in stores for stage in stages if (d := st.archive_stage(stage, keep=keep))]
    reg = store.read_json_file(layout.WANDB_RUNS)
    if isinstance(reg, dict) and isinstance(reg.get("runs"), dict):
        reg["runs"] = {k: v for k, v in reg["runs"].items() if v.get("stage") not in stages}
        store.write_file(layout.WANDB_RUNS, json.dumps(reg, indent=1, sort_keys=True).encode())
    where = ", ".join(moved) if moved else "nothing was computed yet"
    log(f"--restart {restart}: recomputing {', '.join(stages)}; earlier results kept in "
        f"{store.uri}/{layout.HISTORY_DIR}/ ({where})")  # fmt: skip
    return moved


def run_rift_stages(ctx: SweepContext, st: SweepState, until: str | None = None) -> dict[str, Any]:
    """Stages 2-4 (MRC, fine-tuning, interpolation) on ``st.at_state``; return the summary
    (or ``{"stopped_after": stage}`` with ``until``)."""
    from rift_ray.stages.base import run_stage
    from rift_ray.stages.finetune import FinetuneStage
    from rift_ray.stages.interp import InterpolateStage
    from rift_ray.stages.mrc import MRCStage

    for stage in (MRCStage(), FinetuneStage(), InterpolateStage()):
        run_stage(stage, ctx, st)
        if until == stage.name:
            return {"stopped_after": until}
    return dict(st.summary)


def _run_seeds(ctx: SweepContext, st: SweepState, until: str | None = None) -> dict[str, Any]:
    """Stages 2-4 once per seed of ``cfg.seeds`` (each in ``seeds/<s>/``), then the aggregate
    (with ``until``: each seed up to that stage, and no aggregate)."""
    import ray

    from rift_ray.aggregate import seeds_summary
    from rift_ray.results import environment_info, seeds_table, summary_table, versions
    from rift_ray.stages.base import SweepState

    cfg, store = ctx.cfg, ctx.store
    assert cfg.seeds is not None
    per_seed, keys = [], []
    for i, seed in enumerate(cfg.seeds, 1):
        ctx_s = ctx.for_seed(seed)
        log(f"seed {seed} ({i}/{len(cfg.seeds)}): stages 2-4 in {ctx_s.store.uri}")
        try:
            s = run_rift_stages(ctx_s, SweepState(at_state=st.at_state), until)
        except SweepError as e:  # the seeds before are kept; a re-run resumes from this one
            raise SweepError(f"seed {seed}: {e}") from e
        per_seed.append(s)
        keys.append(ctx_s.hashes["interpolate"])
    if until in ("mrc", "finetune"):
        return {"stopped_after": until}
    key = seeds_hash(keys)  # the aggregate is as fresh as every seed's last stage
    if all(s.get("reused") for s in per_seed) and store.valid(layout.SUMMARY, key):
        log(f"seeds: all {len(per_seed)} done earlier, reusing summary.json")
        summary = store.get_json(layout.SUMMARY)
        summary["reused"] = True
        return summary
    seconds = {
        "adv_train": st.timings["adv_train"],
        **{f"seed {s['seed']}": (s.get("seconds") or {}).get("total", 0.0) for s in per_seed},
        "total": time.time() - st.t_start,
    }
    base = {
        "name": cfg.name,
        "seed": cfg.seed,
        "seeds": list(cfg.seeds),
        "config_hash": config_hash(cfg),
    }
    summary = seeds_summary(
        base, [{k: v for k, v in s.items() if k != "reused"} for s in per_seed], seconds
    )
    summary["versions"] = versions()
    summary["environment"] = environment_info(
        ray.cluster_resources(), sum(bool(n["Alive"]) for n in ray.nodes())
    )
    store.put_json(layout.SUMMARY, summary, stage_hash=key)
    store.put_table(layout.SUMMARY_TABLE, summary_table(summary), stage_hash=key)
    store.put_table(layout.SEEDS_TABLE, seeds_table(summary), stage_hash=key)
    ctx.tracker.log_seeds(summary)
    return summary


def _stopped(store: Store, stage: str) -> dict[str, Any]:
    """What a sweep run with ``until=stage`` returns once that stage is done."""
    n = layout.STAGES.index(stage) + 1
    log(
        f"stopped after stage {n}/4 {stage} (--until {stage}); "
        "the same command without --until goes on from there"
    )
    return {"stopped_after": stage, "storage": store.uri}


__all__ = ["init_ray", "run_rift_stages", "run_sweep"]
