"""The one stage lifecycle, and the context every stage runs in.

A stage (:class:`Stage`: one per file of ``stages/``) says only what is its own: how to
load its stored result, how to compute and store it, and what to send to W&B.
:func:`run_stage` does the rest, the same for every stage::

    record done for this hash, artifacts verify  ->  "done earlier", stage.load
    otherwise  ->  record running -> stage.compute (logs, computes, stores its artifacts)
               ->  record done (seconds, and the fields compute returns) -> stage.track
    StageFailed  ->  record failed (its fields), SweepError with its one-line message

The sweep's fixed inputs travel in one :class:`SweepContext`; what stages hand on to the
stages after them (the AT weights, the MRC rows, the surviving trials ...) in one
:class:`SweepState`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from rift_ray.checkpoint import load_checkpoint, save_checkpoint
from rift_ray.config import SweepConfig
from rift_ray.data import DatasetSplits
from rift_ray.errors import StageFailed, SweepError
from rift_ray.hashing import config_hash, stage_hashes
from rift_ray.progress import log
from rift_ray.stages.common import ModelSpec
from rift_ray.store import STAGES, Store

if TYPE_CHECKING:
    from rift_ray.tracking import Tracker


@dataclass(frozen=True)
class SweepContext:
    """What every stage of one sweep (or of one seed of a ``seeds`` sweep) is given.

    ``splits_ref``: ``ray.put(splits)``, what Ray tasks and trials take; ``spec``: what
    building the model needs of the data (``ModelSpec.of(splits)``); ``modules``: the MRC
    candidates in forward order; ``start_state``: the given robust checkpoint's weights
    (``adv_train.checkpoint``), else None; ``run_token``: this run's id (trials that report
    it were computed now, not restored); ``data_seed``: the sweep's own seed, which made
    the data split and the AT model (``cfg.seed`` is the seed of the RiFT stages);
    ``retry_failed``: ``--retry-failed`` (:meth:`Stage.retry`); ``config_key``: the sweep's
    config.yaml as :func:`rift_ray.history.config_key` names it (stage records keep it).
    """

    cfg: SweepConfig
    store: Store
    splits: DatasetSplits
    splits_ref: Any
    spec: ModelSpec
    hashes: dict[str, str]
    modules: list[str]
    tracker: Tracker
    run_token: str
    data_seed: int
    start_state: dict[str, torch.Tensor] | None = None
    retry_failed: bool = False
    config_key: str = ""

    def for_seed(self, seed: int) -> SweepContext:
        """The context of the RiFT stages of one seed of ``cfg.seeds`` (``seeds/<seed>/``)."""
        cfg, store = self.cfg.for_seed(seed), self.store.for_seed(seed)
        return replace(
            self,
            cfg=cfg,
            store=store,
            hashes=stage_hashes(self.cfg, seed),
            tracker=self.tracker.for_seed(cfg, store, stage_hashes(self.cfg, seed)),
        )

    def checkpoint_bytes(self, state: dict[str, torch.Tensor], **extra: Any) -> bytes:
        """``state`` in the one checkpoint format, with this sweep's metadata."""
        buf = io.BytesIO()
        save_checkpoint(
            buf,
            state,
            arch=self.cfg.model.arch,
            num_classes=self.splits.num_classes,
            dataset=self.cfg.data.dataset,
            mean=self.splits.mean,
            std=self.splits.std,
            config_hash=config_hash(self.cfg),
            extra=extra or None,
        )
        return buf.getvalue()

    def load_state(self, rel: str) -> dict[str, torch.Tensor]:
        """The weights of the checkpoint stored at ``rel``."""
        state, _ = load_checkpoint(io.BytesIO(self.store.get(rel)))
        return state


@dataclass
class SweepState:
    """What the stages hand on, filled in stage by stage (stored or computed now)."""

    at_state: dict[str, torch.Tensor] = field(default_factory=dict)
    at_history: list[dict[str, Any]] = field(default_factory=list)
    mrc_rows: list[dict[str, Any]] = field(default_factory=list)
    ft_rows: list[dict[str, Any]] = field(default_factory=list)
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    survivors: list[dict[str, Any]] = field(default_factory=list)
    by_strategy: dict[str, list[list[str]]] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)


