"""keep_ratio schedules: the token counts a constant ratio leaves after each site, their FLOPs, and the ratio
that meets a FLOPs target. One implementation for ``prune``'s static plan, ``eval``'s budgets and ``bench``.

Counts compound: site i keeps ``round(ratio * prunable)`` of the prunable tokens that site i - 1 left
(``scorer.keep_count``, the rounding ``decide`` applies), and every protected token.
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
        alive = keep_count(value, alive - n_protected) + n_protected
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
                       selection: Selection | None = None) -> float:
    """The smallest FLOPs ratio a keep_ratio schedule reaches on these rows: every prunable token dropped
    at the first site (the blocks before it run on every token; ``selection`` counted in)."""
    return flops_ratio(backbone, sites, keep_schedule([0.0] * len(sites), tc.n0, tc.protected), tc, selection)


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


class LengthPlan:
    """keep_ratio at a FLOPs target for every input length: per-site shares shaped like ``profile`` that
    run each row of n tokens at ``flops`` of *its own* FLOPs (selection included), so a batch of any mix of
    lengths (passages and queries, batch 1 or 64) runs at the target, up to one token's rounding per row
    and the padding of a batch packed to its widest row.

    The profile is moved monotonically from keep-nothing to keep-all: for s in [0, 0.5] the shares are the
    profile scaled by 2s; for s in [0.5, 1] each is raised towards 1 (a budget-conditioned scorer's
    calibrated allocation, stretched to meet any target). s is solved for every length up to the longest
    seen at once (a vectorised bisection, cached). A row too short to reach ``flops`` keeps only its
    protected tokens.
    """

    def __init__(self, backbone: TokenBackbone, sites: Sequence[int], flops: float, profile: Sequence[float],
                 protected: Callable[[torch.Tensor], torch.Tensor], selection: Selection | None = None,
                 max_len: int | None = None) -> None:
        self.backbone, self.sites, self.flops = backbone, list(sites), float(flops)
        self.max_len = max_len
        """The longest input the model takes, if known: the plan then covers every length and looks rows up
        without a data-dependent size (what torch.export and ONNX need)."""
        self.profile = torch.tensor([min(max(float(r), 0.0), 1.0) for r in profile], dtype=torch.float64)
        self.protected, self.selection = protected, selection
        self._table = torch.zeros(0, len(self.sites), dtype=torch.float32)
        self._selection: dict[tuple[int, int], float] = {}

    def table(self, n_max: int) -> torch.Tensor:
        """[n_max + 1, S] float32 shares per site for rows of 0..n_max tokens."""
        if len(self._table) <= n_max:
            self._table = self._solve(torch.arange(max(n_max + 1, 2 * len(self._table))))
        return self._table[: n_max + 1]

    def ratios(self, n: int) -> list[float]:
        """Per-site shares for one row of ``n`` tokens."""
        return [float(r) for r in self.table(n)[n]]

    def rows(self, n0: torch.Tensor) -> torch.Tensor:
        """[B, S] shares of rows of ``n0`` [B] tokens (on ``n0``'s device)."""
        if self.max_len is not None:
            return self.table(self.max_len).to(n0.device)[n0.long().clamp(0, self.max_len)]
        n0 = n0.long()
        return self.table(int(n0.max()) if len(n0) else 0).to(n0.device)[n0]

    def _shares(self, s: torch.Tensor) -> torch.Tensor:
        """[M, S] float32 shares at stretch ``s`` [M]: what decide multiplies counts by, so the costs the
        solver sees are the counts that run."""
        u = (2.0 * s).unsqueeze(1)  # [M, 1]
        return torch.where(u <= 1.0, self.profile * u, self.profile + (1.0 - self.profile) * (u - 1.0)).float()

    def _cost(self, n: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """[M] FLOPs ratio of rows of ``n`` tokens at per-row ``shares`` [M, S]."""
        prot = self.protected(n)
        counts = keep_schedule(list(shares.T), n, prot)
        b = self.backbone
        blocks = ops.schedule_flops(b.block_shape, b.depth, self.sites, list(c.double() for c in counts), n.double())
        embed = torch.tensor([float(b.embed_flops(int(k))) for k in n.tolist()], dtype=torch.float64)
        flops = blocks + embed + b.head_flops()
        if self.selection is not None:
            for i, entering in enumerate([n, *counts[:-1]]):
                flops = flops + torch.tensor([self._select(i, int(c)) for c in entering.tolist()], dtype=torch.float64)
        full = b.depth * b.block_flops(n.double()) + embed + b.head_flops()
        return flops / torch.as_tensor(full).clamp_min(1.0)

    def _select(self, i: int, n: int) -> float:
        if (i, n) not in self._selection:
            assert self.selection is not None
            self._selection[(i, n)] = float(self.selection(i, n))
        return self._selection[(i, n)]

    def _solve(self, n: torch.Tensor, iters: int = 30) -> torch.Tensor:
        lo, hi = torch.zeros(len(n), dtype=torch.float64), torch.ones(len(n), dtype=torch.float64)
        for _ in range(iters):  # invariant where reachable: cost(lo) < flops <= cost(hi)
            mid = 0.5 * (lo + hi)
            below = self._cost(n, self._shares(mid)) < self.flops
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        # Counts are whole tokens: of the two ends, the one whose cost is nearer the target.
        c_lo, c_hi = self._cost(n, self._shares(lo)), self._cost(n, self._shares(hi))
        s = torch.where((c_lo - self.flops).abs() <= (c_hi - self.flops).abs(), lo, hi)
        return self._shares(s)
