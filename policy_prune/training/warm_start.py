"""A supervised warm start of the scorer at the first pruning site, before RL (issue #24's tight budgets).

At the tight end PPO's reward says little about which of the first site's tokens matter: on digits-vit the
trained scorers rank ink first, the digit and clutter fragments alike. This gives the policy a denser signal,
computed by the env on its own train split with no label:

- **occlusion values.** S is the ``keep`` share of a sample's prunable tokens that similarity-pre keeps (the
  lowest ``redundancy`` feature, the seed paper's score). A token's value is v(S + i) - v(S) for i outside S and
  v(S) - v(S - i) for i in S, where v reads the frozen model run on the protected tokens and S alone: the
  probability of the unpruned model's own predicted class (classifiers) or the cosine of the embedding to the
  unpruned one (encoders). One batched forward of short sequences per sample.
- **the fit.** The scorer's logits at the first site are fitted to put each sample's top values first (a
  softmax over its prunable tokens against a target spread over the top ``keep`` share, label-smoothed so the
  logit gap stays finite), with every row's mean logit held at the scorer's starting level: PPO starts from the
  same keep rate, with this ranking. The budget column of the context is drawn anew for every batch.
- **during RL** (``aux_coef``): the same cross-entropy added to every PPO minibatch's loss
  (:class:`~policy_prune.training.token_ppo.TokenCreditPPO`). PPO's own gradient on the scorer is small and
  noisy, and Adam steps by about the learning rate whatever its size, so without it the ranking washes out.

On digits-vit the ranking holds with ``aux_coef`` (site 0 alone beats the trained scorers), but the deployed call
scores the same on val, and a one-seed screen on minilm-text gains nothing at 0.35 (README, "What limits the
tight end"): off in the presets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.core.features import BASE_FEATURES
from policy_prune.core.ops import masked_mean
from policy_prune.core.scorer import context_rows, keep_count, spent_fraction

REDUNDANCY_COLUMN = BASE_FEATURES.index("redundancy")
CHUNK = 256


def task_value(backbone: TokenBackbone, reference: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """v(outputs [R, C], row) -> [R]: the probability of the unpruned prediction's class (classifiers) or the
    cosine to the unpruned embedding ``reference`` [B, C] of the row."""
    if backbone.output_kind == "logits":
        classes = reference.argmax(dim=-1)
        return lambda out, row: out.float().softmax(-1)[:, int(classes[row])]
    return lambda out, row: torch.nn.functional.cosine_similarity(out.float(), reference[row].float()[None], dim=-1)


@torch.inference_mode()
def occlusion_values(backbone: TokenBackbone, state: TokenState, start: int, keep_first: torch.Tensor,
                     value: Callable[[torch.Tensor, int], torch.Tensor], keep: float) -> torch.Tensor:
    """[B, N] what each prunable token of ``state`` (the tokens before block ``start``) is worth with few
    tokens left: around S, each row's top ``keep`` share of its prunable tokens by ``keep_first`` [B, N],
    v(S + i) - v(S) for i outside S and v(S) - v(S - i) for i in S, v = ``value`` of the model's output run
    from block ``start`` on the protected tokens and those of S alone. Protected and invalid slots get +inf
    and -inf."""
    out = torch.full(state.valid.shape, -torch.inf)
    out[state.protected & state.valid] = torch.inf
    for row in range(state.valid.shape[0]):
        valid = state.valid[row]
        fixed = (valid & state.protected[row]).nonzero().squeeze(1)
        free = (valid & ~state.protected[row]).nonzero().squeeze(1)
        if len(free) < 2:
            continue
        k = min(int(keep_count(keep, torch.tensor([len(free)]))), len(free) - 1)  # one left outside S at least
        chosen = free[keep_first[row, free].argsort(descending=True)[:k]]
        others = free[~torch.isin(free, chosen)]
        base = torch.cat([fixed, chosen])
        sets = [base[None],
                torch.cat([base.expand(len(others), -1), others[:, None]], dim=1),
                torch.stack([torch.cat([fixed, chosen[chosen != i]]) for i in chosen.tolist()])]
        v_base, v_added, v_removed = (value(_run_on(backbone, state, row, idx, start), row) for idx in sets)
        out[row, others] = (v_added - v_base).float().cpu()
        out[row, chosen] = (v_base - v_removed).float().cpu()
    return out


def _run_on(backbone: TokenBackbone, state: TokenState, row: int, idx: torch.Tensor, start: int) -> torch.Tensor:
    """The model's output from block ``start`` on, run on the slots ``idx`` [R, k] of the state's row."""
    idx = idx.sort(dim=1).values  # embedded order: [CLS] first, as the head reads it
    sub = TokenState(state.tokens[row][idx], state.protected[row][idx], torch.ones_like(idx, dtype=torch.bool),
                     state.positions[row][idx], state.n_full, dense=True)
    return backbone.head(backbone.run_blocks(sub, start, backbone.depth))


@dataclass
class OcclusionRanking:
    """The first site's observations of some train samples and the occlusion ranking the scorer is fitted to."""

    tokens: torch.Tensor
    """[M, N, F] the samples' token features at the first site, as the env observes them."""
    free: torch.Tensor
    """[M, N] bool: the prunable tokens."""
    value: torch.Tensor
    """[M, N] occlusion values (:func:`occlusion_values`)."""
    target: torch.Tensor
    """[M, N] the target distribution over each sample's prunable tokens."""
    spent: torch.Tensor
    """[M] compute spent before the first site (the context's column)."""
    n_sites: int
    budget: tuple[float, float] | None
    keep: float
    generator: torch.Generator

    def logits(self, scorer: Any, rows: torch.Tensor) -> torch.Tensor:
        """[R, N] the scorer's logits for the samples ``rows``, each told a budget drawn from the range."""
        budget = None
        if self.budget is not None:
            low, high = self.budget
            budget = low + (high - low) * torch.rand(len(rows), generator=self.generator)
        # The first site's context as the env builds it: nothing pruned yet, the blocks before it spent.
        ctx = context_rows(0, self.n_sites, torch.ones(len(rows)), self.spent[rows], torch.device("cpu"), budget)
        device = next(scorer.parameters()).device
        return scorer(self.tokens[rows].to(device), ctx.to(device)).float().cpu()

    def loss(self, scorer: Any, rows: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax cross-entropy of the scorer's logits over each sample's prunable tokens against the target
        (unchanged by a shift of a row's logits), plus the squared distance of each row's mean logit to ``level``."""
        z, m = self.logits(scorer, rows), self.free[rows]
        log_p = z.masked_fill(~m, -torch.inf).log_softmax(dim=1).masked_fill(~m, 0.0)
        loss = -(self.target[rows] * log_p).sum(dim=1).mean()
        return loss if level is None else loss + (masked_mean(z.unsqueeze(-1), m).squeeze(-1) - level).square().mean()

    def draw(self, size: int = 64) -> torch.Tensor:
        """``size`` samples drawn at random (with replacement)."""
        return torch.randint(len(self.free), (size,), generator=self.generator)

    def batches(self, size: int = 64) -> list[torch.Tensor]:
        """The samples in a new random order, in batches of ``size``."""
        return list(torch.randperm(len(self.free), generator=self.generator).split(size))

    @torch.no_grad()
    def overlap(self, scorer: Any) -> float:
        """Mean share of each sample's top ``keep`` tokens by value that are also in its top by the scorer's logits."""
        a, b = _top(self.logits(scorer, torch.arange(len(self.free))), self.free, self.keep), self.target_top
        return float(((a & b).sum(dim=1).float() / b.sum(dim=1).clamp_min(1)).mean())

    @property
    def target_top(self) -> torch.Tensor:
        return _top(self.value, self.free, self.keep)


def occlusion_ranking(core: Any, samples: int, keep: float, smoothing: float, seed: int) -> OcclusionRanking:
    """The occlusion values of ``samples`` train samples of the env ``core`` (drawn from ``seed``) at its first
    site, around the ``keep`` share similarity-pre keeps, and their target (``smoothing`` of it spread evenly)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(core.split), generator=g)[: min(samples, len(core.split))]
    backbone, sites = core.backbone, core.sites
    feats, free, values, n0 = [], [], [], []
    with torch.inference_mode():
        for part in idx.split(CHUNK):
            state, f = core.starts.get(part)
            mask = state.valid & ~state.protected
            # similarity-pre keeps the least redundant first (occlusion_values reads the prunable slots only)
            values.append(occlusion_values(backbone, state, sites[0], -f[..., REDUNDANCY_COLUMN].float(),
                                           task_value(backbone, core.teacher(part)), keep))
            feats.append(f.float().cpu())
            free.append(mask.cpu())
            n0.append(state.alive_counts.cpu())
    width = max(f.shape[1] for f in feats)
    # Cloned outside inference mode: the fit differentiates through the scorer with these as inputs.
    tokens = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[1])) for f in feats]).clone()
    free_t = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in free])
    value = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=-torch.inf) for v in values])
    spent = spent_fraction(backbone, sites, torch.cat(n0), [], core.n_tokens).float()
    return OcclusionRanking(tokens, free_t, value, _target(value, free_t, keep, smoothing), spent, len(sites),
                            core.budget, keep, g)


