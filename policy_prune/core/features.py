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

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState, cls_row_attention, tracing

FEATURE_VERSION = 5
"""5: the context's alive fraction is relative to the row's own tokens, not the padded width (issue #23)."""
FEATURE_BOUND = 10.0
BASE_FEATURES = (
    "cls_attention",  # log(1 + n_alive * attention received from CLS) in the block about to run
    "norm",  # token L2 norm / mean norm of the row's alive tokens
    "cos_cls",  # cosine similarity to the CLS token (to the mean token when there is no CLS)
    "redundancy",  # mean cosine similarity to the other alive prunable tokens: the seed paper's score, as similarity-pre scores
    "pos_y",  # grid row in [0, 1] (text: position / position of the row's last alive token, [SEP])
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
    """(prefix tokens, patch grid (rows, cols) or None for sequences) from the backbone's signature.

    Cached on the backbone: it is read at every pruning site and the architecture does not change.
    """
    cached = backbone.__dict__.get("_token_layout")
    if cached is None:
        sig = backbone.signature()
        grid = (int(sig["grid"][0]), int(sig["grid"][1])) if "grid" in sig else None
        cached = backbone.__dict__["_token_layout"] = (int(sig.get("prefix_tokens", 1 if grid else 0)), grid)
    return cached


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
    b, n, c = value.shape
    cells = grid[0] * grid[1] if grid else state.n_full
    if state.unpruned:  # slot i holds token i: no scatter onto the grid and gather back
        pooled = _pooled(value[:, prefix:], grid, b, cells, c)
        return torch.cat([value.new_zeros(b, prefix, c), pooled], dim=1) if prefix else pooled
    inside = state.positions >= prefix
    if not state.dense:
        inside = inside & state.valid
    slot = (state.positions - prefix).clamp_min(0)  # [B, N]
    # The canvas is [B, cells, C]: pooled channels-last, the fast layout of CPU avg_pool2d for few channels.
    canvas = value.new_zeros(b, cells, c).scatter_add_(1, slot.unsqueeze(-1).expand(b, n, c), value * inside.unsqueeze(-1))
    return ops.gather_rows(_pooled(canvas, grid, b, cells, c), slot) * inside.unsqueeze(-1)


def _pooled(canvas: torch.Tensor, grid: tuple[int, int] | None, b: int, cells: int, c: int) -> torch.Tensor:
    """[B, cells, C] mean of ``canvas`` [B, cells, C] over each cell's 3 x 3 grid neighbourhood (or 3-cell window)."""
    if grid:
        nchw = canvas.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)
        return torch.nn.functional.avg_pool2d(nchw, 3, 1, 1, count_include_pad=True).permute(0, 2, 3, 1).reshape(b, cells, c)
    return torch.nn.functional.avg_pool1d(canvas.transpose(1, 2), 3, 1, 1, count_include_pad=True).transpose(1, 2)


def position_table(backbone: TokenBackbone, n_full: int, device: torch.device) -> torch.Tensor:
    """[n_full, 2] (pos_y, pos_x) of every embedded token position, by :func:`token_positions`.

    Cached per (n_full, device) on the backbone, so a site reads its slots' positions with one gather. Never
    stored while tracing: ``torch.export`` traces with fake tensors, and a later eager call read the fake table
    (it returned a FakeTensor).
    """
    tables: dict[Any, torch.Tensor] = backbone.__dict__.setdefault("_position_tables", {})
    key = (n_full, str(device))
    table = tables.get(key)
    if table is None:
        pos = torch.arange(n_full, device=device).unsqueeze(0)
        one = TokenState(pos.unsqueeze(-1).float(), pos < 0, pos >= 0, pos, n_full)
        with torch.inference_mode(False), torch.no_grad():
            table = torch.stack(token_positions(backbone, one), dim=-1)[0]
        if not tracing():
            tables[key] = table
    return table


def token_yx(backbone: TokenBackbone, state: TokenState, layout: tuple[int, tuple[int, int] | None]) -> torch.Tensor:
    """[B, N, 2] (pos_y, pos_x) of the state's slots.

    Images: the cached grid table. Text: the position over the row's last alive position (its protected
    [SEP]), so the feature does not depend on how far the batch was padded (version 3 divided by the
    padded length: the same sentence got other features in another batch).
    """
    if state.unpruned:  # slot i holds token i: the table itself
        # Text: every slot is alive, so the row's last alive position is n_full - 1, the table's divisor.
        table = position_table(backbone, state.n_full, state.tokens.device)
        return table.unsqueeze(0).expand(state.tokens.shape[0], -1, -1)
    if layout[1] is not None:
        return position_table(backbone, state.n_full, state.tokens.device)[state.positions]
    pos = state.positions.to(state.tokens.dtype)
    alive = pos if state.dense else pos.masked_fill(~state.valid, 0.0)
    y = pos / alive.amax(dim=1, keepdim=True).clamp_min(1.0)
    return torch.stack([y, torch.zeros_like(y)], dim=-1)


