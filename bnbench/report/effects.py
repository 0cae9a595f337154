"""Paired effect sizes with confidence intervals, and the rule that turns one into a verdict.

Runs are paired by seed (same seed, same settings but the arm under test: same initial weights, same data
order). An effect is the mean of the paired differences with a two-sided 95% Student t interval over the pairs;
a one-sample effect (a quantity against a reference value) uses the same interval.

Verdict rule (:func:`decide`): fewer than 2 pairs -> ``inconclusive``; every difference exactly 0 -> ``tie``;
the interval entirely above 0 -> ``holds``; entirely below 0 -> ``opposite``; otherwise (it straddles 0)
``inconclusive``. :func:`decide_equivalent` asks instead whether the interval lies within +-margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["HELD", "VERDICTS", "Effect", "decide", "decide_equivalent", "one_sample", "paired", "t_quantile"]

VERDICTS = ("holds", "opposite", "tie", "inconclusive")
#: verdict -> the ``held`` column (True / False / None) that report pages show as yes / no / inconclusive
HELD = {"holds": True, "opposite": False, "tie": False, "inconclusive": None}
CONFIDENCE = 0.95
#: two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a table to 30, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Effect:
    """Mean difference ``estimate`` with its 95% interval [``low``, ``high``] over ``n`` pairs (NaN when n < 2)."""

    estimate: float
    low: float
    high: float
    n: int
    diffs: tuple[float, ...] = ()

    def scaled(self, f) -> Effect:
        """The effect in another unit, through a monotone increasing ``f`` (e.g. exp of a log ratio)."""
        return Effect(f(self.estimate), f(self.low), f(self.high), self.n, tuple(f(d) for d in self.diffs))


def one_sample(values, reference: float = 0.0) -> Effect:
    """The effect of ``values - reference``; non-finite values are dropped."""
    d = np.asarray(values, dtype=float) - reference
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return Effect(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return Effect(mean, math.nan, math.nan, 1, tuple(d.tolist()))
    half = t_quantile(n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return Effect(mean, mean - half, mean + half, n, tuple(d.tolist()))


def paired(a, b) -> Effect:
    """The effect of ``a - b``, pair by pair (equal lengths; pairs with a non-finite value are dropped)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired effect needs equal-length arms, got {a.shape} and {b.shape}")
    return one_sample(a - b)


def decide(effect: Effect, *, two_sided: bool = False) -> str:
    """The verdict for "the effect is positive" (or, ``two_sided``, "the effect is not zero")."""
    if effect.n < 2 or not math.isfinite(effect.low):
        return "inconclusive"
    if all(d == 0 for d in effect.diffs):
        return "tie"
    if effect.low > 0 or (two_sided and effect.high < 0):
        return "holds"
    if effect.high < 0:
        return "opposite"
    return "inconclusive"


def decide_equivalent(effect: Effect, margin: float) -> str:
    """``holds`` when the interval lies inside (-margin, margin), ``opposite`` when it lies wholly outside it."""
    if effect.n < 2 or not math.isfinite(effect.low):
        return "inconclusive"
    if -margin < effect.low and effect.high < margin:
        return "holds"
    if effect.low >= margin or effect.high <= -margin:
        return "opposite"
    return "inconclusive"
