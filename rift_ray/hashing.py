"""What a stored result depends on: the config hash and the chained stage hashes.

One mechanism for both: a hash is a SHA-256 of canonical JSON (:func:`stable_hash`) of the
config dict with the fields of :data:`NEW_DEFAULTS` left out where they hold their default,
so that a field added to the config after sweeps were stored leaves their hashes (and so
their results) valid.

    stage_hashes(cfg)        # {"adv_train": h1, "mrc": h2, "finetune": h3, "interpolate": h4}
    config_hash(cfg)         # the whole config's identity (stored in checkpoints and summaries)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from rift_ray.config import SELECTION_FIELDS, ComputeConfig, SweepConfig


def stable_hash(payload: Any, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``payload`` as sorted-key JSON."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class NewDefault:
    """A config field added after sweeps were stored, and its default. ``config_hash``: the
    config hash leaves it out at its default too (the fields added before the config hash
    was stored anywhere); the others enter it, so the config hash of a stored sweep keeps
    its value."""

    path: tuple[str, ...]
    default: Any
    config_hash: bool = False


NEW_DEFAULTS: tuple[NewDefault, ...] = (
    NewDefault(("compute",), ComputeConfig().model_dump(mode="json"), config_hash=True),
    NewDefault(("mrc", "adv_set_format"), "float32", config_hash=True),
    NewDefault(("adv_train", "checkpoint_normalization"), "dataset"),
    # every sweep before clean_first measured the whole grid, on test too: the new defaults
    # (clean_first, test_curve false) store fewer rows, so they change stage 4's hash
    NewDefault(("interpolate", "search"), "grid"),
    NewDefault(("interpolate", "test_curve"), True),
    NewDefault(("eval", "autoattack", "alphas"), []),
    # what every sweep ran before the field existed; the new default (sync) changes the hash
    NewDefault(("finetune", "asha", "mode"), "async", config_hash=True),
    # the same: every sweep before the field ranked trials by the penalised score
    NewDefault(("finetune", "score"), "penalised", config_hash=True),
    NewDefault(("interpolate", "rule"), "paper"),
    NewDefault(("interpolate", "confirm_size"), 0),
    # unset: off where every sweep before ran it (one worker, CPU); see stage_hashes
    NewDefault(("adv_train", "sync_bn"), None, config_hash=True),
    # 4 for every dataset but Tiny-ImageNet, where the reference's 8 changes the hash
    NewDefault(("data", "crop_padding"), 4, config_hash=True),
    # FGSM-RS's step: enters the adv_train hash only with method fgsm_rs (see stage_hashes)
    NewDefault(("adv_train", "fgsm_step"), 1.25, config_hash=True),
    NewDefault(("adv_train", "free_replays"), 8, config_hash=True),
)
"""Fields added after sweeps were first stored: at the default they are left out of the
stage hashes, so results stored by an earlier version stay valid. A new field that changes
results must be added here (or change the hashes on purpose)."""


def without_new_defaults(d: dict[str, Any], *, config_hash: bool = False) -> dict[str, Any]:
    """A deep copy of the config dict ``d`` without the :data:`NEW_DEFAULTS` fields that hold
    their default (with ``config_hash``: only those the config hash leaves out)."""
    d = json.loads(json.dumps(d))
    for new in NEW_DEFAULTS:
        if config_hash and not new.config_hash:
            continue
        *head, key = new.path
        section = d
        for k in head:
            section = section.get(k) or {}
        if key in section and section[key] == new.default:
            del section[key]
    return d


def config_hash(cfg: SweepConfig) -> str:
    """The identity of what a sweep computes: every field but its name, storage, W&B and
    resources (16 hex digits)."""
    d = without_new_defaults(cfg.to_dict(), config_hash=True)
    for k in ("name", "storage", "shared_storage", "keep_history", "wandb", "resources"):
        d.pop(k, None)
    return stable_hash(d, 16)


STAGE_FIELDS = {
    "adv_train": ("seed", "data", "model", "attack", "adv_train", "eval.val_subset",
                  "eval.restarts", "compute"),
    "mrc": ("mrc", "eval.batch_size", "compute", "seeds"),
    "finetune": ("finetune", "interpolate.tolerance"),
    "interpolate": ("interpolate", "eval"),
}  # fmt: skip
"""The config fields each stage's hash is made of (besides the stages before it)."""

NOT_RESULTS = ("name", "storage", "shared_storage", "keep_history", "wandb", "resources")


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted config fields that differ between two config dicts (those that decide no
    result, such as ``resources`` and ``wandb``, left out)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(without_new_defaults(old)), flat(without_new_defaults(new))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(NOT_RESULTS)]


def stage_reasons(changed: list[str], stage: str) -> list[str]:
    """Of the ``changed`` fields, those that enter ``stage``'s own hash."""
    own = STAGE_FIELDS[stage]
    return [f for f in changed if any(f == p or f.startswith(p + ".") for p in own)]


def stage_hashes(cfg: SweepConfig, seed: int | None = None) -> dict[str, str]:
    """Chained hashes of what each stage's result depends on (never resources or W&B).

    ``seed``: one seed of ``cfg.seeds``; it enters the hashes of stages 2-4 (adversarial
    training keeps the hash of ``cfg.seed``, so every seed starts from the same AT model).
    """
    d = without_new_defaults(cfg.to_dict())
    # adv_train.sync_bn by what it does on these resources: only "on" enters (multi-GPU)
    d["adv_train"].pop("sync_bn", None)
    if cfg.adv_train.uses_sync_bn(cfg.resources.adv_train):
        d["adv_train"]["sync_bn"] = True
    if cfg.adv_train.method != "fgsm_rs":  # the FGSM step changes nothing else
        d["adv_train"].pop("fgsm_step", None)
    if cfg.adv_train.method != "free":  # nor do the free replays
        d["adv_train"].pop("free_replays", None)
    ev = d["eval"]
    compute = [d["compute"]] if "compute" in d else []  # its own list item, when not default
    h1 = stable_hash(
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
    h2 = stable_hash(
        ["mrc", h1, d["mrc"], ev["batch_size"], *compute]
        + ([] if seed is None else ["seed", seed])  # no seeds: the hashes of before
    )
    ft = {k: v for k, v in d["finetune"].items() if k not in SELECTION_FIELDS}
    sel = cfg.finetune.selection_settings()  # {} by default: the hashes of earlier versions
    held = cfg.interpolate.confirm_size  # held out of the ASHA metric's images too
    h3 = stable_hash(
        ["finetune", h2, ft, d["interpolate"]["tolerance"], *([sel] if sel else [])]
        + ([{"confirm_size": held}] if held else [])
    )
    primary = [] if cfg.finetune.primary == "lowest" else [cfg.finetune.primary]
    h4 = stable_hash(["interpolate", h3, d["interpolate"], ev, *primary])
    return {"adv_train": h1, "mrc": h2, "finetune": h3, "interpolate": h4}


def joint_mrc_hash(cfg: SweepConfig, mrc_hash: str) -> str:
    """What the joint-MRC table depends on: the MRC stage (model, adversarial set, ascent) and
    ``finetune.greedy``."""
    return stable_hash(["joint_mrc", mrc_hash, cfg.finetune.greedy.model_dump()])


def seeds_hash(interpolate_hashes: list[str]) -> str:
    """The key of a seeds sweep's aggregate: as fresh as every seed's last stage."""
    return stable_hash(["seeds", interpolate_hashes])
