"""Token merging by bipartite soft matching (ToMe) and EViT's fusion, as pure tensor math.

Bolya et al. 2023, "Token Merging: Your ViT But Faster" (ICLR): split the tokens into two alternating
sets A (even slots) and B (odd slots), connect each A token to its most similar B token (cosine of the
attention keys), merge the r most similar edges by a size-weighted average, and let later attention
count a merged token ``size`` times by adding log(size) to its attention logits (proportional attention).

Differences from the reference code, and why:
- Merged tokens stay in their slots (a merged-away source is marked, then the caller packs the survivors),
  so protected tokens, text padding and per-row r work without reordering. :func:`tome_order` gives the
  reference's order (unmerged A, then B) for the every-block variant, where the next block's A/B split
  depends on it.
- Protected and invalid slots are excluded from both sets (the reference excludes CLS / distillation
  tokens by index).
- r may differ per row ([B]); a row asks for at most what its eligible A tokens allow.

Liang et al. 2022, "Not All Patches are What You Need" (EViT, ICLR): the tokens that receive the least
attention from CLS are fused into one token, their sum weighted by that attention (``extra_token =
sum(non_topk * non_topk_attn)`` in the authors' evit.py): :func:`fuse_into`.

Shapes: B rows, N token slots, D width, C metric width.
"""

from __future__ import annotations

from typing import Any

import torch

MIN_MERGE_LEFT = 3
"""Fewest eligible tokens a merge round can leave: a round must merge fewer than |A| tokens, and with
three eligible tokens (one in A) that is none."""


