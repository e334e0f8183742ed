"""Adapter for Hugging Face encoders: BERT family (BertModel / MiniLM, RoBERTa, DistilBERT) and ViT.

Drives the model's own embeddings and layer modules and builds masks with transformers' own
``create_bidirectional_mask`` so every attention implementation (eager, sdpa) sees its native mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState, in_dtype_of, tracing
from policy_prune.errors import UsageError, UserError

TEXT_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra")
VISION_TYPES = ("vit",)
TEXT_PROTECTED = 2
"""Tokens a text row protects without a special_tokens_mask: [CLS] and the last real token ([SEP])."""


def _mask_fn() -> Any:
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56: fall back to the additive extended mask
        return None
    return create_bidirectional_mask


def _find_layers(base: nn.Module) -> nn.ModuleList:
    """The encoder's block list; its attribute path differs across model types and versions."""
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UsageError(f"cannot find the transformer layers of {type(base).__name__}")


def _find_linear(block: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    """The block's own projection by attribute name (names differ across model types and versions)."""
    for path, module in block.named_modules():
        if path.rsplit(".", 1)[-1] in names and isinstance(module, nn.Linear):
            return module
    raise UsageError(f"cannot find a projection named {names} in {type(block).__name__}")


POOLINGS = ("mean", "cls")
"""How a text encoder's sentence embedding pools its last hidden states (sentence-transformers' mean, or [CLS])."""


class HFEncoderBackbone(TokenBackbone):
    """A Hugging Face encoder (base model or *ForImageClassification) as a TokenBackbone.

    Text models output a pooled sentence embedding (``pooling`` "mean" as in sentence-transformers,
    or "cls"); ViT models output classifier logits when the model has a classifier, else the CLS
    embedding.
    """

    family = "hf-encoder"
    base: Any
    config: Any
    layers: Any

    def __init__(self, model: nn.Module, name: str | None = None, pooling: str = "mean") -> None:
        base = getattr(model, "base_model", model)
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if model_type not in TEXT_TYPES + VISION_TYPES:
            raise UsageError(f"unsupported Hugging Face model type {model_type!r}")
        if pooling not in POOLINGS:
            raise UserError(f"pooling must be {' or '.join(map(repr, POOLINGS))}, got {pooling!r}")
        if base is not model and (model_type in TEXT_TYPES or getattr(model, "classifier", None) is None):
            # The adapter runs the encoder (and an image classifier's head): any other head would be dropped
            # without a word, and the caller read hidden states where they expected its logits.
            raise UsageError(f"{type(model).__name__} has a task head that token pruning does not run: pass its "
                             f"encoder (model.base_model, a {type(base).__name__}); the pruned encoder returns "
                             "the hidden states and the pooled embedding")
        super().__init__(model)
        self.base = base
        self.config = base.config
        self.model_type: str = model_type
        self.is_vision = model_type in VISION_TYPES
        self.pooling = "cls" if self.is_vision else pooling
        self.classifier: nn.Module | None = getattr(model, "classifier", None) if self.is_vision else None
        self.output_kind = "logits" if self.classifier is not None else "embedding"
        self.layers = _find_layers(base)
        self._qk = [(_find_linear(b, ("q_proj", "query", "q_lin")), _find_linear(b, ("k_proj", "key", "k_lin")))
                    for b in self.layers]
        self.final_norm: nn.Module = getattr(base, "layernorm", None) or nn.Identity()
        self.name = name or getattr(self.config, "_name_or_path", "") or model_type
        self._create_mask = _mask_fn()
        self._last_mask: tuple[torch.Tensor, torch.dtype, Any] | None = None

    # ---- contract ------------------------------------------------------------------------------
    def embed(self, inputs: Any) -> TokenState:
        if self.is_vision:
            pixels = inputs["pixel_values"] if isinstance(inputs, Mapping) else inputs
            x = self.base.embeddings(in_dtype_of(pixels, self.base.embeddings.patch_embeddings.projection.weight))
            b, n, _ = x.shape
            valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
            protected = torch.zeros_like(valid)
            protected[:, 0] = True
        else:
            ids = inputs["input_ids"]
            if self.model_type == "distilbert":
                x = self.base.embeddings(ids)
            else:
                x = self.base.embeddings(input_ids=ids, token_type_ids=inputs.get("token_type_ids"))
            b, n, _ = x.shape
            mask = inputs.get("attention_mask")
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            protected = self._special_tokens(inputs, valid)
        positions = torch.arange(n, device=x.device).expand(b, n)
        return TokenState(x, protected & valid, valid, positions, n, dense=self.is_vision)

    @staticmethod
    def _special_tokens(inputs: Mapping[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """[CLS] and [SEP]: the tokenizer's special_tokens_mask if given, else first + last real token."""
        special = inputs.get("special_tokens_mask")
        if special is not None:
            return special.bool()
        protected = torch.zeros_like(valid)
        protected[:, 0] = True
        last = valid.long().cumsum(dim=1).argmax(dim=1)
        protected[torch.arange(valid.shape[0], device=valid.device), last] = True
        return protected

    def _layer_mask(self, state: TokenState) -> torch.Tensor | None:
        """The layers' attention mask for ``state``'s padding, made once per padding layout: the blocks
        between two sites (a site that keeps every token changes nothing) reuse the last one."""
        mask = state.key_padding_mask()
        if mask is None:
            return None
        cache = not tracing()  # a traced graph holds no state
        last = self._last_mask
        if cache and last is not None and last[0] is mask and last[1] == state.tokens.dtype:
            return last[2]
        if self._create_mask is not None:
            made = self._create_mask(config=self.config, inputs_embeds=state.tokens, attention_mask=mask.long())
        else:
            dtype = state.tokens.dtype
            made = (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min
        if cache:
            self._last_mask = (mask, state.tokens.dtype, made)
        return made

    def run_blocks(self, state: TokenState, start: int, stop: int) -> TokenState:
        mask = self._layer_mask(state)
        x = state.tokens
        for layer in itertools.islice(self.layers, start, stop):  # slicing a ModuleList builds a new one per call
            out = layer(x, mask)
            x = out[0] if isinstance(out, tuple) else out
        return state.with_tokens(x)

    def final_hidden(self, state: TokenState) -> torch.Tensor:
        return self.final_norm(state.tokens)

    def head(self, state: TokenState, size: torch.Tensor | None = None) -> torch.Tensor:
        x = self.final_hidden(state)
        pooled = x[:, 0] if self.pooling == "cls" else ops.masked_mean(x, state.valid, size)
        return self.classifier(pooled) if self.classifier is not None else pooled

    def attention_qk(self, state: TokenState, layer: int, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.layers[layer]
        # Pre-norm (ViT) layers normalise before attention; BERT-style layers are post-norm.
        x = blk.layernorm_before(state.tokens) if self.is_vision else state.tokens
        q_lin, k_lin = self._qk[layer]
        b, n, _ = x.shape
        heads = self.heads
        q = q_lin(x[:, :1] if cls_only else x).view(b, 1 if cls_only else n, heads, -1).transpose(1, 2)
        k = k_lin(x).view(b, n, heads, -1).transpose(1, 2)
        return q, k

    def cls_query_parts(self, layer: int) -> tuple[Any, ...] | None:
        norm = self.layers[layer].layernorm_before if self.is_vision else None
        q_lin, k_lin = self._qk[layer]
        return norm, q_lin.weight, q_lin.bias, k_lin.weight, self.heads

    # ---- sizes and FLOPs -----------------------------------------------------------------------
    def block_modules(self) -> Sequence[nn.Module]:
        return list(self.layers)

    @property
    def heads(self) -> int:
        c = self.config
        return int(getattr(c, "n_heads", None) or c.num_attention_heads)

    @property
    def width(self) -> int:
        c = self.config
        return int(getattr(c, "dim", None) or c.hidden_size) if self.model_type == "distilbert" else int(c.hidden_size)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def block_shape(self) -> ops.BlockShape:
        c = self.config
        hidden = c.hidden_dim if self.model_type == "distilbert" else c.intermediate_size
        return ops.BlockShape(width=self.width, attn_dim=self.width, mlp_hidden=int(hidden))

    def embed_flops(self, n_tokens: int) -> int:
        if not self.is_vision:
            return 0  # embedding lookups are gathers, not matmuls
        proj = self.base.embeddings.patch_embeddings.projection
        n_patches = self.base.embeddings.patch_embeddings.num_patches
        return 2 * n_patches * proj.out_channels * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]

    def head_flops(self) -> int:
        c = self.classifier
        return 2 * c.in_features * c.out_features if isinstance(c, nn.Linear) else 0

    def example_inputs(self, batch: int, generator: torch.Generator, device: str = "cpu", length: int = 128) -> Any:
        c = self.config
        if self.is_vision:
            return torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=generator).to(device)
        # Ids above the special-token range of BERT-style vocabularies; [CLS]/[SEP]-like ends are protected anyway.
        ids = torch.randint(min(1000, c.vocab_size // 2), c.vocab_size, (batch, length), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def signature(self) -> dict[str, Any]:
        sig: dict[str, Any] = {
            "family": self.family,
            "architecture": f"{self.model_type}:{type(self.model).__name__}",
            "width": self.width,
            "depth": self.depth,
            "heads": self.heads,
            "pooling": self.pooling,
            "weights": self.weights_fingerprint(),
        }
        if self.is_vision:
            sig["grid"] = [int(self.config.image_size) // int(self.config.patch_size)] * 2
        else:
            sig["vocab_size"] = int(self.config.vocab_size)
        return sig
