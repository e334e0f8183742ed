"""The SB3 token-scorer policy: masked Bernoulli, near keep-all init, save/load, scorer extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO

from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import TokenScorer, make_keep_fn
from policy_prune.training.env import PruneVecEnv
from policy_prune.training.policy import MaskedBernoulli, TokenScorerPolicy, load_learned_scorer
from policy_prune.training.tracking import folderless_logger
from tests import tiny

SITES = [1, 2]


@pytest.fixture(scope="module")
def env():
    return PruneVecEnv(adapt(tiny.make("timm-vit-reg4")), tiny.split("timm-vit-reg4", n=16), 4, SITES, lam=0.5)


def test_masked_bernoulli_respects_masks() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 3
    free = torch.rand(64, 10) > 0.3
    protected = ~free & (torch.rand(64, 10) > 0.5)
    dist = MaskedBernoulli().proba_distribution(logits, free, protected)
    for _ in range(20):
        a = dist.sample()
        assert (a[~free & ~protected] == 0).all(), "a dead token was kept"
        assert (a[protected] == 1).all()
    mode = dist.mode()
    assert torch.equal(mode[free], (logits[free] > 0).float())
    # Dead/protected logits do not enter log-prob or entropy.
    other = logits.clone()
    other[~free] = torch.randn(int((~free).sum())) * 10
    dist2 = MaskedBernoulli().proba_distribution(other, free, protected)
    a = dist.sample()
    torch.testing.assert_close(dist.log_prob(a), dist2.log_prob(a))
    torch.testing.assert_close(dist.entropy(), dist2.entropy())
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(a)
    torch.testing.assert_close(dist.log_prob(a), (expected * free).sum(-1))


def test_policy_starts_near_keep_all(env) -> None:
    model = PPO(TokenScorerPolicy, env, n_steps=4, batch_size=16, seed=0)
    obs = env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert (actions == obs["alive"]).all()
    sampled = np.mean([model.predict(obs)[0][obs["alive"] > 0].mean() for _ in range(5)])
    assert sampled > 0.9


@pytest.mark.parametrize(("algo", "hidden"), [(PPO, [16, 16]), (A2C, [16, 16]), (PPO, [])])
def test_save_load_roundtrip_and_scorer(env, tmp_path, algo, hidden) -> None:
    kwargs = {"n_steps": 4, "batch_size": 16, "n_epochs": 1} if algo is PPO else {"n_steps": 2}
    model = algo(TokenScorerPolicy, env, seed=0, policy_kwargs={"scorer_hidden": hidden}, **kwargs)
    model.set_logger(folderless_logger())  # SB3's default makes an empty SB3-<time> temp folder per learn()
    model.learn(64)
    model.save(tmp_path / "m.zip")
    loaded = algo.load(tmp_path / "m.zip", env=env)
    obs = env.reset()
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    scorer = load_learned_scorer(tmp_path / "m.zip", SITES)
    assert scorer.net.hidden == hidden
    for a, b in zip(scorer.net.state_dict().values(), model.policy.scorer.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_carries_the_env_projection(env, tmp_path) -> None:
    """The env's feature projection travels in the checkpoint, so export needs no backbone."""
    shape = list(env.core.projection.shape)
    model = PPO(TokenScorerPolicy, env, n_steps=4, batch_size=16, seed=0, policy_kwargs={"projection_shape": shape})
    model.policy.set_projection(env.core.projection)
    model.set_logger(folderless_logger())
    model.learn(16)
    model.save(tmp_path / "m.zip")
    assert torch.equal(load_learned_scorer(tmp_path / "m.zip", SITES).projection, env.core.projection)
    assert torch.equal(PPO.load(tmp_path / "m.zip").policy.learned_scorer(SITES).projection, env.core.projection)
    assert load_learned_scorer(_plain_checkpoint(env, tmp_path), SITES).projection is None


def _plain_checkpoint(env, tmp_path):
    PPO(TokenScorerPolicy, env, n_steps=4, batch_size=16, seed=0).save(tmp_path / "plain.zip")
    return tmp_path / "plain.zip"


