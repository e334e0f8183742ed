"""Confidence intervals that respect how the samples were drawn: bootstrap over source units, and seeds.

digits-cluttered draws each source digit on several canvases and python-docs cuts each item (a
docstring, a help-topic section) into several passages, so rows of one source are not independent: an interval that resamples rows is too
narrow. Here the unit of resampling is the group (``Split.groups``: the unit the splits were drawn by, a
source digit or a python-docs module / help topic): a bootstrap replicate draws G groups with
replacement and averages the per-row values of the rows they hold. Differences are paired: both methods
are resampled on the same groups, so the shared difficulty of a sample cancels.

Several seeds of a learned method are a second source of variation (issue #23: a verdict must hold across
seeds, not for the 3 trained seeds taken as fixed). Resampling 3 seeds with replacement cannot reach past
the lowest and highest seed's mean, so its percentile interval covered the true difference only 72-81% of
the time where seeds differ (a simulation with 40 units). With several seeds the interval is instead
mean +- t x sqrt(se_units^2 + se_seeds^2): se_units the standard deviation of the unit bootstrap of the
seeds' row-by-row mean, se_seeds the standard error of the per-seed means (each side's, for a difference of
two multi-seed methods), t at the Welch-Satterthwaite degrees of freedom (S - 1 where the seeds dominate,
many where the units do), as a random-effects interval over seeds would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVEL = 0.95
"""Confidence level of every interval."""


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile bootstrap interval."""

    mean: float
    lo: float
    hi: float

    @property
    def verdict(self) -> str:
        """"better" only where the interval excludes 0 from above, "worse" from below, else "unclear"."""
        return "better" if self.lo > 0 else "worse" if self.hi < 0 else "unclear"

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}


def group_weights(groups: torch.Tensor, n_boot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [M] of each row's group in 0..G-1, counts [n_boot, G]: how often each replicate draws each group)."""
    _, index = torch.unique(groups, return_inverse=True)
    g = int(index.max()) + 1 if len(index) else 0
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, g, (n_boot, g), generator=gen)
    counts = torch.zeros(n_boot, g, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n_boot, g, dtype=torch.float64))
    return index, counts


def replicates(values: torch.Tensor, groups: torch.Tensor, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot] bootstrap means of ``values`` [M] (or [S, M], averaged over the seeds row by row first):
    groups resampled, the same draws for every call with this ``seed``."""
    v = values.double().reshape(-1, values.shape[-1]).mean(dim=0)  # [M]
    index, counts = group_weights(groups, n_boot, seed)
    g = counts.shape[1]
    sums = torch.zeros(g, dtype=torch.float64).scatter_add_(0, index, v)
    sizes = torch.zeros(g, dtype=torch.float64).scatter_add_(0, index, torch.ones(len(v), dtype=torch.float64))
    return (counts @ sums) / (counts @ sizes).clamp_min(1.0)


def n_units(groups: torch.Tensor) -> int:
    """How many distinct groups (units) ``groups`` [M] holds."""
    return int(torch.unique(groups).numel())


def seed_term(values: torch.Tensor) -> tuple[float, int]:
    """(variance of the mean over seeds, its degrees of freedom) of ``values`` [S, M]: the per-seed means'
    sample variance / S with S - 1 degrees of freedom; (0, 0) for one seed."""
    v = values.double().reshape(-1, values.shape[-1])
    if v.shape[0] < 2:
        return 0.0, 0
    return float(v.mean(dim=1).var(unbiased=True)) / v.shape[0], v.shape[0] - 1


def combined(mean: float, unit_reps: torch.Tensor, units: int, seeds: list[tuple[float, int]],
             level: float = LEVEL) -> Interval:
    """mean +- t x sqrt(unit variance + seed variances), t at the Welch-Satterthwaite degrees of freedom.

    The unit part is the bootstrap replicates' variance, with ``units`` - 1 degrees of freedom; each seed
    part (variance, df) is one method's (:func:`seed_term`)."""
    from scipy.stats import t as student_t

    parts = [(float(unit_reps.var(unbiased=True)), max(units - 1, 1))] + [(var, df) for var, df in seeds if df > 0]
    total = sum(var for var, _ in parts)
    if total <= 0.0:
        return Interval(mean, mean, mean)
    df = total**2 / sum(var**2 / df for var, df in parts if var > 0)
    half = float(student_t.ppf(0.5 + level / 2, df)) * total**0.5
    return Interval(mean, mean - half, mean + half)


def seed_aware(mean: float, reps: torch.Tensor, groups: torch.Tensor, seeds: list[tuple[float, int]],
               level: float = LEVEL) -> Interval:
    """:func:`combined` where any of ``seeds`` (:func:`seed_term` of each side) has several seeds, else the
    percentile interval of the unit bootstrap ``reps``."""
    if any(df for _, df in seeds):
        return combined(mean, reps, n_units(groups), seeds, level)
    return interval(mean, reps, level)


def interval(mean: float, reps: torch.Tensor, level: float = LEVEL) -> Interval:
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(reps, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(mean, lo, hi)


def bootstrap_mean(values: torch.Tensor, groups: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """Mean of ``values`` ([M], or [S, M] for S seeds on the same rows): a percentile interval from resampling
    ``groups`` [M] (every replicate draws as many groups as there are) for one seed; for S > 1 the interval
    that adds the seeds' variance (:func:`combined`).

    The same ``seed`` draws the same group replicates, so intervals of different methods on one split
    are computed on the same resamples.
    """
    mean, reps = float(values.double().mean()), replicates(values, groups, n_boot, seed)
    return seed_aware(mean, reps, groups, [seed_term(values)], level)


def bootstrap_difference(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                         level: float = LEVEL) -> Interval:
    """Paired difference mean(a) - mean(b) with its interval.

    a: [M] or [S, M] (seeds of one method); b: [M] or [S', M] on the same rows. The seed-averaged row-by-row
    difference is resampled on the group draws; where either side has several seeds their variance is
    added (:func:`combined`), else the interval is the percentile bootstrap's.
    """
    m = a.shape[-1]
    a2, b2 = a.double().reshape(-1, m), b.double().reshape(-1, m)
    mean = float(a2.mean() - b2.mean())
    reps = replicates(a2.mean(dim=0) - b2.mean(dim=0), groups, n_boot, seed)
    return seed_aware(mean, reps, groups, [seed_term(a2), seed_term(b2)], level)
