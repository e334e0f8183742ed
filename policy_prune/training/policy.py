"""The SB3 actor-critic whose actor IS the token scorer.

Custom networks enter through SB3's seams: ``policy_kwargs`` (scorer / critic sizes) and a pass-through
features extractor for the Dict observation. The action distribution is a masked Bernoulli: only alive,
unprotected tokens are stochastic; dead tokens are always 0 and protected tokens always 1, and neither
contributes to log-probabilities or entropy.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch.nn import functional as F

from policy_prune.core.budget import BudgetInput
from policy_prune.core.features import BASE_FEATURES, FeatureSpec
from policy_prune.core.scorer import LearnedScorer, TokenScorer
from policy_prune.errors import UserError

PROTECTED_COLUMN = BASE_FEATURES.index("protected")


class TokenObsExtractor(BaseFeaturesExtractor):
    """Pass the Dict observation through unchanged: the scorer works per token, not on a flat vector."""

    def __init__(self, observation_space: spaces.Dict) -> None:
        super().__init__(observation_space, features_dim=1)

    def forward(self, observations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return observations


class MaskedBernoulli(Distribution):
    """Independent Bernoulli keep decisions over the free (alive, unprotected) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: torch.Tensor
        self.free: torch.Tensor
        self.protected: torch.Tensor

    def proba_distribution_net(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError("the TokenScorer is the distribution's network")

    def proba_distribution(self, logits: torch.Tensor, free: torch.Tensor, protected: torch.Tensor) -> MaskedBernoulli:  # type: ignore[override]
        """logits, free, protected: [B, N]."""
        self.logits, self.free, self.protected = logits, free.float(), protected.float()
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """[B] summed log-probability of the free tokens' decisions."""
        lp = -F.binary_cross_entropy_with_logits(self.logits, actions.float(), reduction="none")
        return (lp * self.free).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        """[B] summed entropy of the free tokens."""
        ent = F.binary_cross_entropy_with_logits(self.logits, torch.sigmoid(self.logits), reduction="none")
        return (ent * self.free).sum(dim=-1)

    def _fill(self, free_actions: torch.Tensor) -> torch.Tensor:
        return torch.where(self.free.bool(), free_actions, self.protected)

    def sample(self) -> torch.Tensor:
        return self._fill(torch.bernoulli(torch.sigmoid(self.logits)))

    def mode(self) -> torch.Tensor:
        return self._fill((self.logits > 0).float())

    def actions_from_params(self, logits: torch.Tensor, free: torch.Tensor, protected: torch.Tensor,  # type: ignore[override]
                            deterministic: bool = False) -> torch.Tensor:
        self.proba_distribution(logits, free, protected)
        return self.get_actions(deterministic=deterministic)

    def log_prob_from_params(self, logits: torch.Tensor, free: torch.Tensor,  # type: ignore[override]
                             protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actions = self.actions_from_params(logits, free, protected)
        return actions, self.log_prob(actions)


class PooledCritic(nn.Module):
    """Value of a state: per-token embedding, mean-pooled over alive tokens, with the context.

    With ``token_baseline`` it also predicts, per token, how much keeping that token adds to the
    return (``token_values``): the action-dependent part of the baseline that per-token credit uses.
    """

    def __init__(self, feature_dim: int, context_dim: int, hidden: Sequence[int] = (64,), token_baseline: bool = False) -> None:
        super().__init__()
        width = hidden[0]
        self.token = nn.Sequential(nn.Linear(feature_dim, width), nn.Tanh())
        dims = [width + context_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
        # Per-token head on [token embedding | row's pooled embedding | context]; starts at 0 (no credit).
        self.keep_gain: nn.Sequential | None = None
        if token_baseline:
            last = nn.Linear(width, 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.keep_gain = nn.Sequential(nn.Linear(2 * width + context_dim, width), nn.Tanh(), last)

    def _embed(self, tokens: torch.Tensor, alive: AliveTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [M, W] of the alive tokens, their mean per row [B, W])."""
        h = self.token(alive.gather(tokens))
        return h, alive.row_mean(h)

    def forward(self, tokens: torch.Tensor, alive: AliveTokens, context: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, F], the alive slots, context [B, G] -> values [B, 1]."""
        return self.body(torch.cat([self._embed(tokens, alive)[1], context], dim=-1))

    def token_values(self, tokens: torch.Tensor, alive: AliveTokens, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B], keep gains [B, N]): the return is modelled as V + sum_i (keep_i - p_i) * gain_i."""
        if self.keep_gain is None:
            raise RuntimeError("this critic was built without token_baseline")
        h, pooled = self._embed(tokens, alive)
        row = torch.cat([pooled, context], dim=-1)
        values = self.body(row).squeeze(-1)
        # keep_gain's first layer reads [token embedding | row]: its row half is applied once per row
        # (the same weights and result as concatenating, at a third of the per-token cost).
        first: nn.Linear = self.keep_gain[0]  # type: ignore[assignment]
        rest = self.keep_gain[1:]
        width = h.shape[1]
        row_term = torch.nn.functional.linear(row, first.weight[:, width:], first.bias)  # [B, W]
        gains = rest(torch.nn.functional.linear(h, first.weight[:, :width]) + row_term[alive.rows]).squeeze(-1)
        return values, alive.scatter(gains)


@dataclass
class AliveTokens:
    """The alive slots of a batch of observations, packed: the per-token networks run on these only.

    After the first site most slots of an observation are dead (pruned earlier, or text padding);
    running the MLPs on the M alive tokens instead of all B x N slots is what makes the PPO update cheap.
    """

    rows: torch.Tensor
    """[M] long: the row of each alive token."""
    cols: torch.Tensor
    """[M] long: its slot."""
    counts: torch.Tensor
    """[B] alive tokens per row."""
    shape: tuple[int, int]
    """(B, N)."""

    @staticmethod
    def of(alive: torch.Tensor) -> AliveTokens:
        """From an [B, N] alive mask (any dtype; > 0 is alive)."""
        mask = alive > 0
        rows, cols = mask.nonzero(as_tuple=True)
        return AliveTokens(rows, cols, mask.sum(dim=1), (mask.shape[0], mask.shape[1]))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [M, ...]."""
        return x[self.rows, self.cols]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[M] -> [B, N], zeros at dead slots (differentiable)."""
        return values.new_zeros(self.shape).index_put((self.rows, self.cols), values)

    def row_mean(self, h: torch.Tensor) -> torch.Tensor:
        """[M, W] -> [B, W]: the mean over each row's alive tokens (0 for a row with none), summed in fp32."""
        total = h.new_zeros(self.shape[0], h.shape[1], dtype=torch.float32).index_add(0, self.rows, h.float())
        return total / self.counts.clamp_min(1).unsqueeze(1).to(total.dtype)


class TokenScorerPolicy(ActorCriticPolicy):
    """Actor = TokenScorer (shared MLP per token), critic = PooledCritic, masked Bernoulli actions."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.MultiBinary,
        lr_schedule: Any,
        scorer_hidden: Sequence[int] = (64, 64),
        critic_hidden: Sequence[int] = (64,),
        init_keep_logit: float = 3.0,
        projection_shape: Sequence[int] | None = None,
        token_baseline: bool = False,
        budget_knots: int = 0,
        amp: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.token_baseline = token_baseline
        self.budget_knots = int(budget_knots)
        if amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
        self.amp = amp
        self.scorer_hidden = list(scorer_hidden)
        self.projection_shape = None if projection_shape is None else [int(d) for d in projection_shape]
        self.critic_hidden = list(critic_hidden)
        self.init_keep_logit = init_keep_logit
        kwargs.setdefault("features_extractor_class", TokenObsExtractor)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        obs_space: Any = self.observation_space
        feature_dim = obs_space["tokens"].shape[-1]
        context_dim = obs_space["context"].shape[0]
        self.scorer = TokenScorer(feature_dim, context_dim, self.scorer_hidden, self.init_keep_logit)
        self.critic = PooledCritic(feature_dim, context_dim, self.critic_hidden, self.token_baseline)
        self.action_dist = MaskedBernoulli()
        if self.projection_shape is not None:
            # The env's feature projection, kept in the checkpoint so an export needs no backbone:
            # a buffer (saved and loaded with the weights, never trained). Filled by set_projection.
            self.register_buffer("projection", torch.zeros(self.projection_shape))
        if self.budget_knots:
            # The budget multipliers lambda(f) (training/budget.py), saved with every checkpoint so a
            # resumed run continues with them: a buffer, never trained by the optimiser.
            self.register_buffer("budget_lam", torch.zeros(self.budget_knots, dtype=torch.float64))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(scorer_hidden=self.scorer_hidden, critic_hidden=self.critic_hidden,
                    init_keep_logit=self.init_keep_logit, projection_shape=self.projection_shape,
                    token_baseline=self.token_baseline, budget_knots=self.budget_knots, amp=self.amp)
        return data

    def set_projection(self, projection: torch.Tensor) -> None:
        """Record the feature projection [D, P] the env computes observations with."""
        self.projection_shape = list(projection.shape)
        self.register_buffer("projection", projection.detach().to(self.device, torch.float32).clone())

    def _autocast(self) -> Any:
        """bf16 autocast of the per-token networks (``amp``): on CPUs with native bf16 (AVX512-BF16, AMX)
        their matmuls and tanh run about 2.3x faster; the distribution's math stays in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16")

    def _dist(self, obs: dict[str, torch.Tensor], alive: AliveTokens | None = None) -> MaskedBernoulli:
        tokens, mask = obs["tokens"], obs["alive"] > 0
        alive = alive or AliveTokens.of(mask)
        protected = (tokens[..., PROTECTED_COLUMN] > 0.5) & mask
        with self._autocast():
            packed = self.scorer.forward_packed(alive.gather(tokens), alive.rows, obs["context"])
        logits = alive.scatter(packed.float())
        dist: MaskedBernoulli = self.action_dist  # type: ignore[assignment]
        return dist.proba_distribution(logits, mask & ~protected, protected)

    def _values(self, obs: dict[str, torch.Tensor], alive: AliveTokens | None = None) -> torch.Tensor:
        with self._autocast():
            values = self.critic(obs["tokens"], alive or AliveTokens.of(obs["alive"]), obs["context"])
        return values.float()

    def token_terms(self, obs: Any) -> tuple[MaskedBernoulli, torch.Tensor, torch.Tensor]:
        """(action distribution, values [B], per-token keep gains [B, N]) for per-token credit."""
        feats: dict[str, torch.Tensor] = self.extract_features(obs)  # type: ignore[assignment]
        alive = AliveTokens.of(feats["alive"])
        with self._autocast():
            values, gains = self.critic.token_values(feats["tokens"], alive, feats["context"])
        return self._dist(feats, alive), values.float(), gains.float()

    def forward(self, obs: Any, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats: dict[str, torch.Tensor] = self.extract_features(obs)  # type: ignore[assignment]
        alive = AliveTokens.of(feats["alive"])
        dist = self._dist(feats, alive)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, self._values(feats, alive), dist.log_prob(actions)

    def evaluate_actions(self, obs: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        feats: dict[str, torch.Tensor] = self.extract_features(obs)  # type: ignore[assignment]
        alive = AliveTokens.of(feats["alive"])
        dist = self._dist(feats, alive)
        return self._values(feats, alive), dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: Any) -> Distribution:
        return self._dist(self.extract_features(obs))  # type: ignore[arg-type]

    def predict_values(self, obs: Any) -> torch.Tensor:
        return self._values(self.extract_features(obs))  # type: ignore[arg-type]

    def learned_scorer(self, sites: Sequence[int], spec: FeatureSpec | None = None, projection: torch.Tensor | None = None,
                       budget: BudgetInput | None = None) -> LearnedScorer:
        """The actor as a standalone LearnedScorer (a copy on the CPU, in eval mode); ``budget`` for a
        budget-conditioned policy."""
        net = TokenScorer(self.scorer.feature_dim, self.scorer.context_dim, self.scorer.hidden)
        net.load_state_dict({k: v.detach().cpu() for k, v in self.scorer.state_dict().items()})
        stored = getattr(self, "projection", None)
        if projection is None and isinstance(stored, torch.Tensor):
            projection = stored.detach().cpu().clone()
        return LearnedScorer(net.eval(), list(sites), spec or FeatureSpec(), projection, budget=budget)


def resolve_amp(amp: str | None, device: str) -> str | None:
    """``agent.amp`` for this machine: "auto" is bf16 where the device computes bf16 natively, else None."""
    if amp != "auto":
        return amp
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native else None


def load_learned_scorer(checkpoint: Path, sites: Sequence[int], spec: FeatureSpec | None = None) -> LearnedScorer:
    """The scorer inside an SB3 checkpoint zip, read without unpickling.

    SB3 zips hold ``policy.pth`` (a state dict) next to JSON ``data``; the state dict is read with
    ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    try:
        with zipfile.ZipFile(checkpoint) as zf:
            state = torch.load(io.BytesIO(zf.read("policy.pth")), map_location="cpu", weights_only=True)
            data = json.loads(zf.read("data"))
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint {checkpoint}: {exc}") from None
    kwargs = data.get("policy_kwargs", {})
    hidden = [int(h) for h in kwargs.get("scorer_hidden", [64, 64])] if isinstance(kwargs, dict) else [64, 64]
    weights = {k.removeprefix("scorer."): v for k, v in state.items() if k.startswith("scorer.")}
    in_dim = weights["body.0.weight" if hidden else "out.weight"].shape[1]  # the first layer reads [features | context]
    spec = spec or FeatureSpec()
    net = TokenScorer(spec.dim, in_dim - spec.dim, hidden)
    net.load_state_dict(weights)
    projection = state.get("projection")
    return LearnedScorer(net.eval(), list(sites), spec, None if projection is None else projection.float())
