"""ToMe as its authors run it ("tome-native"): r tokens merged in every block, between attention and MLP.

Bolya et al. 2023 (facebookresearch/ToMe, ``tome/patch/timm.py``): each block runs its attention with
proportional attention (log(size) on the keys' logits), takes the keys averaged over heads from that
same attention as the similarity metric, merges min(r, (tokens - protected) // 2) tokens by bipartite
soft matching with size-weighted averaging, then runs its MLP on the merged tokens. The schedule is a
constant r per block, or the authors' inflected schedule (``parse_r(depth, (r, inflect))``: inflect -1
is their "decreasing schedule").

Host glue, not copies: the blocks are driven through their own submodules (timm: norm1, attn, ls1,
drop_path1, norm2, mlp, ls2, drop_path2; BERT-style HF layers: attention, then ``feed_forward_chunk``
(intermediate + output); HF ViT: layernorm_before, attention, layernorm_after, mlp; DistilBERT:
attention, sa_layer_norm, ffn, output_layer_norm). The keys come from a forward hook on the block's
own key projection (timm's fused qkv Linear), registered for one call and removed after it, so the
metric costs nothing beyond the attention the block computes anyway. The user's model is not changed.

Differences from the reference, and why: rows may differ in length (text padding) and r is capped per
row; protected tokens other than CLS / distillation (text's [SEP], registers) stay in front so that the
eligible tokens stay contiguous. The token order after a merge is the reference's (CLS first, unmerged A
tokens, then B; unmerged A in score order when there is no class token), because the next block's
A/B split depends on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.errors import UserError
from policy_prune.evaluation import merge
from policy_prune.evaluation.cost import Work

AttnHalf = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
MlpHalf = Callable[[torch.Tensor], torch.Tensor]


def parse_r(depth: int, r: int, inflect: float = 0.0) -> list[int]:
    """Merges per block: r everywhere (inflect 0) or ToMe's linear trend around r (inflect in [-1, 1])."""
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(depth - 1, 1)
    return [int(low + step * i) for i in range(depth)]


