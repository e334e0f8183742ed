"""Token scorers and decision rules: the one interface that learned policies and baselines share.

A scorer gives every alive token of a state a score (higher = keep) at a pruning site; a decision
rule turns scores into a keep mask: ``threshold`` (per-sample counts) or ``keep_ratio`` (fixed counts
per site: static shapes). ``keep_fn`` adapts a scorer + rule to ``TokenBackbone.forward_pruned``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from policy_prune.core.backbones.base import KeepFn, TokenBackbone, TokenState
from policy_prune.core.budget import BudgetInput
from policy_prune.core.features import FeatureSpec, make_projection, token_features


class Scorer(Protocol):
    """Anything that scores tokens at a site (learned scorer or heuristic baseline)."""

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        """[B, N] scores over the state's slots (higher = keep); invalid slots are ignored by rules."""
        ...


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh; under torch.compile written as 2 sigmoid(2x) - 1 (the same function, within 2e-7).

    Inductor's CPU code for tanh ran 3.6x slower than eager ATen's (0.92 vs 0.26 ms on [9280, 64]);
    the sigmoid form compiles to 0.35 ms. At batch 64 the scorer's tanh layers were the largest part
    of its compiled time on digits-vit.
    """
    if torch.compiler.is_compiling():
        return 2.0 * torch.sigmoid(2.0 * x) - 1.0
    return torch.tanh(x)


class Tanh(nn.Tanh):
    """The scorer's activation module (:func:`tanh`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh(x)


class TokenScorer(nn.Module):
    """The policy's actor: an MLP shared across tokens, [token features | context] -> one keep logit."""

    def __init__(self, feature_dim: int, context_dim: int, hidden: Sequence[int] = (64, 64), init_keep_logit: float = 3.0) -> None:
        super().__init__()
        dims = [feature_dim + context_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), Tanh()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(dims[-1], 1)
        # Start near keep-all (sigmoid(3) = 0.95): early episodes stay accurate and pruning is learned.
        nn.init.orthogonal_(self.out.weight, gain=0.01)
        nn.init.constant_(self.out.bias, init_keep_logit)
        self.feature_dim = feature_dim
        self.context_dim = context_dim
        self.hidden = list(hidden)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, F], context [B, G] (or [1, G]: the same for every row) -> logits [B, N].

        The first layer sees [token | context]; its context half is applied once per row and broadcast
        over the tokens (the same weights and result as concatenating, without an [B, N, G] copy).
        """
        return self._head(self._first(tokens, context, None))

    def forward_packed(self, tokens: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """tokens [M, F] of the rows ``rows`` [M] (long), context [B, G] -> logits [M].

        The same function as :meth:`forward` on only the tokens given (training packs the alive ones).
        """
        return self._head(self._first(tokens, context, rows))

    def _first(self, tokens: torch.Tensor, context: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        first: nn.Linear = self.body[0] if len(self.body) else self.out  # type: ignore[assignment]
        w_tok, w_ctx = first.weight[:, : self.feature_dim], first.weight[:, self.feature_dim :]
        row = torch.nn.functional.linear(context.to(w_ctx.dtype), w_ctx, first.bias)  # [B, H]
        if rows is None and row.shape[0] == 1:  # one context for every row (batch 1, planned sites): the bias
            return torch.nn.functional.linear(tokens, w_tok, row[0])
        return torch.nn.functional.linear(tokens, w_tok) + (row.unsqueeze(1) if rows is None else row[rows])

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The layers after the first Linear, called as functions: at batch 1 on the CPU the scorer's tensors
        are small and each module call's Python cost (slicing ``body`` alone built a new Sequential per call)
        was most of its time (62 -> 33 us per call on a 100-token row)."""
        if len(self.body):  # hidden layers; with none the scorer is linear in its features
            layers = list(self.body._modules.values())
            h = tanh(h)
            for linear in layers[2::2]:
                h = tanh(torch.nn.functional.linear(h, linear.weight, linear.bias))  # type: ignore[arg-type]
            h = torch.nn.functional.linear(h, self.out.weight, self.out.bias)
        return h.squeeze(-1)


