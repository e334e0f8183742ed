"""policy-prune eval: points solved on val, several seeds, intervals over groups, the four output files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import pytest
import torch

from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import random_scorer
from policy_prune.data import Split, cap_groups, relevance_pairs
from policy_prune.errors import UserError
from policy_prune.evaluation import evaluate, report, vis
from policy_prune.evaluation.baselines import BASELINES, learned_methods, make_baseline
from policy_prune.evaluation.evaluate import score
from policy_prune.evaluation.solve import MATCH
from policy_prune.evaluation.stats import bootstrap_difference, bootstrap_mean
from tests import tiny

SITES = [1, 2]
TARGETS = [0.7, 0.5]


def _split(name: str, n: int, seed: int, split: str, labels: bool = True) -> Split:
    s = tiny.split(name, n, seed=seed, labels=labels)
    return Split(split, s.inputs, s.labels, torch.arange(n) // 2)  # two rows per source item


@pytest.fixture(scope="module")
def vit():
    return adapt(tiny.make("timm-vit-cls"))


@pytest.fixture(scope="module")
def splits():
    return {"val": _split("timm-vit-cls", 12, 1, "val"), "test": _split("timm-vit-cls", 16, 2, "test")}


def _methods(backbone, runs=(0, 1)):
    methods = [m for s in runs for m in learned_methods(random_scorer(backbone, SITES, seed=s, hidden=(16,)), f"seed {s}")]
    return methods + [make_baseline(n, SITES) for n in BASELINES]


@pytest.fixture(scope="module")
def results(vit, splits):
    res = evaluate.evaluate(vit, splits, _methods(vit), TARGETS, "test", batch_size=4, repeats=1, n_boot=200)
    res["env"] = "tiny"
    return res


def test_every_method_at_every_target_per_seed(results) -> None:
    rows = results["results"]
    assert results["runs"] == ["seed 0", "seed 1"] and results["n_groups"] == 8 and results["n_samples"] == 16
    for target in TARGETS:
        at = [r for r in rows if r["target"] == target]
        assert {r["method"] for r in at} == set(BASELINES) - {"none"} | {"learned", "learned-topk"}
        assert sorted(r["run"] for r in at if r["method"] == "learned") == ["seed 0", "seed 1"]
        for r in at:
            f = r["flops"]
            assert f["total"] == pytest.approx(f["executed"] + f["selection"]) and f["executed"] >= f["block"] - 1e-12
            assert r["interval"]["lo"] <= r["accuracy"] <= r["interval"]["hi"]
            assert r["ms_b64"] > 0 and r["ms_b1"] > 0
    own = [r for r in rows if r["target"] is None and r["rule"] == "threshold"]
    assert len(own) == 2 and all(r["values"] == [0.0, 0.0] for r in own)
    none = next(r for r in rows if r["method"] == "none")
    assert none["flops"]["total"] == pytest.approx(1.0) and none["agreement"] == 1.0


def test_solved_points_are_on_target_on_val(vit, splits, results) -> None:
    """Every point solved for a target costs, on val, what its row says (solved_val) and never more than the
    target, unless it is the method's cheapest point (keep ratio 0 at every site: tome-sites cannot merge
    half of 17 tokens away); a row is flagged off target where its scored total is further than MATCH from it. The total is recomputed here by running
    the reported point again on val and summing its FLOPs columns. (Closer than TOLERANCE below the target
    is out of reach on a 16-patch model: one token of one site moves the total by more.)"""
    from policy_prune.evaluation.cost import flops_columns
    from policy_prune.evaluation.solve import MATCH, Point

    val = evaluate.prepare(vit, splits["val"], 4, "cpu")
    methods = {(m.name, m.run): m for m in _methods(vit)}
    solved = [r for r in results["results"] if r["target"] is not None]
    assert len(solved) == len(TARGETS) * (len(methods) - 1)  # every method but "none", at every target
    for r in solved:
        point = Point(r["rule"], list(r["values"]), r["target"], budget=r["told"])
        cols = flops_columns(vit, score(vit, methods[(r["method"], r["run"])], point, val).work)
        total = float(cols["total"].sum() / cols["full"].sum())
        assert total == pytest.approx(r["solved_val"], abs=1e-12), r
        if total > r["target"] + 1e-9:
            assert r["rule"] == "keep_ratio" and set(r["values"]) == {0.0}, r
        assert r["on_target"] == (abs(r["flops"]["total"] - r["target"]) <= MATCH), r  # on the scored split


def test_row_recall_is_the_metrics_recall_at_k() -> None:
    """The recall@10 eval reports (per row, bootstrapped) is metrics.recall_at_k's, row by row."""
    from policy_prune.evaluation.metrics import recall_at_k

    g = torch.Generator().manual_seed(0)
    full = torch.randn(40, 16, generator=g)
    out = full + 0.8 * torch.randn(40, 16, generator=g)
    rows = evaluate.row_metrics("embedding", out, full, None)["recall@10"]
    assert rows.shape == (40,) and rows.dtype == torch.float64 and 0.0 < float(rows.mean()) < 1.0
    assert float(rows.mean()) == pytest.approx(recall_at_k(out, full, k=10), abs=1e-12)
    assert float(evaluate.row_metrics("embedding", out[:5], full[:5], None)["recall@10"].mean()) == pytest.approx(
        recall_at_k(out[:5], full[:5], k=10), abs=1e-12)  # k capped at 4 alike


def test_points_are_solved_on_val_only(vit, splits) -> None:
    """Scoring another test split changes no operating point: nothing is solved on the reported split (where a
    val point lands on target there, as fixed-size images always do; see the next tests for text)."""
    other = {"val": splits["val"], "test": _split("timm-vit-cls", 20, 7, "test")}
    methods = _methods(vit, runs=(0,))
    a = evaluate.evaluate(vit, splits, methods, [0.5], "test", batch_size=4, repeats=0, n_boot=50)
    b = evaluate.evaluate(vit, other, methods, [0.5], "test", batch_size=4, repeats=0, n_boot=50)
    points = lambda res: [(r["method"], r["values"], r["solved_val"]) for r in res["results"]]  # noqa: E731
    assert points(a) == points(b)
    assert a["n_samples"] == 16 and b["n_samples"] == 20


def _best(scores: dict, points: dict) -> str:
    """The best baseline as eval chooses it: the highest val score among the points that reach their target on
    val (all where none does), the first registered on ties."""
    return max(scores, key=lambda name: (evaluate.reaches_on_val(points[name]), scores[name]))


def test_best_baseline_is_chosen_on_val(vit, splits, results) -> None:
    val = evaluate.prepare(vit, splits["val"], 4, "cpu")
    from policy_prune.evaluation.solve import SolveContext

    ctx = SolveContext(vit, val.counts, val.batches)
    for target in TARGETS:
        scores, points = {}, {}
        for name in BASELINES:
            m = make_baseline(name, SITES)
            if m.sweeps:
                points[name] = m.solve(ctx, target)
                scores[name] = float(score(vit, m, points[name], val).values["accuracy"].mean())
        chosen = {c["baseline"] for c in results["comparisons"] if c["target"] == target}
        assert chosen == {_best(scores, points)}
    spent = {(r["method"], r["run"], r["target"]): r["flops"]["total"] for r in results["results"]}
    for c in results["comparisons"]:
        assert c["verdict"] in ("better", "worse", "unclear", "unequal FLOPs") and c["n_runs"] == 2
        seeds = [v for (m, run, t), v in spent.items() if m == c["method"] and run is not None and t == c["target"]]
        assert c["flops"] == pytest.approx(sum(seeds) / 2) and c["baseline_flops"] == spent[(c["baseline"], None, c["target"])]


