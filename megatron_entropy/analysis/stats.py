"""Seed statistics for the reduced study: mean with a 95 % t-interval, Welch's t-test.

A handful of seeds per variant is all the CPU budget allows, so intervals use Student's t with
n - 1 degrees of freedom (not the normal 1.96), and differences are tested with Welch's t-test
(unequal variances). Non-finite values (a diverged run's perplexity) are left out and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # 95 % t-interval: mean +- half_width (nan with fewer than 2 values)
    n: int  # finite values used
    n_dropped: int = 0  # non-finite values left out

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        text = format(self.mean * scale, spec) + suffix
        if math.isfinite(self.half_width):
            text += f" ± {format(self.half_width * scale, spec)}{suffix}"
        return text + (f" ({self.n_dropped} non-finite)" if self.n_dropped else "")


def mean_interval(values, confidence: float = 0.95) -> Interval:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    dropped = len(list(values)) - len(finite)
    n = len(finite)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0, dropped)
    mean = sum(finite) / n
    if n < 2:
        return Interval(mean, float("nan"), 1, dropped)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))
    return Interval(mean, t * sd / math.sqrt(n), n, dropped)


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean(a) - mean(b)
    half_width: float  # 95 % Welch interval of the difference
    p_value: float  # two-sided Welch t-test (nan when it cannot be computed)

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < 0.05

    def format(self, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
        if not math.isfinite(self.difference):
            return "n/a"
        text = f"{format(self.difference * scale, '+' + spec)}{suffix}"
        if math.isfinite(self.half_width):
            text += f" ± {format(self.half_width * scale, spec)}{suffix}"
        p = f"p = {self.p_value:.2g}" if math.isfinite(self.p_value) else "p n/a"
        return f"{text} ({p}{', significant' if self.significant else ''})"


def welch(a, b, confidence: float = 0.95) -> Comparison:
    """mean(a) - mean(b) with its Welch interval and two-sided p-value (finite values only)."""
    a = [float(v) for v in a if v is not None and math.isfinite(float(v))]
    b = [float(v) for v in b if v is not None and math.isfinite(float(v))]
    if not a or not b:
        return Comparison(float("nan"), float("nan"), float("nan"))
    difference = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(difference, float("nan"), float("nan"))
    var_a, var_b = _variance(a) / len(a), _variance(b) / len(b)
    se = math.sqrt(var_a + var_b)
    if se == 0:  # identical constant samples: no spread to test against
        return Comparison(difference, 0.0, 0.0 if difference != 0 else 1.0)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    t_crit = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df))
    p = float(_scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Comparison(difference, t_crit * se, p)


def _variance(values) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)
