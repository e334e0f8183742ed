"""Adapter for timm's VisionTransformer family (vit_*, deit_* incl. distilled, register tokens).

Drives timm's own modules (patch_embed, _pos_embed, blocks, norm, forward_head); nothing is copied.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState, in_dtype_of
from policy_prune.errors import UsageError, UserError

SUPPORTED_POOLS = ("token", "avg", "")


class TimmViTBackbone(TokenBackbone):
    """A timm ``VisionTransformer`` (or subclass) seen through the TokenBackbone contract."""

    family = "timm-vit"
    output_kind = "logits"

    def __init__(self, model: nn.Module, name: str | None = None) -> None:
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise UsageError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in SUPPORTED_POOLS:
            raise UserError(f"timm global_pool={model.global_pool!r} is not supported (use 'token' or 'avg')")
        if getattr(model, "dynamic_img_size", False):
            raise UserError("timm models with dynamic_img_size=True are not supported")
        super().__init__(model)
        self.name = name or getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        self.num_prefix = int(model.num_prefix_tokens)

    # ---- contract ------------------------------------------------------------------------------
    def embed(self, inputs: Any) -> TokenState:
        m = self.model
        x = m.patch_embed(in_dtype_of(inputs, m.patch_embed.proj.weight))
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device).expand(b, n)
        protected = positions < self.num_prefix
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
        return TokenState(x, protected, valid, positions, n, dense=True)

    def run_blocks(self, state: TokenState, start: int, stop: int) -> TokenState:
        mask = state.key_padding_mask()
        # SDPA bool semantics: True = take part; broadcast over heads and queries.
        attn_mask = None if mask is None else mask[:, None, None, :]
        x = state.tokens
        for blk in itertools.islice(self.model.blocks, start, stop):  # slicing a Sequential builds a new one per call
            x = blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)
        return state.with_tokens(x)

    def final_hidden(self, state: TokenState) -> torch.Tensor:
        return self.model.norm(state.tokens)

    def head(self, state: TokenState, size: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        x = self.final_hidden(state)
        if m.global_pool == "avg" and (state.key_padding_mask() is not None or size is not None):
            # timm's pool would average pack padding (and merged tokens unweighted); average only the alive
            # tokens, each weighted by the tokens it stands for.
            keep = state.valid.clone()
            if not m.pool_include_prefix:
                keep &= state.positions >= self.num_prefix
            pooled = ops.masked_mean(x, keep, size)
            return m.head(m.head_drop(m.fc_norm(pooled)))
        return m.forward_head(x)

    def attention_qk(self, state: TokenState, layer: int, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.model.blocks[layer]
        attn = blk.attn
        x = blk.norm1(state.tokens)
        b, n, _ = x.shape
        a = attn.num_heads * attn.head_dim
        w, bias = attn.qkv.weight, attn.qkv.bias
        # Slices of timm's fused qkv projection: rows [0, a) are q, [a, 2a) are k.
        q = F.linear(x[:, :1] if cls_only else x, w[:a], None if bias is None else bias[:a])
        k = F.linear(x, w[a : 2 * a], None if bias is None else bias[a : 2 * a])
        q = q.view(b, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        return attn.q_norm(q), attn.k_norm(k)

    def cls_query_parts(self, layer: int) -> tuple[Any, ...] | None:
        attn = self.model.blocks[layer].attn
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            return None
        a = attn.num_heads * attn.head_dim
        w, bias = attn.qkv.weight, attn.qkv.bias
        return self.model.blocks[layer].norm1, w[:a], None if bias is None else bias[:a], w[a : 2 * a], attn.num_heads

    # ---- sizes and FLOPs -----------------------------------------------------------------------
    def block_modules(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def block_shape(self) -> ops.BlockShape:
        blk = self.model.blocks[0]
        fc1 = blk.mlp.fc1
        gated = getattr(blk.mlp, "fc1_g", None) is not None
        hidden = fc1.out_features // (2 if getattr(blk.mlp, "chunk", False) else 1)
        return ops.BlockShape(
            width=self.model.embed_dim,
            attn_dim=blk.attn.num_heads * blk.attn.head_dim,
            mlp_hidden=hidden,
            mlp_matrices=3 if gated else 2,
        )

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.model.patch_embed.grid_size
        return int(h), int(w)

    def embed_flops(self, n_tokens: int) -> int:
        proj = self.model.patch_embed.proj
        n_patches = self.grid[0] * self.grid[1]
        return 2 * n_patches * proj.out_channels * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]

    def head_flops(self) -> int:
        m = self.model
        heads = [m.head] + ([m.head_dist] if hasattr(m, "head_dist") else [])
        return sum(2 * h.in_features * h.out_features for h in heads if isinstance(h, nn.Linear))

    def example_inputs(self, batch: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
        pe = self.model.patch_embed
        return torch.randn(batch, pe.proj.in_channels, *pe.img_size, generator=generator).to(device)

    def signature(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "architecture": self.name,
            "width": int(self.model.embed_dim),
            "depth": self.depth,
            "heads": int(self.model.blocks[0].attn.num_heads),
            "grid": list(self.grid),
            "prefix_tokens": self.num_prefix,
            "num_classes": int(self.model.num_classes),
            "weights": self.weights_fingerprint(),
        }