def _lengths_split(lengths: list[int], seed: int, name: str) -> Split:
    """Tiny-BERT rows of the given lengths (padded to the longest), two rows per unit."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return Split(name, {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}, None,
                 torch.arange(len(lengths)) // 2)


def test_off_target_baselines_are_matched_on_the_scored_splits_counts(bert) -> None:
    """Val of long rows, test mostly short ones (EViT's fused token and ToMe's rounds weigh more on short rows,
    as minilm-text's test holds more short queries per passage than its val): a baseline whose val point spends
    further than MATCH from its target on test is solved again on test's token counts and scored there, within
    MATCH; its quality is that point's, its val total and the best-baseline choice stay its val point's. Rows on
    target, out of reach on test too, or learned are as solved on val."""
    from policy_prune.evaluation.solve import MATCH

    splits = {"val": _lengths_split([24] * 16, 1, "val"), "test": _lengths_split([24, 6, 6, 6] * 4, 2, "test")}
    learned = learned_methods(random_scorer(bert, SITES, seed=0, hidden=(16,)), "seed 0")
    methods = learned + [make_baseline(n, SITES) for n in ("token-norm", "evit", "tome-sites", "tome-native")]
    res = evaluate.evaluate(bert, splits, methods, [0.7, 0.5], "test", batch_size=4, repeats=0, n_boot=50)
    val, test = (evaluate.prepare(bert, splits[k], 4, "cpu") for k in ("val", "test"))
    on_val, on_test = evaluate.solve_context(bert, val), evaluate.solve_context(bert, test)
    by_name = {(m.name, m.run): m for m in methods}
    matched, val_points = 0, {}
    for r in (r for r in res["results"] if r["target"] is not None):
        m, target = by_name[(r["method"], r["run"])], r["target"]
        first = m.solve(on_val, target)
        assert r["solved_val"] == pytest.approx(first.solved, abs=1e-12), r
        if m.run is None:
            val_points[(m.name, target)] = first
        if r["matched_on"] is None:
            again = None if m.run is not None else m.solve(on_test, target)
            assert r["values"] == first.values and (
                r["on_target"] or again is None or abs(again.solved - target) > MATCH), r
            continue
        matched += 1
        assert m.run is None and r["matched_on"] == "test" and r["point"].endswith("(FLOPs matched on test)"), r
        again = m.solve(on_test, target)
        assert r["values"] == again.values != first.values and r["on_target"], r
        assert abs(r["flops"]["total"] - target) <= MATCH and r["flops"]["total"] == pytest.approx(again.solved, abs=1e-9)
        assert r["cosine"] == pytest.approx(float(score(bert, m, again, test).values["cosine"].mean()), abs=1e-9)
    assert matched >= 3  # the construction moves EViT, ToMe and token-norm points off target
    for c in (c for c in res["comparisons"] if c["metric"] == "cosine"):
        points = {name: p for (name, t), p in val_points.items() if t == c["target"]}
        val_scores = {name: float(score(bert, by_name[(name, None)], p, val).values["cosine"].mean())
                      for name, p in points.items()}
        assert c["baseline"] == _best(val_scores, points)


def test_a_verdict_for_the_side_that_spent_more_is_not_one() -> None:
    """Better at 0.03 more FLOPs is no win (issue #23); better at fewer FLOPs is, and within MATCH is equal."""
    from policy_prune.evaluation.evaluate import fair
    from policy_prune.evaluation.solve import MATCH

    assert fair("better", 0.53, 0.50) == "unequal FLOPs" and fair("worse", 0.50, 0.53) == "unequal FLOPs"
    assert fair("better", 0.47, 0.50) == "better" and fair("worse", 0.53, 0.50) == "worse"
    assert fair("better", 0.50 + MATCH - 1e-6, 0.50) == "better" and fair("unclear", 0.9, 0.5) == "unclear"


def test_budget_conditioned_scorer_is_told_each_target(vit, splits) -> None:
    """A budget-conditioned scorer is told the target (clamped to its range), its threshold still solved on
    val; its own points are its calibrated thresholds, as prune(model, scorer, flops=f) runs them."""
    from policy_prune.core.budget import BudgetInput, CalibrationPoint

    budget = BudgetInput(0.4, 0.9, 0.6, [CalibrationPoint(0.4, 1.0, [0.3, 0.3]), CalibrationPoint(0.9, -1.0, [0.9, 0.9])])
    scorer = random_scorer(vit, SITES, seed=0, hidden=(16,), budget=budget)
    res = evaluate.evaluate(vit, splits, learned_methods(scorer, "seed 0"), [0.7, 0.35], "test", batch_size=4,
                            repeats=0, n_boot=50)
    by = {(r["method"], r["target"], r["told"]): r for r in res["results"]}
    assert by[("learned", 0.7, 0.7)]["point"].endswith("told 0.7")
    assert ("learned-topk", 0.35, 0.4) in by  # told the nearest budget it was trained on
    own = [r for r in res["results"] if r["target"] is None]
    assert [r["told"] for r in own] == [0.7]  # 0.35 lies outside the trained range
    assert own[0]["values"] == pytest.approx([-0.2, -0.2])  # the calibration at 0.7
    assert len(report.main_table(res)[1]) == len(res["results"])


def _calibrated_scorer(backbone, batches):
    from policy_prune.core.budget import BudgetInput
    from policy_prune.core.calibration import calibrate

    scorer = random_scorer(backbone, SITES, seed=0, hidden=(16,), budget=BudgetInput.over(0.4, 0.9))
    scorer.budget = BudgetInput.over(0.4, 0.9, calibrate(backbone, scorer, batches, [0.4, 0.5, 0.7, 0.9]))
    return scorer


def _retrieval_scorer(backbone, split, batch_size):
    """A scorer calibrated as a retrieval run's: on every row and query of ``split`` in deployed batches, each kind
    also on its own (plans per task)."""
    from policy_prune.core.budget import BudgetInput
    from policy_prune.core.calibration import batch_counts, calibrate
    from policy_prune.training.train import calibration_batches

    batches, _, parts = calibration_batches(split, len(split), 0, "cpu", batch_size)
    scorer = random_scorer(backbone, SITES, seed=0, hidden=(16,), budget=BudgetInput.over(0.4, 0.9))
    scorer.budget = BudgetInput.over(0.4, 0.9, calibrate(backbone, scorer, batches, [0.4, 0.5, 0.7, 0.9], parts=parts,
                                                         counted=batch_counts(backbone, batches), counted_parts=parts))
    return scorer


def test_deployed_row_is_the_public_call(vit, splits, tmp_path) -> None:
    """learned-deployed runs exactly prune(model, scorer, flops=f) and learned-deployed-threshold the same call
    with rule="threshold": rule, values and outputs; no point outside the budgets the scorer was trained on
    (prune refuses them)."""

    scorer = _calibrated_scorer(vit, [splits["val"].inputs[:6], splits["val"].inputs[6:]])
    methods = learned_methods(scorer, "seed 0")
    assert [m.name for m in methods] == ["learned-deployed", "learned", "learned-topk", "learned-deployed-threshold"]
    res = evaluate.evaluate(vit, splits, methods, [0.7, 0.5, 0.3], "test", batch_size=4, repeats=1, n_boot=50)
    data = evaluate.prepare(vit, splits["test"], 4, "cpu")
    for deployed, rule in ((methods[0], None), (methods[3], "threshold")):
        rows = {r["target"]: r for r in res["results"] if r["method"] == deployed.name}
        assert sorted(rows) == [0.5, 0.7]
        _is_the_public_call(vit, scorer, deployed, rule, rows, data)
    assert {(r["method"], r["rule"]) for r in res["results"] if r["method"] == "learned-deployed-threshold"} \
        == {("learned-deployed-threshold", "threshold")}
    header, body = report.main_table(res)
    assert sum(row[1] == "learned-deployed" for row in body) == 2
    # The target it has no point at is said, with prune's own reason, not dropped silently.
    notes = [n for n in res["notes"] if n.startswith("learned-deployed seed 0 has no point at 0.3: ")]
    assert len(notes) == 1 and "0.4" in notes[0]
    report.write_markdown(res, tmp_path / "table.md")
    assert f"**Not scored:** {notes[0]}" in (tmp_path / "table.md").read_text()


def _is_the_public_call(vit, scorer, deployed, rule, rows, data) -> None:
    """Each row of ``deployed`` is prune(model, scorer, rule=rule, flops=target): rule, values, outputs, timing."""
    from policy_prune.core.inference import prune

    for target, row in rows.items():
        fast = prune(vit.model, scorer, rule=rule, flops=target, strict=False)
        assert (row["rule"], row["values"], row["told"]) == (fast.rule, fast.values, target)
        with torch.inference_mode():
            expected = torch.cat([fast(x) for x, _ in data.batches])
        point = evaluate.Point(fast.rule, fast.values, target, None, target)
        got = evaluate.run_method(vit, deployed, point, data)[0]
        torch.testing.assert_close(got, expected)
        # Its wall-clock columns time the PrunedModel call itself (no FLOPs bookkeeping).
        first = data.batches[0][0]
        timed = deployed.timed(vit, first, point)
        assert timed.func.__self__ is deployed.model(vit, target)
        torch.testing.assert_close(timed()[0], expected[: len(first)])
        assert row["ms_b64"] > 0 and row["speedup_b1"] > 0


def test_seeds_of_the_deployed_call_are_one_method_whatever_rule_each_runs(vit, splits) -> None:
    """Calibration picks each seed's rule: seeds that run different rules at a target are still one method
    there (one summary over all seeds, one mean row in the table), not split by rule (it split 3 seeds
    into 1 + 2 and drew intervals around the wrong mean)."""
    scorer = _calibrated_scorer(vit, [splits["val"].inputs[:6], splits["val"].inputs[6:]])
    data = evaluate.prepare(vit, splits["test"], 4, "cpu")
    method = learned_methods(scorer, "seed 0")[0]
    scored = []
    for run, rule in (("seed 0", "threshold"), ("seed 1", "keep_ratio"), ("seed 2", "keep_ratio")):
        m = learned_methods(scorer, run)[0]
        point = evaluate.Point(rule, [0.0, 0.0] if rule == "threshold" else [0.5, 0.5], 0.5, None, 0.5)
        values = {"accuracy": torch.rand(len(data), generator=torch.Generator().manual_seed(len(scored)), dtype=torch.float64)}
        scored.append(evaluate.Scored(m, point, values, evaluate.run_method(vit, method, point, data)[1]))
    (summary,) = evaluate.summaries(scored, data, "accuracy", 50, 0)
    assert summary["n_runs"] == 3 and summary["rule"] == "keep_ratio/threshold"
    assert summary["accuracy"] == pytest.approx(float(torch.stack([s.values["accuracy"] for s in scored]).mean()))
    rows = [evaluate.result_row(vit, s, data, "accuracy", 50, 0) for s in scored]
    _, body = report.main_table({"results": rows, "summary": [summary], "primary": "accuracy", "output_kind": "logits"})
    assert [row[2] for row in body] == ["seed 0", "seed 1", "seed 2", "mean"]


def test_text_embedding_model_reports_cosine_and_pictures_words(tmp_path) -> None:
    backbone = adapt(tiny.make("hf-bert"))
    splits = {"val": _split("hf-bert", 6, 1, "val", labels=False), "test": _split("hf-bert", 6, 2, "test", labels=False)}
    methods = [make_baseline(n, SITES) for n in ("none", "similarity", "evit", "tome-sites", "tome-native")]
    res = evaluate.evaluate(backbone, splits, methods, [0.6], "val", batch_size=3, repeats=0, n_boot=50)
    assert res["primary"] == "cosine" and res["split"] == "val"
    for r in res["results"]:
        assert -1 <= r["cosine"] <= 1.0 + 1e-6 and 0 <= r["recall@10"] <= 1 and "accuracy" not in r
    assert res["results"][0]["cosine"] == pytest.approx(1.0)
    unsorted = evaluate.evaluate(backbone, splits, methods[:1], [0.6], "val", batch_size=3, repeats=0, n_boot=50,
                                 length_sort=False)
    # Rows of 12, 9, 6 tokens: sorted batches pad less; a ratio divides by the unpruned model's executed work on
    # the same batches, so the unpruned model executes 1 either way.
    padded = [r["results"][0]["gflops_total"] for r in (res, unsorted)]
    assert padded[0] < padded[1] and all(r["results"][0]["flops"]["executed"] == pytest.approx(1.0) for r in (res, unsorted))
    page = vis.draw_kept(backbone, methods, res, splits["val"], 0.6, SITES, tmp_path, 2, None)
    assert page.name == "kept.html" and "line-through" in page.read_text() and "tome-native" in page.read_text()


def test_writes_the_four_files(vit, splits, results, tmp_path) -> None:
    report.write_outputs(results, tmp_path)
    picture = vis.draw_kept(vit, _methods(vit), results, splits["val"], 0.5, SITES, tmp_path, 2)
    payload = json.loads((tmp_path / "pareto.json").read_text())
    assert len(payload["results"]) == len(results["results"]) and payload["comparisons"]
    table = (tmp_path / "table.md").read_text()
    assert "| 0.70 | learned | seed 1 |" in table and "| 0.70 | learned | mean |" in table
    assert "Learned minus the best baseline" in table and "tome-native" in table and "evit" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and picture.stat().st_size > 1000


def test_glance_table_has_each_methods_mean_and_interval_per_target(results) -> None:
    header, body = report.glance_table(results)
    assert header == ["method", "runs", "@ 0.70", "@ 0.50"]
    learned = next(row for row in body if row[0] == "learned")
    s = next(s for s in results["summary"] if s["method"] == "learned" and s["target"] == 0.5)
    assert learned[1] == "2" and learned[3].startswith(f"{s['intervals']['accuracy']['mean']:.3f} [")
    marked = [row[0] for row in body for cell in row[2:] if "(best baseline)" in cell]
    assert len(marked) == 2 and all(m not in ("learned", "learned-topk") for m in marked)
    assert body[-1][0] == "none (FLOPs 1.0)"


def test_group_sizes_ignore_dropped_and_fused() -> None:
    assert vis.group_sizes(torch.tensor([0, -1, -1, 2, 2, -2])).tolist() == [1, 0, 2]


def test_groupings_show_merges_and_drops(vit, splits, results) -> None:
    x = splits["val"].inputs[:2]
    for method, point in vis.method_points(_methods(vit), results, 0.5):
        name = method.name
        first, last = vis.groupings(vit, method, point, x, SITES)
        alive = [int(r.max()) + 1 for r in last]  # slots in use entering the last site's block
        if name in ("tome-sites", "tome-native"):
            assert bool((last >= 0).all())  # merging drops nothing: every token lives in some slot
        elif name == "evit":
            assert bool((last == -2).any())
        else:
            assert bool((last == -1).any()) and min(alive) <= 17


def test_groupings_of_a_merging_method_are_the_groups_it_averaged() -> None:
    """similarity-pre+merge and a merging scorer: every real token lives in a slot (none struck out as dropped),
    and at site 0 each slot's token is the mean of the embedded tokens grouped into it."""
    from policy_prune.core.scorer import make_keep_fn
    from policy_prune.evaluation.baselines import ScorerMethod, SimilarityScorer
    from policy_prune.evaluation.solve import Point

    backbone = adapt(tiny.make("hf-bert"))
    x = _split("hf-bert", 4, 3, "val", labels=False).inputs  # rows of different lengths, right-padded
    real = x["attention_mask"].bool()
    (groups,) = vis.groupings(backbone, make_baseline("similarity-pre+merge", SITES), Point("keep_ratio", [0.4]), x, [0])
    assert torch.equal(groups >= 0, real) and any(bool((vis.group_sizes(g) > 1).any()) for g in groups)
    b, j = next((b, int(j)) for b, g in enumerate(groups) for j in torch.nonzero(vis.group_sizes(g) > 1).flatten())
    words = " ".join(str(i) for i in x["input_ids"][b][groups[b] == j].tolist())
    assert f"title='one token: {words}'" in vis.text_page(x, [("similarity-pre+merge", [groups])], [0], None, 0.4)
    embedded = backbone.embed(x)
    merged = embedded.prune(make_keep_fn(backbone, SimilarityScorer(), "keep_ratio", [0.4])(embedded, 0, 0), merge=True)
    for b in range(len(groups)):
        for j in range(int(merged.valid[b].sum())):
            torch.testing.assert_close(merged.tokens[b, j], embedded.tokens[b, groups[b] == j].mean(dim=0))
    scorer = dataclasses.replace(random_scorer(backbone, SITES, seed=4), merge=True)
    first, last = vis.groupings(backbone, ScorerMethod("learned-topk", scorer, SITES, "keep_ratio"),
                                Point("keep_ratio", [0.6, 0.5]), x, SITES)
    assert torch.equal(last >= 0, real) and all(int(g.max()) + 1 < int(r.sum()) for g, r in zip(last, real, strict=True))
    pruned, _ = vis.groupings(backbone, make_baseline("similarity-pre", SITES), Point("keep_ratio", [0.4]), x, [0, 1])
    assert bool((pruned[real] == -1).any())  # without merging a dropped token is gone


def test_classifier_output_is_unchanged(results) -> None:
    """No retrieval task: the classifier's table keeps its columns and one comparison (accuracy)."""
    header, _ = report.main_table(results)
    assert header == ["target", "method", "seed", "point", "total", "executed", "selection", "block", "accuracy",
                      "95% CI", "agreement", "ms/sample @64", "speed-up @64", "ms/sample @1", "speed-up @1"]
    assert results["compared"] == ["accuracy"] and {c["metric"] for c in results["comparisons"]} == {"accuracy"}
    assert not any(k.startswith("ret_") for r in results["results"] for k in r) and "n_queries" not in results
    assert report.comparison_table(results)[0][3] == "delta accuracy" and report.main_table(results, "retrieval") == ([], [])


# ---- retrieval: queries encoded by every method at every point -------------------------------------------
def _text_split(n_items: int, seed: int, name: str) -> Split:
    """Two tiny-BERT passages per item (rows of 12, 9 and 6 tokens) and a query per item, a second one on
    even items, each answered by its item's passages; the last item's query also answers a passage of
    the item before it (a query text shared by two items), which links those two items."""
    passages = tiny.inputs("hf-bert", batch=2 * n_items, seed=seed)
    q_groups = torch.cat([torch.arange(n_items), torch.arange(0, n_items, 2)])
    relevant = [[2 * g, 2 * g + 1] for g in q_groups.tolist()]
    relevant[n_items - 1].append(2 * (n_items - 2))
    queries = Split(f"{name}-queries", tiny.inputs("hf-bert", batch=len(q_groups), seed=seed + 100), None, q_groups)
    return Split(name, passages, None, torch.arange(2 * n_items) // 2, queries=queries,
                 relevant=relevance_pairs(relevant))


@pytest.fixture(scope="module")
def bert():
    return adapt(tiny.make("hf-bert"))


@pytest.fixture(scope="module")
def text_splits():
    return {"val": _text_split(8, 1, "val"), "test": _text_split(12, 2, "test")}


def _text_methods(backbone):
    methods = [m for s in (0, 1) for m in learned_methods(random_scorer(backbone, SITES, seed=s, hidden=(16,)), f"seed {s}")]
    return methods + [make_baseline(n, SITES) for n in ("none", "token-norm", "cls-attention", "tome-sites")]


@pytest.fixture(scope="module")
def text_results(bert, text_splits):
    res = evaluate.evaluate(bert, text_splits, _text_methods(bert), TARGETS, "test", batch_size=5, repeats=0, n_boot=200)
    res["env"] = "tiny-text"
    return res


RET = ("ret_recall@10", "ret_ndcg@10", "ret_recall@10:full_queries", "ret_ndcg@10:full_queries",
       "ret_recall@10:full_passages", "ret_ndcg@10:full_passages")


def test_every_point_scores_the_retrieval_queries(bert, text_splits, text_results) -> None:
    from policy_prune.evaluation.retrieval import evaluate_retrieval

    res = text_results
    assert res["n_queries"] == 18 and res["n_query_groups"] == 12 and res["n_samples"] == 24
    assert res["compared"] == ["cosine", "ret_ndcg@10", "ret_recall@10"]
    for r in res["results"]:
        for key in ("cosine", "recall@10", *RET):
            assert 0 <= r[key] <= 1 + 1e-6 or key == "cosine"
            ci = r["intervals"][key]
            assert ci["lo"] - 1e-9 <= r[key] <= ci["hi"] + 1e-9
        assert 0 < r["flops_queries"]["block"] <= 1.0 + 1e-9  # each part's own FLOPs; "flops": their one total
        lo, hi = sorted((r["flops_passages"]["total"], r["flops_queries"]["total"]))
        assert lo - 1e-9 <= r["flops"]["total"] <= hi + 1e-9
    none = next(r for r in res["results"] if r["method"] == "none")
    assert none["flops_queries"]["block"] == pytest.approx(1.0)
    # The unpruned model: its three settings agree, and equal the retrieval module's numbers on the split
    # in its own order (the passages and queries were length-sorted and their relevant pairs renumbered).
    reference = evaluate_retrieval(bert, text_splits["test"], batch_size=5)
    for key in ("ret_recall@10", "ret_ndcg@10"):
        assert none[key] == pytest.approx(reference[key], abs=1e-6)
        assert none[f"{key}:full_queries"] == none[key] == none[f"{key}:full_passages"]
    header, body = report.main_table(res)
    assert header[8:-4] == ["cosine", "95% CI", "neighbour recall@10", "95% CI"]
    assert header[-4:] == ["ms/sample @64", "speed-up @64", "ms/sample @1", "speed-up @1"]
    retrieval_header, retrieval_body = report.main_table(res, "retrieval")
    assert retrieval_header[4:] == ["total", "passages", "queries", "retrieval recall@10", "95% CI", "retrieval nDCG@10", "95% CI",
                                    "recall@10 unpruned queries", "nDCG@10 unpruned queries"]
    assert len(retrieval_body) == len(body) and all(len(row) == len(retrieval_header) for row in retrieval_body)


def test_retrieval_intervals_resample_the_queries_items(bert, text_splits, text_results) -> None:
    """Rows' and summaries' retrieval intervals and the paired differences resample queries.groups."""
    data = evaluate.prepare(bert, text_splits["test"], 5, "cpu")
    methods = _text_methods(bert)
    val = evaluate.prepare(bert, text_splits["val"], 5, "cpu")
    ctx = evaluate.solve_context(bert, val)
    learned = [score(bert, m, m.solve(ctx, 0.5), data) for m in methods if m.name == "learned"]
    groups = data.queries.groups
    for s in learned:
        got = next(r for r in text_results["results"] if r["method"] == "learned" and r["run"] == s.method.run
                   and r["target"] == 0.5)
        assert got["intervals"]["ret_ndcg@10"] == bootstrap_mean(s.values["ret_ndcg@10"], groups, 200, 0).to_json()
        per_query = bootstrap_mean(s.values["ret_ndcg@10"], torch.arange(len(groups)), 200, 0).to_json()
        assert got["intervals"]["ret_ndcg@10"] != per_query
    mean = next(s for s in text_results["summary"] if s["method"] == "learned" and s["target"] == 0.5)
    stacked = torch.stack([s.values["ret_recall@10"] for s in learned])
    assert mean["intervals"]["ret_recall@10"] == bootstrap_mean(stacked, groups, 200, 0).to_json()
    for c in (c for c in text_results["comparisons"] if c["target"] == 0.5 and c["method"] == "learned"):
        base = next(m for m in methods if m.name == c["baseline"])
        values = score(bert, base, base.solve(ctx, 0.5), data).values[c["metric"]]
        diff = bootstrap_difference(torch.stack([s.values[c["metric"]] for s in learned]), values,
                                    data.groups_of(c["metric"]), 200, 0)
        assert c["difference"] == diff.to_json() and c["n_runs"] == 2


def test_intervals_use_each_metrics_items() -> None:
    """Six queries of one item all hit, two single-query items miss: resampling the 3 items draws no hit
    (8/27 of replicates) far more often than resampling the 8 queries would, so the interval reaches 0;
    the passages' metric (one item per row) is resampled by the passages' items."""
    queries = evaluate.EvalData("q", [], None, torch.zeros(8, 4), None, torch.tensor([0, 0, 0, 0, 0, 0, 1, 2]))
    data = evaluate.EvalData("test", [], None, torch.zeros(8, 4), None, torch.arange(8), queries=queries)
    hits = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0])
    ci = evaluate.intervals({"ret_recall@10": hits, "cosine": hits}, data, 2000, 0)
    assert ci["ret_recall@10"]["mean"] == ci["cosine"]["mean"] == 0.75
    assert ci["ret_recall@10"]["lo"] == 0.0 and ci["cosine"]["lo"] >= 0.375