def test_scorer_decisions_match_policy_in_env(env) -> None:
    """The standalone scorer (inference path) takes the deterministic policy's decisions in the env."""
    model = PPO(TokenScorerPolicy, env, n_steps=4, batch_size=16, seed=1, policy_kwargs={"init_keep_logit": 0.0})
    model.policy.set_projection(env.core.projection)
    with torch.no_grad():
        for p in model.policy.scorer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    scorer = model.policy.learned_scorer(SITES, env.core.spec)
    core = env.core
    obs = env.reset()
    idx = core.idx.clone()
    env_actions = []
    for _ in SITES:
        a, _ = model.predict(obs, deterministic=True)
        env_actions.append(a)
        obs, *_ = env.step(a)
    keep_fn = make_keep_fn(core.backbone, scorer, "threshold", 0.0)
    decisions = []

    def recording(state, i, layer):
        keep = keep_fn(state, i, layer)
        grid = torch.zeros(state.valid.shape[0], state.n_full, dtype=torch.bool)
        grid.scatter_(1, state.positions, keep | (state.protected & state.valid))
        decisions.append(grid)
        return keep

    with torch.no_grad():
        core.backbone.forward_pruned(core.split.select(idx).inputs, SITES, recording)
    for site, a in enumerate(env_actions):
        assert (decisions[site].numpy() == a.astype(bool)).all()
    assert 0 < np.mean([a.mean() for a in env_actions]) < 1


def test_packed_alive_tokens_give_the_dense_results() -> None:
    """The policy runs its per-token networks on the alive tokens only: the same logits, values and keep
    gains as running them on every slot and masking (the math is identical; float sums may reorder)."""
    from policy_prune.training.policy import AliveTokens, PooledCritic

    torch.manual_seed(0)
    b, n, f, g = 4, 9, 6, 5
    tokens, context = torch.randn(b, n, f), torch.rand(b, g)
    alive = torch.rand(b, n) > 0.4
    alive[:, 0] = True
    packed = AliveTokens.of(alive)
    scorer = TokenScorer(f, g, [8, 8])
    dense_logits = scorer(tokens, context)
    torch.testing.assert_close(packed.scatter(scorer.forward_packed(packed.gather(tokens), packed.rows, context)),
                               dense_logits * alive)
    critic = PooledCritic(f, g, [8], token_baseline=True)
    torch.nn.init.normal_(critic.keep_gain[-1].weight)  # starts at zero: make the gains non-trivial
    values, gains = critic.token_values(tokens, packed, context)
    h = critic.token(tokens)
    pooled = (h * alive.unsqueeze(-1)).sum(1) / alive.sum(1, keepdim=True)
    row = torch.cat([pooled, context], dim=-1)
    torch.testing.assert_close(values, critic.body(row).squeeze(-1))
    dense_gains = critic.keep_gain(torch.cat([h, row.unsqueeze(1).expand(-1, n, -1)], dim=-1)).squeeze(-1)
    torch.testing.assert_close(gains, dense_gains * alive)


@pytest.mark.parametrize("hidden", [(), (8,), (8, 8), (8, 6, 4)])
def test_token_scorer_is_the_mlp_on_token_and_context(hidden) -> None:
    """TokenScorer's split first layer and functional head compute out(body([token | context])) for any depth."""
    torch.manual_seed(1)
    b, n, f, g = 3, 7, 5, 4
    tokens, context = torch.randn(b, n, f), torch.rand(b, g)
    scorer = TokenScorer(f, g, hidden)
    torch.nn.init.normal_(scorer.out.weight)
    joined = torch.cat([tokens, context.unsqueeze(1).expand(-1, n, -1)], dim=-1)
    torch.testing.assert_close(scorer(tokens, context), scorer.out(scorer.body(joined)).squeeze(-1))
    # One context row for every row (the planned sites pass [1, G]): the same as that row repeated.
    one = context[:1]
    torch.testing.assert_close(scorer(tokens, one), scorer(tokens, one.expand(b, -1)), rtol=0, atol=1e-6)
    torch.testing.assert_close(scorer(tokens[:1], one), scorer(tokens, context)[:1], rtol=0, atol=1e-6)
