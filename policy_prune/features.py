"""Per-token features the policy sees, computed by the same code in the env and at inference.

The feature list is named and versioned (FEATURE_SPEC) and travels inside every scorer artifact with
its fixed projection, so an exported scorer reproduces the training-time observation exactly.

Per token: a few scalar statistics, a low-dimensional projection of its hidden state, and the same
projection averaged over its spatial neighbourhood (3 x 3 patches; 3-token window for text). The
neighbourhood half is what lets a policy tell an object's patches from an isolated clutter fragment
that looks the same up close: on digits-vit a supervised probe on site-1 features separates the
digit's tokens from fragment ink 85% of the time without it and 97% with it.
All values are clipped to [-FEATURE_BOUND, FEATURE_BOUND] (finite Box bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from policy_prune.backbones.base import TokenBackbone, TokenState

FEATURE_VERSION = 3
FEATURE_BOUND = 10.0
BASE_FEATURES = (
    "cls_attention",  # log(1 + n_alive * attention received from CLS) in the block about to run
    "norm",  # token L2 norm / mean norm of the row's alive tokens
    "cos_cls",  # cosine similarity to the CLS token (to the mean token when there is no CLS)
    "redundancy",  # mean cosine similarity to the other alive tokens (the seed paper's score)
    "pos_y",  # grid row in [0, 1] (text: relative position)
    "pos_x",  # grid column in [0, 1] (text: 0)
    "protected",  # 1 for CLS / distillation / register / [SEP] tokens
    "local_norm",  # mean "norm" over the alive tokens of the 3 x 3 neighbourhood (text: 3-token window)
)


@dataclass
class FeatureSpec:
    """What a scorer's input columns mean; stored in scorer.json."""

    version: int = FEATURE_VERSION
    names: tuple[str, ...] = BASE_FEATURES
    projection_dim: int = 16
    projection_seed: int = 0
    projection_kind: str = "weights"
    """"weights": the top right-singular vectors of the blocks' Linear layers that read width-D inputs
    (the directions the frozen model itself reads; no data needed); "random": a seeded Gaussian."""

    @property
    def dim(self) -> int:
        return len(self.names) + 2 * self.projection_dim

    def all_names(self) -> list[str]:
        p = range(self.projection_dim)
        return list(self.names) + [f"proj_{i}" for i in p] + [f"nbr_proj_{i}" for i in p]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "names": self.all_names(), "base": list(self.names),
                "projection_dim": self.projection_dim, "projection_seed": self.projection_seed,
                "projection_kind": self.projection_kind}


PROJECTION_KINDS = ("weights", "random")


def make_projection(backbone: TokenBackbone | int, spec: FeatureSpec) -> torch.Tensor:
    """[D, P] fixed projection of the layer-normalised hidden state (saved with every scorer).

    ``backbone``: the frozen backbone, or only its width (then, and when the backbone's blocks have
    too few Linear rows reading width-D inputs, the projection is the seeded Gaussian one).
    """
    if spec.projection_kind not in PROJECTION_KINDS:
        raise ValueError(f"unknown projection kind {spec.projection_kind!r} ({' or '.join(PROJECTION_KINDS)})")
    width = backbone if isinstance(backbone, int) else backbone.block_shape.width
    if spec.projection_kind == "weights" and not isinstance(backbone, int):
        reading = [m.weight.detach().float().cpu() for blk in backbone.block_modules() for m in blk.modules()
                   if isinstance(m, torch.nn.Linear) and m.in_features == width]
        if reading and sum(w.shape[0] for w in reading) >= spec.projection_dim:
            vh = torch.linalg.svd(torch.cat(reading), full_matrices=False)[2][: spec.projection_dim]
            # Singular vectors have arbitrary signs: fix each by its largest entry (same matrix everywhere).
            sign = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
            return (vh * sign).T.contiguous()
    g = torch.Generator().manual_seed(spec.projection_seed)
    return torch.randn(width, spec.projection_dim, generator=g) / width**0.5


def token_layout(backbone: TokenBackbone) -> tuple[int, tuple[int, int] | None]:
    """(prefix tokens, patch grid (rows, cols) or None for sequences) from the backbone's signature."""
    sig = backbone.signature()
    grid = (int(sig["grid"][0]), int(sig["grid"][1])) if "grid" in sig else None
    return int(sig.get("prefix_tokens", 1 if grid else 0)), grid


