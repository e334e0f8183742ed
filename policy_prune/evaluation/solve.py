"""Operating points, and how a method reaches a FLOPs target: solved on val, never on the reported split.

A method's :class:`Point` is its rule and per-site (or per-block) values. ``Method.solve(ctx, target)``
returns the point whose total FLOPs ratio (executed + selection, :mod:`policy_prune.evaluation.cost`)
on the val split is at most ``target`` and as close to it as the method's steps allow:

- keep_ratio (baselines, learned-topk, EViT, ToMe at sites): a constant ratio r at every site is
  bisected first (for the last r above the target, not ``core.schedule.solve_keep_ratio``'s nearest r,
  since the descent starts above it); a constant ratio moves in coarse steps (on digits-vit one token at the first site is
  about 0.006 of the FLOPs), so then, site by site from the first, each site drops tokens one at a time
  while the total stays above the target, and finally the finest site that can still move drops one
  more, which crosses it (:func:`descend`). The last step is one token at the last site that still
  prunes (about 0.001 of the FLOPs on digits-vit). Per-site values are ratios of the tokens alive at
  that site, so text rows of other lengths keep proportional counts.
- threshold (the learned scorer's own per-sample allocation): false position on the FLOPs measured by
  running the method over val, stopping within ``tol`` below the target.
- ToMe per block: the same descent over the per-block r of its schedule (:mod:`...tome`).

Executed FLOPs depend on the batching, so solving uses the eval batch size on val.

A point solved on val can spend otherwise on a split of other lengths: text rows keep whole tokens, EViT
adds its fused token and ToMe merges in rounds, so short rows spend a larger share than long ones, and
minilm-text's test holds more (short) queries per passage than its val (0.25 of the unpruned FLOPs
against 0.20). Where a baseline whose point depends only on token counts (``Method.counts_only``) lands
further than ``MATCH`` from its target on the scored split, eval solves it again on that split's counts
(``evaluate.match_scored``): FLOPs alone, no output or label is read, and the best baseline is still
chosen by the val point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from policy_prune.core import calibration
from policy_prune.core.schedule import TokenCounts, bisect_at_most, keep_schedule

TOLERANCE = 0.002
"""How far below its target a solved total may stop (on val)."""
MATCH = 0.01
"""A row whose scored total FLOPs is further than this from its target is flagged off target (*), and a
comparison whose better side spent more than this above the other gets no verdict ("unequal FLOPs"): a
comparison at unequal FLOPs is not one (issue #23)."""
SAME = "same"
"""eval ``--query-target same``: the retrieval queries' budget is each target itself (each part at most the target)."""


@dataclass
class Point:
    """One operating point of a method."""

    rule: str
    """"none", "keep_ratio", "threshold" or "tome-r" (ToMe's merges per block)."""
    values: list[float] = field(default_factory=list)
    """One value per site ("keep_ratio", "threshold") or per block ("tome-r")."""
    target: float | None = None
    """FLOPs target the point was solved for (None: the method's own point or no pruning)."""
    solved: float | None = None
    """Total FLOPs ratio on the split the point was solved on (val, or ``matched``)."""
    budget: float | None = None
    """The FLOPs ratio a budget-conditioned scorer is told (its budget input; a deployed call's ``flops`` argument,
    whose task's plan may be asked for its part of a split, ``asked``); None for other methods."""
    matched: str | None = None
    """The split this point's FLOPs were matched on instead of val (None: solved on val): a baseline whose val
    point lands further than MATCH from its target on the scored split (``evaluate.match_scored``)."""
    replaces: Point | None = None
    """The val point a matched point stands in for (what the best baseline is chosen by)."""
    task: str | None = None
    """The kind of input a deployed call's plan was solved for (``prune(..., task=task)``); None: the mix."""
    split: str | None = None
    """With ``task``: what the deployed call's flops bounds (``prune(..., split=split)``: "total" over queries and
    documents, or "each" kind)."""
    queries: Point | None = None
    """The point retrieval queries are encoded at where they have a budget of their own (eval
    ``--query-target``: this point's target is then the passages'), or where a deployed call splits one total
    between the parts (``split`` "total"); None: the queries run this point."""
    asked: float | None = None
    """A deployed call's part of a split of one total: the FLOPs ratio its task's plan is asked for
    (``BudgetInput.task_flops``)."""

    def label(self) -> str:
        """Short text for tables: the rule and its values (and the budget a scorer is told, and the split
        the FLOPs were matched on where it is not val)."""
        if self.rule == "none":
            return "-"
        vals = self.values
        told = "" if self.budget is None else f" told {self.budget:g}"
        part = "" if self.asked is None else f" at {self.asked:.3g}"
        told += "" if self.task is None else f" ({self.task} plan{part}{', one total' if self.split == 'total' else ''})"
        told += "" if self.matched is None else f" (FLOPs matched on {self.matched})"
        queries = "" if self.queries is None else f"; queries {self.queries.label()}"
        if self.rule == "tome-r":
            return "r " + ",".join(str(int(v)) for v in vals) + told + queries
        if len(set(vals)) == 1:
            return f"{self.rule} {vals[0]:.3g}{told}{queries}"
        return f"{self.rule} " + ",".join(f"{v:.3g}" for v in vals) + told + queries

    @property
    def on_val(self) -> Point:
        """The point as solved on val (itself, unless its FLOPs were matched on the scored split)."""
        return self.replaces or self


@dataclass
class BatchedCounts(TokenCounts):
    """Per-row token counts of a split at embedding (``core.schedule.TokenCounts``) and the eval batch of
    each row: enough to predict any token-count schedule's block, executed and selection FLOPs without
    running the model."""

    batch: torch.Tensor
    """[M] the eval batch of each row (executed FLOPs pad to the batch's longest row)."""


@dataclass
class SolveContext:
    """What a method may use to reach a target: the backbone and the val split (counts and batches)."""

    backbone: Any
    counts: BatchedCounts
    batches: Sequence[tuple[Any, Any]]
    """The val split in eval batches (inputs, labels): for methods whose FLOPs must be measured."""
    kind: str | None = None
    """One kind of input on its own (``TASKS``: retrieval passages "document" or queries "query", with a budget
    of their own under eval's ``--query-target``), not the mix; None: the mix a scorer's plan was calibrated for."""
    queries_from: int | None = None
    """The mix of a retrieval split: the index of the first of ``batches`` that holds queries (those before hold
    passages); None: no queries."""


def ratio_counts(values: Sequence[float], tc: TokenCounts, n_sites: int) -> list[torch.Tensor]:
    """Alive counts [M] after each of ``n_sites`` sites under per-site keep ratios (the last value repeats),
    rounded exactly as ``decide`` rounds (``core.schedule.keep_schedule``)."""
    return keep_schedule([values[min(i, len(values) - 1)] for i in range(n_sites)], tc.n0, tc.protected)


def ratio_step(values: Sequence[float], site: int, prunable_at: Sequence[torch.Tensor]) -> list[float] | None:
    """``values`` with one token fewer kept at ``site`` (in the row with the most prunable tokens there),
    or None when that site keeps none already. prunable_at[i]: [M] prunable tokens entering site i."""
    n = int(prunable_at[site].max()) if len(prunable_at[site]) else 0
    kept = round(values[site] * n)
    if n == 0 or kept <= 0:
        return None
    out = list(values)
    out[site] = (kept - 1) / n
    return out


def descend(values: list[float], step: Callable[[list[float], int], list[float] | None], n_knobs: int,
            cost: Callable[[list[float]], float], target: float) -> list[float] | None:
    """From a schedule whose cost is above ``target``, the schedule just at or below it.

    Knobs are ordered coarsest first (a token dropped at an early site or block saves more than one at a
    later one, as a rule). Each knob steps while the cost stays above the target; then every knob's next
    step would cross it, and the crossing that lands closest below the target is taken. Returns None
    when no knob can step.
    """
    for k in range(n_knobs):
        while (nxt := step(values, k)) is not None and cost(nxt) > target:
            values = nxt
    below = [(cost(nxt), nxt) for k in range(n_knobs) if (nxt := step(values, k)) is not None]
    below = [(c, v) for c, v in below if c <= target]
    return max(below, key=lambda cv: cv[0])[1] if below else None


def solve_ratios(cost: Callable[[list[float]], float], prunable: Callable[[list[float]], list[torch.Tensor]],
                 n_sites: int, target: float, iters: int = 40) -> list[float]:
    """Per-site keep ratios whose cost is at most ``target`` and as close as one token allows.

    cost(values): total FLOPs ratio; prunable(values)[i]: [M] prunable tokens entering site i.
    """
    def const(r: float) -> list[float]:
        return [r] * n_sites

    if cost(const(1.0)) <= target:
        return const(1.0)
    if cost(const(0.0)) > target:
        return const(0.0)  # out of reach: the deepest cut the method has
    lo, hi = bisect_at_most(lambda r: cost(const(r)), target, 0.0, 1.0, iters)
    found = descend(const(hi), lambda v, k: ratio_step(v, k, prunable(v)), n_sites, cost, target)
    # The descent steps one token of the longest row: rows of other lengths (text) move by whole tokens
    # at other ratios, so a constant ratio just below the crossing can land closer (similarity-pre, one
    # site, on minilm-text's val: 0.494 at the target 0.5 by the descent).
    return max((v for v in (found, const(lo)) if v is not None), key=cost)


def solve_threshold(fn: Callable[[float], float], target: float, iters: int = 20, tol: float = TOLERANCE) -> float:
    """The threshold t with fn(t) <= target, as close to it as ``tol`` (fn non-increasing in t); the
    bracketing search of :func:`policy_prune.core.calibration.solve_threshold`."""
    return calibration.solve_threshold(fn, target, iters=iters, tol=tol, at_most=True)