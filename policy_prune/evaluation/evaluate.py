"""``policy-prune eval``: learned scorers (one run per seed) vs every baseline at equal total FLOPs.

The protocol (issue #15):

1. Every operating point is solved on **val**: each method's keep ratios, threshold or ToMe schedule is
   the one whose total FLOPs (executed + selection, :mod:`policy_prune.evaluation.cost`) on val is at
   most the target and as close as the method's steps allow (:mod:`policy_prune.evaluation.solve`).
   The points are then scored on ``--split`` (test for reporting; val while developing). A baseline whose
   val point spends further than ``MATCH`` from its target there (rows of other lengths: minilm-text's test
   has more short queries per passage than val) and whose FLOPs follow from token counts alone is solved
   again on that split's counts (:func:`match_scored`: FLOPs only, no output or label read; marked
   "FLOPs matched on test"), so that every comparison is at equal FLOPs where a method can reach it.
2. Several runs (seeds) of one env are evaluated together: a row per seed, their mean and a 95%
   interval over the **units the split was drawn by** (``Split.unit_ids``: digits-cluttered's source
   digits; python-docs' modules and help topics, never rows or passages) and over the seeds
   (:mod:`policy_prune.evaluation.stats`: a bootstrap over the units, with the seeds' variance added).
3. At each target the **best baseline** is the one with the highest primary metric (accuracy, else
   cosine) on val at that target among those whose val point does not run more than ``MATCH`` above it
   (:func:`reaches_on_val`), so the choice does not look at the reported split. "learned minus
   best baseline" is paired over the same units, with the seeds' variance; the tables and the plot say
   "better" only where its interval lies above 0 (each seed's own verdict is listed beside it).
   The headline learned row is ``learned-deployed``: exactly ``prune(model, scorer, flops=f)``, its
   default rule, values and batching (:class:`~policy_prune.evaluation.baselines.DeployedMethod`).
4. Encoders whose split carries a retrieval task (``Split.queries``, python-docs): every method at
   every point encodes the queries as well as the passages (a user swaps the encoder for both) and is
   scored per query by recall@10 and nDCG@10 (also with the unpruned model's queries or passages, free:
   those are encoded once). Their intervals resample the **queries'** units, and each has its own
   "learned minus best baseline", the baseline chosen on val by that metric.
   Queries are inside the budget: every point is solved on val for one total over passages and queries. The
   deployed call of a scorer whose calibration splits one total (``CalibrationPoint.split``) runs its passages
   through ``prune(..., flops=f, task="document")`` and its queries through ``task="query"``, as a pruned
   SentenceTransformer's ``encode_document`` / ``encode_query`` do; ``--query-target`` gives each part its own
   budget instead (``split="each"``).
5. Time per sample and speed-up over the unpruned model at batch 64 and batch 1 are measured round-robin
   per target in the same run, over batches (and single rows) spread over the split (``--repeats 0`` skips it).

Cost: every method point encodes the scored split (and val, to choose the best baseline), queries
included; ``--max-items N`` caps each split at N whole source items (``data.cap_groups``).

Writes ``pareto.json``, ``table.md``, ``pareto.png`` and ``kept.png`` (``kept.html`` for text; none where no
method was scored at the picture's target, e.g. ``--methods none``) to
RUN_DIR/eval (RUN_DIR/eval-val for --split val; runs/eval__<env>__<time>/ for several runs or --env).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from policy_prune.cli_args import at_least, between, non_negative, positive, ratio
from policy_prune.core.backbones.base import TokenBackbone
from policy_prune.core.ops import to_device, trim_padding
from policy_prune.embedded import DTYPE_NAMES, DTYPES, check_device
from policy_prune.errors import UserError
from policy_prune.evaluation.baselines import (
    BASELINES,
    BaselineOptions,
    Method,
    learned_methods,
    make_baseline,
)
from policy_prune.evaluation.cost import Work, flops_columns, flops_ratios
from policy_prune.evaluation.metrics import cosine_fidelity, neighbour_recall
from policy_prune.evaluation.retrieval import RetrievalEmbeddings, retrieval_values
from policy_prune.evaluation.solve import MATCH, SAME, BatchedCounts, Point, SolveContext
from policy_prune.evaluation.stats import bootstrap_difference, bootstrap_mean

DEFAULT_TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35)
METRICS = ("accuracy", "agreement", "cosine", "recall@10")
"""Task metrics in display order; classifiers have the first two, encoders the last two."""
RETRIEVAL = ("ret_ndcg@10", "ret_recall@10")
"""Retrieval metrics (per query) compared with the best baseline besides the primary, where the split
has a retrieval task; every method also has them with unpruned queries or passages (``:full_queries``,
``:full_passages``, see :mod:`policy_prune.evaluation.retrieval`)."""
RETRIEVAL_K = 10
LEARNED = ("learned-deployed", "learned-deployed-threshold", "learned", "learned-topk")
"""The ways a run's scorer is evaluated (``baselines.learned_methods``)."""
DEFAULT_LEARNED = ("learned-deployed", "learned", "learned-topk")
"""Those ``--learned`` runs unless told otherwise."""


# ---- data ---------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """One split in eval batches, with what every method is scored against."""

    name: str
    batches: list[tuple[Any, torch.Tensor | None]]
    counts: BatchedCounts
    teacher: torch.Tensor
    """[M, C] or [M, D]: the unpruned model's outputs."""
    labels: torch.Tensor | None
    groups: torch.Tensor
    """[M] the bootstrap's unit of each row: the unit the split was drawn by (``Split.unit_ids``: a
    source digit; a python-docs module or help topic)."""
    queries: EvalData | None = None
    """The split's retrieval queries, prepared the same way (their ``groups``: each query's item)."""
    relevant: torch.Tensor | None = None
    """[R, 2] (query row, passage row) relevant pairs in the rows of ``queries`` and of this split."""

    def __len__(self) -> int:
        return len(self.groups)

    def groups_of(self, metric: str) -> torch.Tensor:
        """[M] or [Q]: the units a metric's values are resampled by (retrieval: the queries')."""
        return self.queries.groups if self.queries is not None and metric.startswith("ret_") else self.groups


