"""Sites that keep every token run no scorer: same decisions, fewer FLOPs, and calibration makes them idle.

A site whose rule keeps all its tokens (keep_ratio 1, threshold -inf) decides nothing, so its features and
MLP are skipped and no selection FLOPs are charged there. Calibration leaves a site idle where the policy's
drops would save less than ``IDLE_SAVING`` of the block compute (trained MiniLM and digits-vit policies keep
0.94-1.0 at their later sites), and solves both rules again with it idle.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from policy_prune.core.artifact import load_scorer, save_scorer
from policy_prune.core.backbones import adapt
from policy_prune.core.budget import BudgetInput, CalibrationPoint, site_savings
from policy_prune.core.calibration import calibrate, measure
from policy_prune.core.inference import prune
from policy_prune.core.scorer import decide, random_scorer, row_full_flops
from policy_prune.core.selection import learned_flops
from tests import tiny
from tests.test_budget import _short_texts

SITES = [1, 2]
INF = math.inf


def scoring_everywhere(backbone, scorer, rule, values):
    """A keep_fn that runs the scorer at every site, keep-all values included (the reference)."""
    n0, kept = [], []

    def fn(state, i, layer):
        if i == 0:
            n0[:] = [state.alive_counts]
            kept.clear()
        keep = decide(scorer.scores_in_episode(backbone, state, i, layer, n0[0], kept), state, rule, values[i])
        kept.append((keep | (state.protected & state.valid)).sum(dim=1))
        return keep

    return fn


def block_segments(backbone):
    """The (start, stop) of every ``run_blocks`` call on ``backbone`` from now on."""
    seen, run = [], backbone.run_blocks

    def spy(state, start, stop):
        seen.append((start, stop))
        return run(state, start, stop)

    backbone.run_blocks = spy
    return seen


def mlp_calls(fast):
    calls = [0]
    fast.scorer_net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", ["timm-vit-cls", "hf-bert"])
@pytest.mark.parametrize("rule,values", [("keep_ratio", [0.5, 1.0]), ("threshold", [0.0, -INF])])
def test_a_keep_all_site_runs_no_scorer_and_decides_the_same(family, rule, values) -> None:
    model = tiny.make(family).eval()
    backbone = adapt(model)
    scorer = random_scorer(backbone, SITES, seed=3, hidden=(16,))
    x = tiny.inputs(family, batch=4)
    fast = prune(model, scorer, rule=rule, **{rule: values}, strict=False)
    assert fast.idle_sites() == [False, True]
    calls = mlp_calls(fast)
    segments = block_segments(fast.backbone)
    with torch.inference_mode():
        out, state, counts = fast.run(x)
        assert calls[0] == 1  # site 0 only
        # The idle site after the last scored one splits no block run: (0, 1), then (1, depth) in one go.
        assert segments == [(0, SITES[0]), (SITES[0], fast.backbone.depth)]
        ref, ref_state, ref_counts = fast.run(x, keep_fn=scoring_everywhere(fast.backbone, fast.scorer, rule, values))
        assert calls[0] == 3  # the reference scores at both sites
    assert torch.allclose(out, ref, atol=1e-6)
    assert [c.tolist() for c in counts] == [c.tolist() for c in ref_counts]
    assert counts[1].tolist() == counts[0].tolist()  # the idle site kept every token
    assert torch.equal(state.positions[state.valid], ref_state.positions[ref_state.valid])


def test_an_idle_site_is_charged_no_selection_flops() -> None:
    """What FlopCounterMode counts drops by exactly the scorer's FLOPs at the idle site, and ``measure``
    (calibration's count) charges nothing there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny.make("timm-vit-cls").eval()
    backbone = adapt(model)
    scorer = random_scorer(backbone, SITES, seed=3, hidden=(16,))
    x = tiny.inputs("timm-vit-cls", batch=4)
    fast = prune(model, scorer, keep_ratio=[0.5, 1.0], strict=False)

    def counted(keep_fn=None) -> int:
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fast.run(x, keep_fn=keep_fn)
        return counter.get_total_flops()

    # The keep-mask path with and without a scorer pass at the idle site.
    skipped = counted(scoring_everywhere(fast.backbone, fast.scorer, "keep_ratio", [0.5, 1.0])) - counted(fast.keep_fn())
    with torch.inference_mode():
        n_at_idle = int(fast.run(x)[2][0][0])
    assert skipped == 4 * learned_flops(backbone, scorer, SITES[1], n_at_idle)
    # The planned path (images' keep_ratio) computes the same but the context's part of the first layer once for
    # the batch at its scored site, not once per row (learned_flops charges every row: at most this much over).
    context_part = 2 * fast.scorer_net.context_dim * fast.scorer_net.hidden[0]
    assert counted(fast.keep_fn()) - counted() == (len(x) - 1) * context_part
    idle = measure(backbone, scorer, [x], "keep_ratio", [0.5, 1.0]).flops_ratio
    busy = measure(backbone, scorer, [x], "keep_ratio", [0.5, 0.9999]).flops_ratio  # same counts, site 1 scored
    n = backbone.embed(x).n_full
    full = float(row_full_flops(backbone, torch.tensor([n]), n)[0])  # one row's unpruned FLOPs
    assert busy - idle == pytest.approx(learned_flops(backbone, scorer, SITES[1], n_at_idle) / full, rel=1e-6)


def _never_prunes_at_site_1(backbone):
    """A linear budget scorer whose logits at the second site are all about +100: it keeps every token there."""
    scorer = random_scorer(backbone, SITES, seed=0, hidden=(), budget=BudgetInput(0.4, 0.9, 0.5))
    with torch.no_grad():
        scorer.net.out.weight[0, scorer.net.feature_dim + 1] = 100.0  # the site-1 column of the context one-hot
    return scorer


def test_calibration_idles_a_site_that_keeps_everything_and_still_meets_each_target(tmp_path) -> None:
    bert = adapt(tiny.make("hf-bert"))
    batches = _short_texts()
    scorer = _never_prunes_at_site_1(bert)
    scorer.budget = BudgetInput(0.4, 0.9, 0.5, calibrate(bert, scorer, batches, [0.4, 0.6, 0.8]))
    for point in scorer.budget.calibration:
        assert point.idle == [1] and point.keep_ratio[1] == 1.0
        assert all(spent == pytest.approx(point.flops, abs=0.01) for spent in point.spent.values())
    # keep_ratio between calibrated targets too (its plan interpolates well; a threshold on 96 rows does not).
    for rule, keep_all, targets in (("threshold", -INF, (0.4, 0.6, 0.8)), ("keep_ratio", 1.0, (0.4, 0.5, 0.8))):
        for f in targets:
            fast = prune(bert.model, scorer, flops=f, rule=rule, strict=False)
            assert fast.values[1] == keep_all and fast.idle_sites() == [False, True]
            ran = measure(bert, fast.scorer, batches, rule, fast.values, executed=True)
            assert ran.flops_ratio == pytest.approx(f, abs=0.012)
    # The idle sites and a threshold default rule with its keep-all site round-trip through scorer.json
    # (JSON has no -inf: the site is written as null).
    rule = prune(bert.model, scorer, flops=0.5, rule="threshold", strict=False)
    save_scorer(scorer, tmp_path / "s", bert.signature(), default_rule={"rule": "threshold", "values": rule.values})
    meta = json.loads((tmp_path / "s" / "scorer.json").read_text())
    assert meta["default_rule"]["values"][1] is None
    loaded = load_scorer(tmp_path / "s")
    assert loaded.meta["default_rule"]["values"] == rule.values and loaded.budget == scorer.budget
    assert prune(bert.model, loaded, strict=False).idle_sites() == [False, True]


def test_between_points_with_other_idle_sites_the_nearer_point_decides() -> None:
    """A threshold solved with other sites idle was solved for other scorer passes: between two points whose
    idle sites differ, the nearer point's idle sites run (a tie: the one with more idle sites), and its
    threshold follows the line of its own run of points, extended past its end, never interpolated with
    the other run's."""
    budget = BudgetInput(0.3, 0.9, 0.5, [CalibrationPoint(0.4, 1.0, [0.3, 0.95]),
                                         CalibrationPoint(0.6, 0.5, [0.5, 1.0], idle=[1]),
                                         CalibrationPoint(0.8, 0.0, [0.7, 1.0], idle=[1])])
    assert budget.idle(0.45, 2) == [False, False] and budget.threshold(0.45) == 1.0  # a run of one point
    assert budget.idle(0.5, 2) == [False, True] and budget.threshold(0.5) == pytest.approx(0.75)  # extended
    assert budget.idle(0.7, 2) == [False, True] and budget.threshold(0.7) == pytest.approx(0.25)  # inside
    assert budget.idle(0.9, 2) == [False, True] and budget.threshold(0.9) == 0.0  # past the last: clamped
    assert budget.idle(0.35, 2) == [False, False] and budget.threshold(0.35) == 1.0
    assert [p.flops for p in budget.regime(0.5)] == [0.6, 0.8]
    assert BudgetInput.from_json(budget.to_json()) == budget
    assert BudgetInput(0.3, 0.9, 0.5).idle(0.5, 2) == [False, False]
    # keep_ratio's own idle sites make its own runs: the threshold's are untouched.
    per_rule = BudgetInput(0.3, 0.9, 0.5, [CalibrationPoint(0.4, 1.0, [0.3, 0.95], idle_keep_ratio=[1]),
                                           CalibrationPoint(0.6, 0.5, [0.5, 0.9]),
                                           CalibrationPoint(0.8, 0.0, [0.7, 0.9])])
    assert [per_rule.idle(f, 2, "keep_ratio") for f in (0.35, 0.45, 0.55, 0.7)] == \
        [[False, True], [False, True], [False, False], [False, False]]
    assert all(per_rule.idle(f, 2) == [False, False] for f in (0.35, 0.45, 0.55, 0.7))
    assert [p.flops for p in per_rule.regime(0.45, "keep_ratio")] == [0.4]
    assert [p.flops for p in per_rule.regime(0.45)] == [0.4, 0.6, 0.8]
    assert BudgetInput.from_json(json.loads(json.dumps(per_rule.to_json()))) == per_rule


def test_eval_scores_and_writes_the_deployed_call_with_an_idle_site(tmp_path) -> None:
    """The deployed row runs prune(flops=f) with its idle site, charges no selection there, and pareto.json
    holds its -inf threshold as null (allow_nan=False: the eval wrote nothing after its whole run before)."""
    from policy_prune.evaluation import evaluate, report
    from policy_prune.evaluation.baselines import learned_methods
    from tests.test_evaluate import _split

    vit = adapt(tiny.make("timm-vit-cls"))
    splits = {"val": _split("timm-vit-cls", 12, 1, "val"), "test": _split("timm-vit-cls", 16, 2, "test")}
    scorer = _never_prunes_at_site_1(vit)
    points = calibrate(vit, scorer, [splits["val"].inputs], [0.5, 0.7])
    # The threshold as the default rule (the rules tie on this tiny model): its idle site is -inf.
    scorer.budget = BudgetInput(0.4, 0.9, 0.5, [dataclasses.replace(p, rule="threshold") for p in points])
    methods = learned_methods(scorer, "seed 0")[:1]
    res = evaluate.evaluate(vit, splits, methods, [0.5, 0.7], "test", batch_size=8, repeats=0, n_boot=20)
    rows = [r for r in res["results"] if r["method"] == "learned-deployed"]
    assert len(rows) == 2
    for row in rows:
        fast = prune(vit.model, scorer, flops=row["target"], strict=False)
        assert fast.idle_sites() == [False, True] and row["values"] == fast.values
        # Selection charged at site 0 only: one scorer pass on every token of each 17-token row.
        full = float(row_full_flops(vit, torch.tensor([17]), 17)[0])
        assert row["flops"]["selection"] == pytest.approx(learned_flops(vit, scorer, SITES[0], 17) / full, rel=1e-6)
    # The ablation row "learned" (its calibrated thresholds as its own points) idles the same site.
    own = learned_methods(scorer, "seed 0")[1].own([0.5, 0.7])
    assert [p.values[1] for p in own] == [-INF, -INF] and all(math.isfinite(p.values[0]) for p in own)
    report.write_outputs(res, tmp_path)
    payload = json.loads((tmp_path / "pareto.json").read_text())
    written = [r["values"] for r in payload["results"] if r["method"] == "learned-deployed"]
    assert len(written) == 2 and all(v[1] is None and isinstance(v[0], float) for v in written)


def test_padded_rows_are_packed_at_an_idle_first_site() -> None:
    """Text padded far past its longest row (padding="max_length") is packed at site 0 even when site 0 is
    idle, as a scored site packs it: later blocks never run on the padding."""
    model = tiny.make("hf-bert").eval()
    backbone = adapt(model)
    scorer = random_scorer(backbone, SITES, seed=3, hidden=(16,))
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(40) < torch.tensor([[12], [7], [15]])).long()
    x = {"input_ids": torch.randint(5, 120, (3, 40), generator=g) * mask, "attention_mask": mask}
    fast = prune(model, scorer, threshold=[-INF, 0.0], strict=False)
    widths = []
    step = fast.step_fn()

    def recording(state, i, layer):
        out = step(state, i, layer)
        widths.append(out.tokens.shape[1])
        return out

    with torch.inference_mode():
        fast.backbone.forward_sites(x, fast.sites, recording)
    assert widths[0] == 15  # the longest row, not the padded 40


