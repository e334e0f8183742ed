"""keep_ratio schedules: one compounding count that every path keeps, and one solver for a FLOPs target."""

from __future__ import annotations

import pytest
import torch

from policy_prune import prune
from policy_prune.core.backbones import adapt
from policy_prune.core.schedule import TokenCounts, flops_ratio, keep_ratio_for, keep_schedule, ratio_counts
from policy_prune.core.scorer import make_keep_fn, random_scorer
from policy_prune.evaluation.baselines import forward_merged
from policy_prune.evaluation.merge import MIN_MERGE_LEFT
from tests import tiny

SITES = [1, 2, 3]
VALUES = [0.7, 0.45, 0.3]


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_every_keep_ratio_path_keeps_the_schedule_counts(name: str) -> None:
    """The mask path (decide), the static PrunedModel path and ToMe's merging all leave keep_schedule's counts,
    on images and on text rows of different lengths."""
    model = tiny.make(name)
    backbone = adapt(model)
    scorer = random_scorer(backbone, SITES)
    x = tiny.inputs(name, batch=4, seed=3)
    with torch.no_grad():
        state = backbone.embed(x)
        expected = keep_schedule(VALUES, state.alive_counts, (state.protected & state.valid).sum(dim=1))
        _, _, masked = backbone.forward_pruned(x, SITES, make_keep_fn(backbone, scorer, "keep_ratio", VALUES))
        _, _, static = prune(model, scorer, keep_ratio=VALUES).run(x)
        _, _, merged, _, _ = forward_merged(backbone, x, SITES, VALUES)
    if name == "hf-bert":
        assert len(set(expected[0].tolist())) > 1  # rows of different lengths keep different counts
    for got in (masked, static):
        assert [c.tolist() for c in got] == [c.tolist() for c in expected]
    # ToMe's rounds never merge as many tokens as A holds (#15), so merging stops at MIN_MERGE_LEFT
    # prunable tokens where the schedule asks for fewer (the last site here).
    prot, before, floored = (state.protected & state.valid).sum(dim=1), state.alive_counts, []
    for e in expected:
        after = torch.maximum(e - prot, torch.clamp(before - prot, max=MIN_MERGE_LEFT))
        floored.append(after + prot)
        before = after + prot
    assert [c.tolist() for c in merged] == [c.tolist() for c in floored]
    assert floored[-1].tolist() != expected[-1].tolist()


def test_keep_schedule_compounds_and_keeps_protected_tokens() -> None:
    counts = keep_schedule([0.5, 0.5, 0.25], torch.tensor([145, 21]), torch.tensor([1, 3]))
    # round(r * alive), the protected tokens among them (half to even): 145 -> 72 -> 36 -> 9; 21 -> 10 -> 5, then
    # round(1.25) = 1 would leave none of the prunable tokens: a row keeps one (3 protected + 1).
    assert [c.tolist() for c in counts] == [[72, 10], [36, 5], [9, 4]]


@pytest.mark.parametrize("target", [0.31, 0.5, 0.62, 0.77, 0.9])
def test_keep_ratio_for_is_the_nearest_achievable_flops(target: float) -> None:
    """Counts are integers, so FLOPs move in steps: the solved ratio's FLOPs are the nearest step to the target
    (checked against every ratio at which a count changes)."""
    backbone = adapt(tiny.make("timm-vit-cls"))
    tc = TokenCounts.dense(17, 1)
    got = flops_ratio(backbone, SITES, ratio_counts(SITES, tc, keep_ratio_for(backbone, SITES, tc, target)), tc)
    grid = torch.linspace(0, 1, 20001).tolist()
    achievable = {round(flops_ratio(backbone, SITES, ratio_counts(SITES, tc, r), tc), 12) for r in grid}
    assert abs(got - target) <= min(abs(f - target) for f in achievable) + 1e-12
