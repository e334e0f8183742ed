"""Selection FLOPs: what choosing the tokens costs at a site, counted as ``FlopCounterMode`` counts.

Matmul FLOPs (2 x multiply-accumulates) of the CLS-attention row, the mean-query attention and the learned
scorer (its features and MLP) per row on a state of ``n`` slots before block ``layer``. ``prune(model,
scorer, flops=f)`` charges them to the budget as evaluation does (``policy_prune.evaluation.cost``).
"""

from __future__ import annotations

import torch

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone
from policy_prune.core.features import token_layout
from policy_prune.core.scorer import LearnedScorer


def model_has_cls(backbone: TokenBackbone) -> bool:
    """Whether the model's states start with a CLS token (images: prefix tokens; text: [CLS] / <s>)."""
    prefix, grid = token_layout(backbone)
    return prefix > 0 if grid is not None else True


def cls_row_flops(backbone: TokenBackbone, layer: int, n: int) -> int:
    """``backbone.attention_from_cls(query="cls")``: the CLS query and its logits over n keys.

    Folded (a LayerNorm'd or post-norm block): q = W_q x_cls (2 D A), the per-head key directions
    W_k,h^T q_h (2 A D) and one [n, D] x [D, H] product. Otherwise (q/k normalised after projection):
    q for one token, keys for all n, and the n logits per head.
    """
    d, a = backbone.block_shape.width, backbone.block_shape.attn_dim
    folded = backbone.cls_query(layer)
    if folded is not None:
        return 2 * d * a + 2 * a * d + 2 * n * d * folded.heads
    return 2 * d * a + 2 * n * d * a + 2 * n * a


def mean_query_flops(backbone: TokenBackbone, n: int) -> int:
    """``attention_from_cls(query="mean")`` (no CLS): q and k for all n tokens and the n x n logits."""
    d, a = backbone.block_shape.width, backbone.block_shape.attn_dim
    return 2 * 2 * n * d * a + 2 * n * n * a


def learned_flops(backbone: TokenBackbone, scorer: LearnedScorer, layer: int, n: int, has_cls: bool = True) -> int:
    """A learned scorer at one site on n slots: ``token_features`` plus the TokenScorer MLP.

    Features: the sum of unit tokens (one [1, n] x [n, D] product), the folded CLS query's key
    directions (2 D A + 2 A D) and one [n, D] x [D, P + H + 3] product (projection, CLS logits, cosine
    to CLS, dot with the unit sum, the ones column for the mean); without a folded query the CLS row
    comes from :func:`cls_row_flops` and the product has P + 3 columns. The neighbourhood mean is
    pooling (not counted). MLP: the token half of the first layer on n rows, its context half once per
    row, then every later Linear on n rows. A merging scorer adds :func:`ops.absorb_flops`.
    """
    d = backbone.block_shape.width
    p = scorer.spec.projection_dim
    folded = backbone.cls_query(layer) if has_cls else None
    features = 2 * n * d
    if folded is not None:
        features += 2 * d * backbone.block_shape.attn_dim * 2 + 2 * n * d * (p + folded.heads + 3)
    else:
        attn = cls_row_flops(backbone, layer, n) if has_cls else mean_query_flops(backbone, n)
        features += attn + 2 * n * d * (p + 3)
    merge = ops.absorb_flops(n, d) if scorer.merge else 0
    return features + mlp_flops(scorer, n) + merge


def mlp_flops(scorer: LearnedScorer, n: int) -> int:
    """The TokenScorer on n token rows and one context row."""
    net = scorer.net
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    first, rest = linears[0], linears[1:]
    total = 2 * n * net.feature_dim * first.out_features + 2 * net.context_dim * first.out_features
    return total + sum(2 * n * m.in_features * m.out_features for m in rest)
