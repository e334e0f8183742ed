"""Baselines run through the same execution: keep-all is the unpruned model; budgets are honoured; the
analytic Work of a point equals what its forward ran."""

from __future__ import annotations

import pytest
import torch

from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import make_keep_fn
from policy_prune.errors import UserError
from policy_prune.evaluation.baselines import (
    BASELINES,
    BaselineOptions,
    EvitMethod,
    SimilarityScorer,
    diverse_order,
    make_baseline,
    redundancy,
)
from policy_prune.evaluation.solve import BatchedCounts, Point
from tests import tiny


def keep_all(name: str, depth: int) -> Point:
    return Point("none") if name == "none" else Point("tome-r", [0] * depth) if name == "tome-native" else \
        Point("keep_ratio", [1.0, 1.0])

FAMILIES = ["timm-vit-cls", "timm-vit-reg-gap", "timm-deit-distilled", "hf-bert", "hf-vit-classifier"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_keep_all_equals_unpruned(name: str, baseline: str) -> None:
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name)
    method = make_baseline(baseline, [1, 3], BaselineOptions(diversity=0.5))
    with torch.no_grad():
        out, work = method.forward(backbone, x, keep_all(baseline, backbone.depth))
        assert torch.allclose(out, backbone(x), atol=1e-5)
    assert torch.equal(work.mlp[:, -1], backbone.embed(x).alive_counts)


@pytest.mark.parametrize("baseline", [b for b in BASELINES if b not in ("none", "tome-native")])
def test_same_counts_at_a_ratio(baseline: str) -> None:
    """Site methods keep the keep_ratio rule's counts: round(r * alive) per site, the protected CLS among them
    (17 -> 8 -> 4 at 0.5; round half to even), EViT with its fused token on top."""
    backbone = adapt(tiny.make("timm-vit-cls"))  # 16 patches + CLS, depth 4
    method = make_baseline(baseline, [1, 3])
    with torch.no_grad():
        _, work = method.forward(backbone, tiny.inputs("timm-vit-cls"), Point("keep_ratio", [0.5, 0.5]))
    expected = {"similarity-pre": [8, 8, 8, 8], "evit": [17, 9, 9, 4]}.get(baseline, [17, 8, 8, 4])
    assert work.attn[0].tolist() == expected and bool((work.attn == work.attn[0]).all())


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert", "timm-deit-distilled"])
@pytest.mark.parametrize("baseline", [*BASELINES, "similarity-pre+merge", "cls-attention+merge"])
def test_predicted_work_equals_the_forward(name: str, baseline: str) -> None:
    """The analytic Work the solver uses is exactly what the forward runs (counts and selection FLOPs),
    text rows of different lengths included."""
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name, batch=4)
    method = make_baseline(baseline, [1, 2])
    point = {"none": Point("none"), "tome-native": Point("tome-r", [3, 1, 4, 2])}.get(baseline, Point("keep_ratio", [0.6, 0.3]))
    with torch.no_grad():
        _, work = method.forward(backbone, x, point)
        state = backbone.embed(x)
    tc = BatchedCounts(state.alive_counts, (state.protected & state.valid).sum(dim=1), state.n_full, torch.zeros(4, dtype=torch.long))
    predicted = method.predict(backbone, tc, point)
    assert torch.equal(predicted.attn, work.attn) and torch.equal(predicted.mlp, work.mlp)
    assert torch.allclose(predicted.selection, work.selection)


@pytest.mark.parametrize(("name", "sum_fusion", "mean"), [("timm-vit-cls", False, False), ("hf-bert", False, True),
                                                           ("hf-bert", True, False), ("hf-vit-classifier", False, False)])
def test_evit_fuses_the_dropped_tokens_weighted_by_cls_attention(name: str, sum_fusion: bool, mean: bool) -> None:
    """EViT's extra token is sum_j a_j x_j over the dropped tokens (a_j: attention from CLS), protected; on a
    post-norm encoder (BERT: attention reads the tokens unnormalised) the a_j are divided by their sum, unless
    ``sum_fusion`` (eval's --evit-sum) asks for the authors' sum there too."""
    from policy_prune.core.scorer import decide

    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name, batch=2)
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(x), 0, 1)
        attn = backbone.attention_from_cls(state, 1)
        keep = decide(attn, state, "keep_ratio", 0.25)
        dropped = state.valid & ~state.protected & ~keep
        weights = attn * dropped
        if mean:
            weights = weights / weights.sum(dim=1, keepdim=True)
        expected = weights.unsqueeze(-1).mul(state.tokens).sum(dim=1)  # [B, D]
        seen: list = []
        method = make_baseline("evit", [1], BaselineOptions(evit_sum=sum_fusion))
        assert isinstance(method, EvitMethod) and method.sum_fusion == sum_fusion
        orig = backbone.forward_sites

        def spy(inputs, sites, step, static=False):
            return orig(inputs, sites, lambda s, i, layer: seen.append(step(s, i, layer)) or seen[-1], static)

        backbone.forward_sites = spy  # type: ignore[method-assign]
        method.forward(backbone, x, Point("keep_ratio", [0.25]))
        del backbone.forward_sites
    after = seen[0]
    assert dropped.any(dim=1).all()
    assert after.alive_counts.tolist() == (state.alive_counts - dropped.sum(dim=1) + 1).tolist()  # the fused token
    fused = after.protected & ~state.protected.gather(1, after.positions.clamp_min(0)) & after.valid
    assert fused.sum(dim=1).tolist() == [1, 1]
    assert torch.allclose(after.tokens[fused], expected, atol=1e-5)
    scale = after.tokens[fused].norm(dim=-1) / state.tokens[dropped].norm(dim=-1).mean()
    assert (scale > 0.5).all() if mean else (scale < 0.9).all()  # the mean has a token's scale, the sum less


def test_random_is_seeded() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))
    x = tiny.inputs("timm-vit-cls")
    with torch.no_grad():
        a, b, c = (make_baseline("random", [1], BaselineOptions(seed=s)).forward(backbone, x, Point("keep_ratio", [0.3]))[0]
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
        make_baseline("attention-rollout", [1])
    with pytest.raises(UserError, match="tome-native"):
        make_baseline("tome", [1])


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_a_merge_variant_keeps_the_same_tokens_and_merges_the_dropped_ones(name: str) -> None:
    """similarity-pre+merge: the counts of similarity-pre, the adapter's merging forward, its cosine product in
    the selection FLOPs; a baseline that fuses or merges on its own has no variant (one line)."""
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name)
    point = Point("keep_ratio", [0.4])
    plain, merged = make_baseline("similarity-pre", [1, 3]), make_baseline("similarity-pre+merge", [1, 3])
    assert merged.name == "similarity-pre+merge" and merged.merge and not plain.merge
    with torch.no_grad():
        a, wa = plain.forward(backbone, x, point)
        b, wb = merged.forward(backbone, x, point)
        ref, _, _ = backbone.forward_pruned(x, [0], make_keep_fn(backbone, merged.scorer, "keep_ratio", [0.4]), merge=True)
    assert torch.equal(wa.attn, wb.attn) and torch.allclose(b, ref, atol=1e-6) and not torch.allclose(a, b, atol=1e-4)
    assert bool((wb.selection > wa.selection).all())
    for bad in ("none+merge", "evit+merge", "tome-sites+merge"):
        with pytest.raises(UserError, match="only the pruning baselines have a [+]merge variant") as exc:
            make_baseline(bad, [1, 3])
        assert "\n" not in str(exc.value)
