"""Measure a scorer's FLOPs on data and solve each rule's value that meets a target (calibration).

Used after training (the calibration stored in a budget-conditioned scorer, measured on validation
data) and by evaluation (thresholds solved on the validation split). Label-free: only token counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.core.budget import (
    IDLE_QUALITY,
    IDLE_SAVING,
    QUERY_SHARE,
    RULE_MARGIN,
    SLACK,
    SPLIT_LOSS,
    TASKS,
    BudgetInput,
    CalibrationPoint,
    on_line,
    site_savings,
)
from policy_prune.core.inference import static_floor, static_ratios
from policy_prune.core.schedule import TokenCounts, bisect_at_most, flops_per_row, keep_schedule
from policy_prune.core.scorer import LearnedScorer, idle_sites, make_keep_fn, row_full_flops
from policy_prune.core.selection import learned_flops, model_has_cls
from policy_prune.errors import UserError

RESOLUTION = 1e-3
""":func:`solve_plan` stops once its next plan lies this close to one it tried (it would run within about tol of
it): the executed FLOPs move in steps of whole tokens per batch, which can straddle a target by more than tol."""


@dataclass
class Measured:
    """What a scorer + rule did over some inputs."""

    flops_ratio: float
    """Total FLOPs over total unpruned FLOPs (a learned scorer's own features and MLP included; with
    ``executed``, every row charged its batch's widest count, as a padded batch runs, for the pruned and
    the unpruned model alike)."""
    keep_ratio: list[float]
    """Per site: kept prunable tokens over the prunable alive tokens before the site (ratio of sums)."""
    outputs: torch.Tensor | None = None
    """[M, C] or [M, D] float32 head outputs, when asked for."""


@torch.inference_mode()
def measure(backbone: TokenBackbone, scorer: Any, inputs: Sequence[Any], rule: str, values: float | Sequence[float],
            sites: Sequence[int] | None = None, executed: bool = False, outputs: bool = False) -> Measured:
    """Run ``scorer`` with ``rule``/``values`` over every batch of ``inputs`` and sum the counts.

    ``executed``: FLOPs as the batched forward computes them (each row at its batch's widest count at
    every block and site: a batch of rows keeping different counts is packed to its largest), over the
    unpruned model's executed FLOPs on the same batches, as ``eval`` counts them; else each row on its own
    counts, over the unpruned model's on each row's own tokens.
    """
    sites = list(sites if sites is not None else scorer.sites)
    selection = _selection(backbone, scorer, sites, rule, values) if isinstance(scorer, LearnedScorer) else None
    flops = full = 0.0
    kept = torch.zeros(len(sites), dtype=torch.float64)
    before = torch.zeros(len(sites), dtype=torch.float64)
    outs = []
    for x in inputs:
        batch = BatchCounts.of(backbone.embed(x))
        n0, prot = batch.counts.n0, batch.counts.protected
        out, _, counts = backbone.forward_pruned(x, sites, make_keep_fn(backbone, scorer, rule, values),
                                                 merge=isinstance(scorer, LearnedScorer) and scorer.merge)
        if outputs:
            outs.append(out.float().cpu())
        counts = [c.cpu() for c in counts]
        f, u = _batch_flops(backbone, sites, counts, batch, selection, executed)
        flops, full = flops + f, full + u
        prev = n0
        for i, c in enumerate(counts):
            kept[i] += float((c - prot).sum())
            before[i] += float((prev - prot).sum())
            prev = c
    shares = (kept / before.clamp_min(1.0)).tolist()
    return Measured(flops / max(full, 1.0), shares, torch.cat(outs) if outs else None)


def _selection(backbone: TokenBackbone, scorer: LearnedScorer, sites: Sequence[int], rule: str,
               values: float | Sequence[float]) -> Callable[[int, int], float]:
    """What choosing the tokens costs at site i with n tokens entering: the scorer's features and MLP, none at a
    site the rule idles."""
    idle = idle_sites(rule, values, len(sites))

    def selection(i: int, n: int) -> float:
        return 0.0 if idle[i] else learned_flops(backbone, scorer, sites[i], n, has_cls=model_has_cls(backbone))

    return selection


@dataclass
class BatchCounts:
    """A batch's token counts as it embeds: enough to count what a keep_ratio plan executes on it without
    running the model (keep_ratio's counts depend on the rows' lengths alone)."""

    counts: TokenCounts
    """Each row's alive and protected tokens."""
    width: int
    """Slots per row of the padded batch (its longest row)."""

    @classmethod
    def of(cls, start: TokenState) -> BatchCounts:
        """The counts of an embedded batch."""
        prot = (start.protected & start.valid).sum(dim=1).cpu()
        return cls(TokenCounts(start.alive_counts.cpu(), prot, start.n_full), start.tokens.shape[1])


