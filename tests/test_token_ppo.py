"""Per-token credit (TokenCreditPPO): the advantage algebra, learning a per-token rule, the train CLI."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from policy_prune.cli import main
from policy_prune.core.features import FeatureSpec
from policy_prune.training.policy import PROTECTED_COLUMN, TokenScorerPolicy
from policy_prune.training.token_ppo import TokenCreditPPO, token_advantages
from tests.test_train import _train_args, presets  # noqa: F401  (pytest fixture)


def test_exact_gains_give_each_token_exactly_its_own_effect() -> None:
    """Return additive in the decisions: with the true gains, token i's advantage is (a_i - p_i) w_i."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(32, 12, generator=g)
    a = torch.bernoulli(p, generator=g)
    w = torch.randn(32, 12, generator=g)
    free = torch.rand(32, 12, generator=g) > 0.2
    base = torch.randn(32, generator=g)
    returns = base + (free * a * w).sum(1)
    values = base + (free * p * w).sum(1)  # the expected return under the policy
    adv = token_advantages(returns, values, a, p, w, free.float())
    torch.testing.assert_close(adv, (a - p) * w * free)


def test_advantage_is_the_return_minus_the_other_tokens_predictions() -> None:
    g = torch.Generator().manual_seed(1)
    p, gains = torch.rand(4, 6, generator=g), torch.randn(4, 6, generator=g)
    a = torch.bernoulli(p, generator=g)
    free = torch.ones(4, 6)
    free[:, 0] = 0.0  # a protected / dead slot: no advantage, no contribution to the others'
    returns, values = torch.randn(4, generator=g), torch.randn(4, generator=g)
    adv = token_advantages(returns, values, a, p, gains, free)
    for r in range(4):
        for i in range(6):
            others = sum((a[r, j] - p[r, j]) * gains[r, j] for j in range(1, 6) if j != i)
            expected = 0.0 if i == 0 else returns[r] - values[r] - others
            assert float(adv[r, i]) == pytest.approx(float(expected), abs=1e-5)


class RuleEnv(VecEnv):
    """One-step episodes over 16 tokens: keeping a token pays +0.1 if its feature 0 is positive and
    -0.1 otherwise, plus reward noise. The best policy keeps exactly the positive tokens."""

    def __init__(self, n_envs: int = 16, n_tokens: int = 16, seed: int = 0, scale: float = 1.0) -> None:
        self.scale = scale  # every reward multiplied by it
        self.spec_dim = FeatureSpec().dim
        obs_space = spaces.Dict({
            "tokens": spaces.Box(-10, 10, (n_tokens, self.spec_dim), np.float32),
            "alive": spaces.MultiBinary(n_tokens),
            "context": spaces.Box(0, 1, (3,), np.float32),
        })
        self.render_mode = None
        super().__init__(n_envs, obs_space, spaces.MultiBinary(n_tokens))
        self.rng = np.random.default_rng(seed)
        self.n_tokens = n_tokens
        self._actions: Any = None

    def _obs(self) -> dict[str, np.ndarray]:
        tokens = self.rng.normal(size=(self.num_envs, self.n_tokens, self.spec_dim)).astype(np.float32)
        tokens[..., PROTECTED_COLUMN] = 0.0
        self.sign = np.sign(tokens[..., 0])
        return {"tokens": tokens, "alive": np.ones((self.num_envs, self.n_tokens), np.int8),
                "context": np.zeros((self.num_envs, 3), np.float32)}

    def reset(self) -> dict[str, np.ndarray]:
        return self._obs()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> Any:
        reward = self.scale * (0.1 * (self._actions * self.sign).sum(1) + self.rng.normal(0.0, 0.5, self.num_envs))
        infos = [{"terminal_observation": None} for _ in range(self.num_envs)]
        return self._obs(), reward.astype(np.float32), np.ones(self.num_envs, bool), infos

    def close(self) -> None:
        return None

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name)] * self.num_envs

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs)]

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs


def test_token_credit_ppo_learns_a_per_token_rule() -> None:
    env = RuleEnv()
    model = TokenCreditPPO(TokenScorerPolicy, env, n_steps=8, batch_size=64, n_epochs=4, learning_rate=3e-3,
                           gamma=1.0, gae_lambda=1.0, seed=0, policy_kwargs={"token_baseline": True, "scorer_hidden": [16]})
    obs = env.reset()
    before = (model.predict(obs, deterministic=True)[0] == (env.sign > 0)).mean()
    model.learn(6000)
    obs = env.reset()
    after = (model.predict(obs, deterministic=True)[0] == (env.sign > 0)).mean()
    assert before < 0.6 and after > 0.9, (before, after)