def site_context(state: TokenState, site_index: int, n_sites: int, spent: torch.Tensor, n0: torch.Tensor,
                 budget: torch.Tensor | float | None = None) -> torch.Tensor:
    """[B, G] context exactly as the env builds it: site one-hot, alive fraction, compute spent[, budget].

    The alive fraction is each row's alive tokens over its own embedded tokens ``n0`` [B], never over the
    padded width: a row gets the same context alone, in any batch and at any padding (issue #23; version
    4 divided by the padded width, so a passage's decisions changed with its batch-mates).
    """
    alive = state.alive_counts.float() / n0.to(state.alive_counts.device).float().clamp_min(1.0)
    return context_rows(site_index, n_sites, alive, spent, state.tokens.device, budget)


def context_width(n_sites: int, budgeted: bool) -> int:
    """G: site one-hot, alive fraction, compute spent, and the target FLOPs ratio of a budgeted scorer."""
    return n_sites + 2 + int(budgeted)


def context_rows(site_index: int, n_sites: int, alive: torch.Tensor, spent: torch.Tensor,
                 device: torch.device, budget: torch.Tensor | float | None = None) -> torch.Tensor:
    """[B, G] context rows from the [B] alive fractions, [B] compute spent before the site and, for a
    budget-conditioned scorer, the target FLOPs ratio ([B] or one number)."""
    ctx = torch.zeros(alive.shape[0], context_width(n_sites, budget is not None), device=device)
    ctx[:, site_index] = 1.0
    ctx[:, n_sites] = alive.to(device)
    ctx[:, n_sites + 1] = spent.float().clamp(0.0, 1.0).to(device)
    if budget is not None:
        ctx[:, n_sites + 2] = torch.as_tensor(budget, dtype=ctx.dtype).to(device)
    return ctx


def spent_fraction(backbone: TokenBackbone, sites: Sequence[int], n0: torch.Tensor, kept: Sequence[torch.Tensor], n_full: int) -> torch.Tensor:
    """[B] FLOPs fraction used before the decision at ``sites[len(kept)]``.

    n0: [B] tokens per row at embedding (text rows differ); kept[i]: [B] tokens kept at site i.
    The env's per-step costs add up to the same number.
    """
    n0 = n0.double().cpu()
    total = backbone.embed_flops(n_full) + sites[0] * backbone.block_flops(n0)
    for i, k in enumerate(kept):
        total = total + (sites[i + 1] - sites[i]) * backbone.block_flops(k.double().cpu())
    return total / row_full_flops(backbone, n0, n_full)


def row_full_flops(backbone: TokenBackbone, n0: torch.Tensor, n_full: int) -> torch.Tensor:
    """[B] FLOPs of the unpruned model on each row's own token count (padding is not work)."""
    blocks = backbone.depth * backbone.block_flops(n0.double().cpu())
    return torch.as_tensor(backbone.embed_flops(n_full) + blocks + backbone.head_flops(), dtype=torch.float64)