def test_site_savings_counts_the_block_work_each_sites_drops_remove() -> None:
    # 6 blocks, sites before blocks 0 and 3: site 0 drops half of every token for all 6 blocks (0.5), site 1
    # drops a tenth of the half still alive for the last 3 blocks (0.1 x 0.5 x 3 / 6).
    assert site_savings([0.5, 0.9], [0, 3], 6) == pytest.approx([0.5, 0.025])
    assert site_savings([1.0, 0.2], [1, 2], 4) == pytest.approx([0.0, 0.4])


def test_calibration_idles_every_site_that_saves_less_than_idle_saving_but_the_one_that_saves_most() -> None:
    """A site that prunes, but little, is idle under a large ``idle_saving`` and scored under 0; the site
    that saves the most is never idle, and each target is still met with the others idle."""
    bert = adapt(tiny.make("hf-bert"))
    batches = _short_texts()
    scorer = random_scorer(bert, SITES, seed=0, hidden=(16,), budget=BudgetInput(0.4, 0.9, 0.5))
    scored = calibrate(bert, scorer, batches, [0.5, 0.7], idle_saving=0.0)
    assert all(p.idle == [] for p in scored)
    idle = calibrate(bert, scorer, batches, [0.5, 0.7], idle_saving=1.0)
    for p, ref in zip(idle, scored, strict=True):
        saved = site_savings(ref.keep_ratio, SITES, bert.depth)
        assert p.idle == [i for i in range(len(SITES)) if i != max(range(len(SITES)), key=saved.__getitem__)]
        assert p.spent["threshold"] == pytest.approx(p.flops, abs=0.015)
        assert p.keep_ratio[p.idle[0]] == 1.0
    # Where idling lowers the threshold's quality by more than idle_quality, the sites stay scored (a
    # negative tolerance asks for a gain no idle site gives): the same points as never idling.
    kept = calibrate(bert, scorer, batches, [0.5, 0.7], idle_saving=1.0, idle_quality=-1.0)
    assert kept == scored