def warm_start(scorer: Any, ranking: OcclusionRanking, epochs: int, lr: float) -> dict[str, float]:
    """Fit ``scorer`` to ``ranking`` for ``epochs``, each row's mean logit held at the scorer's starting level.
    Returns the share of each sample's top occlusion tokens among the scorer's top ones before and after."""
    with torch.no_grad():
        level = masked_mean(ranking.logits(scorer, torch.arange(len(ranking.free))).unsqueeze(-1), ranking.free).mean()
    before = ranking.overlap(scorer)
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    for _ in range(epochs):
        for rows in ranking.batches():
            loss = ranking.loss(scorer, rows, level)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"overlap_before": before, "overlap_after": ranking.overlap(scorer)}


def _top(scores: torch.Tensor, free: torch.Tensor, keep: float) -> torch.Tensor:
    """[B, N] bool: each row's top ``keep`` share of its free tokens by ``scores`` (:func:`keep_count`: at least one)."""
    k = keep_count(keep, free.sum(dim=1))
    order = scores.masked_fill(~free, -torch.inf).argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return (rank < k[:, None]) & free


def _target(value: torch.Tensor, free: torch.Tensor, keep: float, smoothing: float) -> torch.Tensor:
    """[B, N] target distribution over each row's free tokens: 1 - ``smoothing`` spread over its top ``keep``
    share by ``value``, ``smoothing`` over all of them."""
    top = _top(value, free, keep).float()
    n = free.sum(dim=1, keepdim=True).clamp_min(1).float()
    return (1 - smoothing) * top / top.sum(dim=1, keepdim=True).clamp_min(1) + smoothing * free.float() / n
