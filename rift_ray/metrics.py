"""The accuracies a sweep measures, by key, and what counts as a measured number.

The one list of metric keys: interpolation rows, summaries, seeds aggregates, figures and
W&B all take their keys from here.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

ACCURACIES = ("clean_acc", "robust_acc", "corruption_acc")
"""The accuracies (percent) every interpolation row measures; METRICS adds AutoAttack."""
METRICS = {
    "clean_acc": "clean",
    "robust_acc": "PGD",
    "corruption_acc": "corruption",
    "autoattack_acc": "AutoAttack",
}
"""Every accuracy a summary can hold, with the name people see."""


def is_finite(v: Any) -> TypeGuard[float]:
    """A number (int or float, not a bool) that is neither NaN nor infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