def test_calibration_idles_a_site_where_the_keep_ratio_plan_keeps_nearly_everything() -> None:
    """keep_ratio's plan is the threshold's shares stretched to the target, so it can keep nearly every token
    at a site where the threshold dropped enough to stay scored: the idle rule is applied to keep_ratio's own
    shares too, for keep_ratio alone (its plan solved again with the site idle; the threshold, its shares and
    its idle sites untouched), unless keep_ratio's quality then falls by more than idle_quality."""
    from policy_prune.core.budget import SLACK
    from policy_prune.core.inference import static_ratios

    bert = adapt(tiny.make("hf-bert"))
    batches = _short_texts()
    scorer = random_scorer(bert, SITES, seed=1, hidden=(16,), budget=BudgetInput(0.3, 0.9, 0.5))
    scored = calibrate(bert, scorer, batches, [0.7], idle_saving=0.0)[0]
    assert scored.idle == [] and scored.idle_keep_ratio is None
    told = scorer.at(0.7)
    plan = static_ratios(bert, told, scored.plan, scored.keep_ratio, [False, False])
    shares = measure(bert, told, batches, "keep_ratio", plan, executed=True).keep_ratio
    by_threshold, by_plan = (site_savings(s, SITES, bert.depth)[1] for s in (scored.keep_ratio, shares))
    assert by_plan < by_threshold  # the threshold's drops at site 1 save more than the plan's
    between = (by_plan + by_threshold) / 2
    point = calibrate(bert, scorer, batches, [0.7], idle_saving=between, idle_quality=1.0)[0]
    assert point.idle == [] and point.idle_keep_ratio == [1]
    # The threshold is the one solved with every site scored; keep_ratio's plan was solved with site 1 idle.
    assert (point.threshold, point.keep_ratio, point.spent["threshold"]) == \
        (scored.threshold, scored.keep_ratio, scored.spent["threshold"])
    assert point.plan != scored.plan
    assert all(spent <= 0.7 + SLACK for spent in point.spent.values())
    deployed = dataclasses.replace(scorer, budget=BudgetInput(0.3, 0.9, 0.5, [point]))
    kr = prune(bert.model, deployed, flops=0.7, rule="keep_ratio", strict=False)
    assert kr.idle_sites() == [False, True] and kr.values[1] == 1.0
    assert prune(bert.model, deployed, flops=0.7, rule="threshold", strict=False).idle_sites() == [False, False]
    # The per-rule idle sites survive the artifact's JSON; older artifacts (no field) load as the same for both.
    again = BudgetInput.from_json(json.loads(json.dumps(deployed.budget.to_json())))
    assert again.calibration[0].idle_keep_ratio == [1] and again.idle(0.7, 2, "keep_ratio") == [False, True]
    old = deployed.budget.to_json()
    del old["calibration"][0]["idle_keep_ratio"]
    assert BudgetInput.from_json(old).idle(0.7, 2, "keep_ratio") == [False, False]
    # Where idling costs keep_ratio any quality, the site stays scored and nothing else changes.
    guarded = calibrate(bert, scorer, batches, [0.7], idle_saving=between, idle_quality=-1.0)[0]
    assert guarded == scored