def bipartite_plan(metric: torch.Tensor, eligible: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which slots merge into which: one round of bipartite soft matching.

    metric: [B, N, C] similarity features (ToMe: the keys averaged over heads); eligible: [B, N] bool
    (alive and not protected); r: [B] long, merges wanted per row.
    Returns (dst [B, N] long: the slot each token's content goes to, itself unless merged;
    merged [B, N] bool: slots merged away this round; rank [B, N] long: each A slot's place in the
    descending order of its best similarity, N for other slots). Sources are the even eligible slots,
    destinations the odd ones (the reference's ``metric[..., ::2, :]`` / ``metric[..., 1::2, :]``);
    only the |A| x |B| similarities are computed. A row merges min(r, sources with a destination).
    """
    b, n, _ = metric.shape
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    is_a, is_b = eligible[:, 0::2], eligible[:, 1::2]
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    scores = scores.masked_fill(~(is_a[:, :, None] & is_b[:, None, :]), float("-inf"))
    best, best_j = scores.max(dim=-1)  # [B, Na]: each source's most similar destination
    na = best.shape[1]
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(na, device=metric.device).expand(b, na).contiguous())
    merged_a = (rank < r.unsqueeze(1)) & torch.isfinite(best)
    slot = torch.arange(n, device=metric.device).expand(b, n)
    dst = slot.clone()
    dst[:, 0::2] = torch.where(merged_a, 2 * best_j + 1, slot[:, 0::2])
    merged = torch.zeros(b, n, dtype=torch.bool, device=metric.device)
    merged[:, 0::2] = merged_a
    slot_rank = torch.full((b, n), n, dtype=torch.long, device=metric.device)
    slot_rank[:, 0::2] = rank
    return dst, merged, slot_rank


def matching_flops(n_slots: Any, metric_dim: int) -> Any:
    """Matmul FLOPs of one :func:`bipartite_plan` on ``n_slots`` slots per row (an int or a tensor of
    counts): the |A| x |B| cosines."""
    return 2 * ((n_slots + 1) // 2) * (n_slots // 2) * metric_dim


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


def merge_rounds(n: torch.Tensor, target: torch.Tensor, max_rounds: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges per round that take each row from ``n`` [B] eligible tokens down to ``target`` [B].

    No round may merge as many tokens as A holds (the reference never merges more than half the tokens
    in one step, so a dissimilar token always has somewhere to stay): a round on n_j eligible tokens
    merges at most floor(n_j / 2) - 1 (A holds at least floor(n_j / 2) of them). Rounds are balanced:
    each row's count falls geometrically, the same fraction per round, over the fewest rounds that
    respect the limit. Targets below MIN_MERGE_LEFT tokens stop there.
    Returns (shares [R, B] long: merges per round, zero once a row is done; rounds [B]: rounds each row
    needs). R is the most any row needs (0 when nothing merges).
    """
    n = n.long().cpu()
    target = torch.minimum(torch.maximum(target.long().cpu(), torch.clamp(n, max=MIN_MERGE_LEFT)), n)
    rounds = torch.zeros_like(n)
    left = target < n
    for m in range(1, max_rounds + 1):
        if not bool(left.any()):
            break
        step = _geometric_steps(n, target, m)
        ok = ((step <= (_counts_before(n, step) // 2 - 1).clamp_min(0)).all(dim=0)) & left
        rounds[ok] = m
        left &= ~ok
    if bool(left.any()):  # pragma: no cover - geometric rounds exist well within 64 for any real n
        raise ValueError("merge_rounds: no balanced schedule within max_rounds")
    shares = torch.zeros(int(rounds.max()) if len(n) else 0, len(n), dtype=torch.long)
    for m in rounds[rounds > 0].unique().tolist():
        rows = rounds == m
        shares[:m, rows] = _geometric_steps(n[rows], target[rows], m)
    return shares, rounds


def _geometric_steps(n: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
    """[m, B] merges per round when counts fall from n to target by the same factor each round."""
    j = torch.arange(m + 1, dtype=torch.float64).unsqueeze(1) / m
    ratio = (target.double() / n.double().clamp_min(1)).clamp_min(1e-12)
    counts = torch.round(n.double() * ratio**j).long()
    counts[-1] = target
    return counts[:-1] - counts[1:]


def _counts_before(n: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[m, B] eligible tokens entering each round."""
    return n - torch.cat([torch.zeros_like(step[:1]), step.cumsum(0)[:-1]])


def tome_order(survive: torch.Tensor, is_dst: torch.Tensor, protected: torch.Tensor,
               rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's token order after a merge: protected tokens, the unmerged A tokens, then the B
    tokens (``cat([unm, dst])`` with CLS first; with a distillation token ``cat([unm[:1], dst[:1],
    unm[1:], dst[1:]])``: the two protected tokens lead). B tokens keep their slot order; unmerged A
    tokens too, or, given ``rank`` (from :func:`bipartite_plan`), the descending-similarity order the
    reference leaves them in when a model has no class token.

    Keeping protected tokens (text's [SEP] too) in front keeps the eligible tokens contiguous, so the next
    block's A set holds at least half of them, as the reference's (tokens - protected) // 2 cap assumes.
    survive: [B, N] bool (alive after the merge); is_dst: [B, N] bool (the round's B set); protected:
    [B, N] bool. Returns (index [B, M] long, valid [B, M] bool) like ``ops.pack_indices``.
    """
    b, n = survive.shape
    slot = torch.arange(n, device=survive.device).expand(b, n)
    group = torch.where(protected, 0, torch.where(is_dst, 2, 1))
    within = slot if rank is None else torch.where(group == 1, rank, slot)
    key = torch.where(survive, group, 3) * (n + 1) + within
    counts = survive.sum(dim=1)
    m = int(counts.max().item()) if survive.numel() else 0
    index = key.argsort(dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=survive.device).unsqueeze(0) < counts.unsqueeze(1)
    return index, valid


def fuse_into(x: torch.Tensor, weight: torch.Tensor, members: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """EViT's fused token: sum_j weight_j x_j over ``members``, written into ``slot`` of each row.

    x: [B, N, D]; weight: [B, N] (the attention each token receives from CLS); members: [B, N] bool;
    slot: [B] long, where the fused token goes (rows with no members keep their content). One bmm per
    row ([1, N] x [N, D]): 2 N D FLOPs. Returns the new tokens [B, N, D].
    """
    w = (weight * members).to(x.dtype).unsqueeze(1)  # [B, 1, N]
    fused = torch.bmm(w, x).squeeze(1)  # [B, D]
    rows = torch.arange(x.shape[0], device=x.device)
    has = members.any(dim=1)
    out = x.clone()
    out[rows[has], slot[has]] = fused[has]
    return out