@dataclass
class LearnedScorer:
    """A trained TokenScorer with the feature spec and projection it was trained on.

    Not a :class:`Scorer`: its context holds the compute spent so far, which depends on what the earlier
    sites of the same pass kept, so it scores through ``make_keep_fn`` (``scores_in_episode``).
    """

    net: TokenScorer
    sites: list[int]
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    projection: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    budget: BudgetInput | None = None
    """The budget input of a budget-conditioned scorer (None: trained at one lambda)."""
    target: float | None = None
    """The target FLOPs ratio this scorer is told (budget-conditioned scorers; see :meth:`at`)."""
    merge: bool = False
    """Dropped tokens are averaged into their most similar kept token (``TokenState.prune(merge=True)``),
    as the env this scorer trained in did (``env.merge``)."""

    def __repr__(self) -> str:
        # Not the dataclass's: it printed the projection tensor, the backbone signature and every calibration
        # point (some 6 kB for a default scorer).
        trained_for = (self.meta.get("backbone") or {}).get("architecture")
        parts = [f"sites={self.sites}", f"features={self.spec.dim}", f"hidden={self.net.hidden}"]
        if self.budget is not None:
            parts.append(f"budget=[{self.budget.low:g}, {self.budget.high:g}] ({len(self.budget.calibration)} calibrated points)")
        parts += [f"target={self.target:g}"] if self.target is not None else []
        parts += ["merge=True"] if self.merge else []
        parts += [f"trained_for={trained_for!r}"] if trained_for else []
        parts += [f"path={str(self.meta['path'])!r}"] if self.meta.get("path") else []
        return f"LearnedScorer({', '.join(parts)})"

    def at(self, flops: float | None) -> LearnedScorer:
        """This scorer told to run at ``flops`` (a shallow copy; the weights are shared).

        ``None`` = the budget's default. ValueError for a scorer without a budget input.
        """
        if self.budget is None:
            if flops is None:
                return self
            raise ValueError("this scorer has no budget input (it was trained at one lambda): meet a FLOPs "
                             "target with the keep_ratio rule instead")
        return replace(self, target=self.budget.check(self.budget.default if flops is None else flops))

    @property
    def budget_value(self) -> float | None:
        """The budget column of this scorer's context (None for a scorer without a budget input)."""
        if self.budget is None:
            return None
        return self.budget.default if self.target is None else self.target

    def context(self, state: TokenState, site_index: int, spent: torch.Tensor, n0: torch.Tensor) -> torch.Tensor:
        """[B, G] context of this scorer at ``site_index`` given the [B] compute spent before it and the [B]
        tokens each row was embedded with."""
        return site_context(state, site_index, len(self.sites), spent, n0, self.budget_value)

    def episode_context(self, backbone: TokenBackbone, state: TokenState, site_index: int, n0: torch.Tensor,
                        kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, G] context with the exact compute spent by this episode's earlier decisions ``kept``."""
        return self.context(state, site_index, spent_fraction(backbone, self.sites, n0, kept, state.n_full), n0)

    def scores_in_episode(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int,
                          n0: torch.Tensor, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits [B, N] with the exact compute-spent context of this episode's earlier decisions."""
        return self.logits(backbone, state, layer, self.episode_context(backbone, state, site_index, n0, kept))

    def logits(self, backbone: TokenBackbone, state: TokenState, layer: int, context: torch.Tensor) -> torch.Tensor:
        """Logits [B, N] of the state's slots before block ``layer`` given the [B, G] context rows (or one [1, G] row for all)."""
        # Read, never written back: a PrunedModel moves its own copy of the projection (a buffer).
        projection = self.projection if self.projection is not None else make_projection(backbone, self.spec)
        device = state.tokens.device
        if self.net.out.weight.device != device:  # a CPU-loaded scorer on a CUDA model: its MLP follows
            self.net.to(device)
        # The MLP runs in its own dtype (fp32 unless the user cast it), whatever the backbone's dtype.
        dtype = self.net.out.weight.dtype
        features = token_features(backbone, state, layer, projection.to(device), self.spec)
        return self.net(features.to(dtype), context.to(dtype))


def keeps_all(rule: str, value: float) -> bool:
    """Whether ``rule`` at ``value`` keeps every token whatever the scores (keep_ratio 1, threshold -inf):
    such a site runs no scorer (its features and MLP would decide nothing) and is charged no selection FLOPs."""
    return value >= 1.0 if rule == "keep_ratio" else value == float("-inf")


def site_values(values: float | Sequence[float], n_sites: int) -> list[float]:
    """One rule value per site from one number or a per-site list (a short list repeats its last value)."""
    per_site = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    return [per_site[min(i, len(per_site) - 1)] for i in range(n_sites)]


def idle_sites(rule: str, values: float | Sequence[float], n_sites: int) -> list[bool]:
    """Per site: whether ``rule`` at its value keeps every token there (:func:`keeps_all`), so no scorer runs."""
    return [keeps_all(rule, v) for v in site_values(values, n_sites)]


def keep_count(value: float, n_prunable: torch.Tensor, n_protected: torch.Tensor | int = 0) -> torch.Tensor:
    """How many of ``n_prunable`` [B] tokens the keep_ratio rule keeps at ratio ``value``: ``value`` of each
    row's alive tokens, its ``n_protected`` (always kept) counted in, rounded; at least one prunable token
    where a row has one and ``value`` > 0.

    Counting the protected tokens in makes a row's FLOPs about ``value`` of its own whatever its length: a
    ratio of the prunable tokens alone keeps [CLS] and [SEP] on top, so an 8-token query at ratio 0.2 ran
    0.35 of its FLOPs and a 120-token passage 0.21, and a budget solved on one split's mix of lengths
    missed it on another's (minilm-text: test ran 0.26 at 0.25 solved on val).
    """
    prunable = n_prunable.long()
    kept = torch.round(value * (prunable + n_protected).float()).long() - n_protected
    floor = prunable.clamp(max=1) if value > 0 else torch.zeros_like(prunable)
    return torch.maximum(kept, floor).minimum(prunable)


def decide(scores: torch.Tensor, state: TokenState, rule: str, value: float) -> torch.Tensor:
    """Keep mask [B, N] from scores [B, N].

    rule="threshold": keep where score > value (for a learned scorer's logits, 0 = probability 0.5).
    rule="keep_ratio": keep the top prunable alive tokens of every row, :func:`keep_count` of them (``value`` of
    its alive tokens, protected ones counted in), so all rows keep the same count when they have the same
    number of alive tokens (static shapes).
    Protected tokens are always kept by the pruning op itself.
    """
    prunable = state.valid & ~state.protected
    if rule == "threshold":
        return (scores > value) & prunable
    if rule == "keep_ratio":
        k = keep_count(value, prunable.sum(dim=1), (state.valid & state.protected).sum(dim=1))
        masked = scores.masked_fill(~prunable, float("-inf"))
        order = masked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return (rank < k.unsqueeze(1)) & prunable
    raise ValueError(f"unknown decision rule {rule!r} (threshold or keep_ratio)")


def make_keep_fn(backbone: TokenBackbone, scorer: Any, rule: str, values: float | Sequence[float]) -> KeepFn:
    """A KeepFn for ``backbone.forward_pruned``: ``values`` is one number or one per site."""
    per_site = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    n0: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []

    def fn(state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        if site_index == 0:  # a new forward pass: forget the previous one's counts
            n0[:] = [state.alive_counts]
            kept.clear()
        value = per_site[min(site_index, len(per_site) - 1)]
        if keeps_all(rule, value):  # nothing to decide: no features, no MLP
            keep = state.valid & ~state.protected
        else:
            if isinstance(scorer, LearnedScorer):
                s = scorer.scores_in_episode(backbone, state, site_index, layer, n0[0], kept)
            else:
                s = scorer.scores(backbone, state, site_index, layer)
            keep = decide(s, state, rule, value)
        kept.append((keep | (state.protected & state.valid)).sum(dim=1))
        return keep

    return fn


def random_scorer(backbone: TokenBackbone, sites: Sequence[int], seed: int = 0, hidden: Sequence[int] = (64, 64),
                  budget: BudgetInput | None = None) -> LearnedScorer:
    """A LearnedScorer with random weights for ``backbone`` (its logits spread around 0); with ``budget``
    it takes the budget input like a budget-conditioned scorer."""
    spec = FeatureSpec()
    torch.manual_seed(seed)
    net = TokenScorer(spec.dim, context_width(len(sites), budget is not None), hidden)
    nn.init.normal_(net.out.weight, std=1.0)
    nn.init.zeros_(net.out.bias)
    projection = make_projection(backbone, spec)
    return LearnedScorer(net.eval(), list(sites), spec, projection, {"backbone": backbone.signature()}, budget)
