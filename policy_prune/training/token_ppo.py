"""PPO with per-token credit: each keep decision gets its own advantage.

Plain PPO gives every token of a step the step's one advantage, so a token's gradient carries the
noise of all the other tokens' random decisions. On digits-vit dropping one digit patch moves the
cross-entropy by about 0.17 and dropping one clutter fragment by about 0.01: the fragments' signal
drowns and the policy learns "keep ink" instead of "keep the object".

Here the critic also predicts a keep gain g_i per token, and the return is modelled as

    R ~ V(s) + sum_i (a_i - p_i) g_i          (p_i: the rollout policy's keep probability)

Token i's advantage is R - V(s) - sum_{j != i} (a_j - p_j) g_j: the other tokens' predicted
contributions are taken out. They are independent of a_i given the state (the decisions of a step
are independent Bernoullis), so the policy gradient stays unbiased (an action-dependent factorised
baseline, Wu et al., ICLR 2018) while most of the other tokens' noise cancels. The surrogate is
PPO's clipped one, per token (ratio of token i's own decision probabilities), averaged over the free
tokens; ``target_kl`` bounds the mean per-token KL.

``normalize_returns``: the critic regresses the returns in units of their running standard deviation. A
token's gain is a small part of a small return (digits-vit: returns of std 0.03-0.04, gains of 0.001-0.005), and
Adam's steps are about the learning rate whatever the loss's scale, so in raw units the gain head's
weights jitter at the size of the gains themselves: the trained preset's gains were ~0.001 for digit,
clutter and blank patches alike. In return-std units it ranks them digit > clutter > blank (the
policy's deployed accuracy on val did not change, 3 seeds: off in the presets). The advantages are
normalised per minibatch either way, so the policy's loss is unchanged in scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from policy_prune.training.policy import TokenScorerPolicy
from policy_prune.training.tracking import folderless_logger


def _rows(obs: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in obs.items()}


def keep_contributions(actions: torch.Tensor, p_keep: torch.Tensor, gains: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """[B, N] (a_i - p_i) g_i on the free tokens: each decision's modelled share of the return beyond V."""
    return free * (actions - p_keep) * gains


