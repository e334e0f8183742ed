"""A pruning site before block 0 (issue #24): the scorer acts on the embedding output, as similarity-pre
does, for timm ViTs and HF encoders alike, and its action space contains that baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_prune import prune
from policy_prune.config import load_env_config
from policy_prune.core.backbones import adapt
from policy_prune.core.features import BASE_FEATURES, FeatureSpec, make_projection
from policy_prune.core.scorer import LearnedScorer, TokenScorer, context_width
from policy_prune.evaluation.baselines import make_baseline
from policy_prune.evaluation.solve import Point
from policy_prune.training.env import TokenPruneEnv
from tests import tiny

SITES = [0, 2]


def _redundancy_scorer(backbone) -> LearnedScorer:
    """A linear scorer whose logit is minus the redundancy feature: similarity-pre's own score."""
    spec = FeatureSpec()
    net = TokenScorer(spec.dim, context_width(len(SITES), False), hidden=())
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
        net.out.weight[0, BASE_FEATURES.index("redundancy")] = -1.0
    return LearnedScorer(net.eval(), SITES, spec, make_projection(backbone, spec), {"backbone": backbone.signature()})


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_learned_scorer_reproduces_similarity_pre_at_site_0(name) -> None:
    """Weight -1 on the redundancy feature at site 0 keeps exactly the tokens similarity-pre keeps there."""
    model = tiny.make(name).eval()
    backbone = adapt(model)
    x = tiny.inputs(name, batch=4, seed=1)
    scorer = _redundancy_scorer(backbone)
    heuristic = make_baseline("similarity-pre", SITES)
    for ratio in (0.3, 0.6):
        fast = prune(model, scorer, keep_ratio=[ratio, 1.0], strict=False)
        watch: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            out, kept = fast(**x, return_kept=True) if isinstance(x, dict) else fast(x, return_kept=True)
            ref, _ = heuristic.forward(backbone, x, Point("keep_ratio", [ratio]), watch)
        assert torch.equal(kept, watch[0] >= 0), ratio
        got = out if isinstance(out, torch.Tensor) else out.sentence_embedding
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_env_acts_before_block_0(name) -> None:
    """An episode with a site at block 0: its first decision sees the embedding output, protected tokens
    stay, and the rewards' compute terms add up to the FLOPs ratio of the blocks that ran."""
    backbone = adapt(tiny.make(name).eval())
    split = tiny.split(name, n=8, seed=0)
    env = TokenPruneEnv(backbone, split, SITES, lam=1.0, task="teacher_kl" if name.startswith("timm") else "cosine")
    obs, _ = env.reset(seed=0)
    protected = env.core.state.protected[0].clone()
    drop_all = np.zeros_like(obs["alive"])
    obs, r0, done, _, _ = env.step(drop_all)
    assert not done and env.core.state.alive_counts[0] == int(protected.sum())  # only protected tokens left
    total = r0
    while not done:
        obs, r, done, _, info = env.step(np.ones_like(obs["alive"]))
        total += r
    assert total == pytest.approx(info["task"] - info["flops_ratio"], abs=1e-5)
    assert info["flops_ratio"] < 0.5  # every block ran on the protected tokens alone


def test_presets_prune_before_block_0_down_to_tight_budgets() -> None:
    """The embedded presets have a site 0 and budgets reaching the tight end (digits-vit 0.1, minilm-text 0.2);
    minilm-text merges what it drops (README: on val), digits-vit does not (merging sinks it at the tight end)."""
    digits, text = load_env_config("digits-vit"), load_env_config("minilm-text")
    assert digits.sites[0] == 0 and digits.reward.budget[0] == pytest.approx(0.1) and not digits.merge
    assert text.sites[0] == 0 and text.reward.budget[0] == pytest.approx(0.2) and text.merge