def token_positions(
    backbone: TokenBackbone, state: TokenState, layout: tuple[int, tuple[int, int] | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_y, pos_x) in [0, 1] for each slot [B, N]; prefix tokens get 0.

    Float arithmetic (floor of a division) rather than integer // and %: several times faster on CPU
    and exact for any realistic grid.
    ``layout``: :func:`token_layout` of the backbone when the caller has it already.
    """
    prefix, grid = layout or token_layout(backbone)
    pos = state.positions.float()
    if grid is not None:
        gh, gw = grid
        patch = (pos - prefix).clamp_min(0.0)
        row = torch.floor(patch / gw)
        y = row / max(gh - 1, 1)
        x = (patch - row * gw) / max(gw - 1, 1)
        is_prefix = pos < prefix
        return y.masked_fill(is_prefix, 0.0), x.masked_fill(is_prefix, 0.0)
    y = pos / max(state.n_full - 1, 1)
    return y, torch.zeros_like(y)


def local_mean(state: TokenState, value: torch.Tensor, layout: tuple[int, tuple[int, int] | None]) -> torch.Tensor:
    """[B, N, C] mean of ``value`` [B, N, C] over each token's 3 x 3 grid neighbourhood (text: 3-token window).

    Pruned and prefix tokens count as 0, so the result says how much alive content surrounds a token:
    a patch inside a large object has more than an isolated fragment of the same look.
    ``layout``: :func:`token_layout` of the backbone.
    """
    prefix, grid = layout
    b, _, c = value.shape
    cells = grid[0] * grid[1] if grid else state.n_full
    inside = state.valid & (state.positions >= prefix)
    slot = (state.positions - prefix).clamp_min(0).unsqueeze(1).expand(b, c, -1)  # [B, C, N]
    canvas = value.new_zeros(b, c, cells).scatter_add_(2, slot, (value * inside.unsqueeze(-1)).transpose(1, 2))
    if grid:
        pooled = torch.nn.functional.avg_pool2d(canvas.view(b, c, grid[0], grid[1]), 3, 1, 1, count_include_pad=True)
    else:
        pooled = torch.nn.functional.avg_pool1d(canvas, 3, 1, 1, count_include_pad=True)
    return pooled.view(b, c, cells).gather(2, slot).transpose(1, 2) * inside.unsqueeze(-1)


def token_features(
    backbone: TokenBackbone, state: TokenState, layer: int, projection: torch.Tensor, spec: FeatureSpec
) -> torch.Tensor:
    """Features [B, N, F] of the state's current slots before block ``layer``; invalid slots are 0."""
    x = state.tokens
    vf = state.valid.to(x.dtype)
    n_alive = vf.sum(dim=1, keepdim=True).clamp_min(1.0)
    has_cls = bool(state.protected[:, 0].all()) and bool((state.positions[:, 0] == 0).all())
    attn = backbone.attention_from_cls(state, layer, query="cls" if has_cls else "mean")
    cls_attention = torch.log1p(attn * n_alive)

    norms = x.norm(dim=-1)  # one norm serves the norm feature, the unit vectors and nothing else
    norm = norms / ((norms * vf).sum(dim=1, keepdim=True) / n_alive).clamp_min(1e-6)
    unit = x * (vf / norms.clamp_min(1e-12)).unsqueeze(-1)  # padded slots become 0
    anchor = unit[:, 0] if has_cls else torch.nn.functional.normalize(unit.sum(dim=1), dim=-1)
    cos_cls = (unit * anchor.unsqueeze(1)).sum(-1)
    # Mean cosine to the other alive tokens: sum_j u_i.u_j = u_i . (sum_j u_j), O(N D) instead of the
    # O(N^2 D) similarity matrix; padded slots have u = 0 and drop out of the sum.
    redundancy = ((unit * unit.sum(dim=1, keepdim=True)).sum(-1) - vf) / (n_alive - 1).clamp_min(1.0)

    layout = token_layout(backbone)
    pos_y, pos_x = token_positions(backbone, state, layout)
    # layer_norm(x) @ P. (Folding the normalisation into the projection via torch.var_mean was 8x
    # slower on CPU: var_mean over the last dim has no fast kernel there, layer_norm has.)
    proj = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5) @ projection.to(x.dtype)
    # One pooling pass serves local_norm and the neighbourhood half of the projection.
    local = local_mean(state, torch.cat([(norm * vf).unsqueeze(-1), proj], dim=-1), layout)
    cols = [cls_attention, norm, cos_cls, redundancy, pos_y, pos_x, state.protected.to(x.dtype)]
    feats = torch.cat([torch.stack(cols, dim=-1), local[..., :1], proj, local[..., 1:]], dim=-1)
    return feats.clamp(-FEATURE_BOUND, FEATURE_BOUND) * vf.unsqueeze(-1)
