"""Confidence intervals that respect how the samples were drawn: bootstrap over source items.

digits-cluttered draws each source digit on several canvases and python-docs cuts each item (a
docstring, a help-topic section) into several passages, so rows of one source are not independent: an interval that resamples rows is too
narrow. Here the unit of resampling is the group (``Split.groups``): a bootstrap replicate draws G
groups with replacement and averages the per-row values of the rows they hold. Several seeds of a
learned method are averaged row by row first (the seeds share the rows), so one replicate resamples
the data once for all seeds. Differences are paired: the per-row difference of two methods on the same
rows is what is resampled, so the shared difficulty of a sample cancels.
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


def bootstrap_mean(values: torch.Tensor, groups: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """Mean of ``values`` ([M], or [S, M] for S seeds on the same rows: averaged over seeds first) with a
    percentile interval from resampling ``groups`` [M] (every replicate draws as many groups as there are).

    The same ``seed`` draws the same replicates, so intervals of different methods on one split are
    computed on the same resamples.
    """
    per_row = values.double().reshape(-1, values.shape[-1]).mean(dim=0)
    index, counts = group_weights(groups, n_boot, seed)
    g = counts.shape[1]
    sums = torch.zeros(g, dtype=torch.float64).scatter_add_(0, index, per_row)
    sizes = torch.zeros(g, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(per_row))
    reps = (counts @ sums) / (counts @ sizes).clamp_min(1.0)  # [n_boot]
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(reps, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(float(per_row.mean()), lo, hi)


def bootstrap_difference(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                         level: float = LEVEL) -> Interval:
    """Paired difference mean(a) - mean(b) with its group-bootstrap interval.

    a: [M] or [S, M] (seeds of one method, averaged row by row); b: [M] or [S', M] on the same rows.
    """
    diff = a.double().reshape(-1, a.shape[-1]).mean(dim=0) - b.double().reshape(-1, b.shape[-1]).mean(dim=0)
    return bootstrap_mean(diff, groups, n_boot, seed, level)
