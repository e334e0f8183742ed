"""Baselines and learned scorers as methods: the same execution, the same FLOPs count, the same solver.

A :class:`Method` runs the backbone at an operating point (:class:`~policy_prune.evaluation.solve.Point`)
and returns the output and the :class:`~policy_prune.evaluation.cost.Work` it did (tokens per block,
selection FLOPs), from which block, executed and selection FLOPs follow. ``solve(ctx, target)`` is how
the method reaches a FLOPs target on val; ``predict`` gives a point's Work without running the model
(token counts are set by the point alone) so that solving is analytic wherever it can be.

Registry (``BASELINES``, string names):
    none            no pruning
    random          seeded random scores
    cls-attention   top-k attention received from CLS (EViT's criterion, Liang et al. 2022, without fusion)
    evit            the same top-k, the dropped tokens fused into one extra token weighted by their CLS
                    attention, as EViT does (``extra_token = sum(non_topk * non_topk_attn)``; on post-norm
                    encoders the weighted mean, see EvitMethod)
    token-norm      top-k hidden-state L2 norm
    similarity      the seed paper's redundancy (mean cosine similarity to the other patches; the
                    most redundant are pruned), layer-wise at the env's sites
    similarity-pre  the same, once before block 0 on the embedded patches ("pre-transformer")
    tome-native     ToMe as its authors run it: r merges in every block between attention and MLP
                    (Bolya et al. 2023; :mod:`policy_prune.evaluation.tome`)
    tome-sites      ToMe's matching and size-weighted merging at the env's sites, down to the counts
                    the keep_ratio rule keeps, in balanced rounds

Selection FLOPs of each scorer are written next to it (``flops``) and checked against
``FlopCounterMode`` in tests/test_cost.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.core.features import position_table
from policy_prune.core.scorer import (
    LearnedScorer,
    Scorer,
    decide,
    idle_sites,
    keep_count,
    make_keep_fn,
)
from policy_prune.core.selection import model_has_cls
from policy_prune.errors import UserError
from policy_prune.evaluation import cost, merge, tome
from policy_prune.evaluation.cost import Work, batch_max, site_work, total_ratio
from policy_prune.evaluation.solve import (
    BatchedCounts,
    Point,
    SolveContext,
    descend,
    ratio_counts,
    solve_ratios,
    solve_threshold,
)

Watch = dict[int, torch.Tensor]
"""Block index -> [B, n_full] grouping of the tokens entering that block, for pictures: the slot holding
each embedded token, -1 once dropped, -2 inside a fused (EViT) token."""


# ---- scorers: scores and their selection FLOPs per row on n slots before block ``layer`` -------------
def has_cls(state: TokenState) -> bool:
    """Slot 0 of every row is the protected, never-moved token 0 (a CLS to read attention from)."""
    return bool(state.protected[:, 0].all()) and bool((state.positions[:, 0] == 0).all())


class RandomScorer:
    """Uniform random scores from a seeded generator (its stream advances call by call)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return torch.rand(state.valid.shape, generator=self.generator).to(state.tokens.device)

    def flops(self, backbone: TokenBackbone, layer: int, n: int, cls: bool) -> int:
        return 0


class ClsAttentionScorer:
    """Attention each token receives from CLS in the block about to run (EViT's inattentive tokens).

    Models without a CLS use the mean attention over all queries.
    """

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return backbone.attention_from_cls(state, layer, query="cls" if has_cls(state) else "mean")

    def flops(self, backbone: TokenBackbone, layer: int, n: int, cls: bool) -> int:
        return cost.cls_row_flops(backbone, layer, n) if cls else cost.mean_query_flops(backbone, n)


class TokenNormScorer:
    """L2 norm of each token's hidden state: large-norm tokens are kept."""

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return state.tokens.norm(dim=-1)

    def flops(self, backbone: TokenBackbone, layer: int, n: int, cls: bool) -> int:
        return 0  # elementwise