def token_advantages(returns: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, p_keep: torch.Tensor,
                     gains: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """[B, N] per-token advantages R - V - sum_{j != i} (a_j - p_j) g_j (free tokens only; others 0)."""
    contrib = keep_contributions(actions, p_keep, gains, free)
    shared = returns - values - contrib.sum(dim=1)
    return (shared.unsqueeze(1) + contrib) * free


class TokenCreditPPO(PPO):
    """SB3 PPO whose update uses per-token advantages (rollout collection is PPO's own)."""

    policy: TokenScorerPolicy

    def __init__(self, *args: Any, normalize_returns: bool = False, **kwargs: Any) -> None:
        self.normalize_returns = normalize_returns
        self.return_scale: float | None = None
        """Running standard deviation of the rollouts' returns (saved with the model, so a resumed run goes on with it)."""
        self.ranking: Any = None
        """A supervised ranking of the first site (training/warm_start.py) whose loss, times ``ranking_coef``, is
        added to every minibatch's; never saved (the run computes it again on resume)."""
        self.ranking_coef = 0.0
        super().__init__(*args, **kwargs)

    def scaled_returns(self, returns: torch.Tensor) -> torch.Tensor:
        """``returns`` over the running standard deviation (updated with this rollout's), or as they are."""
        if not self.normalize_returns:
            return returns
        std = float(returns.std()) if len(returns) > 1 else 0.0
        self.return_scale = std if self.return_scale is None else 0.9 * self.return_scale + 0.1 * std
        return returns / max(self.return_scale, 1e-6)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "ranking"]

    def _setup_model(self) -> None:
        super()._setup_model()  # runs at construction and after ``load`` restored the saved settings
        # The per-token decomposition models the Monte Carlo return of the episode; GAE with
        # lambda < 1 would bootstrap part of it from the step critic, which the token gains do not model.
        if self.gae_lambda != 1.0:
            raise ValueError(f"per-token credit needs gae_lambda=1 (Monte Carlo returns), got {self.gae_lambda}")

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        # Without a logger of the caller's, SB3 makes an empty tempdir/SB3-<time> folder per learn() (issue 25).
        if not self._custom_logger and self.tensorboard_log is None:
            self.set_logger(folderless_logger(self.verbose))
        return super()._setup_learn(*args, **kwargs)

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        data = next(self.rollout_buffer.get(batch_size=None))  # the whole rollout, flattened
        obs: dict[str, torch.Tensor] = data.observations  # type: ignore[assignment]
        actions, returns = data.actions.float(), self.scaled_returns(data.returns.flatten())
        n = len(returns)
        # The rollout policy's probabilities and the critic's gains, before any update changes them.
        with torch.no_grad():
            parts = []
            for idx in torch.arange(n, device=returns.device).split(self.batch_size):
                dist, v, g = self.policy.token_terms(_rows(obs, idx))  # ``dist`` is reused: copy out now
                parts.append((dist.logits, dist.free, v, g))
            old_logits, free, values, gains = (torch.cat(t) for t in zip(*parts, strict=True))
            p_keep = torch.sigmoid(old_logits)
            old_logp = -F.binary_cross_entropy_with_logits(old_logits, actions, reduction="none")
            advantages = token_advantages(returns, values, actions, p_keep, gains, free)

        pg_losses, value_losses, entropy_losses, clip_fractions, kls, ranking_losses = [], [], [], [], [], []
        loss = torch.zeros(())
        continue_training = True
        for _ in range(self.n_epochs):
            for idx in torch.randperm(n, device=returns.device).split(self.batch_size):  # a new order each epoch
                dist, v, g = self.policy.token_terms(_rows(obs, idx))
                logits, f, a = dist.logits, free[idx], actions[idx]
                n_free = f.sum().clamp_min(1.0)
                adv = advantages[idx]
                if self.normalize_advantage:
                    mean = adv.sum() / n_free
                    std = (((adv - mean) * f).pow(2).sum() / n_free).sqrt()
                    adv = (adv - mean) / (std + 1e-8) * f
                log_ratio = -F.binary_cross_entropy_with_logits(logits, a, reduction="none") - old_logp[idx]
                ratio = torch.exp(log_ratio)
                surrogate = torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
                policy_loss = -(surrogate * f).sum() / n_free
                predicted = v + keep_contributions(a, p_keep[idx], g, f).sum(dim=1)
                value_loss = F.mse_loss(returns[idx], predicted)
                entropy = (dist.entropy().sum() / n_free) if self.ent_coef else torch.zeros(())
                loss = policy_loss - self.ent_coef * entropy + self.vf_coef * value_loss
                if self.ranking is not None and self.ranking_coef:
                    ranking_loss = self.ranking.loss(self.policy.scorer, self.ranking.draw())
                    ranking_losses.append(ranking_loss.item())
                    loss = loss + self.ranking_coef * ranking_loss
                with torch.no_grad():
                    kl = float((((ratio - 1) - log_ratio) * f).sum() / n_free)
                    clip_fractions.append(float((((ratio - 1).abs() > clip_range).float() * f).sum() / n_free))
                pg_losses.append(policy_loss.item())
                value_losses.append(value_loss.item())
                entropy_losses.append(-entropy.item())
                kls.append(kl)
                if self.target_kl is not None and kl > 1.5 * self.target_kl:
                    continue_training = False
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break

        with torch.no_grad():
            modelled = values + keep_contributions(actions, p_keep, gains, free).sum(dim=1)
        record: dict[str, Any] = {
            "train/entropy_loss": np.mean(entropy_losses),
            "train/policy_gradient_loss": np.mean(pg_losses),
            "train/value_loss": np.mean(value_losses),
            "train/approx_kl": np.mean(kls),
            "train/clip_fraction": np.mean(clip_fractions),
            "train/loss": loss.item(),
            "train/explained_variance": explained_variance(values.cpu().numpy(), returns.cpu().numpy()),
            # How much of the return the per-token gains explain beyond V: the noise they remove.
            "train/explained_variance_tokens": explained_variance(modelled.cpu().numpy(), returns.cpu().numpy()),
            "train/clip_range": clip_range,
        }
        if ranking_losses:
            record["train/ranking_loss"] = np.mean(ranking_losses)
        for key, value in record.items():
            self.logger.record(key, value)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