def _rows(x: Any) -> int:
    """Batch size of adapter inputs (a tensor or a tokenizer-style dict of tensors)."""
    return len(next(iter(x.values())) if isinstance(x, dict) else x)


def length_order(split: Any, length_sort: bool = True) -> torch.Tensor | None:
    """[M] text rows from shortest to longest (stable), or None (images, or ``length_sort`` off)."""
    if length_sort and isinstance(split.inputs, dict) and "attention_mask" in split.inputs:
        return split.inputs["attention_mask"].sum(dim=1).argsort(stable=True)
    return None


def prepare(backbone: TokenBackbone, split: Any, batch_size: int, device: str, length_sort: bool = True) -> EvalData:
    """Batches, token counts, the teacher's outputs, labels and groups of a split (and of its retrieval
    queries, when it has them).

    ``length_sort``: text rows are batched in order of length, as ``SentenceTransformer.encode`` batches
    them, so a batch pads little (in split order a batch of passages pads to its longest row: the
    unpruned model then executes about 3x its rows' own FLOPs on python-docs). Images are unaffected.
    """
    if (order := length_order(split, length_sort)) is not None:
        split = split.select(order)  # the relevant pairs follow the passages
    idx = torch.arange(len(split))
    parts = [split.select(i) for i in idx.split(batch_size)]
    batches = [(trim_padding(to_device(p.inputs, device)), None if p.labels is None else p.labels.to(device)) for p in parts]
    with torch.inference_mode():
        states = [backbone.embed(x) for x, _ in batches]
        teacher = torch.cat([backbone(x).float().cpu() for x, _ in batches])
    n0 = torch.cat([s.alive_counts.cpu() for s in states])
    prot = torch.cat([(s.protected & s.valid).sum(dim=1).cpu() for s in states])
    batch = torch.cat([torch.full((_rows(x),), i, dtype=torch.long) for i, (x, _) in enumerate(batches)])
    n_full = max(s.n_full for s in states)
    data = EvalData(split.name, batches, BatchedCounts(n0, prot, n_full, batch), teacher,
                    None if split.labels is None else split.labels.cpu(), split.unit_ids().cpu())
    if split.queries is not None and split.relevant is not None:
        queries, relevant = split.queries, split.relevant
        if (order := length_order(queries, length_sort)) is not None:
            queries = queries.select(order)
            relevant = torch.stack([order.argsort()[relevant[:, 0]], relevant[:, 1]], dim=1)
        data.queries, data.relevant = prepare(backbone, queries, batch_size, device, length_sort=False), relevant
    return data


# ---- metrics --------------------------------------------------------------------------------------------
def row_metrics(kind: str, out: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """[M] per-row values: classifiers' accuracy (vs labels) and agreement (with the unpruned model);
    encoders' cosine to the unpruned embedding and recall@10 (share of the row's 10 nearest neighbours
    among the unpruned embeddings that the pruned embedding retrieves)."""
    if kind == "logits":
        res = {"agreement": (out.argmax(-1) == teacher.argmax(-1)).double()}
        if labels is not None:
            res = {"accuracy": (out.argmax(-1) == labels).double(), **res}
        return res
    return {"cosine": cosine_fidelity(out, teacher).double(), "recall@10": neighbour_recall(out, teacher, 10)}


def primary_metric(kind: str, has_labels: bool) -> str:
    """The metric methods are ranked and compared on: accuracy, else agreement, else cosine."""
    return ("accuracy" if has_labels else "agreement") if kind == "logits" else "cosine"


# ---- evaluation -----------------------------------------------------------------------------------------
@dataclass
class Scored:
    """One method at one point on one split: its per-row values and its Work."""

    method: Method
    point: Point
    values: dict[str, torch.Tensor]
    """Metric -> [M] per row, or [Q] per query for the retrieval metrics (``ret_``)."""
    work: Work
    query_work: Work | None = None
    """What encoding the retrieval queries ran (None: no retrieval task)."""


def run_method(backbone: TokenBackbone, method: Method, point: Point, data: EvalData) -> tuple[torch.Tensor, Work]:
    """Outputs [M, C] or [M, D] (float32, CPU) and the Work of ``method`` at ``point`` over ``data``."""
    outs, works = [], []
    with torch.inference_mode():
        for x, _ in data.batches:
            out, work = method.forward(backbone, x, point)
            outs.append(out.float().cpu())
            works.append(work)
    return torch.cat(outs), Work.cat(works)


def score(backbone: TokenBackbone, method: Method, point: Point, data: EvalData) -> Scored:
    """Run ``method`` at ``point`` over every batch of ``data``, and over its retrieval queries: a user
    who swaps in the pruned encoder embeds the corpus and the queries with it (the headline ``ret_``
    metrics); the unpruned embeddings of either side give the mixed settings at no extra encoding."""
    out, work = run_method(backbone, method, point, data)
    values = row_metrics(backbone.output_kind, out, data.teacher, data.labels)
    if data.queries is None or data.relevant is None:
        return Scored(method, point, values, work)
    queries, query_work = run_method(backbone, method, point.queries or point, data.queries)
    full = RetrievalEmbeddings(data.queries.teacher, data.teacher)
    values.update(retrieval_values(data.relevant, RetrievalEmbeddings(queries, out), full, RETRIEVAL_K))
    return Scored(method, point, values, work, query_work)


def solve_context(backbone: TokenBackbone, val: EvalData, kind: str | None = None) -> SolveContext:
    """What methods reach their targets on: the val rows and, with a retrieval task, the val queries too,
    so that one total over queries and passages meets the target (a user's encoder embeds both). ``kind``:
    ``val`` is that kind of input alone, given a budget of its own (``SolveContext.kind``)."""
    parts = [val] if val.queries is None else [val, val.queries]
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + len(p.batches))
    counts = BatchedCounts(torch.cat([p.counts.n0 for p in parts]), torch.cat([p.counts.protected for p in parts]),
                           max(p.counts.n_full for p in parts),
                           torch.cat([p.counts.batch + o for p, o in zip(parts, offsets, strict=True)]))
    return SolveContext(backbone, counts, [b for p in parts for b in p.batches], kind,
                        offsets[1] if len(parts) > 1 else None)