@contextmanager
def captured(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``module`` while the block runs (a forward hook, removed on exit)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def _timm_halves(backbone: TokenBackbone, layer: int) -> tuple[AttnHalf, MlpHalf, nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    blk = backbone.model.blocks[layer]
    missing = [a for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2") if not hasattr(blk, a)]
    if missing:
        raise UserError(f"tome-native drives timm's Block submodules; {type(blk).__name__} has no {missing[0]}")
    attn = blk.attn
    a = attn.num_heads * attn.head_dim

    def keys(qkv: torch.Tensor) -> torch.Tensor:  # [B, N, 3A] -> [B, N, head_dim]: k normalised as attention uses it
        b, n, _ = qkv.shape
        k = qkv[..., a : 2 * a].reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        return attn.k_norm(k).mean(dim=1)

    return (lambda x, mask: x + blk.drop_path1(blk.ls1(attn(blk.norm1(x), attn_mask=mask))),
            lambda x: x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), attn.qkv, keys)


def _hf_halves(backbone: Any, layer: int) -> tuple[AttnHalf, MlpHalf, nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    blk = backbone.layers[layer]
    heads = backbone.heads

    def keys(k: torch.Tensor) -> torch.Tensor:  # [B, N, A] -> [B, N, head_dim]
        b, n, _ = k.shape
        return k.view(b, n, heads, -1).mean(dim=2)

    key_linear = backbone._qk[layer][1]
    if hasattr(blk, "feed_forward_chunk"):  # BERT, RoBERTa, ELECTRA, ...: post-norm inside attention / output
        return lambda x, m: blk.attention(x, m)[0], blk.feed_forward_chunk, key_linear, keys
    if hasattr(blk, "layernorm_before"):  # HF ViT: pre-norm
        return (lambda x, m: x + blk.dropout(blk.attention(blk.layernorm_before(x), m)[0]),
                lambda x: x + blk.dropout(blk.mlp(blk.layernorm_after(x))), key_linear, keys)
    if hasattr(blk, "sa_layer_norm"):  # DistilBERT
        return (lambda x, m: blk.sa_layer_norm(blk.attention(x, attention_mask=m)[0] + x),
                lambda x: blk.output_layer_norm(blk.ffn(x) + x), key_linear, keys)
    raise UserError(f"tome-native does not know the layer layout of {type(blk).__name__}")


def block_halves(backbone: TokenBackbone, layer: int) -> tuple[AttnHalf, MlpHalf, nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(attention half, MLP half, key projection to hook, hooked output -> keys averaged over heads)."""
    from policy_prune.core.backbones import HFEncoderBackbone, TimmViTBackbone

    if isinstance(backbone, TimmViTBackbone):
        return _timm_halves(backbone, layer)
    if isinstance(backbone, HFEncoderBackbone):
        impl = getattr(backbone.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa", None):
            raise UserError(f"tome-native needs eager or sdpa attention for an additive bias, not {impl!r}")
        return _hf_halves(backbone, layer)
    raise UserError(f"tome-native supports timm ViTs and HF encoders, not {type(backbone).__name__}")


def head_dim(backbone: TokenBackbone) -> int:
    """Width of ToMe's metric: the keys averaged over heads."""
    heads = int(backbone.signature()["heads"])
    return backbone.block_shape.attn_dim // heads


def attention_bias(state: TokenState, size: torch.Tensor, prop_attn: bool) -> torch.Tensor | None:
    """The additive mask of a block: log(size) on the keys (proportional attention) and padding masked;
    None while nothing is merged and no slot is padding (the host's own unmasked path, as the reference's
    first block)."""
    merged = bool((size > 1).any())
    if not merged and state.key_padding_mask() is None:
        return None
    return merge.size_bias(size if prop_attn else state.valid.long(), state.valid, state.tokens.dtype)


def merge_in_block(state: TokenState, size: torch.Tensor, metric: torch.Tensor, r: int,
                   slot_of: torch.Tensor | None) -> tuple[TokenState, torch.Tensor, torch.Tensor | None, bool]:
    """One block's merge: min(r, eligible // 2) per row, then the reference's token order.

    Returns (state, size, slot_of, whether the matching ran). ``slot_of`` [B, n_full] (the slot holding
    each embedded token, -1 once gone) is followed for pictures when given.
    """
    eligible = state.valid & ~state.protected
    rows_r = torch.clamp(eligible.sum(dim=1) // 2, max=r)
    if r <= 0 or not bool((rows_r > 0).any()):
        return state, size, slot_of, False
    dst, merged, rank = merge.bipartite_plan(metric, eligible, rows_r)
    tokens, size = merge.merge_wavg(state.tokens, size, dst)
    slot = torch.arange(state.tokens.shape[1], device=dst.device)
    # Without a class token the reference leaves the unmerged A tokens in score order (it sorts them back
    # into place only to keep CLS first); the next block's A/B split depends on that order.
    by_score = rank if not bool(state.protected.any()) else None
    index, valid = merge.tome_order(state.valid & ~merged, eligible & (slot % 2 == 1), state.protected, by_score)
    if slot_of is not None:
        slot_of = follow(slot_of, dst, index, valid)
    state = replace(state, tokens=ops.gather_rows(tokens, index), protected=ops.gather_rows(state.protected, index) & valid,
                    valid=valid, positions=ops.gather_rows(state.positions, index), dense=False)
    return state, ops.gather_rows(size, index) * valid, slot_of, True


def follow(slot_of: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Where each embedded token lives after merging by ``dst`` [B, N] and repacking by ``index`` [B, M]."""
    b, n = dst.shape
    new_slot = torch.full((b, n), -1, dtype=torch.long, device=dst.device)
    rows = torch.arange(b, device=dst.device).unsqueeze(1).expand_as(index)
    new_slot[rows[valid], index[valid]] = torch.arange(index.shape[1], device=dst.device).expand_as(index)[valid]
    alive = slot_of >= 0
    moved = dst.gather(1, slot_of.clamp_min(0))
    return torch.where(alive, new_slot.gather(1, moved), slot_of)


def forward_native(backbone: TokenBackbone, inputs: Any, r: Sequence[int], prop_attn: bool = True,
                   watch: dict[int, torch.Tensor] | None = None, size_pool: bool = True) -> tuple[torch.Tensor, Work]:
    """The whole model with ToMe in every block, r[l] merges in block l. Returns (output, Work).
    ``size_pool``: an average-pooling head weights merged tokens by their sizes (see ``forward_merged``).

    ``watch``, when given, receives for every block l the grouping of the tokens entering it
    ([B, n_full]: slot of each embedded token, -1 once gone) for pictures.
    """
    state = backbone.embed(inputs)
    size = state.valid.long()
    slot_of = initial_slots(state) if watch is not None else None
    b, hd = state.tokens.shape[0], head_dim(backbone)
    attn_n, mlp_n, selection = [], [], 0.0
    for layer in range(backbone.depth):
        if watch is not None and slot_of is not None:
            watch[layer] = slot_of.clone()
        attn_n.append(state.alive_counts)
        attn_half, mlp_half, key_proj, keys = block_halves(backbone, layer)
        with captured(key_proj) as seen:
            x = attn_half(state.tokens, attention_bias(state, size, prop_attn))
        n_slots = x.shape[1]
        state, size, slot_of, matched = merge_in_block(state.with_tokens(x), size, keys(seen[-1]), int(r[layer]), slot_of)
        if matched:
            selection += merge.matching_flops(n_slots, hd)
        mlp_n.append(state.alive_counts)
        state = state.with_tokens(mlp_half(state.tokens))
    work = Work(torch.stack(attn_n, 1).cpu(), torch.stack(mlp_n, 1).cpu(), torch.full((b,), selection, dtype=torch.float64),
                torch.zeros(b, dtype=torch.long), state.n_full, attn_n[0].cpu())
    return backbone.head(state, size if size_pool else None), work


def initial_slots(state: TokenState) -> torch.Tensor:
    """[B, n_full] slot of each embedded token before any reduction (-1 for text padding)."""
    slot = torch.arange(state.n_full, device=state.tokens.device).expand(state.tokens.shape[0], -1)
    return torch.where(state.valid, slot, torch.full_like(slot, -1))


def predict_native(n0: torch.Tensor, protected: torch.Tensor, batch: torch.Tensor, r: Sequence[int],
                   hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic ([M, depth] attention counts, [M, depth] MLP counts, [M] selection FLOPs) of a schedule,
    exactly as :func:`forward_native` runs it on batches ``batch`` [M]."""
    from policy_prune.evaluation.cost import batch_max

    n = n0.long()
    attn_n, mlp_n = [], []
    selection = torch.zeros(len(n), dtype=torch.float64)
    for r_l in r:
        attn_n.append(n)
        rows_r = torch.clamp((n - protected) // 2, max=int(r_l)) if r_l > 0 else torch.zeros_like(n)
        ran = batch_max((rows_r > 0).long(), batch) > 0  # the batch runs the matching if any row merges
        padded = batch_max(n, batch)
        selection += torch.where(ran, merge.matching_flops(padded, hd), 0).double()
        n = n - rows_r
        mlp_n.append(n)
    return torch.stack(attn_n, 1), torch.stack(mlp_n, 1), selection
