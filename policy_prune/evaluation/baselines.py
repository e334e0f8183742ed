"""Heuristic baselines and ToMe-style merging, run through the same execution and FLOPs count.

Every baseline is a :class:`Method`: given sites and a decision rule + value it runs the whole
backbone and returns the output and the per-site alive counts, from which the FLOPs follow exactly
as for a learned scorer. Pruning baselines are :class:`~policy_prune.core.scorer.Scorer` s driven by
``make_keep_fn`` + ``forward_pruned``; ToMe is a merge mode (it carries token sizes through blocks).

Registry (``BASELINES``, string names):
    none            no pruning
    random          seeded random scores
    cls-attention   top-k attention received from CLS (EViT, Liang et al. 2022, without fusion)
    token-norm      top-k hidden-state L2 norm
    similarity      the seed paper's redundancy (mean cosine similarity to the other patches; the
                    most redundant are pruned), layer-wise at the env's sites
    similarity-pre  the same, once before block 0 on the embedded patches ("pre-transformer")
    tome            bipartite soft matching with size-weighted averaging and proportional attention
                    (Bolya et al. 2023); timm ViTs and HF encoders with eager / sdpa attention
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.core.features import position_table
from policy_prune.core.scorer import LearnedScorer, Scorer, keep_count, make_keep_fn
from policy_prune.errors import UserError
from policy_prune.evaluation import merge

Output = tuple[torch.Tensor, list[torch.Tensor]]
"""(model output [B, C] or [B, D], alive counts [B] after each site)."""


class Method(Protocol):
    """A way to reduce tokens at pruning sites (a scorer + rule, or merging)."""

    name: str
    sites: list[int] | None
    """Fixed placement (similarity-pre: [0]); None runs at the caller's sites."""
    sweeps: bool
    """False for a method with one operating point only (no pruning)."""

    def forward(self, backbone: TokenBackbone, inputs: Any, sites: Sequence[int], rule: str, value: float) -> Output:
        """Run the backbone reducing tokens before each site by ``rule`` ("keep_ratio" / "threshold")."""
        ...


# ---- scorers ---------------------------------------------------------------------------------------
def has_cls(state: TokenState) -> bool:
    """Slot 0 of every row is the protected, never-moved token 0 (a CLS to read attention from)."""
    return bool(state.protected[:, 0].all()) and bool((state.positions[:, 0] == 0).all())