def operating_points(method: Method, ctx: SolveContext, targets: Sequence[float],
                     queries: tuple[SolveContext, float | None] | None = None) -> list[Point]:
    """The method's points: each target solved on val, then its own points (or "none" once). ``queries``
    (their context and target; None: each point's own target): the queries' own point goes with every solved
    point (none where the method has no point for the queries: the reason is in ``method.unsolved``)."""
    if not method.sweeps:
        return [Point("none")]
    solved = [p for p in (method.solve(ctx, t) for t in targets) if p is not None]
    if queries is not None:
        q_ctx, q_target = queries
        for_queries = functools.cache(lambda t: method.solve(q_ctx, t))
        with_queries = [(p, for_queries(p.target if q_target is None else q_target)) for p in solved]
        solved = [replace(p, queries=q) for p, q in with_queries if q is not None]
    return solved + method.own(targets)


def evaluate(backbone: TokenBackbone, splits: dict[str, Any], methods: Sequence[Method], targets: Sequence[float],
             split: str = "test", batch_size: int = 64, device: str = "cpu", repeats: int = 3, n_boot: int = 2000,
             seed: int = 0, progress: Callable[[str], None] | None = None, length_sort: bool = True,
             query_target: float | str | None = None) -> dict[str, Any]:
    """Every method at every target (solved on val) scored on ``split``; the pareto.json payload.

    ``query_target`` (retrieval): the queries get a budget of their own. Each method's queries run its point
    solved on the val queries alone for at most ``query_target`` of their FLOPs (the deployed call:
    ``prune(..., flops=query_target, task="query", split="each")``, where the scorer has that plan), its passages the point solved on the val passages alone for each
    target; ``"same"`` (SAME): the queries' point is solved for each target too (each part at most the target);
    None: one point per target, solved for one total over both.

    ``methods``: baselines (``run`` None) and learned methods (``run`` = the seed's label).
    Returns {"split", "n_samples", "n_groups", "runs", "sites", "targets", "signature", "output_kind",
    "primary", "results": [row], "summary": [...], "comparisons": [...]}.
    """
    say = progress or (lambda text: None)
    val = prepare(backbone, splits["val"], batch_size, device, length_sort)
    data = val if split == "val" else prepare(backbone, splits[split], batch_size, device, length_sort)
    if query_target is not None and (data.queries is None or val.queries is None):
        raise UserError("--query-target gives retrieval queries a budget of their own: this split has no queries")

    def contexts(d: EvalData) -> tuple[SolveContext, SolveContext | None]:
        """Where points are solved on ``d``: (its rows with its queries, None), or with a query budget of their
        own (its rows alone, its queries alone)."""
        if query_target is None or d.queries is None:
            return solve_context(backbone, d), None
        return (solve_context(backbone, replace(d, queries=None, relevant=None), kind="document"),
                solve_context(backbone, d.queries, kind="query"))

    ctx, query_ctx = contexts(val)
    scored_ctx = None if data is val else contexts(data)  # to match off-target baselines' FLOPs
    primary = primary_metric(backbone.output_kind, data.labels is not None)
    compared = [primary, *(RETRIEVAL if data.queries is not None and val.queries is not None else ())]
    scored: list[Scored] = []
    own_target = None if query_target is None or query_target == SAME else float(query_target)
    queries = None if query_ctx is None else (query_ctx, own_target)
    for m in methods:
        say(f"solving {m.name}{'' if m.run is None else ' ' + m.run} on val")
        for point in operating_points(m, ctx, targets, queries):
            s = score(backbone, m, point, data)
            scored.append(s if scored_ctx is None else match_scored(backbone, s, data, *scored_ctx))
    say("choosing the best baseline per target on val")
    best = best_baselines(backbone, scored, val, data, compared)
    rows = [result_row(backbone, s, data, primary, n_boot, seed) for s in scored]
    if repeats > 0:
        say("timing")
        add_timing(backbone, scored, rows, data, repeats, device)
    runs = list(dict.fromkeys(m.run for m in methods if m.run is not None))
    notes = [f"{m.name}{'' if m.run is None else ' ' + m.run} has no point at {t:g}: {why}"
             for m in methods for t, why in m.unsolved.items()] + list(dict.fromkeys(note for m in methods for note in m.notes))
    retrieval = {} if data.queries is None else {
        "n_queries": len(data.queries), "n_query_groups": int(data.queries.groups.unique().numel())}
    spent = [r["flops"]["total"] for r in rows]  # each scored point's total, as the comparisons weigh FLOPs
    return {
        "split": data.name, "n_samples": len(data), "n_groups": int(data.groups.unique().numel()), **retrieval,
        "runs": runs,
        "sites": sorted({s for m in methods for s in m.sites}), "targets": list(targets), "batch_size": batch_size,
        "length_sorted": length_sort and isinstance(splits[split].inputs, dict),
        "signature": backbone.signature(), "output_kind": backbone.output_kind, "primary": primary,
        "query_target": query_target,
        "compared": compared, "n_boot": n_boot, "results": rows, "notes": notes,
        "summary": summaries(scored, data, primary, n_boot, seed),
        "comparisons": comparisons(scored, spent, best, data, n_boot, seed),
        "group_comparisons": group_comparisons(scored, spent, compared, data, n_boot, seed),
    }


