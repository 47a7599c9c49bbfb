"""Intervals over interleaved rounds, and the three-way verdict they give.

Every comparison in the verdicts is made round by round: round *k* ran every configuration
of one VM count back to back, so a figure of round *k* is paired with the other
configuration's figure of the same round (a shift of the shared machine's load moves both).

* A ratio (``a`` over ``b``): per-round ratios ``a_k / b_k``; the point is their geometric
  mean and the interval a two-sided 95% Student *t* interval on ``ln(a_k / b_k)`` (``n - 1``
  degrees of freedom), mapped back with ``exp``.
* A difference: per-round differences; the mean and a 95% Student *t* interval on it.

A claim is a region (``> bound``, ``< bound``, or ``[lo, hi]``): the verdict is **holds**
when the whole interval lies in it, **does not hold** when the whole interval lies outside,
and **within noise** when the interval straddles the region's edge.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HOLDS = "holds"
FAILS = "does not hold"
NOISE = "within noise"
MISSING = "not measured"
STATES = (HOLDS, FAILS, NOISE, MISSING)
LEVEL = 0.95
METHOD = "95% Student t interval over per-round figures (ratios: on their logarithms)"

# two-sided 95% quantiles t(0.975, df); between listed df the smaller df's (wider) value
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (conservative between
    tabulated values; the normal 1.960 beyond 120)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1 (got {df})")
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


@dataclass(frozen=True)
class Interval:
    """``point`` with a 95% interval ``[lo, hi]`` over ``n`` rounds; ``kind`` ratio or diff."""

    point: float
    lo: float
    hi: float
    n: int
    kind: str

    def text(self, unit: str = "") -> str:
        if self.kind == "ratio":
            return f"×{self.point:.3f} [{self.lo:.3f}, {self.hi:.3f}]"
        return f"{self.point:+,.0f} [{self.lo:+,.0f}, {self.hi:+,.0f}]{unit}"

    def to_json(self) -> dict[str, float | int | str]:
        return {"point": self.point, "lo": self.lo, "hi": self.hi, "n": self.n, "kind": self.kind}


def ratio_interval(num: Sequence[float], den: Sequence[float]) -> Interval | None:
    """Geometric-mean ratio of paired rounds with its interval; None with fewer than 2 pairs
    (or a non-positive figure, which has no ratio)."""
    pairs = [(a, b) for a, b in zip(num, den, strict=True)]
    if len(pairs) < 2 or any(a <= 0 or b <= 0 for a, b in pairs):
        return None
    logs = [math.log(a / b) for a, b in pairs]
    m = statistics.fmean(logs)
    h = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Interval(math.exp(m), math.exp(m - h), math.exp(m + h), len(logs), "ratio")


def diff_interval(xs: Sequence[float]) -> Interval | None:
    """Mean of per-round differences with its interval; None with fewer than 2 rounds."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    h = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(m, m - h, m + h, len(xs), "diff")


def above(iv: Interval | None, bound: float) -> str:
    """The claim "greater than ``bound``"."""
    if iv is None:
        return MISSING
    return HOLDS if iv.lo > bound else FAILS if iv.hi <= bound else NOISE


def below(iv: Interval | None, bound: float) -> str:
    """The claim "less than ``bound``"."""
    if iv is None:
        return MISSING
    return HOLDS if iv.hi < bound else FAILS if iv.lo >= bound else NOISE


def inside(iv: Interval | None, lo: float, hi: float) -> str:
    """The claim "between ``lo`` and ``hi``"."""
    if iv is None:
        return MISSING
    if lo <= iv.lo and iv.hi <= hi:
        return HOLDS
    return FAILS if iv.hi < lo or iv.lo > hi else NOISE


def all_of(states: Iterable[str]) -> str:
    """Several parts of one claim: fails if any part fails, holds if all hold."""
    st = list(states)
    if MISSING in st or not st:
        return MISSING
    if FAILS in st:
        return FAILS
    return HOLDS if all(s == HOLDS for s in st) else NOISE