def _batch_flops(backbone: TokenBackbone, sites: Sequence[int], counts: Sequence[torch.Tensor], batch: BatchCounts,
                 selection: Callable[[int, int], float] | None, executed: bool) -> tuple[float, float]:
    """(FLOPs, unpruned FLOPs) of a batch whose rows kept ``counts`` [B] after each site: with ``executed``
    every row at the batch's widest count (a padded batch runs so), for the pruned and the unpruned model alike;
    else each row on its own tokens."""
    tc = batch.counts
    if executed:
        tc = TokenCounts(torch.full_like(tc.n0, batch.width), tc.protected, tc.n_full)
        counts = [c.max().expand_as(c) if len(c) else c for c in counts]
    f = flops_per_row(backbone, sites, counts, tc, selection)
    return float(f.sum()), float(row_full_flops(backbone, tc.n0, tc.n_full).sum())


@torch.inference_mode()
def batch_counts(backbone: TokenBackbone, inputs: Sequence[Any]) -> list[BatchCounts]:
    """:class:`BatchCounts` of every batch of ``inputs`` (only the embedding runs)."""
    return [BatchCounts.of(backbone.embed(x)) for x in inputs]


def plan_flops(backbone: TokenBackbone, scorer: LearnedScorer, batches: Sequence[BatchCounts],
               values: Sequence[float]) -> float:
    """The executed FLOPs ratio (the scorer's own cost included) of the keep_ratio plan ``values`` on
    ``batches``, counted from their lengths: what :func:`measure` with ``executed`` returns for the same plan,
    without running the model, so that a plan can be solved on a whole split."""
    sites = list(scorer.sites)
    selection = _selection(backbone, scorer, sites, "keep_ratio", values)
    flops = full = 0.0
    for b in batches:
        counts = keep_schedule(list(values), b.counts.n0, b.counts.protected)
        f, u = _batch_flops(backbone, sites, counts, b, selection, executed=True)
        flops, full = flops + f, full + u
    return flops / max(full, 1.0)


