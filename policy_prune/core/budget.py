"""The budget input of a scorer: the target FLOPs ratio it is told, and how a target is met.

A budget-conditioned scorer sees the target FLOPs ratio f (one more context column) and was trained on
a range of f, so one scorer serves every budget in that range (DynamicViT users asked for exactly this:
"one model per keep ratio"). Told f, its logits rank and allocate tokens for that budget; a target is
then met by one of the two decision rules:

- ``threshold``: keep tokens whose logit exceeds a threshold. Counts vary per sample (hard inputs keep
  more); the threshold that meets f on average is measured on validation data after training and
  stored with the scorer (``calibration``), so ``prune(model, scorer, flops=f)`` needs no data.
- ``keep_ratio``: a fixed share of the prunable tokens at each site (static shapes). The per-site shares
  come from the calibration (the policy's own allocation at f), scaled so that the FLOPs the calibration
  batches execute equal f: the scale is stored as ``plan``, the FLOPs ratio the shares would cost on a
  full-length input (short texts keep relatively more protected tokens and spend relatively more on the
  linear layers, so a plan for a 128-token input overspends on 45-token passages). Where the calibration
  data held retrieval passages and queries, each kind also has a scale of its own (``plans``): one plan for
  the mix runs above f on short queries alone, so a query encoder gets the scale solved on the queries
  (``prune(..., task="query")``; a SentenceTransformer's ``encode_query`` / ``encode_document`` choose it).

Scorers without a budget input (trained at one lambda) meet a FLOPs target with keep_ratio only: one
constant ratio at every site, solved on the analytic FLOPs.

Shapes: B rows, N token slots; counts are per row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from policy_prune.errors import UserError

SLACK = 0.01
"""How far above its target a rule may run on the calibration batches and still count as meeting it."""
IDLE_SAVING = 0.04
"""A site whose drops save less than this share of the blocks' work on the prunable tokens keeps every token
and runs no scorer (:func:`site_savings`). A scorer pass costs about one block of wall-clock time at batch 1
on the CPU (0.5-0.6 ms against 0.44 ms per block on digits-vit, 1.0 against 2.0 ms on MiniLM) and a twentieth
of one at batch 64, so a site that removes less than a quarter of a block's work (1/24 of a 6-block model)
slows a batch-1 call down and saves next to nothing in a batch."""

IDLE_QUALITY = 0.005
"""Sites below ``IDLE_SAVING`` stay scored where idling them lowers the threshold rule's calibration quality
by more than this (mean cosine, or accuracy: one of the 256 samples calibration scores is 0.0039)."""

TASKS = ("document", "query")
"""The kinds of input a retrieval scorer's calibration holds (part 0: the split's rows, part 1: its queries),
named as sentence-transformers' ``encode_document`` / ``encode_query`` pass them to a model's modules (``task``)."""

SPLITS = ("total", "each")
"""What ``prune(..., flops=f, split=...)`` bounds for retrieval: one total over queries and documents, or each kind."""

QUERY_SHARE = 0.3
"""Retrieval: the largest share of the unpruned FLOPs that queries may carry in a mix for which one total of
``flops`` still holds with the calibrated split (``CalibrationPoint.split``: queries above ``flops``, documents
below). python-docs' val queries carry 0.21 of them (12 tokens against 50 for a passage); a corpus of shorter
passages carries more, so the bound sits above it: at share s, a split asked q for queries and d for documents
runs s q + (1 - s) d at most, which is ``flops`` at the bound and less below it."""

SPLIT_LOSS = 0.15
"""How much more distant from their unpruned embeddings the documents may get to pay for fuller queries in a split
(training's ``retrieval_splits``; a run sets its own in ``train.split_loss``): 1 - their mean cosine may grow by this
share of what it is with each kind at the target. Fuller queries retrieve better, and the documents that pay for them
lose fidelity, which other uses of the same embeddings (clustering, deduplication) need; a cosine budget in
proportion leaves more room where pruning already costs more (tight targets). The largest share that keeps the
documents' mean cosine at least every baseline's on val at every target: chosen on minilm-text's val (the merging
preset's three seeds, every pair of each target scored, with the baselines' val numbers in view; 0 to 0.2 in steps of
0.025 tried). 0.2 (the previous choice, when no baseline merged) fell below similarity-pre+merge at 0.5 and 0.35
(-0.005, -0.008) for +0.007 and +0.014 of recall@10; with 0.15 the learned call is +0.000 to +0.004 above it on
cosine and +0.002 to +0.003 above the best baseline on recall@10 at 0.7 / 0.5 / 0.35 (``scripts/split_pairs.py``),
and keeps 0.25's queries at 0.30-0.35."""

