"""Token merging by bipartite soft matching (ToMe), as pure tensor math.

Bolya et al. 2023, "Token Merging: Your ViT But Faster" (ICLR): split the tokens into two alternating
sets A and B, connect each A token to its most similar B token (cosine of the attention keys), merge
the r most similar edges by a size-weighted average, and let later attention count a merged token
``size`` times by adding log(size) to its attention logits (proportional attention).

Differences from the reference code, and why:
- Tokens stay in their slots (a merged-away source is marked, then the caller packs the survivors in
  their original order), so protected tokens, text padding and per-row r work without reordering.
- Protected and invalid slots are excluded from both sets (the reference excludes CLS / distillation
  tokens by index).
- r may differ per row ([B]); a row asks for at most what its eligible A tokens allow.

Shapes: B rows, N token slots, D width, C metric width.
"""

from __future__ import annotations

import torch


def bipartite_plan(metric: torch.Tensor, eligible: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slots merge into which: one round of bipartite soft matching.

    metric: [B, N, C] similarity features (ToMe: the keys averaged over heads); eligible: [B, N] bool
    (alive and not protected); r: [B] long, merges wanted per row.
    Returns (dst [B, N] long: the slot each token's content goes to, itself unless merged;
    merged [B, N] bool: slots merged away this round). Sources are the even eligible slots,
    destinations the odd ones; a row merges min(r, sources with a destination) tokens.
    """
    b, n, _ = metric.shape
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    slot = torch.arange(n, device=metric.device)
    is_a = eligible & (slot % 2 == 0)
    is_b = eligible & (slot % 2 == 1)
    scores = (unit @ unit.transpose(1, 2)).masked_fill(~(is_a[:, :, None] & is_b[:, None, :]), float("-inf"))
    best, best_dst = scores.max(dim=-1)  # [B, N]: each source's most similar destination
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, slot.expand(b, n).contiguous())
    merged = (rank < r.unsqueeze(1)) & torch.isfinite(best)
    return torch.where(merged, best_dst, slot.expand(b, n)), merged


def merge_wavg(x: torch.Tensor, size: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every token with the sources merged into it.

    x: [B, N, D]; size: [B, N] tokens each slot stands for (0 for padding); dst: [B, N] long from
    :func:`bipartite_plan`. Returns (x' [B, N, D], size' [B, N]); merged-away slots get size 0 and
    keep their old content (the caller drops them). Sizes are conserved: size'.sum(1) == size.sum(1).
    """
    w = size.to(x.dtype).unsqueeze(-1)
    num = torch.zeros_like(x).scatter_add(1, dst.unsqueeze(-1).expand_as(x), x * w)
    new_size = torch.zeros_like(size).scatter_add(1, dst, size)
    den = new_size.to(x.dtype).unsqueeze(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), x), new_size


def size_bias(size: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, N] for proportional attention: log(size) per key.

    A key standing for s tokens gets the softmax weight s identical keys would get together.
    Invalid keys get the dtype's most negative finite value (not -inf, so no row can turn into NaN).
    """
    bias = size.to(dtype).clamp_min(1.0).log()
    bias = bias.masked_fill(~valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]