class RandomScorer:
    """Uniform random scores from a seeded generator (its stream advances call by call)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return torch.rand(state.valid.shape, generator=self.generator).to(state.tokens.device)


class ClsAttentionScorer:
    """Attention each token receives from CLS in the block about to run (EViT's inattentive tokens).

    Models without a CLS use the mean attention over all queries.
    """

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return backbone.attention_from_cls(state, layer, query="cls" if has_cls(state) else "mean")


class TokenNormScorer:
    """L2 norm of each token's hidden state: large-norm tokens are kept."""

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return state.tokens.norm(dim=-1)


def redundancy(x: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each token to the other eligible tokens (the seed paper's score).

    x: [B, N, D]; eligible: [B, N] bool (alive patches: protected tokens are not compared).
    Returns [B, N]; ineligible slots get 0.
    """
    unit = torch.nn.functional.normalize(x.float(), dim=-1) * eligible.unsqueeze(-1)
    sims = unit @ unit.transpose(1, 2)
    n_other = (eligible.sum(dim=1, keepdim=True) - 1).clamp_min(1)
    return (sims.sum(dim=-1) - (unit * unit).sum(dim=-1)) / n_other


def diverse_order(base: torch.Tensor, coords: torch.Tensor, eligible: torch.Tensor, weight: float) -> torch.Tensor:
    """Greedy keep order with a spatial-diversity term, as scores (first pick = highest).

    base: [B, N] keep scores; coords: [B, N, 2] positions in [0, 1]; eligible: [B, N] bool.
    Each pick maximises base + weight * (distance to the nearest earlier pick) / sqrt(2), so the kept
    patches spread over the image instead of collapsing into one region. Ineligible slots get -inf.
    """
    b, n = base.shape
    rows = torch.arange(b, device=base.device)
    nearest = torch.ones_like(base)  # before any pick every token counts as far away
    left = eligible.clone()
    out = torch.full_like(base, float("-inf"))
    for t in range(int(eligible.sum(dim=1).max())):
        pick = (base + weight * nearest).masked_fill(~left, float("-inf")).argmax(dim=1)
        has = left[rows, pick]
        out[rows[has], pick[has]] = float(n - t)
        left[rows, pick] = False
        dist = (coords - coords[rows, pick].unsqueeze(1)).norm(dim=-1) / 2**0.5
        nearest = torch.minimum(nearest, dist)
    return out


class SimilarityScorer:
    """Seed paper: prune the patches most similar on average to the others (score = -redundancy).

    ``diversity`` > 0 adds the spatial-diversity term (:func:`diverse_order`); 0 is pure redundancy.
    """

    def __init__(self, diversity: float = 0.0) -> None:
        self.diversity = diversity

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        eligible = state.valid & ~state.protected
        score = -redundancy(state.tokens, eligible)
        if self.diversity <= 0:
            return score
        yx = position_table(backbone, state.n_full, state.tokens.device)[state.positions]  # [B, N, 2]
        return diverse_order(score, yx, eligible, self.diversity)


# ---- methods ---------------------------------------------------------------------------------------
@dataclass
class NoPruning:
    """The unpruned model (the reference point at FLOPs ratio 1)."""

    name: str = "none"
    sites: list[int] | None = None
    sweeps: bool = False

    def forward(self, backbone: TokenBackbone, inputs: Any, sites: Sequence[int], rule: str, value: float) -> Output:
        out, _, counts = backbone.forward_pruned(inputs, sites, None)
        return out, counts


@dataclass
class ScorerMethod:
    """Prune with a scorer and a decision rule through ``forward_pruned``."""

    name: str
    scorer: Scorer | LearnedScorer
    sites: list[int] | None = None
    sweeps: bool = True
    operating_point: tuple[str, float] | None = None
    """The method's own (rule, value), evaluated besides the FLOPs-matched sweep (learned: threshold 0)."""
    sweep_rule: str = "keep_ratio"
    """Rule the FLOPs-matched sweep varies: "keep_ratio" (one constant ratio at every site) or "threshold"
    (a learned scorer's own per-sample, per-site allocation, its logit threshold solved for the target)."""

    def forward(self, backbone: TokenBackbone, inputs: Any, sites: Sequence[int], rule: str, value: float) -> Output:
        keep_fn = make_keep_fn(backbone, self.scorer, rule, value)
        out, _, counts = backbone.forward_pruned(inputs, self.sites or sites, keep_fn)
        return out, counts


@dataclass
class TomeMethod:
    """ToMe merging down to the token counts the keep_ratio rule would keep (equal FLOPs)."""

    name: str = "tome"
    prop_attn: bool = True
    sites: list[int] | None = None
    sweeps: bool = True

    def forward(self, backbone: TokenBackbone, inputs: Any, sites: Sequence[int], rule: str, value: float) -> Output:
        if rule != "keep_ratio":
            raise UserError(f"tome merges a fixed number of tokens: rule must be keep_ratio, got {rule!r}")
        out, _, counts, _ = forward_merged(backbone, inputs, self.sites or sites, value, self.prop_attn)
        return out, counts


# ---- ToMe merge mode: size bookkeeping through the host's own blocks ---------------------------------
def run_blocks_sized(backbone: TokenBackbone, state: TokenState, size: torch.Tensor | None, start: int, stop: int) -> TokenState:
    """Blocks[start:stop] with proportional attention: log(size) added to every key's logits.

    size: [B, N] tokens each slot stands for, or None (plain attention). All-ones sizes take the
    backbone's own path, so nothing merged means exactly the unpruned computation.
    """
    if size is None or start >= stop or bool((size[state.valid] == 1).all()):
        return backbone.run_blocks(state, start, stop)
    bias = merge.size_bias(size, state.valid, state.tokens.dtype)
    x = state.tokens
    for block in _host_blocks(backbone)[start:stop]:
        x = _call_block(backbone, block, x, bias)
    return state.with_tokens(x)


def _host_blocks(backbone: TokenBackbone) -> Any:
    from policy_prune.core.backbones import HFEncoderBackbone, TimmViTBackbone

    if isinstance(backbone, TimmViTBackbone):
        return backbone.model.blocks
    if isinstance(backbone, HFEncoderBackbone):
        impl = getattr(backbone.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa", None):
            raise UserError(f"tome needs eager or sdpa attention for an additive bias, not {impl!r}")
        return backbone.layers
    raise UserError(f"tome merging supports timm ViTs and HF encoders, not {type(backbone).__name__}")


def _call_block(backbone: TokenBackbone, block: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # timm's Attention and HF's eager / sdpa attention both add a float mask to the logits.
    out = block(x, attn_mask=bias) if backbone.family == "timm-vit" else block(x, bias)
    return out[0] if isinstance(out, tuple) else out


def merge_tokens(
    backbone: TokenBackbone, state: TokenState, size: torch.Tensor, layer: int, target: torch.Tensor, max_rounds: int = 8
) -> tuple[TokenState, torch.Tensor]:
    """Merge each row down to ``target`` [B] prunable tokens by bipartite soft matching.

    The metric is block ``layer``'s keys averaged over heads (ToMe, Sec. 3). One round merges at most
    half of the eligible tokens, so deeper cuts take several rounds, each on the re-packed survivors
    with fresh keys. Returns the packed state and sizes [B, N']; sizes keep summing to each row's
    original token count. Protected tokens are never merged.
    """
    for _ in range(max_rounds):
        eligible = state.valid & ~state.protected
        r = (eligible.sum(dim=1) - target).clamp_min(0)
        if not bool(r.any()):
            break
        metric = backbone.attention_qk(state, layer)[1].mean(dim=1)  # [B, N, head_dim]
        dst, merged = merge.bipartite_plan(metric, eligible, r)
        if not bool(merged.any()):
            break  # nothing left to pair (one eligible token per row)
        tokens, size = merge.merge_wavg(state.tokens, size, dst)
        state, size = _pack(state.with_tokens(tokens), size, state.valid & ~merged)
    return state, size


def _pack(state: TokenState, size: torch.Tensor, keep: torch.Tensor) -> tuple[TokenState, torch.Tensor]:
    """``state.prune(keep)`` that also gathers the sizes with the same index."""
    keep = ops.normalize_keep(keep, state.valid, state.protected)
    index, valid = ops.pack_indices(keep)
    return state.prune(keep), ops.gather_rows(size, index) * valid


def forward_merged(
    backbone: TokenBackbone, inputs: Any, sites: Sequence[int], values: float | Sequence[float], prop_attn: bool = True
) -> tuple[torch.Tensor, TokenState, list[torch.Tensor], torch.Tensor]:
    """The whole model with ToMe before each site, reaching the keep_ratio rule's token counts.

    The reference merges r tokens inside every block (between attention and MLP); here merging
    happens at the same sites as pruning and down to the same counts, so every method at a budget
    runs the same blocks on the same number of tokens. Heads are the host's own: an average-pooling
    head averages merged tokens unweighted, as the reference does.

    values: the keep ratio, one number or one per site. Returns (output, final state, alive counts
    [B] after each site, final sizes [B, N']).
    """
    backbone.check_sites(sites)
    per_site = [float(values)] * len(sites) if isinstance(values, (int, float)) else [float(v) for v in values]
    state = backbone.embed(inputs)
    size = state.valid.long()
    counts: list[torch.Tensor] = []
    start = 0
    for site, value in zip(sites, per_site, strict=True):
        state = run_blocks_sized(backbone, state, size if prop_attn else None, start, site)
        state, size = merge_tokens(backbone, state, size, site, keep_count(value, (state.valid & ~state.protected).sum(dim=1)))
        counts.append(state.alive_counts)
        start = site
    state = run_blocks_sized(backbone, state, size if prop_attn else None, start, backbone.depth)
    return backbone.head(state), state, counts, size


# ---- registry ----------------------------------------------------------------------------------------
@dataclass
class BaselineOptions:
    """Knobs shared by the baseline factories."""

    seed: int = 0
    """Seed of the random baseline."""
    diversity: float = 0.0
    """Weight of the similarity baselines' spatial-diversity term (0: pure redundancy)."""
    prop_attn: bool = True
    """ToMe's proportional attention (log(size) added to attention logits)."""


BASELINES: dict[str, Callable[[BaselineOptions], Method]] = {
    "none": lambda o: NoPruning(),
    "random": lambda o: ScorerMethod("random", RandomScorer(o.seed)),
    "cls-attention": lambda o: ScorerMethod("cls-attention", ClsAttentionScorer()),
    "token-norm": lambda o: ScorerMethod("token-norm", TokenNormScorer()),
    "similarity": lambda o: ScorerMethod("similarity", SimilarityScorer(o.diversity)),
    "similarity-pre": lambda o: ScorerMethod("similarity-pre", SimilarityScorer(o.diversity), sites=[0]),
    "tome": lambda o: TomeMethod(prop_attn=o.prop_attn),
}


def make_baseline(name: str, options: BaselineOptions | None = None) -> Method:
    """The baseline registered under ``name``; UserError listing the choices otherwise."""
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r} (available: {', '.join(BASELINES)})")
    return BASELINES[name](options or BaselineOptions())