def test_normalized_returns_make_learning_independent_of_the_reward_scale(tmp_path) -> None:
    """With normalize_returns the critic regresses the returns over their running std: rewards 1000x smaller
    (a token worth 1e-4) train the same policy and the same gains, in those units. Without it the gain head
    sits in Adam's jitter at that scale (gains 3e-4 against a true 1e-4, the rule learnt on 0.55 of the tokens
    where the unit-scale run learns 0.88). The scale is saved with the model; a loaded one goes on with it."""
    def trained(scale: float) -> tuple[RuleEnv, TokenCreditPPO]:
        env = RuleEnv(scale=scale)
        model = TokenCreditPPO(TokenScorerPolicy, env, n_steps=8, batch_size=64, n_epochs=4, learning_rate=3e-3,
                               gamma=1.0, gae_lambda=1.0, seed=0, normalize_returns=True,
                               policy_kwargs={"token_baseline": True, "scorer_hidden": [16]})
        model.learn(6000)
        return env, model

    (env, unit), (_, small) = trained(1.0), trained(1e-3)
    assert unit.return_scale is not None and small.return_scale is not None
    assert small.return_scale == pytest.approx(1e-3 * unit.return_scale, rel=1e-3)
    obs = env.reset()
    rule = env.sign > 0
    keep_unit, keep_small = unit.predict(obs, deterministic=True)[0], small.predict(obs, deterministic=True)[0]
    assert (keep_unit == rule).mean() > 0.75 and (keep_unit == keep_small).mean() > 0.98
    gains_unit = unit.policy.token_terms(unit.policy.obs_to_tensor(obs)[0])[2]
    gains_small = small.policy.token_terms(small.policy.obs_to_tensor(obs)[0])[2]
    positive = torch.as_tensor(rule)
    assert float(gains_unit[positive].mean()) > 0.02 > -0.02 > float(gains_unit[~positive].mean())
    torch.testing.assert_close(gains_small, gains_unit, atol=0.02, rtol=0.0)
    small.save(tmp_path / "m.zip")
    loaded = TokenCreditPPO.load(tmp_path / "m.zip", env=env)
    assert loaded.normalize_returns and loaded.return_scale == small.return_scale


def test_learn_leaves_no_sb3_folder_in_the_temp_dir(tmp_path, monkeypatch) -> None:
    """A direct learn() (no logger set by the caller) used to leave an empty <tempdir>/SB3-<time> folder
    per call: SB3's default logger makes one even when it writes nothing (issue 25)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temp dir: no other process's folders
    model = TokenCreditPPO(TokenScorerPolicy, RuleEnv(n_envs=2), n_steps=2, batch_size=4, n_epochs=1, gamma=1.0,
                           gae_lambda=1.0, seed=0, policy_kwargs={"token_baseline": True, "scorer_hidden": [8]})
    model.learn(8)
    model.learn(8, reset_num_timesteps=False)
    assert tempfile.gettempdir() == str(tmp_path) and not list(tmp_path.glob("SB3-*"))


def test_token_critic_needs_token_baseline() -> None:
    env = RuleEnv(n_envs=2)
    model = TokenCreditPPO(TokenScorerPolicy, env, n_steps=2, batch_size=4, seed=0, gae_lambda=1.0)
    with pytest.raises(RuntimeError, match="token_baseline"):
        model.policy.token_terms(model.policy.obs_to_tensor(env.reset())[0])


def test_token_credit_refuses_bootstrapped_returns() -> None:
    # Its per-token decomposition models Monte Carlo returns: GAE lambda < 1 would bootstrap from the critic.
    with pytest.raises(ValueError, match="gae_lambda=1"):
        TokenCreditPPO(TokenScorerPolicy, RuleEnv(n_envs=2), n_steps=2, batch_size=4, seed=0, gae_lambda=0.95)


def test_train_cli_with_token_credit_and_resume(presets, tmp_path) -> None:  # noqa: F811
    runs = tmp_path / "runs"
    args = _train_args(presets, runs, "--timesteps", "64", "--name", "tc", "--set", "agent.credit=token")
    assert main(args) == 0
    rows = [json.loads(line) for line in (runs / "tc" / "metrics.jsonl").read_text().splitlines()]
    assert "train/explained_variance_tokens" in set().union(*rows)
    assert main(["train", "--resume", str(runs / "tc"), "--timesteps", "96"]) == 0
    assert json.loads((runs / "tc" / "eval" / "summary.json").read_text())["timesteps"] >= 96
    assert (runs / "tc" / "scorer" / "scorer.safetensors").is_file()


@pytest.mark.parametrize("extra,match", [
    (["--set", "agent.credit=tokens"], "agent.credit must be one of step, token"),
    (["--set", "agent.credit=token", "--set", "agent.algo=a2c"], "needs algo ppo"),
    (["--set", "agent.credit=token", "--set", "agent.hyperparams.normalize_returns=sometimes"],
     "normalize_returns must be true or false, got 'sometimes'"),
    (["--set", "agent.credit=step", "--set", "agent.hyperparams.normalize_returns=true"],
     "unknown key 'normalize_returns' for PPO"),
])
def test_bad_credit_settings_are_user_errors(presets, tmp_path, capsys, extra, match) -> None:  # noqa: F811
    assert main(_train_args(presets, tmp_path / "runs", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