RULE_MARGIN = 0.005
"""The threshold rule is the default at a target only where its calibration quality beats keep_ratio's by more
than this (one of 256 calibration samples is 0.0039): keep_ratio runs static shapes, the same counts in any
batch and faster in one, so a win of one sample (noise) does not buy the masked, per-row path."""


def on_line(a: tuple[float, float], b: tuple[float, float], x: float) -> float:
    """The value at ``x`` of the line through the points ``a`` and ``b`` ((x, y) pairs, distinct x)."""
    return a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0])


def site_savings(shares: Sequence[float], sites: Sequence[int], depth: int) -> list[float]:
    """Per site: the share of the model's block compute its drops remove, from the per-site shares of the
    prunable tokens kept: (1 - s_i) x (the prunable share alive before it) x (blocks after it) / depth.

    A block's work counted as proportional to its tokens, and each site's drops as if no later site pruned:
    an estimate from the calibration's own counts, no timing (the same on every machine).
    """
    alive, out = 1.0, []
    for share, layer in zip(shares, sites, strict=True):
        out.append((1.0 - share) * alive * (depth - layer) / depth)
        alive *= share
    return out


@dataclass(frozen=True)
class CalibrationPoint:
    """How the scorer, told ``flops``, meets it on the calibration data."""

    flops: float
    """The target FLOPs ratio (the scorer's budget input)."""
    threshold: float
    """Logit threshold at which the mean FLOPs ratio over the calibration data equals ``flops``."""
    keep_ratio: list[float]
    """Mean share of the prunable alive tokens kept at each site at that threshold."""
    reached: bool = True
    """False when no threshold brought the mean FLOPs ratio down to ``flops`` (the threshold is then the
    deepest cut tried, which runs above it). Artifacts written before this flag load as reached."""
    rule: str = "keep_ratio"
    """The rule ``prune(model, scorer, flops=f)`` runs by default near this target: the one of the two
    (threshold, keep_ratio) that scored higher on the calibration data, the threshold only by more than
    ``RULE_MARGIN`` (issue #23). Artifacts written before the choice was made load as keep_ratio, the
    default they ran with."""
    quality: dict[str, float] = field(default_factory=dict)
    """Rule -> its quality on the calibration data at this target (mean cosine to the unpruned output for
    encoders; accuracy, else agreement with the unpruned model, for classifiers); where the calibration data
    held several kinds of input (retrieval: passages, queries), also "rule@k" -> its quality on kind k."""
    plan: float | None = None
    """keep_ratio's scale: the FLOPs ratio on a full-length input whose per-site shares (``keep_ratio``
    stretched, :func:`policy_prune.core.inference.static_ratios`) execute ``flops`` on the calibration
    batches (runs calibrated since the whole split was counted: at most ``flops`` on every batch of it). None in
    artifacts written before it was measured: the plan is then ``flops`` itself."""
    spent: dict[str, float] = field(default_factory=dict)
    """Rule -> the FLOPs ratio it executed on the calibration batches at this target (keep_ratio: on the whole
    split, where it was counted); "keep_ratio@task" -> what the plan of ``plans[task]`` executes on that kind's
    batches alone."""
    idle: list[int] = field(default_factory=list)
    """Sites (indices into the scorer's sites) that keep every token at this target, so no scorer runs at
    them: the tokens the policy dropped there, with the threshold or with keep_ratio's plan, would save less
    than ``IDLE_SAVING`` of the blocks' work (:func:`site_savings`; a scorer pass costs far more wall-clock time
    than the FLOPs of the few tokens it would drop). The threshold was solved with them idle, and keep_ratio's
    plan with them and those of ``idle_keep_ratio``."""
    idle_keep_ratio: list[int] | None = None
    """keep_ratio's idle sites where they are more than ``idle`` (None: the same): its plan stretches the
    threshold's shares to the target and can keep nearly every token at a site the threshold still scores,
    so the idle rule is applied to its own shares too, kept only where its quality holds. Per rule: a site
    idled for keep_ratio's sake need not cost the threshold anything (artifacts written before load as None)."""
    plans: dict[str, float] = field(default_factory=dict)
    """Task (a kind of input of ``TASKS``) -> keep_ratio's scale solved on that kind alone: the largest plan
    (the same shares and idle sites) that executes at most ``flops`` on every val batch of it. Retrieval
    calibrations only (empty otherwise, and in artifacts written before)."""

    split: dict[str, float] = field(default_factory=dict)
    """Retrieval: task -> the FLOPs ratio its plan (``plans``) is asked for where ``flops`` is one total over queries
    and documents (``prune(..., split="total")``, the default): the pair, among query ratios from ``flops`` up in
    steps, with ``BudgetInput.query_share`` q + (1 - query_share) d = ``flops``, that retrieved best on val
    (recall@10 of the val passages for the val queries) among those whose passages stay close to their unpruned
    embeddings (:func:`policy_prune.core.calibration.solve_splits`); short queries kept fuller cost little of the
    total. Empty: no split (artifacts written before it, and non-retrieval runs)."""

    def idle_of(self, rule: str) -> list[int]:
        """The sites ``rule`` runs no scorer at (keep_ratio: ``idle_keep_ratio`` where it was recorded)."""
        return self.idle_keep_ratio if rule == "keep_ratio" and self.idle_keep_ratio is not None else self.idle


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
    """Sorted by ``flops``; empty before calibration (then no threshold is known)."""
    query_share: float | None = None
    """Retrieval calibrations with a split (``CalibrationPoint.split``): the queries' share of the unpruned FLOPs up
    to which one total of ``flops`` holds (``QUERY_SHARE`` by default); None without a split."""

    @classmethod
    def over(cls, low: float, high: float, calibration: list[CalibrationPoint] | None = None) -> BudgetInput:
        """The budget input of a scorer trained on targets in [low, high]: its default is 0.5, clamped to
        that range."""
        return cls(float(low), float(high), float(min(max(0.5, low), high)), list(calibration or []))

    def check(self, flops: float) -> float:
        """``flops`` as a float; ValueError outside the trained range (with a little rounding slack)."""
        f = float(flops)
        if not (self.low - 1e-6 <= f <= self.high + 1e-6):
            unpruned = "; flops=1 is the unpruned model: call the model itself" if abs(f - 1.0) < 1e-9 else ""
            raise ValueError(f"flops={f:g} is outside the budgets this scorer was trained on "
                             f"[{self.low:g}, {self.high:g}]{unpruned}")
        return f

    def threshold(self, flops: float) -> float:
        """Calibrated logit threshold at ``flops``: linear between the calibration points of the idle sites
        that run there (:meth:`regime`), extrapolated from its two nearest where ``flops`` lies past the last
        of them (half a calibration step at most); UserError without calibration (threshold 0 would run at
        whatever FLOPs the policy's own decisions give). A threshold solved with other sites idle is not
        interpolated with: it was solved for other scorer passes."""
        f = self.check(flops)
        if not self.calibration:
            raise UserError(f"this scorer's budget input is not calibrated, so no threshold is known for flops={f:g}: "
                            "use rule='keep_ratio' (the default with flops=...)")
        run = self.regime(f)
        xs, ts = [p.flops for p in run], [p.threshold for p in run]
        outside = f < self.calibration[0].flops or f > self.calibration[-1].flops  # clamped, as ever
        if len(run) == 1 or outside or xs[0] <= f <= xs[-1]:
            return float(np.interp(f, xs, ts))
        i = 0 if f < xs[0] else len(run) - 2  # towards a point with other idle sites: extend this run's line
        return on_line((xs[i], ts[i]), (xs[i + 1], ts[i + 1]), f)

    def regime(self, flops: float, rule: str = "threshold") -> list[CalibrationPoint]:
        """The run of consecutive calibration points with the idle sites of ``rule`` that run at ``flops``: those
        of the two points around it where both have the same, else those of the nearer one (on a tie, the one
        with more idle sites: fewer scorer passes). Empty without calibration."""
        f = float(flops)
        points = self.calibration
        if not points:
            return []
        idle = [set(p.idle_of(rule)) for p in points]
        right = next((i for i, p in enumerate(points) if p.flops >= f), len(points) - 1)
        left = max(right - 1, 0) if points[right].flops > f else right
        a, b = points[left], points[right]
        pick = right if (abs(b.flops - f), -len(idle[right])) < (abs(a.flops - f), -len(idle[left])) else left
        lo = hi = pick
        while lo > 0 and idle[lo - 1] == idle[pick]:
            lo -= 1
        while hi < len(points) - 1 and idle[hi + 1] == idle[pick]:
            hi += 1
        return points[lo:hi + 1]

    def reached(self, flops: float) -> bool:
        """Whether the calibration points that :meth:`threshold` interpolates at ``flops`` all reached their
        targets (True without calibration: nothing was missed)."""
        f = self.check(flops)
        if not self.calibration:
            return True
        missed = [0.0 if p.reached else 1.0 for p in self.calibration]
        return float(np.interp(f, [p.flops for p in self.calibration], missed)) <= 1e-9

    def check_reached(self, flops: float) -> None:
        """UserError when the calibrated threshold at ``flops`` did not meet it on the calibration data."""
        if not self.reached(flops):
            lowest = min((p.flops for p in self.calibration if p.reached), default=None)
            floor = "it reached none of its targets" if lowest is None else f"the lowest target it reached is {lowest:g}"
            raise UserError(f"flops={float(flops):g} with rule='threshold': calibration could not bring this scorer down "
                            f"to that FLOPs ratio ({floor}); ask for a larger flops, or use rule='keep_ratio'")

    def plan(self, flops: float, task: str | None = None) -> float:
        """keep_ratio's calibrated scale at ``flops`` (linear between calibration points; ``flops`` itself
        without calibration or for points calibrated before plans were measured). ``task``: the scale solved
        on that kind of input alone (:attr:`tasks`; UserError for one the calibration has no plan for), linear
        between the points of keep_ratio's :meth:`regime` at ``flops``: at most ``flops`` on that kind's
        calibration batches at a calibration point, about ``flops`` between two. Between two points whose idle sites
        differ, ``flops`` lies beyond its regime's points: there the nearest point's plan moves with ``flops`` (its
        offset from its target kept), rather than staying at that point's plan (which ran the target of the point,
        0.35, for a document part asked 0.33)."""
        f = self.check(flops)
        if task is not None:
            self._check_task(task)
        if not self.calibration:
            return f
        xs = [p.flops for p in self.calibration]
        if task is not None:  # between the points solved with the idle sites that run at f (a plan is solved for them)
            run = self.regime(f, "keep_ratio")
            return f + float(np.interp(f, [p.flops for p in run], [p.plans[task] - p.flops for p in run]))
        return float(np.interp(f, xs, [p.flops if p.plan is None else p.plan for p in self.calibration]))

    def _check_task(self, task: str) -> None:
        """UserError unless the calibration has a plan for ``task``."""
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}: one of {', '.join(repr(t) for t in TASKS)}")
        if task not in self.tasks:
            have = f"its tasks are {', '.join(self.tasks)}" if self.tasks else \
                "it was calibrated on one kind of input" if self.calibration else "it is not calibrated"
            raise UserError(f"task={task!r}: this scorer's calibration has no plan for it ({have}); a retrieval run "
                            "calibrated again (policy-prune export RUN --calibrate) has 'document' and 'query'")

    @property
    def tasks(self) -> list[str]:
        """The kinds of input every calibration point has a keep_ratio plan of its own for (in ``TASKS`` order)."""
        return [t for t in TASKS if self.calibration and all(t in p.plans for p in self.calibration)]

    @property
    def splits(self) -> bool:
        """Whether every calibration point has a split of one total between every task (:attr:`tasks`)."""
        return bool(self.tasks) and self.query_share is not None and \
            all(set(p.split) == set(self.tasks) for p in self.calibration)

    def task_flops(self, flops: float, task: str) -> float:
        """The FLOPs ratio ``task``'s plan is asked for where ``flops`` is one total over queries and documents
        (linear between the calibration points' splits: their total at ``query_share`` stays ``flops``);
        ``flops`` itself without a split."""
        f = self.check(flops)
        self._check_task(task)
        if not self.splits:
            return f
        return float(np.interp(f, [p.flops for p in self.calibration], [p.split[task] for p in self.calibration]))

    def _gaps(self, rule: str) -> list[float]:
        """Per calibration point, how far above its target ``rule`` ran (0 where it was not recorded)."""
        return [p.spent.get(rule, p.flops) - p.flops for p in self.calibration]

    def _over(self, f: float, rule: str) -> float:
        """How far above its target ``rule`` ran on the calibration batches, interpolated at ``f``."""
        return float(np.interp(f, [p.flops for p in self.calibration], self._gaps(rule)))

    def check_spent(self, flops: float, rule: str, slack: float = SLACK, task: str | None = None) -> None:
        """UserError when ``rule`` (with ``task``: its plan for that kind of input, on that kind's batches alone)
        executed more than ``flops`` + ``slack`` on the calibration batches at the calibration points around
        ``flops`` (points that did not record it count as met)."""
        f = self.check(flops)
        if not self.calibration:
            return
        key = rule if task is None else f"{rule}@{task}"
        if self._over(f, key) > slack:
            met = [p.flops for p, gap in zip(self.calibration, self._gaps(key), strict=True) if gap <= slack]
            floor = f"the lowest target it met is {min(met):g}" if met else "it met none of its targets"
            on = "" if task is None else f" on {task} inputs alone"
            raise UserError(f"flops={f:g} with rule={rule!r}{on}: on the calibration data this scorer runs above that "
                            f"FLOPs ratio ({floor}); ask for a larger flops")

    def rule(self, flops: float) -> str:
        """The default rule at ``flops``: that of the nearest calibration point (keep_ratio without any), or the
        other rule where only that one met its targets around ``flops`` on the calibration data."""
        f = self.check(flops)
        if not self.calibration:
            return "keep_ratio"
        rule = min(self.calibration, key=lambda p: (abs(p.flops - f), p.flops)).rule
        # The other rule where the chosen one did not meet the target on the calibration data and it did.
        if rule == "threshold" and not self.reached(f):
            return "keep_ratio"
        if rule == "keep_ratio" and self._over(f, "keep_ratio") > SLACK and self.reached(f) \
                and self._over(f, "threshold") <= SLACK:
            return "threshold"
        return rule

    def idle(self, flops: float, n_sites: int, rule: str = "threshold") -> list[bool]:
        """Per site: whether ``rule`` runs no scorer there at ``flops``: idle at the calibration points of
        :meth:`regime` (those on both sides where they agree, else the nearer one's); all False without calibration."""
        f = self.check(flops)
        run = self.regime(f, rule)
        return [bool(run) and i in run[0].idle_of(rule) for i in range(n_sites)]

    def keep_ratios(self, flops: float) -> list[float] | None:
        """Calibrated per-site keep shares at ``flops`` (None without calibration)."""
        f = self.check(flops)
        if not self.calibration:
            return None
        xs = [p.flops for p in self.calibration]
        per_site = np.array([p.keep_ratio for p in self.calibration])  # [K, S]
        return [float(np.interp(f, xs, per_site[:, s])) for s in range(per_site.shape[1])]

    def to_json(self) -> dict[str, Any]:
        share = {} if self.query_share is None else {"query_share": self.query_share}
        return {"input": "flops", "low": self.low, "high": self.high, "default": self.default, **share,
                "calibration": [asdict(p) for p in self.calibration]}

    @staticmethod
    def from_json(data: Any, n_sites: int | None = None) -> BudgetInput:
        """From :meth:`to_json` output; ValueError (with the reason) on anything malformed. ``n_sites``: the
        scorer's sites, which every calibration point's per-site shares and idle sites must fit."""
        try:
            if data["input"] != "flops":
                raise ValueError(f"unknown budget input {data['input']!r}")
            points = [CalibrationPoint(float(p["flops"]), float(p["threshold"]), [float(r) for r in p["keep_ratio"]],
                                       bool(p.get("reached", True)), str(p.get("rule", "keep_ratio")),
                                       {str(k): float(v) for k, v in p.get("quality", {}).items()},
                                       None if p.get("plan") is None else float(p["plan"]),
                                       {str(k): float(v) for k, v in p.get("spent", {}).items()},
                                       [int(i) for i in p.get("idle", [])],
                                       None if p.get("idle_keep_ratio") is None else [int(i) for i in p["idle_keep_ratio"]],
                                       {str(k): float(v) for k, v in p.get("plans", {}).items()},
                                       {str(k): float(v) for k, v in p.get("split", {}).items()})
                      for p in data.get("calibration", [])]
            if bad := [p.rule for p in points if p.rule not in ("threshold", "keep_ratio")]:
                raise ValueError(f"unknown calibrated rule {bad[0]!r} (threshold or keep_ratio)")
            if bad := [t for p in points for t in (*p.plans, *p.split) if t not in TASKS]:
                raise ValueError(f"unknown calibrated task {bad[0]!r} ({' or '.join(TASKS)})")
            share = data.get("query_share")
            budget = BudgetInput(float(data["low"]), float(data["high"]), float(data["default"]),
                                 sorted(points, key=lambda p: p.flops), None if share is None else float(share))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed budget entry ({exc!r})") from None
        if not 0.0 < budget.low <= budget.default <= budget.high <= 1.0:
            raise ValueError(f"budget range must satisfy 0 < low <= default <= high <= 1, got {data!r}")
        if budget.query_share is not None and not 0.0 < budget.query_share < 1.0:
            raise ValueError(f"query_share must lie in (0, 1), got {budget.query_share!r}")
        if off := [p for p in points if any(not budget.low - 1e-6 <= v <= budget.high + 1e-6 for v in p.split.values())]:
            raise ValueError(f"calibration point {off[0].flops:g}: a split's FLOPs ratios must lie in the trained range "
                             f"[{budget.low:g}, {budget.high:g}], got {off[0].split}")
        split = [bool(p.split) for p in points]
        if any(split) and (not all(split) or budget.query_share is None or not budget.splits):
            raise ValueError("a split of one total needs one on every calibration point, between every task it has a "
                             "plan for, and the budget's query_share")
        share = budget.query_share
        if share is not None and any(split) and (off := [p for p in points if abs(
                share * p.split["query"] + (1 - share) * p.split["document"] - p.flops) > 1e-4]):
            raise ValueError(f"calibration point {off[0].flops:g}: its split {off[0].split} is not one total of "
                             f"{off[0].flops:g} at query_share {share:g}")
        for p in points:
            numbers = [p.flops, p.threshold, *p.keep_ratio, *([] if p.plan is None else [p.plan]), *p.plans.values()]
            idle = [*p.idle, *(p.idle_keep_ratio or [])]
            if not all(math.isfinite(v) for v in numbers) or not all(0.0 <= r <= 1.0 for r in p.keep_ratio):
                raise ValueError(f"calibration point {p.flops:g}: flops, threshold and plan must be finite numbers and "
                                 f"keep_ratio shares in [0, 1], got {asdict(p)}")
            if n_sites is not None and (len(p.keep_ratio) != n_sites or not all(0 <= i < n_sites for i in idle)):
                raise ValueError(f"calibration point {p.flops:g}: keep_ratio needs one share per site ({n_sites}) and "
                                 f"idle sites indices below it, got {p.keep_ratio} and idle {idle}")
        return budget
