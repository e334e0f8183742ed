"""keep_ratio schedules: the token counts a constant ratio leaves after each site, their FLOPs, and the ratio
that meets a FLOPs target. One implementation for ``prune``'s static plan, ``eval``'s budgets and ``bench``.

Counts compound: site i keeps ``round(ratio * alive)`` of the tokens that site i - 1 left, every protected token
among them and at least one prunable token (``scorer.keep_count``, the rounding ``decide`` applies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone
from policy_prune.core.scorer import keep_count, row_full_flops


@dataclass
class TokenCounts:
    """Per-row token counts at embedding, enough for analytic FLOPs."""

    n0: torch.Tensor
    """[M] alive tokens per row (text rows differ; padding is not work)."""
    protected: torch.Tensor
    """[M] protected tokens per row (never pruned)."""
    n_full: int
    """Embedded sequence length."""

    @classmethod
    def dense(cls, n_tokens: int, n_protected: int) -> TokenCounts:
        """One row of ``n_tokens`` tokens, ``n_protected`` of them protected (an image)."""
        return cls(torch.tensor([n_tokens]), torch.tensor([n_protected]), n_tokens)


def keep_schedule(values: Sequence[float], n_alive: torch.Tensor, n_protected: torch.Tensor | int) -> list[torch.Tensor]:
    """[M] alive counts after each site when site i keeps ratio ``values[i]`` of the prunable alive tokens.

    n_alive: [M] alive tokens before the first site; n_protected: [M] (or one number) never pruned.
    """
    counts, alive = [], n_alive
    for value in values:
        alive = keep_count(value, alive - n_protected, n_protected) + n_protected
        counts.append(alive)
    return counts


def smooth_schedule(values: Sequence[float], n_alive: torch.Tensor, n_protected: torch.Tensor | int) -> list[torch.Tensor]:
    """:func:`keep_schedule` without the rounding: fractional counts, continuous in ``values`` (a plan costed on a
    proxy row, whose rounded counts would move the ratios in steps of one token of that row)."""
    counts, alive = [], n_alive.double()
    for value in values:
        if value < 1.0:
            floor = n_protected + (alive - n_protected).clamp(max=1.0) * (value > 0)
            alive = torch.maximum(value * alive, torch.as_tensor(floor, dtype=torch.float64))
        counts.append(alive)
    return counts


Selection = Callable[[int, int], float]
"""(site index, tokens entering the site) -> FLOPs of choosing the tokens there, per row
(``core.selection``: a learned scorer's features and MLP)."""


def flops_per_row(backbone: TokenBackbone, sites: Sequence[int], counts: Sequence[torch.Tensor], tc: TokenCounts,
                  selection: Selection | None = None) -> torch.Tensor:
    """[M] FLOPs of each row given the alive counts [M] after each site (with ``selection``, what
    choosing the tokens costs at each site too)."""
    kept = [torch.as_tensor(c).double().cpu().expand(len(tc.n0)) for c in counts]
    blocks = ops.schedule_flops(backbone.block_shape, backbone.depth, list(sites), list(kept), tc.n0.double().cpu())
    flops = torch.as_tensor(blocks + backbone.embed_flops(tc.n_full) + backbone.head_flops(), dtype=torch.float64)
    if selection is not None:
        for i, entering in enumerate([tc.n0.cpu(), *kept[:-1]]):
            per_count = {c: float(selection(i, int(c))) for c in entering.unique().tolist()}
            flops = flops + torch.tensor([per_count[c] for c in entering.tolist()], dtype=torch.float64)
    return flops


def flops_ratio(backbone: TokenBackbone, sites: Sequence[int], counts: Sequence[torch.Tensor], tc: TokenCounts,
                selection: Selection | None = None) -> float:
    """Total FLOPs over total unpruned FLOPs of the rows."""
    full = row_full_flops(backbone, tc.n0, tc.n_full).expand(len(tc.n0))
    return float(flops_per_row(backbone, sites, counts, tc, selection).sum() / full.sum())


def ratio_counts(sites: Sequence[int], tc: TokenCounts, ratio: float) -> list[torch.Tensor]:
    """Alive counts [M] after each site under one constant keep ratio."""
    return keep_schedule([ratio] * len(sites), tc.n0, tc.protected)


def lowest_flops_ratio(backbone: TokenBackbone, sites: Sequence[int], tc: TokenCounts,
                       selection: Selection | None = None, idle: Sequence[bool] | None = None) -> float:
    """The smallest FLOPs ratio a keep_ratio schedule reaches on these rows: every prunable token dropped
    at the first site that is not ``idle`` (kept at 1; the blocks before it run on every token;
    ``selection`` counted in)."""
    return schedule_ratio(backbone, sites, [1.0 if i else 0.0 for i in (idle or [False] * len(sites))], tc, selection)


def schedule_ratio(backbone: TokenBackbone, sites: Sequence[int], ratios: Sequence[float], tc: TokenCounts,
                   selection: Selection | None = None, smooth: bool = False) -> float:
    """FLOPs ratio of the keep_ratio schedule ``ratios``; a site at ratio 1 runs no scorer
    (``scorer.keeps_all``), so ``selection`` is not charged there. ``smooth``: unrounded counts
    (:func:`smooth_schedule`)."""
    charged = None if selection is None else (lambda i, n: 0.0 if ratios[i] >= 1.0 else selection(i, n))
    schedule = smooth_schedule if smooth else keep_schedule
    return flops_ratio(backbone, sites, schedule(ratios, tc.n0, tc.protected), tc, charged)


def bisect_at_most(fn: Callable[[float], float], target: float, lo: float, hi: float,
                   iters: int) -> tuple[float, float]:
    """The bracket (lo, hi) narrowed ``iters`` times around where fn (non-decreasing) crosses ``target``, from
    one with fn(lo) <= target < fn(hi), which it keeps: lo is the largest point found at most the target."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fn(mid) > target else (mid, hi)
    return lo, hi


def solve_keep_ratio(fn: Callable[[float], float], target: float, iters: int = 40) -> float:
    """The r in [0, 1] whose FLOPs ratio fn(r) (non-decreasing, a step function) is nearest ``target``."""
    lo, hi = 0.0, 1.0
    if fn(hi) <= target:
        return hi
    if fn(lo) >= target:
        return lo
    for _ in range(iters):  # invariant: fn(lo) < target <= fn(hi)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return lo if abs(fn(lo) - target) <= abs(fn(hi) - target) else hi


def keep_ratio_for(backbone: TokenBackbone, sites: Sequence[int], tc: TokenCounts, target: float) -> float:
    """The constant per-site keep ratio whose schedule runs these rows nearest ``target`` of their FLOPs."""
    return solve_keep_ratio(lambda r: flops_ratio(backbone, sites, ratio_counts(sites, tc, r), tc), target)


def keep_ratios_for(backbone: TokenBackbone, sites: Sequence[int], tc: TokenCounts, target: float,
                    profile: Sequence[float], selection: Selection | None = None,
                    idle: Sequence[bool] | None = None, smooth: bool = False) -> list[float]:
    """Per-site keep ratios shaped like ``profile`` whose schedule runs these rows nearest ``target`` of
    their FLOPs (``selection`` counted in).

    The profile is moved monotonically from keep-nothing to keep-all: for s in [0, 0.5] the ratios are
    the profile scaled by 2s; for s in [0.5, 1] each is raised towards 1 (a budget-conditioned scorer's
    calibrated allocation, stretched to meet any target). ``idle`` sites keep ratio 1 throughout, and so does a
    site whose ratio would keep every token of the longest row of ``tc`` (it would drop none on a row that
    long or shorter, and its scorer would run for nothing: on minilm-text a plan kept 0.9986 at a site).
    ``smooth``: ``tc`` is a proxy for rows of other lengths (text), costed with unrounded counts, so that the
    ratios move continuously with ``target`` (rounded on a 128-token row they moved in steps of 1/128: a plan
    solved on val could keep 0.496 or 0.504 and nothing between, 0.009 of the FLOPs apart).
    """
    base = [min(max(float(r), 0.0), 1.0) for r in profile]
    pinned = list(idle or [False] * len(base))
    longest = int(tc.n0.max())
    protected = int(tc.protected[int(tc.n0.argmax())])

    def keeps_all(r: float) -> bool:
        return int(keep_count(r, torch.tensor([longest - protected]), protected)) == longest - protected

    def ratios(s: float) -> list[float]:
        u = 2.0 * s
        raw = [1.0 if pin else r * u if u <= 1.0 else r + (1.0 - r) * (u - 1.0) for r, pin in zip(base, pinned, strict=True)]
        return [1.0 if keeps_all(r) else r for r in raw]

    return ratios(solve_keep_ratio(lambda s: schedule_ratio(backbone, sites, ratios(s), tc, selection, smooth), target))