def scored_ratios(backbone: TokenBackbone, s: Scored) -> dict[str, float]:
    """``flops_ratios`` of what ``s`` ran: with a retrieval task one total over the passages and the queries."""
    return flops_ratios(backbone, s.work if s.query_work is None else Work.cat([s.work, s.query_work]))


def match_scored(backbone: TokenBackbone, s: Scored, data: EvalData, ctx: SolveContext,
                 query_ctx: SolveContext | None = None) -> Scored:
    """``s`` scored again at a point solved on ``data``'s own token counts (``ctx``), where ``s`` is a baseline's
    val point whose total on ``data`` is further than MATCH from its target and whose method's FLOPs follow
    from token counts alone (``Method.counts_only``); ``s`` itself otherwise, or where no point comes within
    MATCH on ``data`` either (out of the method's reach: still flagged).

    A split of other lengths than val moves what such a point spends (text rows keep whole tokens, EViT adds
    a fused token, ToMe merges in rounds: short rows spend more; minilm-text's test has more short queries per
    passage than its val), and a comparison at unequal FLOPs is not one. Only FLOPs are matched: the solve
    reads ``data``'s lengths, never an output or a label, and the best baseline is still chosen by the val
    point (``Point.on_val``). Learned methods are never matched: they are scored as calibrated or solved.
    Where the queries have a point of their own (``query_ctx``: ``data``'s queries), each part is matched on
    its own (``ctx``: ``data``'s rows alone)."""
    if s.point.target is None or s.method.run is not None or not s.method.counts_only:
        return s
    if s.point.queries is None:
        point = _rematched(s.method, scored_ratios(backbone, s)["total"], s.point, ctx)
    else:
        assert query_ctx is not None and s.query_work is not None
        rows = _rematched(s.method, flops_ratios(backbone, s.work)["total"], s.point, ctx)
        queries = _rematched(s.method, flops_ratios(backbone, s.query_work)["total"], s.point.queries, query_ctx)
        point = None if rows is None and queries is None else replace(rows or s.point, queries=queries or s.point.queries)
    return s if point is None else score(backbone, s.method, replace(point, matched=data.name, replaces=s.point), data)


def _rematched(method: Method, spent: float, point: Point, ctx: SolveContext) -> Point | None:
    """``point`` solved again on ``ctx`` where it ``spent`` further than MATCH from its target and the new
    point comes within MATCH of it; None otherwise."""
    assert point.target is not None
    if abs(spent - point.target) <= MATCH:
        return None
    again = method.solve(ctx, point.target)
    return again if again is not None and again.solved is not None and abs(again.solved - point.target) <= MATCH else None


def best_baselines(backbone: TokenBackbone, scored: Sequence[Scored], val: EvalData, data: EvalData,
                   metrics: Sequence[str]) -> dict[str, dict[float, str]]:
    """Metric -> target -> the baseline with the highest mean of that metric on val at that target
    (ties: first registered), among the baselines whose val point does not run more than MATCH above the
    target (:func:`reaches_on_val`; all of them where none does). A baseline that cannot bring its FLOPs down to
    a target on val (ToMe's queries under ``--query-target same``: merge rounds leave a short query 0.43 of its
    FLOPs at best) spends more than the others there, and a comparison at unequal FLOPs is not one: it stays in
    the tables, flagged, but is not the one the learned methods are measured against."""
    best: dict[str, dict[float, tuple[bool, float, str]]] = {m: {} for m in metrics}
    for s in scored:
        if s.method.run is not None or s.point.target is None:
            continue
        reached = reaches_on_val(s.point.on_val)
        on_val = s if data is val else score(backbone, s.method, s.point.on_val, val)
        for metric, at in best.items():
            value = float(on_val.values[metric].mean())
            if s.point.target not in at or (reached, value) > at[s.point.target][:2]:
                at[s.point.target] = (reached, value, s.method.name)
    return {m: {t: name for t, (_, _, name) in at.items()} for m, at in best.items()}


def reaches_on_val(point: Point) -> bool:
    """Whether a point solved on val spent at most MATCH above its target there (each part, where the retrieval
    queries have a point of their own; spending less is no advantage); points without a val measure count as
    reaching it."""
    parts = [point] if point.queries is None else [point, point.queries]
    return all(p.solved is None or p.target is None or p.solved <= p.target + MATCH for p in parts)