def test_best_baseline_per_retrieval_metric_is_chosen_on_val(bert, text_splits, text_results) -> None:
    val = evaluate.prepare(bert, text_splits["val"], 5, "cpu")
    ctx = evaluate.solve_context(bert, val)
    baselines = [m for m in _text_methods(bert) if m.run is None and m.sweeps]
    for target in TARGETS:
        points = {m.name: m.solve(ctx, target) for m in baselines}
        on_val = {m.name: score(bert, m, points[m.name], val).values for m in baselines}
        for metric in text_results["compared"]:
            means = {name: float(v[metric].mean()) for name, v in on_val.items()}
            chosen = {c["baseline"] for c in text_results["comparisons"] if c["target"] == target and c["metric"] == metric}
            assert chosen == {_best(means, points)}


def test_best_baseline_is_one_that_reaches_the_target_on_val() -> None:
    """A baseline whose val point misses its target by more than MATCH (on either part, where the queries have a
    point of their own) is not the best baseline there while another reaches it, however well it scores (it
    spends more: under --query-target same, tome-sites' queries stayed at 0.43 of their FLOPs at 0.25 and the
    learned rows were measured against it); where none reaches the target, the highest still is."""
    data = evaluate.EvalData("val", [], None, torch.zeros(4, 2), None, torch.arange(4))

    def scored(name, value, target, solved, queries_solved=None):
        queries = None if queries_solved is None else evaluate.Point("keep_ratio", [0.5], target, queries_solved)
        point = evaluate.Point("keep_ratio", [0.5], target, solved, queries=queries)
        return evaluate.Scored(make_baseline(name, SITES), point, {"cosine": torch.full((4,), value)}, None)

    rows = [scored("tome-sites", 0.9, 0.25, 0.25, 0.43), scored("similarity-pre", 0.5, 0.25, 0.25, 0.25),
            scored("token-norm", 0.4, 0.25, 0.252, 0.25),
            scored("tome-sites", 0.9, 0.35, 0.37), scored("token-norm", 0.6, 0.35, 0.35),
            scored("tome-sites", 0.9, 0.5, 0.53), scored("token-norm", 0.6, 0.5, 0.52),
            scored("similarity", 0.3, 0.7, 0.65), scored("token-norm", 0.2, 0.7, 0.7)]
    best = evaluate.best_baselines(None, rows, data, data, ["cosine"])
    # At 0.7 a point that spends less than its target (by more than MATCH) still reaches it.
    assert best == {"cosine": {0.25: "similarity-pre", 0.35: "token-norm", 0.5: "tome-sites", 0.7: "similarity"}}


