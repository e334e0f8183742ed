"""What a pruned Hugging Face model returns: ``ModelOutput`` subclasses shaped like the original outputs.

Imported only when a PrunedModel wraps an HF model (transformers is then installed), so that pruning a
timm model never imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class PrunedEncoderOutput(ModelOutput):
    """What a pruned HF encoder returns, shaped like the original ``BaseModelOutputWithPooling``.

    ``last_hidden_state`` [B, N, D] is scattered back to the ORIGINAL token positions: kept tokens hold
    their final hidden state, pruned and padding positions hold zeros, so ``[:, 0]`` is still [CLS].
    Pool with ``kept_mask`` [B, N] (not the tokenizer's attention_mask), or use ``sentence_embedding``
    [B, D]: the backbone's pooling (mean over kept tokens for text, CLS for ViT). ``pooler_output`` is
    the model's own pooler on [CLS] when it has one (as in the original output), else None.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    sentence_embedding: torch.Tensor | None = None
    kept_mask: torch.Tensor | None = None


@dataclass
class PrunedClassifierOutput(ModelOutput):
    """What a pruned HF image classifier returns: ``logits`` [B, C] and ``kept_mask`` [B, N]."""

    logits: torch.Tensor | None = None
    kept_mask: torch.Tensor | None = None
