"""Plain-Python statistics for metric dicts (torch-free, no numpy)."""
from __future__ import annotations

import math
from typing import Iterable


def mean(xs: Iterable[float]) -> float:
    """The arithmetic mean; NaN when there is nothing to average (metrics.jsonl writes null)."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan
