"""Budget-conditioned training: a target FLOPs ratio per episode and the multiplier that enforces it.

Each group of rows draws a target f from the preset's range (uniformly, or log-uniformly with
``reward.budget_draw: log``, which trains the tight end more: there the choice of tokens decides the task); the policy sees f in its context
(``core.scorer.context_rows``) and the episode pays ``lambda(f)`` per unit of FLOPs ratio:

    return = task - lambda(f) * FLOPs ratio

``lambda(f)`` is a Lagrange multiplier for the constraint "mean FLOPs ratio at target f is at most f",
kept per knot of a piecewise-linear curve over the range and moved by dual ascent after every
rollout (Lagrangian relaxation of an average-cost constraint, as in constrained policy optimisation).
The policy thus learns, for every f, the lambda-optimal trade-off whose mean cost is f: per-sample
adaptivity stays (hard samples may spend more than f, easy ones less). Where the task alone spends
less than f the multiplier rests at 0 and the policy does what serves the task best; the calibrated
threshold of the exported scorer then spends the rest of the budget (``core.budget``).

An equality constraint (multipliers allowed below 0) was tried first on digits-vit: at targets above
what the task needs (0.5 - 0.9) the multipliers went to -0.8 and paid the policy to keep harmless
background, while the policy still ignored the target (validation FLOPs 0.27 at every target after
150k steps): capacity spent on meeting budgets that do not buy accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policy_prune.errors import UserError

DRAWS = ("uniform", "log")


class BudgetController:
    """Multipliers lambda(f) at ``knots`` evenly spaced targets in [low, high], linear in between."""

    def __init__(self, low: float, high: float, knots: int = 8, init_lam: float = 0.0, lr: float = 0.05,
                 bound: float = 2.0, draw: str = "uniform") -> None:
        """Multipliers start at ``init_lam`` and stay in [0, ``bound``]. ``draw``: how episodes draw their
        target from [low, high], "uniform" or "log" (uniform in log f)."""
        if not 0.0 < low <= high <= 1.0:
            raise UserError(f"budget must be [low, high] FLOPs ratios with 0 < low <= high <= 1, got [{low}, {high}]")
        if draw not in DRAWS:
            raise UserError(f"env.reward.budget_draw must be one of {', '.join(map(repr, DRAWS))}, got {draw!r}")
        self.draw_kind = draw
        self.low, self.high = float(low), float(high)
        self.knots = np.linspace(self.low, self.high, max(int(knots), 1) if high > low else 1)
        self.lam = np.full(len(self.knots), float(init_lam))
        self.lr = float(lr)
        self.bound = float(bound)

    def draw(self, rng: np.random.Generator) -> float:
        """One episode's target FLOPs ratio (one uniform draw from ``rng`` either way)."""
        if self.draw_kind == "log":
            return float(np.clip(np.exp(rng.uniform(np.log(self.low), np.log(self.high))), self.low, self.high))
        return float(rng.uniform(self.low, self.high))

    def weights(self, targets: np.ndarray) -> np.ndarray:
        """[M, K] linear-interpolation weights of each target on the knots (rows sum to 1)."""
        t = np.clip(np.asarray(targets, dtype=float), self.low, self.high)
        if len(self.knots) == 1:
            return np.ones((len(t), 1))
        pos = (t - self.low) / (self.high - self.low) * (len(self.knots) - 1)
        left = np.minimum(np.floor(pos).astype(int), len(self.knots) - 2)
        frac = pos - left
        w = np.zeros((len(t), len(self.knots)))
        rows = np.arange(len(t))
        w[rows, left] = 1.0 - frac
        w[rows, left + 1] += frac
        return w

    def lam_at(self, targets: np.ndarray) -> np.ndarray:
        """[M] multipliers at the [M] targets."""
        return self.weights(targets) @ self.lam

    def update(self, targets: Sequence[float], flops: Sequence[float]) -> np.ndarray:
        """One dual-ascent step from finished episodes: each knot moves by lr * the weighted mean of
        (FLOPs ratio - target) of the episodes near it. Returns that mean error per knot [K]."""
        if len(targets) == 0:
            return np.zeros(len(self.knots))
        w = self.weights(np.asarray(targets))
        err = np.asarray(flops, dtype=float) - np.asarray(targets, dtype=float)
        mass = w.sum(axis=0)
        knot_err = np.where(mass > 0, (w * err[:, None]).sum(axis=0) / np.maximum(mass, 1e-12), 0.0)
        self.lam = np.clip(self.lam + self.lr * knot_err, 0.0, self.bound)
        return knot_err
