"""How a summary's paired statistics read (no Ray, no I/O): the RiFT - AT intervals, the
validation noise floor next to the tolerance, and the confirmation of alpha*.

    for line in noise_lines(summary):   # summary.json of one seed or sweep
        print(line)

The numbers come from ``summary["paired"]``, ``summary["noise_floor"]`` and
``summary["confirmation"]`` (written by stage 4, ``rift_ray.stages.interp.noise_fields``).
"""

from __future__ import annotations

from typing import Any

LABELS = (("clean_acc", "clean"), ("robust_acc", "PGD"), ("corruption_acc", "corruption"))


def interval_text(iv: dict[str, Any] | None) -> str:
    """``+0.32 [-0.05, +0.70]`` (points) of a ``{diff, lo, hi}`` dict; ``-`` without one."""
    if not iv:
        return "-"
    return f"{iv['diff']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}]"


def paired_line(summary: dict[str, Any], split: str = "test") -> str | None:
    """One line: RiFT minus AT on ``split`` with the paired 95% intervals, or None."""
    paired = (summary.get("paired") or {}).get(split) or {}
    if not paired:
        return None
    n = next(iter(paired.values()))["n"]
    parts = [f"{label} {interval_text(paired.get(k))}" for k, label in LABELS if k in paired]
    method = summary["paired"].get("method", "paired bootstrap")
    return f"RiFT - AT on {split} (points, 95% interval; {method}, n={n:,}): " + ", ".join(parts)


def noise_warning(summary: dict[str, Any]) -> str | None:
    """A warning when ``interpolate.tolerance`` is below the validation noise floor."""
    floor = summary.get("noise_floor") or {}
    value, tol = floor.get("robust_drop"), floor.get("tolerance")
    if value is None or tol is None or tol >= value:
        return None
    rule = summary.get("rule", "paper")
    advice = (
        "the paper rule then picks the alpha whose drop is most under-estimated; "
        "interpolate.rule: confident accounts for it"
        if rule == "paper"
        else "the confident rule accounts for it"
    )
    return (
        f"warning: tolerance {tol:g} is below the validation noise floor {value:.2f} points "
        f"(the smallest robust drop {floor['val_n']:,} validation images can resolve, "
        f"sign test at 95%): {advice}"
    )


def confirmation_line(summary: dict[str, Any]) -> str | None:
    """The held-out confirmation of alpha* (``interpolate.confirm_size``), or None."""
    c = summary.get("confirmation")
    if not c:
        return None
    verdict = "confirmed" if c["confirmed"] else "NOT confirmed"
    return (
        f"alpha* {c['alpha']:g} {verdict} on {c['n']:,} held-out validation images: {c['reason']}"
    )


def noise_lines(summary: dict[str, Any]) -> list[str]:
    """Every line above that applies, in order: the rule, test, val, warning, confirmation."""
    lines = [f"alpha* rule: {summary['rule']}"] if summary.get("rule") else []
    for line in (
        paired_line(summary, "test"),
        paired_line(summary, "val"),
        noise_warning(summary),
        confirmation_line(summary),
    ):
        if line:
            lines.append(line)
    return lines


def seeds_interval_lines(summary: dict[str, Any]) -> list[str]:
    """A seeds summary's RiFT - AT per split: the 95% t interval over the seeds (``ci95``)."""
    lines = []
    for split in ("test", "val"):
        cells = [
            f"{label} [{iv[0]:+.2f}, {iv[1]:+.2f}]"
            for k, label in LABELS
            if (iv := ((summary.get("ci95") or {}).get("delta") or {}).get(split, {}).get(k))
        ]
        if cells:
            lines.append(
                f"RiFT - AT on {split}, 95% t interval over the seeds: " + ", ".join(cells)
            )
    return lines


__all__ = [
    "confirmation_line",
    "interval_text",
    "noise_lines",
    "noise_warning",
    "paired_line",
    "seeds_interval_lines",
]
