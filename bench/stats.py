"""Pure statistics for benchmark samples: percentiles, min/median/max, ratios."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default). Raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    return float(data[lo] + (data[hi] - data[lo]) * frac)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def clean(values: Iterable[float | None]) -> list[float]:
    """Drop missing samples (None, NaN)."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """min / median / max over the samples present, and how many there were."""
    data = clean(values)
    if not data:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(data), "median": median(data), "max": max(data), "n": len(data)}


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def per_unit(amount: float | None, units: float | None, scale: float = 1.0) -> float | None:
    """amount per (units / scale), e.g. CPU seconds per GB with scale=1e9; None if no units."""
    if amount is None or units is None or units <= 0:
        return None
    return amount / (units / scale)