def quality(kind: str, out: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Mean quality of outputs [M, ...] against the unpruned model's ``teacher`` [M, ...]: cosine for
    encoders (``kind`` "embedding"); accuracy against ``labels``, else agreement, for classifiers."""
    if kind != "logits":
        return float(torch.nn.functional.cosine_similarity(out.double(), teacher.double(), dim=-1).mean())
    reference = labels if labels is not None else teacher.argmax(-1)
    return float((out.argmax(-1) == reference.to(out.device)).double().mean())


def solve_threshold(fn: Callable[[float], float], target: float, iters: int = 20, tol: float = 0.002,
                    start: float = 0.0, step: float = 1.0, at_most: bool = False) -> float:
    """A threshold t for which the FLOPs ratio fn(t) (non-increasing in t) meets ``target``.

    Brackets around ``start`` by doubling ``step`` outwards (logits are unbounded; thresholds beyond
    +-64 count as unreachable), then narrows the bracket until target - tol <= fn(t) <= target (without
    ``at_most``: |fn(t) - target| <= tol) by false position with the Illinois safeguard (the FLOPs ratio is
    close to linear in t across a narrow bracket: about 30% fewer calls than bisection on smooth and stepped
    curves). Returns that t with ``at_most`` (evaluation: a method never gets more than its budget), else
    the t seen whose fn(t) is nearest the target (calibration). Each fn value is computed once (a call runs
    the pruned model over the data).
    """
    seen: dict[float, float] = {}

    def f(t: float) -> float:
        if t not in seen:
            seen[t] = fn(t)
        return seen[t]

    lo, hi = start - step, start + step  # want f(lo) > target >= f(hi)
    while f(lo) <= target and lo > -64:
        lo, step = lo - step, 2 * step
    while f(hi) > target and hi < 64:
        hi, step = hi + step, 2 * step
    if f(hi) > target:
        return hi  # out of reach: the deepest cut tried
    if f(lo) <= target:
        return lo  # everything fits
    # Illinois false position: the line through the two ends' misses, the miss of an end kept twice in a
    # row halved (else one slow end makes it crawl); a new point at least 2% of the bracket in from either end.
    glo, ghi, kept = f(lo) - target, f(hi) - target, 0
    for _ in range(iters):
        if target - f(hi) <= tol or (not at_most and f(lo) - target <= tol):
            break  # met (calibration: from either side)
        mid = lo + min(max(glo / (glo - ghi), 0.02), 0.98) * (hi - lo)
        if (g := f(mid) - target) <= 0:
            hi, ghi, glo = mid, g, glo / 2 if kept == -1 else glo
            kept = -1
        else:
            lo, glo, ghi = mid, g, ghi / 2 if kept == 1 else ghi
            kept = 1
    return hi if at_most else min(seen, key=lambda t: abs(seen[t] - target))


def solve_plan(backbone: TokenBackbone, told: LearnedScorer, inputs: Sequence[Any], f: float, profile: Sequence[float],
               tol: float = 0.002, iters: int = 8, idle: Sequence[bool] | None = None,
               start: float | None = None, counted: Sequence[BatchCounts] | None = None) -> tuple[float, Measured]:
    """(plan g, what it did): the FLOPs ratio g whose keep_ratio plan :func:`static_ratios` (shaped like
    ``profile``, costed on a full-length input; ``idle`` sites keep every token) executes nearest ``f`` on
    ``inputs``.

    Secant steps from g = ``start`` (default f; executed FLOPs grow with g at about slope 1), g kept within
    [the plan's floor, 1]; stops within ``tol``. Each step runs the pruned model over the data once.

    ``counted`` (the batches of a whole split, :func:`batch_counts`): g is instead the largest plan that executes
    at most ``f`` on them, counted from their lengths (:func:`plan_flops`: as baselines are solved, on every row
    of the split rather than a sample), and the pruned model runs once over ``inputs`` for its outputs; the
    returned FLOPs ratio is the one on ``counted``.
    """
    low = static_floor(backbone, told, idle)
    if counted is not None:
        g, spent = _largest_counted_plan(backbone, told, counted, f, profile, idle)
        ran = measure(backbone, told, inputs, "keep_ratio", static_ratios(backbone, told, g, profile, idle),
                      executed=True, outputs=True)
        return g, Measured(spent, ran.keep_ratio, ran.outputs)
    tried: dict[float, Measured] = {}
    g, slope = min(max(f if start is None else start, low), 1.0), 1.0
    for _ in range(iters):
        tried[g] = measure(backbone, told, inputs, "keep_ratio", static_ratios(backbone, told, g, profile, idle),
                           executed=True, outputs=True)
        miss = f - tried[g].flops_ratio
        if abs(miss) <= tol:
            break
        if len(tried) >= 2:
            (g0, m0), (g1, m1) = [(k, tried[k].flops_ratio) for k in list(tried)[-2:]]
            if abs(m1 - m0) > 1e-9:
                slope = min(max((g1 - g0) / (m1 - m0), 0.25), 4.0)
        nxt = min(max(g + slope * miss, low), 1.0)
        if any(abs(nxt - k) <= RESOLUTION for k in tried):  # pinned at a bound, or between two count steps
            break
        g = nxt
    best = min(tried, key=lambda k: abs(tried[k].flops_ratio - f))
    return best, tried[best]


def _largest_counted_plan(backbone: TokenBackbone, told: LearnedScorer, batches: Sequence[BatchCounts], f: float,
                          profile: Sequence[float], idle: Sequence[bool] | None) -> tuple[float, float]:
    """(g, its FLOPs ratio on ``batches``): the largest keep_ratio plan shaped like ``profile`` (``idle`` sites
    keep every token) that executes at most ``f`` on ``batches``, counted from their lengths (:func:`plan_flops`)."""
    def counted_flops(g: float) -> float:
        return plan_flops(backbone, told, batches, static_ratios(backbone, told, g, profile, idle))

    g = _largest_plan_within(counted_flops, f, static_floor(backbone, told, idle))
    return g, counted_flops(g)


def _largest_plan_within(fn: Callable[[float], float], f: float, low: float, iters: int = 30) -> float:
    """The largest g in [low, 1] whose FLOPs ratio fn(g) (non-decreasing in g) is at most ``f`` (``low`` when
    none is): bisection, to a resolution far below one token of a batch."""
    if fn(1.0) <= f:
        return 1.0
    if fn(low) > f:
        return low
    return bisect_at_most(fn, f, low, 1.0, iters)[0]


def _indices(flags: Sequence[bool]) -> list[int]:
    return [i for i, on in enumerate(flags) if on]


def _next_on_line(known: Sequence[tuple[float, float]], f: float) -> float:
    """Where the line through the last two (target, threshold) pairs crosses ``f`` (the last threshold with one
    pair, 0 with none): thresholds move smoothly with the target, so this starts a solve close by."""
    if not known:
        return 0.0
    if len(known) == 1:
        return known[-1][1]
    return on_line(known[-1], known[-2], f)


def calibrate(backbone: TokenBackbone, scorer: LearnedScorer, inputs: Sequence[Any], targets: Sequence[float],
              tol: float = 0.002, labels: torch.Tensor | None = None, slack: float = SLACK,
              idle_saving: float = IDLE_SAVING, idle_quality: float = IDLE_QUALITY,
              rule_margin: float = RULE_MARGIN, parts: Sequence[int] | None = None,
              counted: Sequence[BatchCounts] | None = None,
              counted_parts: Sequence[int] | None = None) -> list[CalibrationPoint]:
    """For each target f: the threshold at which ``scorer`` told f meets f on ``inputs``, the per-site keep
    shares it then has, the keep_ratio plan that meets f with those shares, and the rule
    ``prune(model, scorer, flops=f)`` runs by default.

    ``inputs`` are batches as deployed (text: length-sorted, each cut to its longest row): FLOPs are
    counted as those batches execute them (:func:`measure` with ``executed``). Both rules are solved on
    them (the threshold by false position, keep_ratio's scale by :func:`solve_plan`) and scored against the
    unpruned model on the same inputs (:func:`quality`; ``labels`` [M]: classifiers' accuracy). The
    default is the better of the rules that ran within ``slack`` of f, the threshold only where it beats
    keep_ratio by more than ``rule_margin`` (static shapes otherwise), keep_ratio when neither ran within
    it. ``parts`` (one per batch: the kind of input it holds, e.g. retrieval passages 0 and queries 1): the
    threshold must beat keep_ratio by more than ``rule_margin`` on each kind on its own (a threshold met on
    the total can move compute from one kind to the other, and a user who encodes only passages asked for f
    on them: they must not get worse embeddings than keep_ratio gives at f). A target that no threshold
    brings the FLOPs down to is kept with ``reached=False`` (its threshold the deepest cut tried).
    ``counted`` (:func:`batch_counts` of the whole split ``inputs`` were drawn from, as deployed): keep_ratio's
    plan is the largest that executes at most f on it (:func:`solve_plan`), its recorded FLOPs that split's; a
    sample of a few batches has its own mix of lengths (on minilm-text's val a plan met on 256 rows ran 0.507
    on test at 0.5, where baselines solved on the whole split ran 0.496).
    ``counted_parts`` (one per ``counted`` batch, as ``parts``): where it holds several kinds, each kind also
    gets keep_ratio's plan solved on its batches alone, the same shares and idle sites
    (``CalibrationPoint.plans``, named by ``TASKS``): the mix's plan runs above f on short retrieval queries
    alone (minilm-text at 0.35: 0.368 on the val queries), which a query encoder asked f for must not.

    Sites whose threshold drops save less than ``idle_saving`` of the block compute
    (:func:`policy_prune.core.budget.site_savings`) are made idle (they keep every token and run no scorer;
    never the site that saves the most) and the threshold is solved again with them idle, until no other
    site falls below, unless its quality on ``inputs`` then falls more than ``idle_quality`` below what
    scoring every site gave, or it no longer meets f where it did (those sites stay scored); keep_ratio is
    solved with the same idle sites. Then the same rule on keep_ratio's own shares: its plan stretches the
    threshold's shares to f and can keep nearly every token at a site the threshold still scores (minilm-text
    at 0.5: 0.95 at its second site, a scorer pass for 2% of the blocks' work); such sites are made idle for
    keep_ratio alone (``CalibrationPoint.idle_keep_ratio``) and its plan solved again, kept where its quality
    falls by at most ``idle_quality`` from its plan before this test and it still meets f where it did. Each
    target starts with every site scored: a site's savings need not grow or shrink with the budget (on
    digits-vit a second site saves 3% at 0.1, 14% at 0.3 and 3% at 0.7).
    """
    with torch.inference_mode():
        per_batch = [backbone(x).float().cpu() for x in inputs]
    teacher = torch.cat(per_batch)
    # Per output row: the kind of input of its batch (one kind without ``parts``).
    kinds = torch.repeat_interleave(torch.tensor(list(parts) if parts is not None else [0] * len(inputs)),
                                    torch.tensor([len(t) for t in per_batch]))

    def score(m: Measured) -> float:
        return quality(backbone.output_kind, m.outputs, teacher, labels)  # type: ignore[arg-type]

    def score_kinds(m: Measured) -> list[float]:
        """Quality on each kind of input (kinds 0, 1, ... in order)."""
        return [quality(backbone.output_kind, m.outputs[kinds == k], teacher[kinds == k],  # type: ignore[index]
                        None if labels is None else labels[kinds == k]) for k in kinds.unique().tolist()]

    points: list[CalibrationPoint] = []
    all_scored: list[tuple[float, float]] = []  # (target, its threshold with every site scored)
    n_sites = len(scorer.sites)
    for f in sorted(targets):
        told = scorer.at(f)
        ran: dict[float, Measured] = {}  # threshold -> what it did with the current idle sites (outputs kept)
        idle = [False] * n_sites

        def values(t: float, idle: list[bool] = idle) -> list[float]:
            return [-math.inf if i else t for i in idle]

        def flops_at(t: float, told: LearnedScorer = told, values: Any = values,
                     ran: dict[float, Measured] = ran) -> float:
            ran[t] = measure(backbone, told, inputs, "threshold", values(t), executed=True, outputs=True)
            return ran[t].flops_ratio

        def reached(ran: dict[float, Measured] = ran, f: float = f) -> bool:
            """solve_threshold's own test: a threshold tried with the current idle sites ran at most f (else it
            gave up at the deepest cut)."""
            return min(m.flops_ratio for m in ran.values()) <= f

        # Every site scored: start on the line through the last two targets' thresholds with every site
        # scored (from the previous one's with one), a short step away.
        t = solve_threshold(flops_at, f, tol=tol, start=_next_on_line(all_scored, f),
                            step=0.25 if all_scored else 1.0)
        all_scored.append((f, t))
        runs = {"threshold": ran[t]}  # solve_threshold returns a threshold it measured
        scored = score(runs["threshold"])  # every site scored: what idling may cost at most idle_quality of

        def met_f(m: Measured, f: float = f) -> bool:
            return reached() and m.flops_ratio <= f + slack

        def idling(shares: Sequence[float], idle: list[bool] = idle) -> list[bool]:
            """Scored sites whose drops at ``shares`` save less than idle_saving (never the one that saves most)."""
            saved = site_savings(shares, scorer.sites, backbone.depth)
            most = max((i for i in range(n_sites) if not idle[i]), key=lambda i: saved[i])
            return [not off and s < idle_saving and i != most for i, (s, off) in enumerate(zip(saved, idle, strict=True))]

        def plan_for(profile: Sequence[float], idle: Sequence[bool], f: float = f,
                     told: LearnedScorer = told) -> tuple[float, Measured]:
            """keep_ratio's plan from the previous target's offset (plan - target) where it had the same idle sites."""
            near = points[-1] if points and points[-1].idle_of("keep_ratio") == _indices(idle) else None
            start = None if near is None or near.plan is None else f + near.plan - near.flops
            return solve_plan(backbone, told, inputs, f, profile, tol, idle=idle, start=start, counted=counted)

        while any(more := idling(runs["threshold"].keep_ratio)):
            # Solve again with those sites idle too, from the threshold just found; kept only where the
            # threshold's quality holds (within idle_quality of scoring every site) and it still meets f.
            was_idle, was_ran, was_t, was_met = list(idle), dict(ran), t, met_f(runs["threshold"])
            idle[:] = [a or b for a, b in zip(idle, more, strict=True)]
            ran.clear()
            # From the line through the last targets' thresholds with these idle sites, where they had them.
            known = [(p.flops, p.threshold) for p in points[-2:] if p.idle == _indices(idle)]
            t = solve_threshold(flops_at, f, tol=tol, start=_next_on_line(known, f) if known else t, step=0.25)
            trial = ran[t]
            if score(trial) < scored - idle_quality or (was_met and not met_f(trial)):
                idle[:], t = was_idle, was_t
                ran.clear()
                ran.update(was_ran)
                break
            runs["threshold"] = trial
        plan, runs["keep_ratio"] = plan_for(runs["threshold"].keep_ratio, idle)
        # keep_ratio's plan is the threshold's shares stretched to f, so it can keep nearly every token at a site
        # where the threshold dropped enough to be scored (minilm-text at 0.5: 0.95 at a second site): the same
        # rule on keep_ratio's own shares, for keep_ratio alone (the threshold is not solved again), kept where
        # its quality stays within idle_quality of its plan before this test and it still meets f where it did.
        planned, kr_met = score(runs["keep_ratio"]), runs["keep_ratio"].flops_ratio <= f + slack
        kr_idle = list(idle)
        while any(more := idling(runs["keep_ratio"].keep_ratio, kr_idle)):
            trial_idle = [a or b for a, b in zip(kr_idle, more, strict=True)]
            trial_plan, trial_kr = plan_for(runs["threshold"].keep_ratio, trial_idle)
            if score(trial_kr) < planned - idle_quality or (kr_met and trial_kr.flops_ratio > f + slack):
                break
            kr_idle, plan, runs["keep_ratio"] = trial_idle, trial_plan, trial_kr
        plans, task_spent = _task_plans(backbone, told, f, runs["threshold"].keep_ratio, kr_idle, counted, counted_parts)
        scores = {rule: score(m) for rule, m in runs.items()}
        by_kind = {rule: score_kinds(m) for rule, m in runs.items()}
        if len(by_kind["threshold"]) > 1:  # recorded per kind too: "threshold@1" (queries)
            scores.update({f"{rule}@{k}": q for rule, qs in by_kind.items() for k, q in enumerate(qs)})
        spent = {rule: m.flops_ratio for rule, m in runs.items()} | task_spent
        met = [rule for rule in runs if spent[rule] <= f + slack and (rule != "threshold" or reached())]
        if len(met) == 2:  # static shapes unless the mask path wins clearly, on every kind of input
            lead = min(a - b for a, b in zip(by_kind["threshold"], by_kind["keep_ratio"], strict=True))
            best = "threshold" if lead > rule_margin else "keep_ratio"
        else:
            best = met[0] if met else "keep_ratio"
        points.append(CalibrationPoint(float(f), float(t), runs["threshold"].keep_ratio, reached=reached(), rule=best,
                                       quality=scores, plan=float(plan), spent=spent,
                                       idle=_indices(idle),
                                       idle_keep_ratio=_indices(kr_idle) if kr_idle != idle else None,
                                       plans=plans))
    return points


def _task_plans(backbone: TokenBackbone, told: LearnedScorer, f: float, profile: Sequence[float], idle: Sequence[bool],
                counted: Sequence[BatchCounts] | None,
                parts: Sequence[int] | None) -> tuple[dict[str, float], dict[str, float]]:
    """({task: keep_ratio's plan solved on that kind's ``counted`` batches alone}, {"keep_ratio@task": what it
    executes there}), both empty unless ``parts`` names several kinds (:func:`calibrate`'s ``counted_parts``)."""
    if counted is None or parts is None or len(set(parts)) < 2:
        return {}, {}
    plans, spent = {}, {}
    for kind, task in enumerate(TASKS[:max(parts) + 1]):
        batches = [b for b, k in zip(counted, parts, strict=True) if k == kind]
        plans[task], spent[f"keep_ratio@{task}"] = _largest_counted_plan(backbone, told, batches, f, profile, idle)
    return plans, spent


SPLIT_STEP = 0.05
""":func:`solve_splits` tries query ratios from the target up in steps of this much."""

def solve_splits(budget: BudgetInput, score: Callable[[float, float], tuple[float, float]], share: float = QUERY_SHARE,
                 step: float = SPLIT_STEP, loss: float = SPLIT_LOSS) -> BudgetInput:
    """``budget`` with a split of one total per calibration point (``CalibrationPoint.split``): at each target f,
    queries asked q = f, f + step, ... (within the trained range) and documents d = (f - share q) / (1 - share)
    (at least the range's low end). ``score(q, d)``: (retrieval quality, the documents' fidelity) on val (training's:
    recall@10 of queries encoded at q for documents at d, each through its task's plan, and the documents' mean
    cosine to their unpruned embeddings). The split is the pair with the best retrieval among those whose
    documents' 1 - fidelity is at most (1 + ``loss``) times that of (f, f); ties keep the smaller q. The documents'
    fidelity falls as q rises (their plan keeps fewer tokens), so the search stops at the first pair beyond that
    loss: each pair embeds the whole val split (the pairs past it took 3 of 14 minutes of a minilm-text calibration).
    A pair whose plans cannot run (UserError: a plan above its target on its calibration data) is skipped; where
    (f, f) cannot run, the split is (f, f) (prune then runs the mix's call for that kind, with a warning)."""
    points = []
    for p in budget.calibration:
        f = p.flops
        best: tuple[float, float, float] | None = None
        floor = -math.inf
        for k in range(int(math.floor((budget.high - f) / step + 1e-6)) + 1):
            q = round(f + k * step, 6)
            d = round((f - share * q) / (1.0 - share), 6)
            if d < budget.low - 1e-6:
                break
            try:
                quality, fidelity = score(q, d)
            except UserError:
                if k == 0:
                    break
                continue
            if k == 0:
                floor = 1.0 - (1.0 + loss) * (1.0 - fidelity)
            if fidelity < floor - 1e-9:
                break
            if best is None or quality > best[0]:
                best = (quality, q, d)
        q, d = (f, f) if best is None else best[1:]
        points.append(replace(p, split={"document": d, "query": q}))
    return replace(budget, calibration=points, query_share=share)