def intervals(values: dict[str, torch.Tensor], data: EvalData, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Metric -> its mean and 95% interval (values [M] / [Q], or [S, M] / [S, Q] for S seeds), each
    over the units of its rows (passages) or of its queries (retrieval)."""
    return {k: bootstrap_mean(v, data.groups_of(k), n_boot, seed).to_json() for k, v in values.items()}


def result_row(backbone: TokenBackbone, s: Scored, data: EvalData, primary: str, n_boot: int, seed: int) -> dict[str, Any]:
    """One table row: the point, its FLOPs columns on the scored split, the metrics and their intervals
    (``interval``: the primary's). With a retrieval task ``flops`` is one total over the passages and the
    queries (what the point was solved to meet on val), ``flops_passages`` / ``flops_queries`` each part."""
    ratios = scored_ratios(backbone, s)
    target = s.point.target
    queries = {} if s.query_work is None else {"flops_passages": flops_ratios(backbone, s.work),
                                               "flops_queries": flops_ratios(backbone, s.query_work)}
    if s.point.queries is None or not queries or target is None:
        on_target = target is None or abs(ratios["total"] - target) <= MATCH
    elif s.point.queries.split == "total":  # one total split between the parts: at most the target (below it where
        on_target = ratios["total"] <= target + MATCH  # the queries carry less than the split's bound on their share)
    else:  # each part on its own budget
        q_target = s.point.queries.target
        assert q_target is not None
        on_target = (abs(queries["flops_passages"]["total"] - target) <= MATCH
                     and abs(queries["flops_queries"]["total"] - q_target) <= MATCH)
    ci = intervals(s.values, data, n_boot, seed)
    return {
        "method": s.method.name, "run": s.method.run, "target": target, "rule": s.point.rule, "told": s.point.budget,
        "values": s.point.values, "point": s.point.label(), "sites": s.method.sites, "solved_val": s.point.on_val.solved,
        "matched_on": s.point.matched, "on_target": on_target,
        "query_values": None if s.point.queries is None else s.point.queries.values, "flops": ratios, **queries,
        "gflops_total": float(flops_columns(backbone, s.work)["total"].mean()) / 1e9,
        "tokens": [float(c) for c in s.work.attn.double().mean(dim=0)],
        **{k: float(v.mean()) for k, v in s.values.items()}, "interval": ci[primary], "intervals": ci,
    }


def _group_key(s: Scored) -> tuple[str, float | None, str, float | None]:
    """One method at one target (its seeds together, whatever rule each seed's calibration chose), or at one
    own point (a rule and, for a budgeted scorer, the budget told)."""
    own = s.point.target is None
    return s.method.name, s.point.target, s.point.rule if own else "", s.point.budget if own else None


def summaries(scored: Sequence[Scored], data: EvalData, primary: str, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per (method, target): the seeds' mean of every metric, with every metric's interval (seeds
    averaged row by row; ``interval``: the primary's)."""
    by: dict[tuple[str, float | None, str, float | None], list[Scored]] = {}
    for s in scored:
        by.setdefault(_group_key(s), []).append(s)
    out = []
    for (name, target, _, told), items in by.items():
        stacked = {k: torch.stack([s.values[k] for s in items]) for k in items[0].values}
        ci = intervals(stacked, data, n_boot, seed)
        rule = "/".join(sorted({s.point.rule for s in items}))  # the deployed call's seeds may each run their own
        out.append({"method": name, "target": target, "rule": rule, "told": told, "n_runs": len(items),
                    "learned": items[0].method.run is not None, **{k: float(v.mean()) for k, v in stacked.items()},
                    "interval": ci[primary], "intervals": ci})
    return out


def comparisons(scored: Sequence[Scored], spent: Sequence[float], best: dict[str, dict[float, str]], data: EvalData,
                n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per compared metric, target and learned method: learned (seeds averaged) minus the best baseline
    on that metric, paired over the metric's units (passages', or queries'), with the seeds' variance.

    ``spent``: each scored point's total FLOPs ratio on the scored split. A verdict in favour of the side
    that spent more than :data:`MATCH` above the other is "unequal FLOPs" (overall and per seed).
    """
    total = {id(s): f for s, f in zip(scored, spent, strict=True)}
    out = []
    for metric, at in best.items():
        for target, baseline in sorted(at.items(), reverse=True):
            base = next(s for s in scored if s.method.name == baseline and s.point.target == target and s.method.run is None)
            learned: dict[str, list[Scored]] = {}
            for s in scored:
                if s.method.run is not None and s.point.target == target:
                    learned.setdefault(s.method.name, []).append(s)
            for name, items in learned.items():
                groups = data.groups_of(metric)
                diff = bootstrap_difference(torch.stack([s.values[metric] for s in items]), base.values[metric],
                                            groups, n_boot, seed)
                mine = mean_spent(items, total)
                per_seed = [fair(bootstrap_difference(s.values[metric], base.values[metric], groups, n_boot, seed).verdict,
                                 total[id(s)], total[id(base)]) for s in items]
                out.append({"metric": metric, "target": target, "method": name, "baseline": baseline,
                            "n_runs": len(items), "difference": diff.to_json(),
                            "verdict": fair(diff.verdict, mine, total[id(base)]), "per_seed": per_seed,
                            "flops": mine, "baseline_flops": total[id(base)]})
    return out


def mean_spent(items: Sequence[Scored], total: dict[int, float]) -> float:
    """The mean scored total FLOPs of one method's seeds (``total``: by ``id`` of each scored point)."""
    return sum(total[id(s)] for s in items) / len(items)


def fair(verdict: str, mine: float, theirs: float) -> str:
    """``verdict`` (of mine minus theirs), or "unequal FLOPs" where the side it favours spent more than
    :data:`MATCH` above the other."""
    if (verdict == "better" and mine > theirs + MATCH) or (verdict == "worse" and theirs > mine + MATCH):
        return "unequal FLOPs"
    return verdict


def group_comparisons(scored: Sequence[Scored], spent: Sequence[float], metrics: Sequence[str], data: EvalData,
                      n_boot: int, seed: int) -> list[dict[str, Any]]:
    """With named groups of runs (``NAME=RUN_DIR``): per metric and target, each kind of learned method
    ("learned", "learned-topk") of the first group minus the same kind of every other group, each group's
    seeds averaged row by row, paired over the metric's units (with both groups' seed variances).
    ``spent`` as for :func:`comparisons`: a verdict for the group that spent more than :data:`MATCH` above
    the other is "unequal FLOPs"."""
    total = {id(s): f for s, f in zip(scored, spent, strict=True)}
    by: dict[tuple[str, float], dict[str, list[Scored]]] = {}
    for s in scored:
        if s.method.run is not None and s.point.target is not None:
            kind = s.method.name.partition("[")[0]
            by.setdefault((kind, s.point.target), {}).setdefault(s.method.name, []).append(s)
    out = []
    for metric in metrics:
        for (_kind, target), groups in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            names = list(groups)
            for other in names[1:]:
                diff = bootstrap_difference(torch.stack([s.values[metric] for s in groups[names[0]]]),
                                            torch.stack([s.values[metric] for s in groups[other]]),
                                            data.groups_of(metric), n_boot, seed)
                mine, theirs = mean_spent(groups[names[0]], total), mean_spent(groups[other], total)
                out.append({"metric": metric, "target": target, "method": names[0], "other": other,
                            "n_runs": [len(groups[names[0]]), len(groups[other])], "difference": diff.to_json(),
                            "verdict": fair(diff.verdict, mine, theirs), "flops": mine, "other_flops": theirs})
    return out


# ---- wall-clock -----------------------------------------------------------------------------------------
B1_REPEATS = 5
"""Batch-1 timings take this many times ``--repeats`` (a row alone is short and noisier on a shared CPU)."""
TIMED_BATCHES = 3
"""Eval-batch timings run this many batches in turn, spread evenly over the split (text is length-sorted:
its length quantiles), so one batch's lengths do not decide the column (a split of a few batches may give
its last, partial one: ms per sample still divides by the rows timed)."""
B1_ROWS = 8
"""Batch-1 timings run the first row of this many batches spread the same way, one row per call: on text a
single row's length (and how its keep counts round) would decide the column."""


def spread(batches: Sequence[Any], k: int) -> list[Any]:
    """``k`` of ``batches`` at evenly spaced quantiles of their order (k = 1: the middle one)."""
    return [batches[int((j + 0.5) * len(batches) / k)] for j in range(k)]


def in_turn(calls: Sequence[Callable[[], Any]]) -> Callable[[], None]:
    """One call that makes each of ``calls`` in order."""

    def run() -> None:
        for call in calls:
            call()

    return run


def add_timing(backbone: TokenBackbone, scored: Sequence[Scored], rows: list[dict[str, Any]], data: EvalData,
               repeats: int, device: str, warmup: int = 1) -> None:
    """ms per sample at the eval batch size and at batch 1, per target group, timed round-robin with the
    unpruned model (``bench.time_round_robin``: warm-up, then one call of each per repeat, median; batch 1
    ``B1_REPEATS`` times as many): at the eval batch size over ``TIMED_BATCHES`` batches spread over the split,
    at batch 1 over the first rows of ``B1_ROWS`` such batches (each row its own call), so the time per
    sample averages typical lengths. Each method's ``timed`` call: the deployed row times the public
    ``PrunedModel`` itself, scorer baselines their scorer and rule, EViT and ToMe their eval forward."""
    from policy_prune.evaluation.bench import time_round_robin

    batches = [x for x, _ in data.batches]
    x64 = spread(batches, TIMED_BATCHES)
    x1 = [trim_padding({k: v[:1] for k, v in x.items()} if isinstance(x, dict) else x[:1]) for x in spread(batches, B1_ROWS)]
    groups: dict[float | None, list[int]] = {}
    for i, s in enumerate(scored):
        groups.setdefault(s.point.target, []).append(i)
    for tag, xs in (("b64", x64), ("b1", x1)):
        n = sum(_rows(x) for x in xs)
        for ids in groups.values():
            fns: dict[str, Callable[[], Any]] = {"full": in_turn([functools.partial(backbone, x) for x in xs])}
            for i in ids:
                fns[str(i)] = in_turn([scored[i].method.timed(backbone, x, scored[i].point) for x in xs])
            with torch.inference_mode():  # batch 1: short calls, noisier on a shared CPU: more repeats
                t = time_round_robin(fns, warmup, repeats * (B1_REPEATS if tag == "b1" else 1), device)
            for i in ids:
                rows[i][f"ms_{tag}"] = 1e3 * t[str(i)] / n
                rows[i][f"speedup_{tag}"] = t["full"] / t[str(i)]


# ---- runs and the CLI -------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """A training run folder: its env config, learned scorer, a label (its seed) and the named group of
    runs it belongs to (None: the unnamed group, "learned")."""

    path: Path
    env: Any
    scorer: Any
    label: str
    group: str | None = None


def parse_run_arg(arg: str) -> tuple[str | None, Path]:
    """``RUN_DIR`` or ``NAME=RUN_DIR`` (NAME: letters, digits, ``.``, ``_``, ``-``; no path separator)."""
    name, sep, rest = arg.partition("=")
    if sep and name and "/" not in name and not Path(arg).exists():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise UserError(f"run group name {name!r} in {arg!r}: use letters, digits, '.', '_' or '-'")
        return name, Path(rest)
    return None, Path(arg)


def load_run(run_dir: Path, group: str | None = None) -> RunInfo:
    """The env config (config.yaml) and scorer (scorer/) of a run folder; one clear line when it is not one."""
    from policy_prune.config import read_run_config, run_env_config
    from policy_prune.core.artifact import load_scorer

    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    data = read_run_config(run_dir)
    env = run_env_config(data, run_dir)
    train = data.get("train")
    seed = train.get("seed") if isinstance(train, dict) else None
    label = f"seed {seed}" if seed is not None else run_dir.name
    if group:
        label = f"{group} {label}"
    return RunInfo(run_dir, env, load_scorer(run_dir / "scorer"), label, group)


def env_key(env: Any) -> dict[str, Any]:
    """What runs must share to be compared as seeds: backbone, data (but for options that change only the training
    rows, which no eval reads) and sites."""
    from policy_prune.config import to_dict
    from policy_prune.data.text import TRAIN_ROWS_ONLY

    d = to_dict(env)
    data = dict(d["data"], options={k: v for k, v in (d["data"].get("options") or {}).items() if k not in TRAIN_ROWS_ONLY})
    return {"backbone": d["backbone"], "data": data, "sites": d["sites"]}


def check_same_env(runs: Sequence[RunInfo], env: Any = None) -> None:
    """One clear error when a run folder is given twice, two runs of one group hold the same scorer, or runs (or
    --env) differ in backbone, data or sites, or scorers in sites."""
    seen: dict[Path, Path] = {}
    for r in runs:  # one scorer counted as two seeds would narrow every interval it is in
        if (real := r.path.resolve()) in seen:
            raise UserError(f"run folder given twice: {seen[real]} and {r.path} (each run is one seed)")
        seen[real] = r.path
    same: dict[tuple[str | None, bytes], Path] = {}
    for r in runs:  # in one group: a copied run folder, or a seed trained twice (the same seed gives the same scorer)
        digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in r.scorer.net.state_dict().values()))
        if (weights := (r.group, digest.digest())) in same:
            raise UserError(f"{same[weights]} and {r.path} hold the same scorer (a copy, or one seed trained twice): "
                            "each seed counts once")
        same[weights] = r.path
    ref_name, ref = (("--env", env_key(env)) if env is not None else (str(runs[0].path), env_key(runs[0].env)))
    for r in runs:
        key = env_key(r.env)
        diff = next((k for k in ref if key[k] != ref[k]), None)
        if diff is not None:
            raise UserError(f"runs do not share one env: {r.path} has {diff} {key[diff]!r}, {ref_name} has {ref[diff]!r}")
        if list(r.scorer.sites) != list(runs[0].scorer.sites):
            raise UserError(f"runs do not share sites: {r.path} prunes at {r.scorer.sites}, {runs[0].path} at {runs[0].scorer.sites}")
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="training run folders of one env (one per seed; a shell glob works); their scorers are evaluated. "
                        "NAME=RUN_DIR puts a run in the named group NAME (methods learned[NAME], learned-topk[NAME]), "
                        "compared with the unnamed group's (or the first group's) learned methods, paired")
    p.add_argument("--env", default=None, help="env preset (name or YAML); required without RUN_DIR (baselines only)")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="split to score on (points are always solved on val); develop on val, report test")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: RUN_DIR/eval; several runs or --env: runs/eval__<env>__<time>/eval; "
                        "eval-val instead of eval for --split val)")
    p.add_argument("--methods", nargs="+", default=list(BASELINES), help=f"baselines to compare ({', '.join(BASELINES)}; a pruning baseline's name + '+merge', e.g. "
                        "similarity-pre+merge: its dropped tokens averaged into their most similar kept ones)")
    p.add_argument("--learned", nargs="+", choices=LEARNED, default=list(DEFAULT_LEARNED),
                   help="how the runs' scorers are evaluated: learned-deployed (prune(model, scorer, flops=f), the "
                        "headline), learned-deployed-threshold (the same call with rule='threshold'; not by default), "
                        "learned (one threshold solved on val), learned-topk (per-site keep ratios solved on val)")
    p.add_argument("--targets", type=ratio, nargs="+", default=list(DEFAULT_TARGETS), help="total FLOPs ratio targets")
    p.add_argument("--diversity", type=at_least(0.0, float), default=0.0, help="spatial-diversity weight of the similarity baselines")
    p.add_argument("--no-prop-attn", action="store_true", help="ToMe without proportional attention")
    p.add_argument("--tome-unweighted-pool", action="store_true",
                   help="ToMe on a mean-pooling model (text encoders) averages merged tokens unweighted, as the "
                        "reference's timm heads do (default: weighted by the tokens each stands for)")
    p.add_argument("--evit-sum", action="store_true",
                   help="EViT's fused token as the authors' attention-weighted sum on every model (default: the "
                        "weighted mean on post-norm text encoders such as BERT and MiniLM, whose blocks read tokens "
                        "unnormalised)")
    p.add_argument("--tome-inflect", type=between(-1.0, 1.0), default=0.0,
                   help="tome-native's r schedule: 0 constant per block, -1 the authors' decreasing schedule")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline, subsets and the bootstrap")
    p.add_argument("--max-samples", type=positive, default=None, help="cap on val and scored samples (seeded subsets of rows)")
    p.add_argument("--max-items", type=positive, default=None, metavar="N",
                   help="cap each split at N source items (Split.groups: python-docs' docstrings and help sections, "
                        "digits' source digits), a subset seeded by --seed, with all their rows and retrieval queries; "
                        "every kept query keeps all its relevant passages (minilm-text: --max-items 800, about 10 minutes for "
                        "the baselines at three targets on 2 CPU cores)")
    p.add_argument("--query-target", type=parse_query_target, default=None, metavar="F|same",
                   help="retrieval: the queries' own FLOPs target (each method's queries solved on the val queries "
                        "alone, its passages on the val passages alone for each --targets value; 'same': each "
                        "target for both parts; default: one total over both)")
    p.add_argument("--batch-size", type=positive, default=64, help="eval batch size (executed FLOPs and solving use it)")
    p.add_argument("--no-length-sort", action="store_true",
                   help="batch text rows in split order (default: by length, as SentenceTransformer.encode does)")
    p.add_argument("--repeats", type=non_negative, default=3, help="timed repeats per wall-clock measurement (0: skip timing)")
    p.add_argument("--bootstrap", type=positive, default=2000, help="bootstrap replicates of every interval")
    p.add_argument("--vis-target", type=ratio, default=None, help="FLOPs target of the kept-token picture "
                   "(default: the target nearest 0.5)")
    p.add_argument("--vis-samples", type=positive, default=3, help="val samples in the kept-token picture")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="dtype of the frozen backbone")


def output_dir(args: argparse.Namespace, env_name: str) -> Path:
    if args.out is not None:
        return Path(args.out)
    leaf = "eval" if args.split == "test" else "eval-val"
    if len(args.run_dirs) == 1:
        return parse_run_arg(str(args.run_dirs[0]))[1] / leaf
    return Path("runs") / f"eval__{env_name}__{time.strftime('%Y%m%d-%H%M%S')}" / leaf


EVAL_FILES = ("pareto.json", "table.md", "pareto.png", "kept.png", "kept.html")
"""What an eval writes in its output folder."""


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A hidden folder beside ``out_dir`` to write an eval's files in; on success they replace the previous eval's
    files in ``out_dir`` (all of them: a kept.png of an earlier eval beside this one's tables would be a mix), on
    failure or interrupt ``out_dir`` is as it was. They were written in place, one after the other: a failure
    between two left the new pareto.json beside the old pictures."""
    if (clash := [name for name in EVAL_FILES if (out_dir / name).is_dir()]):
        raise UserError(f"--out {out_dir}: {', '.join(clash)} there is a folder; eval writes files of that name")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        for name in EVAL_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for path in stage.iterdir():
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def parse_query_target(text: str) -> float | str:
    """``--query-target``: a FLOPs ratio, or "same" (each target)."""
    return SAME if text == SAME else ratio(text)


def run(args: argparse.Namespace) -> int:
    from policy_prune.config import load_env_config
    from policy_prune.console import make_console, status
    from policy_prune.core.artifact import check_signature
    from policy_prune.data import cap, cap_groups, load_splits
    from policy_prune.embedded import resolve_backbone
    from policy_prune.evaluation import report, vis

    if not args.run_dirs and args.env is None:
        raise UserError("give a RUN_DIR or --env ENV")
    # A target given twice was evaluated twice and its rows pooled as if they were two seeds (runs: 2, the
    # across-seeds interval); each target and method is evaluated once.
    args.targets, args.methods = list(dict.fromkeys(args.targets)), list(dict.fromkeys(args.methods))
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder for pareto.json, table.md and the pictures")
    if args.vis_target is not None and not any(abs(t - args.vis_target) < 1e-9 for t in args.targets):
        raise UserError(f"--vis-target {args.vis_target:g} is not one of --targets ({' '.join(f'{t:g}' for t in args.targets)})")
    console = make_console()
    runs = [load_run(path, group) for group, path in (parse_run_arg(str(d)) for d in args.run_dirs)]
    env_cfg = load_env_config(args.env) if args.env else runs[0].env
    if runs:
        check_same_env(runs, env_cfg if args.env else None)
    options = BaselineOptions(seed=args.seed, diversity=args.diversity, prop_attn=not args.no_prop_attn,
                              tome_inflect=args.tome_inflect, tome_size_pool=not args.tome_unweighted_pool,
                              evit_sum=args.evit_sum)
    methods: list[Method] = [m for r in runs for m in learned_methods(r.scorer, r.label, r.group)
                             if m.name.partition("[")[0] in args.learned]
    methods += [make_baseline(name, env_cfg.sites, options) for name in args.methods]
    torch.manual_seed(args.seed)
    check_device(args.device)
    backbone, tokenizer = resolve_backbone(env_cfg, console=console)
    backbone = backbone.to(args.device, DTYPES[args.dtype])  # the data stays fp32: the adapters cast it
    for r in runs:
        # Names may differ (a renamed or re-headed copy of the model), weights may not: a scorer trained on
        # another checkpoint of this architecture would be scored on a model it never saw.
        check_signature(r.scorer, backbone.signature(), strict=False, weights=True)
    splits = load_splits(env_cfg, seed=args.seed, backbone=backbone, tokenizer=tokenizer)
    if args.max_samples is not None:
        splits = {k: cap(s, args.max_samples, args.seed) for k, s in splits.items()}
    if args.max_items is not None:
        splits = {k: cap_groups(s, args.max_items, args.seed) for k, s in splits.items()}
    with status(console, "evaluating") as phase:
        results = evaluate(backbone, splits, methods, args.targets, args.split, args.batch_size, args.device,
                           args.repeats, args.bootstrap, args.seed, progress=lambda t: phase.update(t),
                           length_sort=not args.no_length_sort, query_target=args.query_target)
    results["env"] = env_cfg.name
    out_dir = output_dir(args, env_cfg.name)
    vis_target = args.vis_target if args.vis_target is not None else min(args.targets, key=lambda t: abs(t - 0.5))
    with staged(out_dir) as stage:
        report.write_outputs(results, stage)
        picture = vis.draw_kept(backbone, methods, results, splits["val"], vis_target, env_cfg.sites, stage,
                                args.vis_samples, tokenizer, args.device)
    report.print_tables(results, console)
    console.print(f"wrote {out_dir}/pareto.json, table.md, pareto.png" + (f", {picture.name}" if picture else ""))
    return 0