@pytest.mark.parametrize("own", [0.8, "same"])
def test_queries_with_a_budget_of_their_own(bert, text_splits, vit, splits, own) -> None:
    """--query-target: each method's queries run its point solved on the val queries alone (the deployed call:
    prune(flops=query target)), its passages the point solved on the val passages alone for each target
    ("same": the queries' target is each target too); what the queries spend on test is that point's. A split
    without queries is one clear error."""
    from dataclasses import replace

    from policy_prune.core.inference import prune
    from policy_prune.evaluation.cost import flops_ratios

    scorer = _retrieval_scorer(bert, text_splits["val"], 5)
    methods = [learned_methods(scorer, "seed 0")[0], *(make_baseline(n, SITES) for n in ("token-norm", "similarity-pre"))]
    res = evaluate.evaluate(bert, text_splits, methods, [0.7, 0.5], "test", batch_size=5, repeats=0, n_boot=50,
                            query_target=own)
    assert res["query_target"] == own
    val, test = (evaluate.prepare(bert, text_splits[k], 5, "cpu") for k in ("val", "test"))
    passages_ctx = evaluate.solve_context(bert, replace(val, queries=None, relevant=None), kind="document")
    queries_ctx = evaluate.solve_context(bert, val.queries, kind="query")
    by_name = {m.name: m for m in methods}
    solved = [r for r in res["results"] if r["target"] is not None]
    assert sorted({r["method"] for r in solved}) == ["learned-deployed", "similarity-pre", "token-norm"]
    checked = 0
    for r in solved:
        m, q_target = by_name[r["method"]], r["target"] if own == "same" else own
        q = m.solve(queries_ctx, q_target)
        assert q.solved <= q_target + 1e-9 or m.run is not None, r  # the deployed call spends what prune gives
        if r["matched_on"] is not None:  # a baseline part off target on test: matched there (the test above)
            continue
        assert r["query_values"] == q.values and r["point"].endswith(f"; queries {q.label()}"), r
        assert r["values"] == m.solve(passages_ctx, r["target"]).values, r
        spent = flops_ratios(bert, evaluate.run_method(bert, m, q, test.queries)[1])["total"]
        assert r["flops_queries"]["total"] == pytest.approx(spent, abs=1e-12), r
        checked += 1
    assert checked >= 4
    deployed, mix_rules = by_name["learned-deployed"], set()
    for r in (r for r in solved if r["method"] == "learned-deployed"):
        q_target = r["target"] if own == "same" else own
        q = deployed.solve(queries_ctx, q_target)  # the call with the scorer's plan for queries (keep_ratio's)
        for point, values, target, task in ((q, r["query_values"], q_target, "query"),
                                            (None, r["values"], r["target"], "document")):
            call = prune(bert.model, scorer, flops=target, task=task, strict=False)
            assert call.rule == "keep_ratio" and values == list(call.values), (r, task)
            if point is not None:
                assert (point.budget, point.task) == (target, task) and point.solved <= target + 1e-9, r
            mix_rules.add(prune(bert.model, scorer, flops=target, strict=False).rule)
    # Also where the mix's default is the threshold, each kind runs keep_ratio's plan for it.
    assert mix_rules == {"threshold", "keep_ratio"}
    with pytest.raises(UserError, match="no queries"):
        evaluate.evaluate(vit, splits, [make_baseline("token-norm", SITES)], [0.5], "test", batch_size=4, repeats=0,
                          n_boot=10, query_target=0.8)


