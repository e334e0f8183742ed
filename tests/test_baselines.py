"""Baselines run through the same execution: keep-all is the unpruned model; budgets are honoured."""

from __future__ import annotations

import pytest
import torch

from policy_prune.core.backbones import adapt
from policy_prune.errors import UserError
from policy_prune.evaluation.baselines import (
    BASELINES,
    BaselineOptions,
    SimilarityScorer,
    diverse_order,
    make_baseline,
    redundancy,
)
from tests import tiny

FAMILIES = ["timm-vit-cls", "timm-vit-reg-gap", "timm-deit-distilled", "hf-bert", "hf-vit-classifier"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_keep_all_equals_unpruned(name: str, baseline: str) -> None:
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name)
    method = make_baseline(baseline, BaselineOptions(diversity=0.5))
    with torch.no_grad():
        out, counts = method.forward(backbone, x, [1, 3], "keep_ratio", 1.0)
        assert torch.allclose(out, backbone(x), atol=1e-5)
    assert torch.equal(counts[-1], backbone.embed(x).alive_counts)


@pytest.mark.parametrize("baseline", [b for b in BASELINES if b != "none"])
def test_same_counts_at_a_ratio(baseline: str) -> None:
    """Every method keeps the keep_ratio rule's counts: protected + round(r * prunable) per site."""
    backbone = adapt(tiny.make("timm-vit-cls"))  # 16 patches + CLS
    method = make_baseline(baseline)
    with torch.no_grad():
        _, counts = method.forward(backbone, tiny.inputs("timm-vit-cls"), [1, 3], "keep_ratio", 0.5)
    expected = [9] if baseline == "similarity-pre" else [9, 5]
    assert [int(c[0]) for c in counts] == expected and all(bool((c == c[0]).all()) for c in counts)


def test_random_is_seeded() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))
    x = tiny.inputs("timm-vit-cls")
    with torch.no_grad():
        a, b, c = (make_baseline("random", BaselineOptions(seed=s)).forward(backbone, x, [1], "keep_ratio", 0.3)[0]
                   for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_redundancy_prunes_the_duplicates_first() -> None:
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0]]])
    eligible = torch.ones(1, 4, dtype=torch.bool)
    r = redundancy(x, eligible)
    assert r[0, 3] < r[0, :3].min()  # the odd one out is the least redundant: kept first


def test_diversity_spreads_the_picks() -> None:
    base = torch.tensor([[1.0, 0.99, 0.0]])  # two near-equal scores at the same spot, one far away
    coords = torch.tensor([[[0.0, 0.0], [0.0, 0.05], [1.0, 1.0]]])
    eligible = torch.ones(1, 3, dtype=torch.bool)
    plain = diverse_order(base, coords, eligible, weight=0.0)
    diverse = diverse_order(base, coords, eligible, weight=2.0)
    assert plain.argsort(descending=True).tolist() == [[0, 1, 2]]
    assert diverse.argsort(descending=True).tolist() == [[0, 2, 1]]


def test_similarity_with_diversity_keeps_protected_and_counts() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    state = backbone.embed(tiny.inputs("hf-bert"))
    scores = SimilarityScorer(diversity=1.0).scores(backbone, state, 0, 0)
    assert scores.shape == state.valid.shape
    assert bool(torch.isfinite(scores[state.valid & ~state.protected]).all())


def test_unknown_baseline_is_a_user_error() -> None:
    with pytest.raises(UserError, match="cls-attention"):
        make_baseline("attention-rollout")