def redundancy(x: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each token to the other eligible tokens (the seed paper's score).

    x: [B, N, D]; eligible: [B, N] bool (alive patches: protected tokens are not compared).
    Returns [B, N]; ineligible slots get 0.
    """
    unit = torch.nn.functional.normalize(x.float(), dim=-1) * eligible.unsqueeze(-1)
    sims = unit @ unit.transpose(1, 2)
    n_other = (eligible.sum(dim=1, keepdim=True) - 1).clamp_min(1)
    return (sims.sum(dim=-1) - (unit * unit).sum(dim=-1)) / n_other


def diverse_order(base: torch.Tensor, coords: torch.Tensor, eligible: torch.Tensor, weight: float) -> torch.Tensor:
    """Greedy keep order with a spatial-diversity term, as scores (first pick = highest).

    base: [B, N] keep scores; coords: [B, N, 2] positions in [0, 1]; eligible: [B, N] bool.
    Each pick maximises base + weight * (distance to the nearest earlier pick) / sqrt(2), so the kept
    patches spread over the image instead of collapsing into one region. Ineligible slots get -inf.
    """
    b, n = base.shape
    rows = torch.arange(b, device=base.device)
    nearest = torch.ones_like(base)  # before any pick every token counts as far away
    left = eligible.clone()
    out = torch.full_like(base, float("-inf"))
    for t in range(int(eligible.sum(dim=1).max())):
        pick = (base + weight * nearest).masked_fill(~left, float("-inf")).argmax(dim=1)
        has = left[rows, pick]
        out[rows[has], pick[has]] = float(n - t)
        left[rows, pick] = False
        dist = (coords - coords[rows, pick].unsqueeze(1)).norm(dim=-1) / 2**0.5
        nearest = torch.minimum(nearest, dist)
    return out


class SimilarityScorer:
    """Seed paper: prune the patches most similar on average to the others (score = -redundancy).

    ``diversity`` > 0 adds the spatial-diversity term (:func:`diverse_order`); 0 is pure redundancy.
    """

    def __init__(self, diversity: float = 0.0) -> None:
        self.diversity = diversity

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        eligible = state.valid & ~state.protected
        score = -redundancy(state.tokens, eligible)
        if self.diversity <= 0:
            return score
        yx = position_table(backbone, state.n_full, state.tokens.device)[state.positions]  # [B, N, 2]
        return diverse_order(score, yx, eligible, self.diversity)

    def flops(self, backbone: TokenBackbone, layer: int, n: int, cls: bool) -> int:
        return 2 * n * n * backbone.block_shape.width  # the n x n cosine matrix (diversity is elementwise)


def scorer_flops(scorer: Any, backbone: TokenBackbone, layer: int, n: int, cls: bool, merge: bool = False) -> int:
    """Selection FLOPs per row of ``scorer`` on n slots before block ``layer``; ``merge``: a baseline that merges
    what it drops adds :func:`ops.absorb_flops` (a learned scorer counts its own merge, ``cost.learned_flops``)."""
    if isinstance(scorer, LearnedScorer):
        return cost.learned_flops(backbone, scorer, layer, n, cls)
    return int(scorer.flops(backbone, layer, n, cls)) + (ops.absorb_flops(n, backbone.block_shape.width) if merge else 0)


def per_batch(fn: Callable[[int], float], padded: torch.Tensor) -> torch.Tensor:
    """[M] float64 fn of every row's padded count, computed once per distinct count."""
    values = {v: float(fn(v)) for v in padded.unique().tolist()}
    return torch.tensor([values[v] for v in padded.tolist()], dtype=torch.float64)


# ---- methods -------------------------------------------------------------------------------------------
class Method:
    """A way to reduce tokens, its operating points and how it reaches a FLOPs target.

    Subclasses implement ``forward``; site methods with analytic counts implement ``site_counts`` and
    ``site_flops`` and inherit ``predict`` and the keep_ratio ``solve``.
    """

    name: str = ""
    sites: list[int]
    run: str | None = None
    """The training run a learned method comes from (None for baselines)."""
    sweeps: bool = True
    """False for a method with one operating point only (no pruning)."""
    skips_idle: bool = False
    """True for a method that scores nothing at a site whose rule keeps every token (keep_ratio 1)."""
    own_points: list[Point]
    """Points evaluated besides the FLOPs-matched sweep (the learned scorer's trained threshold)."""
    counts_only: bool = True
    """True where ``solve`` reads the split's token counts alone (keep ratios, ToMe's r: their FLOPs follow from
    the rows' lengths), so a point can be matched to any split's FLOPs without reading its outputs or labels."""
    unsolved: dict[float, str]
    """Target -> why the method has no point there (``solve`` returned None), for the report."""

    def __init__(self, name: str, sites: Sequence[int]) -> None:
        self.name, self.sites, self.own_points, self.unsolved = name, list(sites), [], {}
        self.notes: list[str] = []  # what the report should say about points it did solve

    def own(self, targets: Sequence[float]) -> list[Point]:
        """Points evaluated besides the solved ones (given the targets of this evaluation)."""
        return list(self.own_points)

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        """Output [B, C] or [B, D] and the Work of one batch at ``point``."""
        raise NotImplementedError

    def timed(self, backbone: TokenBackbone, inputs: Any, point: Point) -> Callable[[], Any]:
        """What eval's wall-clock columns time for one batch at ``point``: by default :meth:`forward` (EViT
        and ToMe: their FLOPs bookkeeping is a few Python operations per site)."""
        return functools.partial(self.forward, backbone, inputs, point)

    # -- analytic counts (site methods) --
    def site_counts(self, values: Sequence[float], tc: BatchedCounts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(alive [M] after each site, prunable [M] entering each site) under keep ratios ``values``."""
        counts = ratio_counts(values, tc, len(self.sites))
        return counts, [tc.n0 - tc.protected] + [c - tc.protected for c in counts[:-1]]

    def site_flops(self, backbone: TokenBackbone, layer: int, n: int) -> float:
        """Selection FLOPs per row of choosing at a site on n slots."""
        return 0.0

    def predict(self, backbone: TokenBackbone, tc: BatchedCounts, point: Point) -> Work:
        """The Work of ``point`` on rows with counts ``tc``, without running the model."""
        if point.rule == "none":
            return site_work(backbone.depth, [], tc.n0, [], torch.zeros(len(tc.n0)), tc.batch, tc.n_full)
        if point.rule != "keep_ratio":
            raise ValueError(f"{self.name}: no analytic counts for rule {point.rule!r}")
        counts, _ = self.site_counts(point.values, tc)
        entering = [tc.n0, *counts[:-1]]
        selection = torch.zeros(len(tc.n0), dtype=torch.float64)
        idle = idle_sites(point.rule, point.values, len(self.sites))
        for layer, e, off in zip(self.sites, entering, idle, strict=True):
            if not (off and self.skips_idle):
                selection += per_batch(functools.partial(self.site_flops, backbone, layer), batch_max(e, tc.batch))
        return site_work(backbone.depth, self.sites, tc.n0, counts, selection, tc.batch, tc.n_full)

    def measure(self, ctx: SolveContext, point: Point) -> Work:
        """The Work of ``point`` over the val batches (rules whose counts depend on the data)."""
        with torch.inference_mode():
            return Work.cat([self.forward(ctx.backbone, x, point)[1] for x, _ in ctx.batches])

    def solve(self, ctx: SolveContext, target: float) -> Point | None:
        """The method's point for ``target`` on val (None where it has none); by default :meth:`keep_ratios`."""
        return self.keep_ratios(ctx, target)

    def keep_ratios(self, ctx: SolveContext, target: float) -> Point:
        """Per-site keep ratios reaching ``target`` total FLOPs on val (:func:`solve_ratios`)."""
        def total(values: list[float]) -> float:
            return total_ratio(ctx.backbone, self.predict(ctx.backbone, ctx.counts, Point("keep_ratio", values)))

        values = solve_ratios(total, lambda v: self.site_counts(v, ctx.counts)[1], len(self.sites), target)
        return Point("keep_ratio", values, target, total(values))


def run_sites(backbone: TokenBackbone, inputs: Any, sites: Sequence[int],
              reduce: Callable[[TokenState, int, int], tuple[TokenState, float]],
              watch: Watch | None = None, snapshot: Callable[[TokenState], torch.Tensor] | None = None,
              static: bool = False, merged: bool = False) -> tuple[torch.Tensor, Work]:
    """The whole model with ``reduce(state, site_index, layer) -> (state, selection FLOPs per row)``
    before each site; ``watch`` gets ``snapshot(state)`` (default: which slot holds each token) per site.
    ``static``: a padded text state takes the static path (``TokenBackbone.forward_sites``). ``merged``:
    ``reduce`` averages each dropped token into a kept one (``prune(..., merge=True)``), and ``watch`` gets
    each token's group (:func:`merged_slots`) instead of -1 for the merged ones."""
    n0: list[torch.Tensor] = []
    spent = [0.0]
    groups: list[torch.Tensor] = []

    def step(state: TokenState, i: int, layer: int) -> TokenState:
        if i == 0:
            n0.append(state.alive_counts)
        before = state
        state, flops = reduce(state, i, layer)
        spent[0] += flops
        if watch is not None and merged:
            groups[:] = [merged_slots(groups[0] if groups else tome.initial_slots(before), before, state)]
            watch[layer] = groups[0]
        elif watch is not None:
            watch[layer] = (snapshot or slots_from_state)(state)
        return state

    out, state, counts = backbone.forward_sites(inputs, sites, step, static=static)
    first = n0[0] if n0 else state.alive_counts
    b = len(first)
    return out, site_work(backbone.depth, list(sites), first, counts, torch.full((b,), spent[0], dtype=torch.float64),
                          torch.zeros(b, dtype=torch.long), state.n_full)


def merged_slots(slot_of: torch.Tensor, before: TokenState, after: TokenState) -> torch.Tensor:
    """[B, n_full] the slot of ``after`` each embedded token lives in once ``before`` was pruned with merging
    (``slot_of``: its slot in ``before``, -1 none): a kept token its own, a dropped one the kept slot
    :func:`ops.absorb` averaged it into (its nearest by cosine)."""
    # [B, M]: before's slot of each slot of after (the token kept there keeps its position).
    index = slots_from_state(before).gather(1, after.positions.clamp_min(0)).clamp_min(0)
    to_after = ops.nearest_kept(ops.gather_rows(before.tokens, index), after.valid, before.tokens)  # [B, N]
    b, m = index.shape
    rows = torch.arange(b, device=index.device).unsqueeze(1).expand(b, m)
    to_after[rows[after.valid], index[after.valid]] = torch.arange(m, device=index.device).expand(b, m)[after.valid]
    return torch.where(slot_of >= 0, to_after.gather(1, slot_of.clamp_min(0)), slot_of)


def slots_from_state(state: TokenState) -> torch.Tensor:
    """[B, n_full]: the slot holding each embedded token, -1 where it was dropped (pure pruning)."""
    b, n = state.valid.shape
    out = torch.full((b, state.n_full), -1, dtype=torch.long, device=state.valid.device)
    rows = torch.arange(b, device=out.device).unsqueeze(1).expand(b, n)
    slots = torch.arange(n, device=out.device).expand(b, n)
    out[rows[state.valid], state.positions[state.valid]] = slots[state.valid]
    return out


class NoPruning(Method):
    """The unpruned model (the reference point at FLOPs ratio 1)."""

    sweeps = False

    def __init__(self, sites: Sequence[int] = ()) -> None:
        super().__init__("none", [])

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        return run_sites(backbone, inputs, [], lambda s, i, layer: (s, 0.0))


class ScorerMethod(Method):
    """Prune with a scorer and a decision rule (keep_ratio or threshold) at the sites.

    ``solver``: how a FLOPs target is reached on val. "keep_ratio" (baselines, learned-topk): per-site
    keep ratios, analytic. "threshold" (learned): one logit threshold at every site, the scorer's own
    per-sample allocation, bisected on FLOPs measured by running over val. A budget-conditioned scorer
    is told the target (clamped to the budgets it was trained on: ``Point.budget``) and the rule's value
    is solved on val the same way, since its calibration meets block FLOPs on average, not the total
    (executed + selection) on this split.
    """

    skips_idle = True  # make_keep_fn runs no scorer where the rule keeps every token

    def __init__(self, name: str, scorer: Scorer | LearnedScorer, sites: Sequence[int], solver: str = "keep_ratio",
                 own_points: Sequence[Point] = (), run: str | None = None, merge: bool | None = None) -> None:
        super().__init__(name, sites)
        self.scorer, self.solver, self.own_points, self.run = scorer, solver, list(own_points), run
        # Dropped tokens averaged into their most similar kept one: a learned scorer's own setting by default.
        self.merge = bool(getattr(scorer, "merge", False)) if merge is None else merge
        self.counts_only = solver != "threshold"  # a threshold's FLOPs are measured by running the scorer

    def told(self, target: float) -> float | None:
        """The budget a budget-conditioned scorer is told for ``target`` (None for other scorers)."""
        budget = getattr(self.scorer, "budget", None)
        return None if budget is None else min(max(target, budget.low), budget.high)

    def scorer_at(self, point: Point) -> Any:
        return self.scorer if point.budget is None else self.scorer.at(point.budget)  # type: ignore[union-attr]

    def site_flops(self, backbone: TokenBackbone, layer: int, n: int) -> float:
        return scorer_flops(self.scorer, backbone, layer, n, model_has_cls(backbone), self.merge)

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        scorer = self.scorer_at(point)
        keep_fn = make_keep_fn(backbone, scorer, point.rule, point.values)
        idle = idle_sites(point.rule, point.values, len(self.sites))

        def reduce(state: TokenState, i: int, layer: int) -> tuple[TokenState, float]:  # idle: nothing scored
            flops = 0.0 if idle[i] else scorer_flops(scorer, backbone, layer, state.tokens.shape[1], has_cls(state),
                                                     self.merge)
            return state.prune(keep_fn(state, i, layer), merge=self.merge), flops

        return run_sites(backbone, inputs, self.sites, reduce, watch, merged=self.merge)

    def timed(self, backbone: TokenBackbone, inputs: Any, point: Point) -> Callable[[], Any]:
        """The scorer and rule alone (``forward_pruned``), without eval's bookkeeping, as the deployed row is timed."""
        scorer = self.scorer_at(point)
        return lambda: backbone.forward_pruned(inputs, self.sites, make_keep_fn(backbone, scorer, point.rule, point.values),
                                               self.merge)

    def solve(self, ctx: SolveContext, target: float) -> Point:
        budget = self.told(target)
        if self.solver != "threshold":
            return replace(self.keep_ratios(ctx, target), budget=budget)

        def measured(t: float) -> float:
            return total_ratio(ctx.backbone, self.measure(ctx, Point("threshold", [t] * len(self.sites), budget=budget)))

        t = solve_threshold(measured, target)
        return Point("threshold", [t] * len(self.sites), target, measured(t), budget)

    def own(self, targets: Sequence[float]) -> list[Point]:
        """The scorer's own points: a budget-conditioned scorer at each target in its range as deployed
        (``prune(model, scorer, flops=f)``: its calibrated threshold, -inf at idle sites), else its trained threshold 0."""
        budget = getattr(self.scorer, "budget", None)
        if budget is None or not budget.calibration or not self.own_points:  # uncalibrated: no threshold per f
            return list(self.own_points)
        return [Point("threshold", [-math.inf if idle else budget.threshold(f) for idle in budget.idle(f, len(self.sites))],
                      None, None, f) for f in targets if budget.low - 1e-9 <= f <= budget.high + 1e-9]


# ---- EViT: top-k by CLS attention, the rest fused into one token --------------------------------------
class EvitMethod(Method):
    """EViT's inattentive-token fusion at the sites (Liang et al. 2022).

    At each site the tokens receiving the least CLS attention (in the block about to run) are dropped
    and fused into one extra token: the sum of the dropped tokens weighted by their CLS attention, as
    the authors' ``extra_token = sum(non_topk * non_topk_attn)`` (not a size-weighted mean). The fused
    token is protected afterwards and counted in FLOPs; at a later site it is fused again with the newly
    dropped tokens, weighted by its own attention, as EViT treats an extra token that falls in the
    inattentive set. It takes the slot of the first dropped token (a real patch position).

    The authors' sum has the scale of the attention the dropped tokens received (a fraction of one token's):
    their pre-norm ViTs normalise every block's input, so that scale never reaches attention or the MLP. A
    post-norm encoder (BERT, MiniLM: attention reads the tokens as they are) would take a token of that scale
    into its next block, which the model never saw, so there the weights are divided by their sum (the
    attention-weighted mean, a token of the usual scale; ``sum_fusion`` keeps the authors' sum everywhere). On
    digits-vit (pre-norm) the two give val accuracy within 0.002 at 0.5-0.15 of the FLOPs; on MiniLM the sum
    scored below cls-attention, EViT without the fusion, at every target (val cosine 0.714 / 0.535 / 0.331 at
    0.5 / 0.35 / 0.25 against the mean's 0.762 / 0.605 / 0.442), where the authors report the fusion helping.
    """

    def __init__(self, sites: Sequence[int], name: str = "evit", sum_fusion: bool = False) -> None:
        super().__init__(name, sites)
        self.sum_fusion = sum_fusion

    def fusion_weights(self, backbone: TokenBackbone, layer: int, attn: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """[B, N] weights of the fused token's members at block ``layer``: their CLS attention, divided by its sum
        over the members where the block reads its input without normalising it (post-norm; not with ``sum_fusion``)."""
        parts = None if self.sum_fusion else backbone.cls_query_parts(layer)
        if parts is None or parts[0] is not None:  # pre-norm (or no folded query to tell): the authors' sum
            return attn
        return attn / (attn * members).sum(dim=1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)

    def site_flops(self, backbone: TokenBackbone, layer: int, n: int) -> float:
        attn = ClsAttentionScorer().flops(backbone, layer, n, model_has_cls(backbone))
        return attn + 2 * n * backbone.block_shape.width  # + the fusion's [1, n] x [n, D] product

    def site_counts(self, values: Sequence[float], tc: BatchedCounts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        prunable, fused = tc.n0 - tc.protected, torch.zeros_like(tc.n0)
        counts, entering = [], []
        for i in range(len(self.sites)):
            entering.append(prunable)
            kept = keep_count(values[min(i, len(values) - 1)], prunable, tc.protected + fused)
            fused = fused | (kept < prunable).long()
            prunable = kept
            counts.append(tc.protected + fused + kept)
        return counts, entering

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        carry: dict[str, torch.Tensor] = {}
        query = "cls" if model_has_cls(backbone) else "mean"  # not has_cls(state): the fused token is protected too

        def reduce(state: TokenState, i: int, layer: int) -> tuple[TokenState, float]:
            fused = carry.get("fused", torch.zeros_like(state.valid))
            if watch is not None and "slot_of" not in carry:
                carry["slot_of"] = tome.initial_slots(state)
            flops = self.site_flops(backbone, layer, state.tokens.shape[1])
            attn = backbone.attention_from_cls(state, layer, query=query)
            keep = decide(attn, state, "keep_ratio", point.values[min(i, len(point.values) - 1)])
            dropped = state.valid & ~state.protected & ~keep
            members = dropped | fused
            slot = torch.where(fused.any(dim=1), fused.long().argmax(dim=1), dropped.long().argmax(dim=1))
            has = members.any(dim=1)
            fused = torch.zeros_like(fused)
            fused[torch.arange(len(slot), device=slot.device)[has], slot[has]] = True
            tokens = merge.fuse_into(state.tokens, self.fusion_weights(backbone, layer, attn, members), members, slot)
            state = replace(state, tokens=tokens, protected=state.protected | fused)
            keep = ops.normalize_keep(keep | fused, state.valid, state.protected)
            index, valid = ops.pack_indices(keep)
            if "slot_of" in carry:
                dst = torch.where(members, slot.unsqueeze(1), torch.arange(keep.shape[1], device=keep.device))
                carry["slot_of"] = tome.follow(carry["slot_of"], dst, index, valid)
            carry["fused"] = ops.gather_rows(fused, index) & valid
            return state.prune(keep), flops

        def snapshot(state: TokenState) -> torch.Tensor:
            slot_of = carry["slot_of"]
            in_fused = carry["fused"].gather(1, slot_of.clamp_min(0)) & (slot_of >= 0)
            return torch.where(in_fused, torch.full_like(slot_of, -2), slot_of)

        return run_sites(backbone, inputs, self.sites, reduce, watch, snapshot)


# ---- ToMe at the sites (merge mode: size bookkeeping through the host's own blocks) --------------------
class TomeSites(Method):
    """ToMe's matching at the env's sites, down to the token counts the keep_ratio rule keeps."""

    def __init__(self, sites: Sequence[int], prop_attn: bool = True, name: str = "tome-sites",
                 size_pool: bool = True) -> None:
        super().__init__(name, sites)
        self.prop_attn, self.size_pool = prop_attn, size_pool

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        out, _, counts, _, work = forward_merged(backbone, inputs, self.sites, point.values, self.prop_attn, watch,
                                                 self.size_pool)
        return out, work

    def site_counts(self, values: Sequence[float], tc: BatchedCounts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        prunable = tc.n0 - tc.protected
        counts, entering = [], []
        for i in range(len(self.sites)):
            entering.append(prunable)
            shares, _ = merge.merge_rounds(prunable, keep_count(values[min(i, len(values) - 1)], prunable, tc.protected))
            prunable = prunable - shares.sum(dim=0)
            counts.append(tc.protected + prunable)
        return counts, entering

    def predict(self, backbone: TokenBackbone, tc: BatchedCounts, point: Point) -> Work:
        work = super().predict(backbone, tc, point)
        _, entering = self.site_counts(point.values, tc)
        hd = tome.head_dim(backbone)
        selection = torch.zeros(len(tc.n0), dtype=torch.float64)
        for i, prunable in enumerate(entering):
            shares, rounds = merge.merge_rounds(prunable, keep_count(point.values[min(i, len(point.values) - 1)], prunable,
                                                                             tc.protected))
            left = prunable.clone()
            for j in range(shares.shape[0]):
                ran = batch_max(rounds, tc.batch) > j
                padded = batch_max(tc.protected + left, tc.batch)
                selection += torch.where(ran, cost.key_flops(backbone, padded) + merge.matching_flops(padded, hd), 0).double()
                left = left - shares[j]
        work.selection = selection
        return work


def run_blocks_sized(backbone: TokenBackbone, state: TokenState, size: torch.Tensor | None, start: int, stop: int) -> TokenState:
    """Blocks[start:stop] with proportional attention: log(size) added to every key's logits.

    size: [B, N] tokens each slot stands for, or None (plain attention). All-ones sizes take the
    backbone's own path, so nothing merged means exactly the unpruned computation.
    """
    if size is None or start >= stop or bool((size[state.valid] == 1).all()):
        return backbone.run_blocks(state, start, stop)
    bias = merge.size_bias(size, state.valid, state.tokens.dtype)
    x = state.tokens
    for block in _host_blocks(backbone)[start:stop]:
        x = _call_block(backbone, block, x, bias)
    return state.with_tokens(x)


def _host_blocks(backbone: TokenBackbone) -> Any:
    from policy_prune.core.backbones import HFEncoderBackbone, TimmViTBackbone

    if isinstance(backbone, TimmViTBackbone):
        return backbone.model.blocks
    if isinstance(backbone, HFEncoderBackbone):
        impl = getattr(backbone.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa", None):
            raise UserError(f"tome needs eager or sdpa attention for an additive bias, not {impl!r}")
        return backbone.layers
    raise UserError(f"tome merging supports timm ViTs and HF encoders, not {type(backbone).__name__}")


def _call_block(backbone: TokenBackbone, block: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # timm's Attention and HF's eager / sdpa attention both add a float mask to the logits.
    out = block(x, attn_mask=bias) if backbone.family == "timm-vit" else block(x, bias)
    return out[0] if isinstance(out, tuple) else out


def merge_tokens(backbone: TokenBackbone, state: TokenState, size: torch.Tensor, layer: int, target: torch.Tensor,
                 slot_of: torch.Tensor | None = None) -> tuple[TokenState, torch.Tensor, float, torch.Tensor | None]:
    """Merge each row down to ``target`` [B] prunable tokens by bipartite soft matching, in balanced rounds.

    The metric is block ``layer``'s keys averaged over heads (ToMe, Sec. 3), recomputed each round on the
    re-packed survivors. No round merges as many tokens as A holds (:func:`merge.merge_rounds`), so a
    token unlike every other is never forced into a merge. Returns the packed state, sizes [B, N'] (they
    keep summing to each row's original count; protected tokens are never merged), the selection FLOPs
    per row (keys and matching of every round) and ``slot_of`` followed through the merges.
    """
    eligible = state.valid & ~state.protected
    shares, _ = merge.merge_rounds(eligible.sum(dim=1), target)
    flops, hd = 0.0, tome.head_dim(backbone)
    for share in shares:
        n = state.tokens.shape[1]
        flops += cost.key_flops(backbone, n) + merge.matching_flops(n, hd)
        metric = backbone.attention_qk(state, layer, cls_only=True)[1].mean(dim=1)  # [B, N, head_dim]
        dst, merged, _ = merge.bipartite_plan(metric, state.valid & ~state.protected, share.to(metric.device))
        tokens, size = merge.merge_wavg(state.tokens, size, dst)
        keep = ops.normalize_keep(state.valid & ~merged, state.valid, state.protected)
        index, valid = ops.pack_indices(keep)
        if slot_of is not None:
            slot_of = tome.follow(slot_of, dst, index, valid)
        state, size = state.with_tokens(tokens).prune(keep), ops.gather_rows(size, index) * valid
    return state, size, flops, slot_of


def forward_merged(
    backbone: TokenBackbone, inputs: Any, sites: Sequence[int], values: float | Sequence[float], prop_attn: bool = True,
    watch: Watch | None = None, size_pool: bool = True,
) -> tuple[torch.Tensor, TokenState, list[torch.Tensor], torch.Tensor, Work]:
    """The whole model with ToMe before each site, reaching the keep_ratio rule's token counts.

    Merging happens at the same sites as pruning and down to the same counts, so every method at a
    budget runs the same blocks on the same number of tokens. Heads are the host's own; with
    ``size_pool`` an average-pooling head (a text encoder's mean pool) weights each merged token by its
    size, so it averages the embedded tokens as ``merge_wavg`` keeps their sum (without: unweighted, as the
    reference's timm heads do; its ViTs pool a CLS token, where the two agree).

    values: the keep ratio, one number or one per site. Returns (output, final state, alive counts
    [B] after each site, final sizes [B, N'], Work).
    """
    backbone.check_sites(sites)
    per_site = [float(values)] * len(sites) if isinstance(values, (int, float)) else [float(v) for v in values]
    state = backbone.embed(inputs)
    n0, size = state.alive_counts, state.valid.long()
    slot_of = tome.initial_slots(state) if watch is not None else None
    counts: list[torch.Tensor] = []
    start, spent = 0, 0.0
    for i, site in enumerate(sites):
        state = run_blocks_sized(backbone, state, size if prop_attn else None, start, site)
        target = keep_count(per_site[min(i, len(per_site) - 1)], (state.valid & ~state.protected).sum(dim=1),
                            (state.valid & state.protected).sum(dim=1))
        state, size, flops, slot_of = merge_tokens(backbone, state, size, site, target, slot_of)
        spent += flops
        counts.append(state.alive_counts)
        if watch is not None and slot_of is not None:
            watch[site] = slot_of.clone()
        start = site
    state = run_blocks_sized(backbone, state, size if prop_attn else None, start, backbone.depth)
    b = len(n0)
    work = site_work(backbone.depth, list(sites), n0, counts, torch.full((b,), spent, dtype=torch.float64),
                     torch.zeros(b, dtype=torch.long), state.n_full)
    return backbone.head(state, size if size_pool else None), state, counts, size, work


# ---- ToMe in every block --------------------------------------------------------------------------------
class TomeNative(Method):
    """ToMe as its authors run it (:mod:`policy_prune.evaluation.tome`): r merges in every block.

    Reaching a target: the constant (or inflected) r whose total is the last above the target, then the
    per-block r raised one at a time from the first block by :func:`descend`, the last block finest
    (one merge there saves one token of one MLP).
    """

    def __init__(self, prop_attn: bool = True, inflect: float = 0.0, name: str = "tome-native",
                 size_pool: bool = True) -> None:
        super().__init__(name, [])
        self.prop_attn, self.inflect, self.size_pool = prop_attn, inflect, size_pool

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        r = [int(v) for v in point.values] if point.rule == "tome-r" else [0] * backbone.depth
        return tome.forward_native(backbone, inputs, r, self.prop_attn, watch, self.size_pool)

    def predict(self, backbone: TokenBackbone, tc: BatchedCounts, point: Point) -> Work:
        r = [int(v) for v in point.values] if point.rule == "tome-r" else [0] * backbone.depth
        attn, mlp, selection = tome.predict_native(tc.n0, tc.protected, tc.batch, r, tome.head_dim(backbone))
        return Work(attn, mlp, selection, tc.batch, tc.n_full, tc.n0)

    def solve(self, ctx: SolveContext, target: float) -> Point:
        backbone, tc, depth = ctx.backbone, ctx.counts, ctx.backbone.depth

        def total(r: list[float]) -> float:
            return total_ratio(backbone, self.predict(backbone, tc, Point("tome-r", r)))

        def step(r: list[float], k: int) -> list[float] | None:
            attn = self.predict(backbone, tc, Point("tome-r", r)).attn
            cap = int(((attn[:, k] - tc.protected) // 2).max())
            return None if r[k] >= cap else [v + (1 if i == k else 0) for i, v in enumerate(r)]

        def schedule(r: int) -> list[float]:
            return [float(v) for v in tome.parse_r(depth, r, self.inflect)]

        lo, hi = 0, int((tc.n0 - tc.protected).max()) // 2  # lo: above the target (or r = 0)
        if total(schedule(lo)) <= target or total(schedule(hi)) > target:  # nothing to merge, or out of reach
            edge = schedule(lo) if total(schedule(lo)) <= target else schedule(hi)
            return Point("tome-r", edge, target, total(edge))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(schedule(mid)) > target else (lo, mid)
        found = descend(schedule(lo), step, depth, total, target) or schedule(hi)
        return Point("tome-r", found, target, total(found))


# ---- registry ----------------------------------------------------------------------------------------
@dataclass
class BaselineOptions:
    """Knobs shared by the baseline factories."""

    seed: int = 0
    """Seed of the random baseline."""
    diversity: float = 0.0
    """Weight of the similarity baselines' spatial-diversity term (0: pure redundancy)."""
    prop_attn: bool = True
    """ToMe's proportional attention (log(size) added to attention logits)."""
    tome_inflect: float = 0.0
    """tome-native's schedule: 0 constant r per block; -1 the authors' decreasing schedule (any value in [-1, 1])."""
    tome_size_pool: bool = True
    """ToMe's average-pooling heads (text encoders' mean pool) weight each merged token by its size: the mean over
    the embedded tokens, which merge_wavg preserves; False: the reference's unweighted pool (built for CLS ViTs)."""
    evit_sum: bool = False
    """EViT's fused token as the authors' attention-weighted sum on every model (default: the weighted mean on
    post-norm encoders, see :class:`EvitMethod`)."""


BASELINES: dict[str, Callable[[BaselineOptions, list[int]], Method]] = {
    "none": lambda o, s: NoPruning(),
    "random": lambda o, s: ScorerMethod("random", RandomScorer(o.seed), s),
    "cls-attention": lambda o, s: ScorerMethod("cls-attention", ClsAttentionScorer(), s),
    "evit": lambda o, s: EvitMethod(s, sum_fusion=o.evit_sum),
    "token-norm": lambda o, s: ScorerMethod("token-norm", TokenNormScorer(), s),
    "similarity": lambda o, s: ScorerMethod("similarity", SimilarityScorer(o.diversity), s),
    "similarity-pre": lambda o, s: ScorerMethod("similarity-pre", SimilarityScorer(o.diversity), [0]),
    "tome-native": lambda o, s: TomeNative(o.prop_attn, o.tome_inflect, size_pool=o.tome_size_pool),
    "tome-sites": lambda o, s: TomeSites(s, o.prop_attn, size_pool=o.tome_size_pool),
}


MERGE_SUFFIX = "+merge"
"""A pruning baseline's name with this suffix (``similarity-pre+merge``): the same tokens kept, each dropped
token averaged into its most similar kept one, as a scorer trained with ``env.merge`` runs."""


def make_baseline(name: str, sites: Sequence[int], options: BaselineOptions | None = None) -> Method:
    """The baseline registered under ``name`` at ``sites`` (a ``+merge`` variant of a pruning baseline: merging);
    UserError listing the choices otherwise."""
    base = name.removesuffix(MERGE_SUFFIX)
    if base != name and base in BASELINES:
        method = BASELINES[base](options or BaselineOptions(), list(sites))
        if not isinstance(method, ScorerMethod):
            raise UserError(f"{name!r}: only the pruning baselines have a {MERGE_SUFFIX} variant (not {base})")
        return ScorerMethod(name, method.scorer, method.sites, merge=True)
    if name not in BASELINES:
        hint = " (ToMe is tome-native, as its authors run it, or tome-sites)" if name == "tome" else ""
        raise UserError(f"unknown baseline {name!r}{hint} (available: {', '.join(BASELINES)})")
    return BASELINES[name](options or BaselineOptions(), list(sites))


class DeployedMethod(Method):
    """The public call, as a user runs it: ``prune(model, scorer, flops=f)`` with its default rule (chosen
    on val at calibration and stored in the scorer), its values, its static or packed path and the eval
    batching (text: length-sorted batches, as ``SentenceTransformer.encode`` makes them). ``solve`` measures on
    val what ``flops=target`` spends: nothing is solved in eval. Retrieval, where the scorer has plans per task
    (what a pruned SentenceTransformer's ``encode_query`` / ``encode_document`` run): for one total over queries
    and passages the passages run ``prune(..., flops=target, task="document")`` and the queries ``task="query"``
    (the default ``split="total"``), where the calibration has a split; for one kind of input on its own
    (``SolveContext.kind``: eval's ``--query-target``) ``prune(..., flops=target, task=kind, split="each")``;
    else the call for the mix. The point's ``budget`` is the flops argument. Targets outside the budgets the
    scorer was trained on have no point (``prune`` refuses them)."""

    counts_only = False  # what the call spends is the scorer's plan: measured, never matched

    def __init__(self, name: str, scorer: LearnedScorer, run: str | None = None, rule: str | None = None) -> None:
        super().__init__(name, scorer.sites)
        self.scorer, self.run, self.rule = scorer, run, rule
        self._models: dict[tuple[int, float, str | None, str | None], Any] = {}

    def model(self, backbone: TokenBackbone, target: float, task: str | None = None, split: str | None = None) -> Any:
        """``prune(backbone.model, scorer, flops=target[, rule=rule][, task=task, split=split])``, built once per
        backbone, target, task and split."""
        from policy_prune.core.inference import prune

        key = (id(backbone), target, task, split)
        if key not in self._models:
            self._models[key] = prune(backbone.model, self.scorer, rule=self.rule, flops=target, strict=False, task=task,
                                      split=split if task is not None else None)
        return self._models[key]

    def _called(self, backbone: TokenBackbone, point: Point) -> Any:
        """The PrunedModel ``point`` runs (its flops argument, task and split)."""
        flops = point.target if point.budget is None else point.budget
        assert flops is not None
        return self.model(backbone, flops, point.task, point.split)

    def forward(self, backbone: TokenBackbone, inputs: Any, point: Point, watch: Watch | None = None) -> tuple[torch.Tensor, Work]:
        fast = self._called(backbone, point)
        step, cls, idle = fast.step_fn(), model_has_cls(fast.backbone), fast.idle_sites()

        def reduce(state: TokenState, i: int, layer: int) -> tuple[TokenState, float]:
            n = state.tokens.shape[1]
            return step(state, i, layer), 0.0 if idle[i] else cost.learned_flops(fast.backbone, fast.scorer, layer, n, cls)

        return run_sites(fast.backbone, inputs, self.sites, reduce, watch, static=fast.static_text(inputs),
                         merged=fast.scorer.merge)

    def timed(self, backbone: TokenBackbone, inputs: Any, point: Point) -> Callable[[], Any]:
        """The public call itself (the PrunedModel on the adapter's inputs), without eval's bookkeeping."""
        return functools.partial(self._called(backbone, point).run, inputs)

    def solve(self, ctx: SolveContext, target: float) -> Point | None:
        budget = self.scorer.budget
        routed = budget is not None and self.rule != "threshold"
        task = ctx.kind if routed and ctx.kind in budget.tasks else None  # type: ignore[union-attr]
        split = routed and ctx.kind is None and ctx.queries_from is not None and budget.splits  # type: ignore[union-attr]
        try:
            fast = self.model(ctx.backbone, target)
        except UserError as exc:  # outside the trained budgets, or below what the scorer reaches: said in the report
            self.unsolved[target] = str(exc)
            return None
        if split:  # one total: each part through its task's plan, as encode_query / encode_document run them
            point = self._split(ctx.backbone, target)
            return replace(point, solved=total_ratio(ctx.backbone, self._measure_split(ctx, point)))
        # One kind alone (--query-target): its plan at the target, where it has one, as ST runs it.
        point = self._each(ctx.backbone, target, task) if task is not None else \
            Point(fast.rule, list(fast.values), target, None, target)
        return replace(point, solved=total_ratio(ctx.backbone, self.measure(ctx, point)))

    def _split(self, backbone: TokenBackbone, target: float) -> Point:
        """The passages' point with the queries' (``queries``) under one total, as a pruned SentenceTransformer runs
        them: each part ``prune(..., flops=target, task=task)`` (split "total"); where the total cannot be split,
        each part's plan at the target (split "each"), or the call for the mix where that cannot run (noted)."""
        budget = self.scorer.budget
        assert budget is not None
        try:
            calls = {t: self.model(backbone, target, t, "total") for t in ("document", "query")}
            doc, qry = (Point(calls[t].rule, list(calls[t].values), target, None, target, task=t, split="total",
                              asked=budget.task_flops(target, t)) for t in ("document", "query"))
        except UserError as exc:
            self.notes.append(f"{self.name} {self.run} at {target:g}: {exc}; each part runs its plan at {target:g}")
            doc, qry = (self._each(backbone, target, t) for t in ("document", "query"))
        return replace(doc, queries=qry)

    def _each(self, backbone: TokenBackbone, target: float, task: str) -> Point:
        """``prune(..., flops=target, task=task, split="each")``, or the call for the mix where that task's plan
        cannot reach the target (noted)."""
        try:
            fast, split = self.model(backbone, target, task, "each"), "each"
        except UserError as exc:
            self.notes.append(f"{self.name} {self.run} at {target:g}: {exc}; the {task} inputs run the call for the mix")
            fast, task, split = self.model(backbone, target), None, None  # type: ignore[assignment]
        return Point(fast.rule, list(fast.values), target, None, target, task=task, split=split)

    def _measure_split(self, ctx: SolveContext, point: Point) -> Work:
        """The Work over the val mix with the passages at ``point`` and the queries at ``point.queries``."""
        assert ctx.queries_from is not None and point.queries is not None
        with torch.inference_mode():
            return Work.cat([self.forward(ctx.backbone, x, point if i < ctx.queries_from else point.queries)[1]
                             for i, (x, _) in enumerate(ctx.batches)])


def learned_methods(scorer: LearnedScorer, run: str | None = None, group: str | None = None) -> list[Method]:
    """A learned scorer four ways. "learned-deployed" is the public ``prune(model, scorer, flops=f)``
    (:class:`DeployedMethod`): the headline. "learned-deployed-threshold" is the same call with
    ``rule="threshold"`` (the calibrated threshold: per-sample counts whose total meets f on the calibration
    mix, e.g. retrieval passages and queries together). "learned" reaches a target with one logit threshold at
    every site solved on val (its own per-sample, per-site allocation) and also runs its trained point
    (threshold 0); "learned-topk" ranks tokens by the same logits with per-site keep ratios solved on val
    (static shapes). A named ``group`` of runs (eval's ``NAME=RUN_DIR``) gives "learned-deployed[NAME]" and so on."""
    sites = list(scorer.sites)
    own = [Point("threshold", [0.0] * len(sites))]
    tag = f"[{group}]" if group else ""
    solved: list[Method] = [ScorerMethod(f"learned{tag}", scorer, sites, "threshold", own, run),
                            ScorerMethod(f"learned-topk{tag}", scorer, sites, "keep_ratio", (), run)]
    if scorer.budget is None:  # no flops=f call to deploy
        return solved
    return [DeployedMethod(f"learned-deployed{tag}", scorer, run), *solved,
            DeployedMethod(f"learned-deployed-threshold{tag}", scorer, run, rule="threshold")]