def test_deployed_call_splits_one_total_between_queries_and_passages(bert, text_splits) -> None:
    """Under one total (no --query-target) a scorer whose calibration has a split (training's retrieval_splits: the
    pair of task plans that retrieved best on val) runs the passages through prune(flops=f, task="document") and the
    queries through task="query" (split="total", the default: what a pruned SentenceTransformer's
    encode_document / encode_query run); the val total is each part at its own call, and the chosen pair retrieves
    at least as well on val (recall@10 and the passages' cosine) as each kind at f."""
    from policy_prune.core.budget import SPLIT_LOSS
    from policy_prune.core.calibration import solve_splits
    from policy_prune.core.inference import prune
    from policy_prune.evaluation.cost import Work, flops_ratios
    from policy_prune.evaluation.metrics import retrieval_scores
    from policy_prune.evaluation.retrieval import embed_rows
    from policy_prune.training.train import retrieval_splits

    val_split = text_splits["val"]
    scorer = _retrieval_scorer(bert, val_split, 5)
    calibrated = scorer.budget
    scorer.budget = retrieval_splits(scorer, bert, val_split, 0.3, "cpu", batch_size=5)
    assert scorer.budget.splits

    def val_scores(f: float, split: str) -> tuple[float, float]:  # retrieval_splits' (recall, fidelity), publicly
        calls = {t: prune(bert.model, scorer, flops=f, task=t, split=split, strict=False) for t in ("query", "document")}
        q, d = (embed_rows(lambda x, m=calls[t]: m.run(x)[0], val_split.queries if t == "query" else val_split, 5,
                           trim=True) for t in ("query", "document"))
        full = embed_rows(bert, val_split, 5, trim=True)
        recall = float(retrieval_scores(q, d, val_split.relevant, 10)["recall@10"].mean())
        return recall, float(torch.nn.functional.cosine_similarity(d, full).mean())

    compared = 0
    for p in scorer.budget.calibration:
        try:
            each = val_scores(p.flops, "each")
        except UserError:  # a kind's plan above f on its val rows (short queries at 0.4): not a candidate
            continue
        total = val_scores(p.flops, "total")
        assert total[0] >= each[0] - 1e-6 and 1 - total[1] <= (1 + SPLIT_LOSS) * (1 - each[1]) + 1e-6, p.flops
        compared += 1
    assert compared >= 2
    # A split with queries well above f (as minilm-text's), to see each part run its own call: the fullest queries
    # whose pair of plans runs (retrieval_splits skips the others so too).
    def fullest(q: float, d: float) -> tuple[float, float]:
        for flops, task in ((q, "query"), (d, "document")):
            prune(bert.model, dataclasses.replace(scorer, budget=calibrated), flops=flops, task=task, split="each",
                  strict=False)
        return q, 1.0

    scorer.budget = solve_splits(calibrated, fullest, share=0.3)
    method = learned_methods(scorer, "seed 0")[0]
    res = evaluate.evaluate(bert, text_splits, [method, make_baseline("token-norm", SITES)], [0.7, 0.5], "test",
                            batch_size=5, repeats=0, n_boot=50)
    val = evaluate.prepare(bert, val_split, 5, "cpu")
    rows = [r for r in res["results"] if r["method"] == "learned-deployed"]
    assert sorted(r["target"] for r in rows) == [0.5, 0.7]
    for r in rows:
        f = r["target"]
        assert scorer.budget.task_flops(f, "query") > f > scorer.budget.task_flops(f, "document")
        for task, values in (("document", r["values"]), ("query", r["query_values"])):
            call = prune(bert.model, scorer, flops=f, task=task, strict=False)
            asked = prune(bert.model, scorer, flops=scorer.budget.task_flops(f, task), task=task, split="each",
                          strict=False)
            assert values == list(call.values) == list(asked.values), (f, task)
        for task in ("document", "query"):
            assert f"({task} plan at {scorer.budget.task_flops(f, task):.3g}, one total)" in r["point"], r["point"]
        # On target where the total is at most f (the tiny split's queries carry more than the bound's 0.3 of its
        # FLOPs, so it can run above): a split's parts are not each held to f.
        assert r["on_target"] == (r["flops"]["total"] <= f + MATCH)
        assert (r["flops_queries"]["total"] > f + MATCH) and (r["flops_passages"]["total"] < f - MATCH)
        point = method.solve(evaluate.solve_context(bert, val), f)
        works = [evaluate.run_method(bert, method, point, val)[1], evaluate.run_method(bert, method, point.queries, val.queries)[1]]
        assert r["solved_val"] == pytest.approx(flops_ratios(bert, Work.cat(works))["total"], abs=1e-12)
    # A total that cannot be split (the queries' part, at 0.4, above its target on their val rows): each part its
    # plan at f, as a pruned SentenceTransformer runs it, and the report says so.
    low = [dataclasses.replace(p, split={"query": p.flops - 0.1, "document": (p.flops - 0.3 * (p.flops - 0.1)) / 0.7})
           for p in calibrated.calibration]
    method = learned_methods(dataclasses.replace(scorer, budget=dataclasses.replace(
        calibrated, calibration=low, query_share=0.3)), "seed 0")[0]
    point = method.solve(evaluate.solve_context(bert, val), 0.5)
    assert point.split != "total" and point.queries.split != "total"
    assert point.values == list(prune(bert.model, scorer, flops=0.5, task="document", split="each", strict=False).values)
    assert any("each part runs its plan at 0.5" in note for note in method.notes)
    method = learned_methods(scorer, "seed 0")[0]
    # --query-target same: each kind at f (split="each"), whatever the calibration's split.
    same = evaluate.evaluate(bert, text_splits, [method], [0.7], "test", batch_size=5, repeats=0, n_boot=50,
                             query_target="same")
    row = next(r for r in same["results"] if r["method"] == "learned-deployed")
    assert row["query_values"] == list(prune(bert.model, scorer, flops=0.7, task="query", split="each", strict=False).values)
    assert "one total" not in row["point"]


