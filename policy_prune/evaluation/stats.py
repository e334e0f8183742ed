"""Confidence intervals that respect how the samples were drawn: bootstrap over source items.

digits-cluttered draws each source digit on several canvases and python-docs cuts each item (a
docstring, a help-topic section) into several passages, so rows of one source are not independent: an interval that resamples rows is too
narrow. Here the unit of resampling is the group (``Split.groups``: the unit the splits were drawn by, a
source digit or a python-docs module / help topic): a bootstrap replicate draws G groups with
replacement and averages the per-row values of the rows they hold. Several seeds of a learned method are
a second level (issue #23: a verdict must hold across seeds, not for the 3 trained seeds taken as
fixed): each replicate also draws S seeds with replacement and averages their rows. Differences are
paired: both methods are resampled on the same groups, so the shared difficulty of a sample cancels.
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


def seed_weights(n_seeds: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, S]: each replicate's share of each of S seeds (S draws with replacement; all 1 for S = 1).
    ``seed`` picks the stream (an integer of its own per resampled method)."""
    if n_seeds == 1:
        return torch.ones(n_boot, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the group draws stay shared by every method
    draws = torch.randint(0, n_seeds, (n_boot, n_seeds), generator=gen)
    return torch.zeros(n_boot, n_seeds, dtype=torch.float64).scatter_add_(
        1, draws, torch.full((n_boot, n_seeds), 1.0 / n_seeds, dtype=torch.float64))


def replicates(values: torch.Tensor, groups: torch.Tensor, n_boot: int, seed: int, stream: int = 0) -> torch.Tensor:
    """[n_boot] bootstrap means of ``values`` [M] or [S, M]: groups resampled (the same draws for every
    call with this ``seed``), and S seeds resampled too where there are several (from the seed draws'
    ``stream``: two methods of one paired difference draw their seeds independently)."""
    v = values.double().reshape(-1, values.shape[-1])  # [S, M]
    index, counts = group_weights(groups, n_boot, seed)
    g = counts.shape[1]
    sums = torch.zeros(v.shape[0], g, dtype=torch.float64).scatter_add_(1, index.expand_as(v), v)  # [S, G]
    sizes = torch.zeros(g, dtype=torch.float64).scatter_add_(0, index, torch.ones(v.shape[1], dtype=torch.float64))
    mixed = seed_weights(v.shape[0], n_boot, seed + 104729 * stream) @ sums  # [n_boot, G]: the drawn seeds' sums per group
    return (mixed * counts).sum(dim=1) / (counts @ sizes).clamp_min(1.0)


def interval(mean: float, reps: torch.Tensor, level: float = LEVEL) -> Interval:
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(reps, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(mean, lo, hi)


def bootstrap_mean(values: torch.Tensor, groups: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """Mean of ``values`` ([M], or [S, M] for S seeds on the same rows) with a percentile interval from
    resampling ``groups`` [M] (every replicate draws as many groups as there are) and, for S > 1, the seeds.

    The same ``seed`` draws the same group replicates, so intervals of different methods on one split
    are computed on the same resamples.
    """
    return interval(float(values.double().mean()), replicates(values, groups, n_boot, seed), level)


def bootstrap_difference(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                         level: float = LEVEL) -> Interval:
    """Paired difference mean(a) - mean(b) with its two-level bootstrap interval.

    a: [M] or [S, M] (seeds of one method); b: [M] or [S', M] on the same rows. Both are resampled on the
    same group draws; each one's seeds independently.
    """
    reps = replicates(a, groups, n_boot, seed) - replicates(b, groups, n_boot, seed, stream=1) \
        if b.dim() > 1 and b.shape[0] > 1 else replicates(a - b.double().reshape(-1, b.shape[-1]).mean(dim=0), groups, n_boot, seed)
    return interval(float(a.double().mean() - b.double().mean()), reps, level)