class Stage:
    """One stage of the sweep. ``name``: its ``store.STAGES`` entry; ``reuses``: what a re-run
    reuses (for the log line)."""

    name: ClassVar[str]
    reuses: ClassVar[str]

    @property
    def number(self) -> int:
        return STAGES.index(self.name) + 1

    def say(self, msg: str) -> None:
        log(f"stage {self.number}/{len(STAGES)} {self.name}: {msg}")

    def load(self, ctx: SweepContext, st: SweepState) -> None:
        """Fill ``st`` from the stored result (the stage is done for this hash)."""
        raise NotImplementedError

    def compute(self, ctx: SweepContext, st: SweepState) -> dict[str, Any]:
        """Compute, store the artifacts, fill ``st``; return the stage record's fields
        (``seconds`` when the stage times itself). StageFailed when there is no result."""
        raise NotImplementedError

    def track(self, ctx: SweepContext, st: SweepState) -> None:
        """Send the computed result to W&B."""

    def load_failed(self, ctx: SweepContext, st: SweepState) -> bool:
        """Fill ``st`` from what a failed run of this stage stored (its table of failed rows);
        False when it stored nothing to retry from."""
        return False

    def retry(self, ctx: SweepContext, st: SweepState) -> bool | None:
        """``--retry-failed``: rerun the failed rows of the stored result alone and merge them
        into the stored tables and record; return whether the stages after this one must be
        recomputed (their results then move to ``history/``), None when nothing had failed."""
        return None


def failures(rows: list[dict[str, Any]], key: str) -> list[str]:
    """``name (error)`` of every failed row (MRC module, fine-tuning trial)."""
    return [f"{r[key]} ({r.get('error') or 'no message'})" for r in rows if r["status"] == "failed"]


def run_stage(stage: Stage, ctx: SweepContext, st: SweepState) -> None:
    """``stage``'s lifecycle (module docstring); its duration goes to ``st.timings``."""
    t0 = time.time()
    store, h = ctx.store, ctx.hashes[stage.name]
    rec = store.read_stage(stage.name) or {}
    if store.stage_done(stage.name, h):
        stage.say(f"done earlier, reusing {stage.reuses}")
        stage.load(ctx, st)
        if ctx.retry_failed:
            _retry(stage, ctx, st)
    elif (
        ctx.retry_failed
        and rec.get("hash") == h
        and rec.get("status") == "failed"
        and stage.load_failed(ctx, st)
    ):
        _retry(stage, ctx, st)
        if not store.stage_done(stage.name, h):
            error = (store.read_stage(stage.name) or {}).get("error") or "no usable result"
            raise SweepError(f"stage {stage.name} failed again after --retry-failed: {error}")
        stage.load(ctx, st)
    else:
        old = rec.get("hash")
        if old and old != h:  # a changed config: the stored result is kept, not overwritten
            where = store.archive_stage(stage.name, keep=ctx.cfg.keep_history)
            if where:
                stage.say(
                    f"the result of hash {old} {'moved to ' + where if ctx.cfg.keep_history else 'was ' + where}"
                )
        i = STAGES.index(stage.name)
        store.write_stage(stage.name, status="running", hash=h, started=time.time(),
                          after=ctx.hashes.get(STAGES[i - 1]) if i else None,
                          config=ctx.config_key or None)  # fmt: skip
        try:
            record = stage.compute(ctx, st)
        except StageFailed as e:
            store.write_stage(stage.name, status="failed", **e.record)
            raise SweepError(str(e)) from e
        record.setdefault("seconds", time.time() - t0)
        store.write_stage(stage.name, status="done", **record)
        stage.track(ctx, st)
        ctx.tracker.flush()
    st.timings[stage.name] = (store.read_stage(stage.name) or {}).get("seconds", time.time() - t0)


def _retry(stage: Stage, ctx: SweepContext, st: SweepState) -> None:
    """``--retry-failed`` on ``stage``; the later stages of this sweep (or seed) are moved to
    ``history/`` and forgotten by W&B when the retry changed what they were computed from."""
    later = STAGES[STAGES.index(stage.name) + 1 :]
    invalid = stage.retry(ctx, st)
    if not invalid:  # None: nothing had failed (the stage said so), False: later stages stand
        return
    keep = ctx.cfg.keep_history
    moved = [d for s in later if (d := ctx.store.archive_stage(s, keep=keep))]
    ctx.tracker.forget(stages=list(later))
    if moved:
        stage.say(f"the retried rows change what {', '.join(later)} "
                  f"{'were' if len(later) > 1 else 'was'} computed from: "
                  f"recomputing them; {'kept in ' if keep else ''}{', '.join(moved)}")  # fmt: skip
