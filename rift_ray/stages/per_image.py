"""Stage 4's per-image results and what is computed from them (no Ray): the per-image table
rows (``tables/per_image.parquet``), alpha* by ``interpolate.rule``, the paired intervals of
the final model minus the AT model, the noise floor and the confirmation of alpha*
(``docs/evaluation.md``, "Noise"). The statistics themselves: :mod:`rift_ray.rift.confidence`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rift_ray.config import SweepConfig
from rift_ray.rift import select_alpha
from rift_ray.rift.confidence import (
    confirm,
    noise_floor,
    pack,
    paired_interval,
    select_alpha_confident,
    unpack,
)

PER_IMAGE_KEYS = ("clean_correct", "robust_correct", "corruption_correct")
"""Per-image results an evaluated row carries until :func:`run_interpolation` stores them."""


AT_TRIAL = "AT"
"""The per-image table's name of the AT model's rows (alpha 0, stored once)."""


def strip_live(on_rows: Any) -> Any:
    """``on_rows`` (live logging) without the per-image tensors of each row."""
    if on_rows is None:
        return None

    def strip(rows: list[dict[str, Any]]) -> None:
        on_rows([{k: v for k, v in r.items() if k not in PER_IMAGE_KEYS} for r in rows])

    return strip


def confirmation(
    rows: list[dict[str, Any]], best: Mapping[str, Any], tolerance: float
) -> dict[str, Any]:
    """alpha* of the winning trial checked on the held-out ``confirm`` images
    (:func:`rift_ray.rift.confidence.confirm`), with the images' count and the alpha."""
    at = next(r for r in rows if r["trial"] == AT_TRIAL)
    if float(best["alpha"]) == 0.0:
        chosen = at
    else:
        chosen = next(
            r for r in rows if r["trial"] == best["trial"] and r["alpha"] == best["alpha"]
        )
    res = confirm(images_of(at), images_of(chosen), tolerance)
    return {**res, "alpha": best["alpha"], "trial": best["trial"], "n": int(at["n"])}


def alpha_choice(
    trial: str,
    val: list[dict[str, Any]],
    tolerance: float,
    rule: str = "paper",
    images: dict[float, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """alpha* of one trial on its validation rows by ``interpolate.rule`` (alpha 0 without
    any: selecting on test would be dishonest, so the AT model is kept). ``confident`` needs
    ``images``: alpha -> the per-image ``clean`` / ``robust`` bool arrays of its val row."""
    if not val:
        return {"trial": trial, "alpha": 0.0, "clean_gain": 0.0, "robust_drop": 0.0,
                "feasible": True, "reason": "no validation split: alpha* = 0 (AT model)"}  # fmt: skip
    if rule == "confident":
        points = [{**r, **(images or {})[float(r["alpha"])]} for r in val]
        c = select_alpha_confident(points, tolerance)
    else:
        c = select_alpha(val, tolerance=tolerance)
    return {"trial": trial, "alpha": c.alpha, "clean_gain": c.clean_gain,
            "robust_drop": c.robust_drop, "feasible": c.feasible, "reason": c.reason}  # fmt: skip


def split_per_image(
    rows: list[dict[str, Any]], trial: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows without their per-image results, the per-image table rows: ``trial``,
    ``alpha``, ``split``, ``n`` and the packed results: ``clean_bits``, ``robust_bits``
    (:func:`rift_ray.rift.confidence.pack`; None where no PGD ran) and ``corruption_correct`` (float32 bytes: each
    image's fraction of corruption cells correct; test only))."""
    plain, images = [], []
    for row in rows:
        per = {k: row.get(k) for k in PER_IMAGE_KEYS}
        plain.append({k: v for k, v in row.items() if k not in PER_IMAGE_KEYS})
        if per["clean_correct"] is None:
            continue
        cc = per["corruption_correct"]
        images.append({
            "trial": trial, "alpha": row["alpha"], "split": row["split"], "n": row["n"],
            "clean_bits": pack(per["clean_correct"]),
            "robust_bits": None if per["robust_correct"] is None else pack(per["robust_correct"]),
            "corruption_correct": None if cc is None else cc.numpy().astype("float32").tobytes(),
        })  # fmt: skip
    return plain, images


def images_of(row: dict[str, Any]) -> dict[str, Any]:
    """One per-image table row unpacked: ``clean``, ``robust`` (bool arrays; ``robust`` None
    where only clean accuracy was measured) and ``corruption`` (float array or None)."""
    n = int(row["n"])
    cc, rb = row.get("corruption_correct"), row.get("robust_bits")
    return {
        "clean": unpack(row["clean_bits"], n),
        "robust": None if rb is None else unpack(rb, n),
        "corruption": None if cc is None else np.frombuffer(cc, dtype=np.float32),
    }


def paired_changes(
    per_image: list[dict[str, Any]], trial: str, alpha: float
) -> dict[str, dict[str, Any]]:
    """The final model minus the AT model on the same images, per split (val, test) and
    figure (clean, PGD, corruption): paired 95% intervals
    (:func:`rift_ray.rift.confidence.paired_interval`), in points."""
    at = {r["split"]: images_of(r) for r in per_image if r["trial"] == AT_TRIAL}
    mine = at if alpha == 0.0 else {
        r["split"]: images_of(r) for r in per_image if r["trial"] == trial and r["alpha"] == alpha
    }  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for split in ("val", "test"):
        if split not in at or split not in mine:
            continue
        out[split] = {}
        for key, field in (("clean_acc", "clean"), ("robust_acc", "robust"),
                           ("corruption_acc", "corruption")):  # fmt: skip
            a, b = at[split][field], mine[split][field]
            if a is None or b is None:
                continue
            iv = paired_interval(a, b)
            out[split][key] = {"diff": iv.diff, "lo": iv.lo, "hi": iv.hi, "n": iv.n}
            out["method"] = iv.method  # type: ignore[assignment]
    return out


def noise_fields(
    cfg: SweepConfig, choice: dict[str, Any], best: Mapping[str, Any]
) -> dict[str, Any]:
    """What the summary says about the noise of the choice: the rule, the paired intervals of
    RiFT minus AT, the validation noise floor next to the tolerance, and the confirmation."""
    per_image = choice["per_image"]
    n_val = next((int(r["n"]) for r in per_image if r["split"] == "val"), 0)
    out: dict[str, Any] = {
        "rule": cfg.interpolate.rule,
        "paired": paired_changes(per_image, best["trial"], float(best["alpha"])),
        "noise_floor": {
            "val_n": n_val,
            "robust_drop": noise_floor(n_val) if n_val else None,
            "tolerance": cfg.interpolate.tolerance,
        },
    }
    if "confirmation" in choice:
        out["confirmation"] = choice["confirmation"]
    return out