def token_features(
    backbone: TokenBackbone, state: TokenState, layer: int, projection: torch.Tensor, spec: FeatureSpec
) -> torch.Tensor:
    """Features [B, N, F] (fp32 for any model dtype) of the state's current slots before block ``layer``;
    invalid slots are 0.

    Written for few tensor ops (each costs a fixed overhead that dominates small models at batch 1):
    one bmm sums the unit tokens, and one more gives the projection of the layer-normalised tokens,
    the CLS row's attention logits and every token's dot product with CLS and with that sum.
    A dense state (no padding) skips every mask; dense and static states never sync with the device.
    """
    # Always in fp32: a half-precision model's squared token norms overflow fp16 (above 256; deit-sized
    # ViTs have such tokens) and bf16 keeps ~3 significant digits, too few for cosines near 1.
    x = state.tokens.float()
    b, n, d = x.shape
    dense = state.dense
    vf = None if dense else state.valid.to(x.dtype)
    n_alive: torch.Tensor | float = float(n) if vf is None else vf.sum(dim=1, keepdim=True).clamp_min(1.0)
    layout = token_layout(backbone)
    if state.static:  # [CLS] sits in slot 0 by construction (text): no device sync
        has_cls = True
    elif dense:
        has_cls = layout[0] > 0
    else:
        has_cls = bool(state.protected[:, 0].all()) and bool((state.positions[:, 0] == 0).all())
    folded = backbone.cls_query(layer) if has_cls else None
    block_eps = folded.eps if folded is not None else None
    pre_norm = block_eps is not None  # the block normalises before attention

    norms = x.norm(dim=-1)  # [B, N]
    inv = norms.clamp_min(1e-12).reciprocal()  # unit token u_i = x_i * inv_i (0 on padded slots)
    if vf is not None:
        inv = inv * vf
    # Sum of the unit tokens that may be pruned (protected ones are never compared, as in the seed paper's
    # score): the redundancy feature is then exactly what similarity-pre ranks by, and a scorer can
    # reproduce that baseline at any site, site 0 included (issue #24).
    prunable = (~state.protected).to(x.dtype)
    unit_sum = torch.bmm((inv * prunable).unsqueeze(1), x)  # [B, 1, D]
    n_prunable = (prunable if vf is None else prunable * vf).sum(dim=1, keepdim=True)  # [B, 1]
    anchor = x[:, :1] * inv[:, :1, None] if has_cls else torch.nn.functional.normalize(unit_sum, dim=-1)

    # Every product with the tokens in one bmm, x @ [P | CLS-query directions | anchor | unit sum | 1]:
    # - layer_norm(x) @ M = (x @ M - mean(x) 1^T M) / std(x), with mean from the column of ones and
    #   std from the norms already taken, so the normalised tokens are never materialised;
    # - the CLS row's attention logits read the block's own normalisation (its eps) when it is
    #   pre-norm, the raw tokens when post-norm; other backbones take the generic q / k path.
    eps = block_eps if block_eps is not None else 1e-5
    proj_w = projection.to(x.dtype).expand(b, d, -1)
    k = proj_w.shape[2]
    cols = [proj_w]
    if folded is not None:
        # Before block 0 the CLS row is the model's [CLS] embedding for every input: its directions are reused.
        cols.append(folded.directions_of(x[:, 0]) if layer == 0 else folded.directions(folded.normalize(x[:, 0])))
    normed = sum(c.shape[2] for c in cols)  # columns read through the layer norm (or raw, post-norm)
    cols += [anchor.transpose(1, 2), unit_sum.transpose(1, 2), x.new_ones(b, d, 1)]
    m = torch.cat(cols, dim=2)
    r = torch.bmm(x, m)  # [B, N, normed + 3]
    mean = r[..., -1:] / d
    rstd = torch.rsqrt((norms.square().unsqueeze(-1) / d - mean.square()).clamp_min(0.0) + eps)
    z = (r[..., :normed] - mean * m[:, :, :normed].sum(dim=1, keepdim=True)) * rstd
    proj = z[..., :k]
    if folded is not None:
        attn = cls_row_attention(z[..., k:] if pre_norm else r[..., k:normed], state)
    else:
        attn = backbone.attention_from_cls(state, layer, query="cls" if has_cls else "mean").float()
    cls_attention = torch.log1p(attn * n_alive)

    mean_norm = norms.mean(dim=1, keepdim=True) if vf is None else (norms * vf).sum(dim=1, keepdim=True) / n_alive
    norm = norms / mean_norm.clamp_min(1e-6)
    # Mean cosine to the other alive tokens: sum_j u_i.u_j = u_i . (sum_j u_j), O(N D) instead of the
    # O(N^2 D) similarity matrix.
    dots = r[..., normed:normed + 2] * inv.unsqueeze(-1)  # [B, N, 2]: cosine to CLS, dot with the unit sum
    self_term = prunable if vf is None else prunable * vf  # a prunable token's own cosine (1) is not "other"
    redundancy = (dots[..., 1] - self_term) / (n_prunable - 1.0).clamp_min(1.0)

    pos = token_yx(backbone, state, layout).to(x.dtype)  # [B, N, 2]
    # One pooling pass serves local_norm and the neighbourhood half of the projection.
    local = local_mean(state, torch.cat([(norm if vf is None else norm * vf).unsqueeze(-1), proj], dim=-1), layout)
    scalars = torch.stack([cls_attention, norm, dots[..., 0], redundancy], dim=-1)
    feats = torch.cat([scalars, pos, state.protected.to(x.dtype).unsqueeze(-1), local[..., :1], proj, local[..., 1:]], dim=-1)
    feats = feats.clamp(-FEATURE_BOUND, FEATURE_BOUND)
    return feats if vf is None else feats * vf.unsqueeze(-1)