def test_split_pairs_script_scores_every_pair_and_chooses_as_calibration(bert, text_splits) -> None:
    """scripts/split_pairs.py scores every pair of each target once and, at any loss, chooses what calibration's
    solve_splits chooses there (at SPLIT_LOSS: the split retrieval_splits writes); a larger loss allows more pairs, so
    its split retrieves at least as well, and every split keeps the passages within its loss of fidelity."""
    import importlib.util
    import math
    from pathlib import Path

    from policy_prune.core.budget import SPLIT_LOSS
    from policy_prune.training.train import retrieval_splits, split_score

    spec = importlib.util.spec_from_file_location("split_pairs", Path(__file__).parents[1] / "scripts" / "split_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    val_split = text_splits["val"]
    scorer = _retrieval_scorer(bert, val_split, 5)
    targets = [p.flops for p in scorer.budget.calibration]
    calls = []
    score = split_score(scorer, bert, val_split, "cpu", batch_size=5)
    pairs = module.scored_pairs(scorer.budget, lambda q, d: calls.append((q, d)) or score(q, d), 0.3, targets)
    # every pair once (those whose plans cannot run raise, as in calibration), more than (f, f) alone
    assert len(calls) == len(set(calls)) >= len(pairs) > len(targets)
    written = retrieval_splits(scorer, bert, val_split, 0.3, "cpu", batch_size=5)
    chosen = {loss: module.splits_at(scorer.budget, pairs, 0.3, targets, loss) for loss in (0.0, SPLIT_LOSS, 1.0)}
    for p in written.calibration:
        assert chosen[SPLIT_LOSS][p.flops][:2] == (p.split["query"], p.split["document"])
        each = pairs.get((p.flops, p.flops))
        if each is None:  # (f, f) cannot run: no split
            continue
        for loss, splits in chosen.items():
            recall, fidelity = splits[p.flops][2:]
            assert 1 - fidelity <= (1 + loss) * (1 - each[1]) + 1e-9 and recall >= each[0] - 1e-9
        assert chosen[1.0][p.flops][2] >= chosen[SPLIT_LOSS][p.flops][2] >= chosen[0.0][p.flops][2] - 1e-9
        assert not math.isnan(chosen[0.0][p.flops][2])
    # retrieval_splits at another loss writes that loss's choice
    strict = retrieval_splits(scorer, bert, val_split, 0.3, "cpu", batch_size=5, loss=0.0)
    assert [chosen[0.0][p.flops][:2] for p in strict.calibration] == \
        [(p.split["query"], p.split["document"]) for p in strict.calibration]
    assert strict.calibration != written.calibration  # the tiny split's choice moves with the loss


def test_calibration_splits_at_the_runs_own_loss(bert, text_splits, monkeypatch) -> None:
    """A retrieval run's calibration splits one total at its train.split_loss (a preset's own), not at SPLIT_LOSS."""
    from policy_prune.core.budget import SPLIT_LOSS, BudgetInput
    from policy_prune.training import train

    seen = []
    monkeypatch.setattr(train, "retrieval_splits", lambda *a, **k: seen.append(k["loss"]) or a[0].budget)
    scorer = random_scorer(bert, SITES, seed=0, hidden=(16,), budget=BudgetInput.over(0.4, 0.9))
    cfg = train.RunConfig()
    cfg.env.reward.budget = [0.4, 0.9]
    cfg.train.calibration_samples, cfg.train.calibration_step = 10, 0.5
    for loss in (None, 0.05):
        if loss is not None:
            cfg.train.split_loss = loss
        budget = train.calibrated_budget(cfg, scorer, bert, text_splits["val"])
        assert budget.tasks and [p.flops for p in budget.calibration] == [0.4, 0.9]
    assert seen == [SPLIT_LOSS, 0.05]


def test_deployed_call_on_one_kind_of_input_alone_runs_the_plan_for_it(bert) -> None:
    """A plan calibrated for a mix of long and short rows runs above its target on the short rows alone
    (retrieval queries with a budget of their own keep [CLS], [SEP] and a word): there the deployed row is
    prune(flops=target, task="query"), the scorer's plan for that kind, which meets the target; on the mix it
    stays prune(flops=target) whatever it spends; a scorer without plans per task runs the call for the mix."""
    from policy_prune.core.budget import BudgetInput
    from policy_prune.core.calibration import batch_counts, calibrate
    from policy_prune.core.inference import prune
    from policy_prune.core.ops import trim_padding

    x = tiny.inputs("hf-bert", batch=30, seed=1)
    lengths = x["attention_mask"].sum(dim=1)
    long, short = (trim_padding({k: v[lengths == n] for k, v in x.items()}) for n in (lengths.max(), lengths.min()))
    batches = [long, short]  # as deployed: each batch cut to its longest row
    scorer = random_scorer(bert, SITES, seed=0, hidden=(16,), budget=BudgetInput.over(0.4, 0.9))
    scorer.budget = BudgetInput.over(0.4, 0.9, calibrate(bert, scorer, batches, [0.5, 0.7, 0.9], parts=[0, 1],
                                                         counted=batch_counts(bert, batches), counted_parts=[0, 1]))
    deployed = learned_methods(scorer, "seed 0")[0]

    def context(rows, kind="query"):
        data = evaluate.prepare(bert, Split("q", rows, None, torch.arange(10)), len(rows["input_ids"]), "cpu")
        return evaluate.solve_context(bert, data, kind=kind)

    target = 0.9  # 6-token rows keep 0-4 tokens: the mix's plan steps from 0.79 to 0.92 of their FLOPs
    mixed = deployed.solve(context(short, kind=None), target)  # the call for the mix, on the short rows
    assert mixed.task is None and mixed.solved > target + MATCH  # what the test is about
    point = deployed.solve(context(short), target)
    assert (point.task, point.budget, point.target) == ("query", target, target) and point.solved <= target
    fast = prune(bert.model, scorer, flops=target, task="query", strict=False)
    assert (point.rule, point.values) == (fast.rule, list(fast.values))
    data = evaluate.prepare(bert, Split("q", short, None, torch.arange(10)), 5, "cpu")
    with torch.inference_mode():
        expected = torch.cat([fast.run(x)[0].float() for x, _ in data.batches])
    torch.testing.assert_close(evaluate.run_method(bert, deployed, point, data)[0], expected)
    # Where the task's plan cannot reach the target (6-token rows at 0.5): the call for the mix, as a pruned
    # SentenceTransformer's encode_query runs it, and the report says so.
    unreached = deployed.solve(context(short), 0.5)
    assert unreached.task is None and unreached.values == list(prune(bert.model, scorer, flops=0.5).values)
    assert any("0.5" in note and "query inputs run the call for the mix" in note for note in deployed.notes)
    # Without plans per task (calibrated on one kind): the call for the mix, as it is.
    plain = _calibrated_scorer(bert, [long])
    assert learned_methods(plain, "seed 0")[0].solve(context(short), target).task is None


def test_text_outputs_show_every_comparison(text_results, tmp_path) -> None:
    report.write_outputs(text_results, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "## Learned minus the best baseline\n" in table and "| delta cosine |" in table
    assert "## Learned minus the best baseline: retrieval nDCG@10" in table and "| delta ret_recall@10 |" in table
    assert "18 queries from 12 units" in table and "## Retrieval at the same points" in table
    assert "| retrieval nDCG@10 | 95% CI |" in table
    payload = json.loads((tmp_path / "pareto.json").read_text())
    assert {c["metric"] for c in payload["comparisons"]} == {"cosine", "ret_ndcg@10", "ret_recall@10"}
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_cap_groups_keeps_every_query_complete(text_splits) -> None:
    split = text_splits["test"]
    original = {tuple(split.queries.inputs["input_ids"][q].tolist()): set() for q in range(len(split.queries))}
    for q, p in split.relevant.tolist():
        original[tuple(split.queries.inputs["input_ids"][q].tolist())].add(tuple(split.inputs["input_ids"][p].tolist()))
    for seed in range(6):
        capped = cap_groups(split, 5, seed)
        items = set(capped.groups.tolist())
        assert len(items) <= 5 and len(capped) == 2 * len(items)  # whole items, every row of each
        assert (10 in items) == (11 in items)  # linked by the last item's query
        assert set(capped.queries.groups.tolist()) == items
        kept: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        for q, p in capped.relevant.tolist():
            key = tuple(capped.queries.inputs["input_ids"][q].tolist())
            kept.setdefault(key, set()).add(tuple(capped.inputs["input_ids"][p].tolist()))
        assert len(kept) == len(capped.queries) and all(original[k] == v for k, v in kept.items())
    assert len(cap_groups(split, 4, 0).groups.unique()) == 4  # linked sets that do not fit are skipped, later ones fill the cap
    assert cap_groups(split, 100, 0).relevant.tolist() == split.relevant.tolist()


# ---- CLI -----------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run(parser.parse_args(argv))


def test_eval_needs_a_run_or_an_env() -> None:
    with pytest.raises(UserError, match="RUN_DIR or --env"):
        _cli([])


@pytest.fixture()
def fake_env(monkeypatch, vit, splits):
    from policy_prune import data, embedded

    monkeypatch.setattr(embedded, "resolve_backbone", lambda env_cfg, console=None: (vit, None))
    monkeypatch.setattr(data, "load_splits", lambda env_cfg, seed, backbone=None, tokenizer=None: dict(splits))
    return vit


def _run_dir(tmp_path, backbone, seed: int, sites=SITES, name: str | None = None):
    from policy_prune.core.artifact import save_scorer

    run_dir = tmp_path / (name or f"run{seed}")
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"env:\n  name: tiny\n  sites: {sites}\ntrain:\n  seed: {seed}\n")
    save_scorer(random_scorer(backbone, sites, seed=seed, hidden=(16,)), run_dir / "scorer", backbone.signature())
    return run_dir


def test_eval_refuses_a_run_given_twice(tmp_path, fake_env) -> None:
    """One scorer counted as two seeds would narrow every interval it is in: refused, however it is named."""
    run = _run_dir(tmp_path, fake_env, 0)
    for argv in ([str(run), str(run)], [f"a={run}", f"a={tmp_path / '.' / run.name}"], [str(run), f"b={run}"]):
        with pytest.raises(UserError, match="run folder given twice"):
            _cli([*argv, "--methods", "none", "--targets", "0.6", "--repeats", "0"])
    # A copy of the folder (or the same seed trained twice: the same scorer) is the same seed too.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    with pytest.raises(UserError, match=f"{run} and {copy} hold the same scorer"):
        _cli([str(run), str(copy), "--methods", "none", "--targets", "0.6", "--repeats", "0"])


def test_eval_two_runs_writes_one_table(tmp_path, fake_env, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    runs = [_run_dir(tmp_path, fake_env, s) for s in (0, 1)]
    out = tmp_path / "out"
    assert _cli([*map(str, runs), "--methods", "none", "random", "evit", "--targets", "0.6", "--repeats", "0",
                 "--bootstrap", "50", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"pareto.json", "table.md", "pareto.png", "kept.png"}
    payload = json.loads((out / "pareto.json").read_text())
    assert payload["runs"] == ["seed 0", "seed 1"] and payload["split"] == "test"
    assert {c["baseline"] for c in payload["comparisons"]} <= {"random", "evit"}
    only = tmp_path / "only"
    assert _cli([*map(str, runs), "--learned", "learned-topk", "--methods", "none", "--targets", "0.6", "--repeats",
                 "0", "--bootstrap", "50", "--out", str(only)]) == 0
    rows = json.loads((only / "pareto.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"learned-topk", "none"}


def test_named_groups_of_runs_are_compared_paired(tmp_path, fake_env) -> None:
    """``NAME=RUN_DIR``: runs of one name are the seeds of learned[NAME]; the first group's learned methods
    minus each other group's, paired over the source items (a group against itself differs by exactly 0)."""
    a = [_run_dir(tmp_path, fake_env, s) for s in (0, 1)]
    b = [_run_dir(tmp_path, fake_env, s, name=f"other{s}") for s in (0, 1)]
    c = [_run_dir(tmp_path, fake_env, s + 5, name=f"third{s}") for s in (0,)]
    out = tmp_path / "out"
    argv = [*map(str, a), *(f"same={p}" for p in b), *(f"third={p}" for p in c), "--methods", "none", "random",
            "--targets", "0.6", "--repeats", "0", "--bootstrap", "50", "--out", str(out)]
    assert _cli(argv) == 0
    payload = json.loads((out / "pareto.json").read_text())
    methods = {r["method"] for r in payload["results"]}
    assert {"learned", "learned-topk", "learned[same]", "learned-topk[same]", "learned[third]"} <= methods
    assert sorted(r["run"] for r in payload["results"] if r["method"] == "learned[same]" and r["target"] == 0.6) == \
        ["same seed 0", "same seed 1"]
    pairs = {(g["method"], g["other"]): g for g in payload["group_comparisons"]}
    assert set(pairs) == {("learned", "learned[same]"), ("learned", "learned[third]"),
                          ("learned-topk", "learned-topk[same]"), ("learned-topk", "learned-topk[third]")}
    same = pairs[("learned", "learned[same]")]["difference"]  # the same scorers: identical rows
    assert same["mean"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
    assert pairs[("learned", "learned[same]")]["n_runs"] == [2, 2] and pairs[("learned", "learned[third]")]["n_runs"] == [2, 1]
    flops = {r["run"]: r["flops"]["total"] for r in payload["results"] if r["method"] == "learned[third]" and r["target"] == 0.6}
    assert pairs[("learned", "learned[third]")]["other_flops"] == pytest.approx(sum(flops.values()) / len(flops))
    assert "Between groups of runs" in (out / "table.md").read_text()
    with pytest.raises(UserError, match="run group name"):
        _cli([f"bad name={a[0]}", "--repeats", "0"])


def test_eval_one_run_val_split_goes_to_eval_val(tmp_path, fake_env) -> None:
    run = _run_dir(tmp_path, fake_env, 0)
    assert _cli([str(run), "--split", "val", "--methods", "none", "tome-native", "--targets", "0.6", "--repeats", "0",
                 "--bootstrap", "50"]) == 0
    assert json.loads((run / "eval-val" / "pareto.json").read_text())["split"] == "val"
    assert not (run / "eval").exists()


def test_runs_of_different_sites_are_one_clear_error(tmp_path, fake_env) -> None:
    a = _run_dir(tmp_path, fake_env, 0)
    b = _run_dir(tmp_path, fake_env, 1, sites=[1, 3])
    with pytest.raises(UserError, match="do not share one env: .*sites"):
        _cli([str(a), str(b), "--repeats", "0"])


def test_eval_refuses_a_scorer_trained_on_other_weights(tmp_path, fake_env, capsys) -> None:
    """eval tolerates another name for the same shapes, not another checkpoint: its numbers would describe a
    scorer on a model it was never trained on (issue 25). One line, exit 2."""
    from policy_prune.cli import main

    run = _run_dir(tmp_path, adapt(tiny.make("timm-vit-cls", seed=1)), 0)
    assert main(["eval", str(run), "--methods", "none", "--targets", "0.6", "--repeats", "0", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same shapes, different weights" in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_env_cli_writes_files(tmp_path) -> None:
    preset = tmp_path / "tiny-digits.yaml"
    preset.write_text(
        "backbone:\n  spec: vit_tiny_patch16_224\n"
        "  model_kwargs: {img_size: 32, patch_size: 8, depth: 4, num_classes: 10, embed_dim: 32, num_heads: 2, in_chans: 1}\n"
        "data:\n  dataset: digits-cluttered\n  max_samples: 12\n"
        "  options: {canvas: 32, digit_size: 16, canvases_train: 1, canvases_val: 1, canvases_test: 2}\n"
        "sites: [1, 2]\n"
    )
    out = tmp_path / "eval"
    code = _cli(["--env", str(preset), "--out", str(out), "--methods", "none", "random", "tome-sites",
                 "--targets", "0.6", "--batch-size", "6", "--repeats", "1", "--bootstrap", "50"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"pareto.json", "table.md", "pareto.png", "kept.png"}
    payload = json.loads((out / "pareto.json").read_text())
    assert payload["n_groups"] < payload["n_samples"] or payload["n_samples"] <= 12  # digits rows share sources


def test_a_target_given_twice_is_evaluated_once(tmp_path, fake_env) -> None:
    """--targets 0.6 0.6 scored the one seed twice and pooled the rows as two seeds (runs: 2, a mean row, the
    across-seeds interval); it is the same eval as --targets 0.6."""
    run = _run_dir(tmp_path, fake_env, 0)
    payloads = []
    for name, targets in (("twice", ["0.6", "0.6"]), ("once", ["0.6"])):
        assert _cli([str(run), "--methods", "none", "random", "random", "--targets", *targets, "--repeats", "0",
                     "--bootstrap", "50", "--out", str(tmp_path / name)]) == 0
        payloads.append(json.loads((tmp_path / name / "pareto.json").read_text()))
    rows = [[(r["method"], r["target"], r["run"], r["interval"]) for r in payload["results"]] for payload in payloads]
    assert rows[0] == rows[1] and payloads[0]["targets"] == [0.6] and payloads[0]["runs"] == ["seed 0"]
    assert len({row[:3] for row in rows[0]}) == len(rows[0])  # each method once per target


def test_an_eval_that_fails_while_writing_leaves_the_previous_eval_whole(tmp_path, fake_env, monkeypatch) -> None:
    """Outputs are written beside the folder and moved in at the end: a failure while writing (here the picture)
    leaves the previous eval's files as they were, not its pictures beside the new pareto.json; a later eval
    replaces all of them, a picture it does not draw included."""
    run = _run_dir(tmp_path, fake_env, 0)
    out = tmp_path / "out"
    common = ["--repeats", "0", "--bootstrap", "50", "--out", str(out)]
    argv = [str(run), "--methods", "none", "random", "--targets", "0.6", *common]
    assert _cli(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"pareto.json", "table.md", "pareto.png", "kept.png"}

    def broken(*args, **kwargs):
        raise RuntimeError("the picture failed")

    with monkeypatch.context() as m:
        m.setattr(vis, "draw_kept", broken)
        with pytest.raises(RuntimeError, match="the picture failed"):
            _cli([str(run), "--methods", "none", "random", "--targets", "0.5", *common])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", run.name])  # no staging folder left
    assert _cli(["--env", "digits-vit", "--methods", "none", "--targets", "0.6", *common]) == 0
    assert {p.name for p in out.iterdir()} == {"pareto.json", "table.md", "pareto.png"}  # the old kept.png is gone
    (out / "table.md").unlink()
    (out / "table.md").mkdir()
    with pytest.raises(UserError, match="table.md there is a folder"):
        _cli(argv)


def test_eval_max_items_caps_every_split(tmp_path, fake_env) -> None:
    out = tmp_path / "out"
    run = _run_dir(tmp_path, fake_env, 0)
    assert _cli([str(run), "--methods", "none", "random", "--targets", "0.6", "--repeats", "0",
                 "--bootstrap", "50", "--max-items", "3", "--out", str(out)]) == 0
    payload = json.loads((out / "pareto.json").read_text())
    assert payload["n_groups"] == 3 and payload["n_samples"] == 6  # two rows per item
    with pytest.raises(SystemExit):  # refused while parsing (policy_prune.cli_args), before anything loads
        _cli([str(run), "--max-items", "0"])


def test_eval_refuses_a_picture_target_it_does_not_score(tmp_path, fake_env, monkeypatch) -> None:
    """--vis-target must be one of --targets: refused before the eval runs (it used to fail in the picture,
    after the whole eval). Without a method scored at it (only "none") no picture is drawn."""
    run = _run_dir(tmp_path, fake_env, 0)
    with monkeypatch.context() as m, \
            pytest.raises(UserError, match=r"--vis-target 0.3 is not one of --targets \(0.6 0.5\)"):
        m.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("the eval ran"))
        _cli([str(run), "--targets", "0.6", "0.5", "--vis-target", "0.3"])
    out = tmp_path / "none"
    assert _cli(["--env", "digits-vit", "--methods", "none", "--targets", "0.6", "--repeats", "0",
                 "--bootstrap", "50", "--out", str(out)]) == 0  # (the fake env's model and splits)
    assert (out / "table.md").exists() and not (out / "kept.png").exists()


def test_timing_runs_batches_and_single_rows_spread_over_the_split(vit, splits, monkeypatch) -> None:
    """The eval-batch columns time TIMED_BATCHES batches spread over the split, the batch-1 columns the first
    rows of B1_ROWS such batches (each row its own call: one row's length does not decide the column), and
    ms per sample divides by every row timed."""
    from policy_prune.evaluation import bench

    data = evaluate.prepare(vit, splits["test"], 2, "cpu")  # 8 batches of 2
    batches = [x for x, _ in data.batches]
    assert len(batches) == 8 and evaluate.B1_ROWS == 8 and evaluate.TIMED_BATCHES == 3
    assert evaluate.spread(list(range(8)), 3) == [1, 4, 6] and evaluate.spread(list(range(8)), 1) == [4]
    seen = []

    class Spy:
        name = "spy"

        def timed(self, backbone, x, point):
            seen.append(x)
            return lambda: None

    monkeypatch.setattr(bench, "time_round_robin", lambda fns, *a: {"full": 0.024, "0": 0.012})
    rows = [{}]
    scored = [evaluate.Scored(Spy(), evaluate.Point("keep_ratio", [0.5], 0.5), {}, None)]
    evaluate.add_timing(vit, scored, rows, data, repeats=1, device="cpu")
    assert len(seen) == 3 + 8
    assert all(got is want for got, want in zip(seen[:3], [batches[1], batches[4], batches[6]], strict=True))
    assert all(torch.equal(got, want[:1]) for got, want in zip(seen[3:], batches, strict=True))  # every batch's first row
    assert rows[0]["ms_b64"] == pytest.approx(1e3 * 0.012 / 6) and rows[0]["ms_b1"] == pytest.approx(1e3 * 0.012 / 8)
    assert rows[0]["speedup_b64"] == pytest.approx(2.0) and rows[0]["speedup_b1"] == pytest.approx(2.0)


def test_runs_that_differ_only_in_their_training_rows_are_compared() -> None:
    """train_queries changes the train split alone (val and test keep passages as rows): such runs share an env."""
    from policy_prune.config import load_env_config
    from policy_prune.evaluation.evaluate import env_key

    plain = env_key(load_env_config("minilm-text"))
    assert env_key(load_env_config("minilm-text", ["data.options.train_queries=true"])) == plain
    assert env_key(load_env_config("minilm-text", ["data.options.max_words=48"])) != plain
