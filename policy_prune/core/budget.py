"""The budget input of a scorer: the target FLOPs ratio it is told, and how a target is met.

A budget-conditioned scorer sees the target FLOPs ratio f (one more context column) and was trained on
a range of f, so one scorer serves every budget in that range (DynamicViT users asked for exactly this:
"one model per keep ratio"). Told f, its logits rank and allocate tokens for that budget; a target is
then met by one of the two decision rules:

- ``threshold``: keep tokens whose logit exceeds a threshold. Counts vary per sample (hard inputs keep
  more); the threshold that meets f on average is measured on validation data after training and
  stored with the scorer (``calibration``), so ``prune(model, scorer, flops=f)`` needs no data.
- ``keep_ratio``: a fixed share of the prunable tokens at each site (static shapes). The per-site shares
  come from the calibration (the policy's own allocation at f), scaled so that the analytic FLOPs of a
  full-length input equal f exactly.

Scorers without a budget input (trained at one lambda) meet a FLOPs target with keep_ratio only: one
constant ratio at every site, solved on the analytic FLOPs.

Shapes: B rows, N token slots; counts are per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone


@dataclass(frozen=True)
class CalibrationPoint:
    """How the scorer, told ``flops``, meets it on the calibration data."""

    flops: float
    """The target FLOPs ratio (the scorer's budget input)."""
    threshold: float
    """Logit threshold at which the mean FLOPs ratio over the calibration data equals ``flops``."""
    keep_ratio: list[float]
    """Mean share of the prunable alive tokens kept at each site at that threshold."""


@dataclass
class BudgetInput:
    """A scorer's budget input: the range it was trained on, its default, and the calibration."""

    low: float
    """Smallest target FLOPs ratio drawn in training."""
    high: float
    """Largest target FLOPs ratio drawn in training."""
    default: float
    """Budget used when the caller gives none."""
    calibration: list[CalibrationPoint] = field(default_factory=list)
    """Sorted by ``flops``; empty before calibration (then the threshold is 0)."""

    def check(self, flops: float) -> float:
        """``flops`` as a float; ValueError outside the trained range (with a little rounding slack)."""
        f = float(flops)
        if not (self.low - 1e-6 <= f <= self.high + 1e-6):
            raise ValueError(f"flops={f:g} is outside the budgets this scorer was trained on "
                             f"[{self.low:g}, {self.high:g}]")
        return f

    def threshold(self, flops: float) -> float:
        """Calibrated logit threshold at ``flops`` (linear between calibration points; 0 without any)."""
        f = self.check(flops)
        if not self.calibration:
            return 0.0
        xs = [p.flops for p in self.calibration]
        return float(np.interp(f, xs, [p.threshold for p in self.calibration]))

    def keep_ratios(self, flops: float) -> list[float] | None:
        """Calibrated per-site keep shares at ``flops`` (None without calibration)."""
        f = self.check(flops)
        if not self.calibration:
            return None
        xs = [p.flops for p in self.calibration]
        per_site = np.array([p.keep_ratio for p in self.calibration])  # [K, S]
        return [float(np.interp(f, xs, per_site[:, s])) for s in range(per_site.shape[1])]

    def to_json(self) -> dict[str, Any]:
        return {"input": "flops", "low": self.low, "high": self.high, "default": self.default,
                "calibration": [asdict(p) for p in self.calibration]}

    @staticmethod
    def from_json(data: Any) -> BudgetInput:
        """From :meth:`to_json` output; ValueError (with the reason) on anything malformed."""
        try:
            if data["input"] != "flops":
                raise ValueError(f"unknown budget input {data['input']!r}")
            points = [CalibrationPoint(float(p["flops"]), float(p["threshold"]), [float(r) for r in p["keep_ratio"]])
                      for p in data.get("calibration", [])]
            budget = BudgetInput(float(data["low"]), float(data["high"]), float(data["default"]),
                                 sorted(points, key=lambda p: p.flops))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed budget entry ({exc!r})") from None
        if not 0.0 < budget.low <= budget.default <= budget.high <= 1.0:
            raise ValueError(f"budget range must satisfy 0 < low <= default <= high <= 1, got {data!r}")
        return budget


# ---- analytic FLOPs of keep-ratio schedules ---------------------------------------------------------
def ratio_schedule_counts(ratios: Sequence[float], n_prunable: torch.Tensor | int,
                          n_protected: torch.Tensor | int) -> list[torch.Tensor]:
    """Alive counts after each site when site i keeps round(ratios[i] * prunable alive) tokens.

    The shares compound (site i takes its share of what site i-1 kept) and round exactly as the
    keep_ratio rule does (``scorer.keep_count``). n_prunable, n_protected: [B] or ints.
    """
    prunable = torch.as_tensor(n_prunable)
    counts = []
    for r in ratios:
        prunable = torch.round(float(r) * prunable.double()).long()
        counts.append(prunable + torch.as_tensor(n_protected))
    return counts


Selection = Callable[[int, int], float]
"""(site index, tokens entering the site) -> FLOPs of choosing the tokens there (per row)."""


def schedule_flops_rows(backbone: TokenBackbone, sites: Sequence[int], counts: Sequence[torch.Tensor | int],
                        n0: torch.Tensor | int, n_full: int,
                        selection: Selection | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FLOPs [B], unpruned FLOPs [B]) of rows with ``n0`` [B] tokens and alive ``counts`` [B] after each
    site; with ``selection``, what choosing the tokens costs at each site is counted too."""
    n0_t = torch.as_tensor(n0, dtype=torch.float64).reshape(-1).cpu()
    kept: list[torch.Tensor | int] = [torch.as_tensor(c, dtype=torch.float64).reshape(-1).cpu() for c in counts]
    blocks = ops.schedule_flops(backbone.block_shape, backbone.depth, list(sites), kept, n0_t)
    fixed = backbone.embed_flops(n_full) + backbone.head_flops()
    full = backbone.depth * backbone.block_flops(n0_t) + fixed
    flops = torch.as_tensor(blocks, dtype=torch.float64) + fixed
    if selection is not None:
        entering = [n0_t, *kept[:-1]]
        for i, n in enumerate(torch.as_tensor(e).expand(flops.shape) for e in entering):
            per_count = {c: float(selection(i, int(c))) for c in n.unique().tolist()}
            flops = flops + torch.tensor([per_count[c] for c in n.tolist()], dtype=torch.float64)
    return flops, torch.as_tensor(full, dtype=torch.float64)


def schedule_flops_ratio(backbone: TokenBackbone, sites: Sequence[int], counts: Sequence[torch.Tensor | int],
                         n0: torch.Tensor | int, n_full: int, selection: Selection | None = None) -> float:
    """Total FLOPs over total unpruned FLOPs of rows with ``n0`` [B] tokens and per-site ``counts`` [B]."""
    flops, full = schedule_flops_rows(backbone, sites, counts, n0, n_full, selection)
    return float(flops.sum() / full.sum())


def solve_scale(flops_of: Callable[[float], float], target: float, iters: int = 48) -> float:
    """The s in [0, 1] with flops_of(s) nearest ``target`` (flops_of non-decreasing; a step function)."""
    lo, hi = 0.0, 1.0
    if flops_of(hi) <= target:
        return hi
    if flops_of(lo) >= target:
        return lo
    for _ in range(iters):  # invariant: flops_of(lo) < target <= flops_of(hi)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if flops_of(mid) < target else (lo, mid)
    return lo if abs(flops_of(lo) - target) <= abs(flops_of(hi) - target) else hi


def keep_ratios_for_flops(backbone: TokenBackbone, sites: Sequence[int], target: float, n_tokens: int,
                          n_protected: int, profile: Sequence[float] | None = None,
                          selection: Selection | None = None) -> list[float]:
    """Per-site keep shares whose schedule on a full ``n_tokens`` input runs ``target`` of the FLOPs
    (``selection``: the cost of choosing the tokens, counted in the budget).

    ``profile``: the relative per-site shares to keep (e.g. a calibrated allocation); None = the same
    share at every site. The profile is moved monotonically from keep-nothing to keep-all (shares
    scaled by s; past the profile, each share raised towards 1) until the analytic FLOPs meet the target.
    """
    base = np.asarray(profile if profile is not None else [1.0] * len(sites), dtype=float).clip(0.0, 1.0)

    def ratios(s: float) -> list[float]:
        if profile is None:
            return [s] * len(sites)
        # s in [0, 0.5]: scale the profile from 0 to itself; s in [0.5, 1]: from the profile to all-ones.
        u = 2.0 * s
        shares = base * u if u <= 1.0 else base + (1.0 - base) * (u - 1.0)
        return [float(r) for r in shares]

    def flops_of(s: float) -> float:
        counts = ratio_schedule_counts(ratios(s), n_tokens - n_protected, n_protected)
        return schedule_flops_ratio(backbone, sites, counts, n_tokens, n_tokens, selection)

    return ratios(solve_scale(flops_of, target))
