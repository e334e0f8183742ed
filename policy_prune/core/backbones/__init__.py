"""Frozen-backbone adapters and ``load_backbone``.

A spec is one of:
- an ``nn.Module`` already in memory (timm VisionTransformer or Hugging Face encoder),
- ``"timm:<name>"`` or a bare timm model name (``vit_small_patch16_224``), with an optional checkpoint,
- ``"hf:<id or folder>"`` or a local folder holding a transformers ``config.json``.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from policy_prune.core import hub
from policy_prune.core.backbones.base import KeepFn, TokenBackbone, TokenState
from policy_prune.core.backbones.hf import HFEncoderBackbone
from policy_prune.core.backbones.timm_vit import TimmViTBackbone
from policy_prune.errors import UsageError, UserError

BACKBONES: dict[str, type[TokenBackbone]] = {
    TimmViTBackbone.family: TimmViTBackbone,
    HFEncoderBackbone.family: HFEncoderBackbone,
}

__all__ = [
    "BACKBONES",
    "HFEncoderBackbone",
    "KeepFn",
    "TimmViTBackbone",
    "TokenBackbone",
    "TokenState",
    "adapt",
    "load_backbone",
]


def adapt(model: nn.Module, **kwargs: Any) -> TokenBackbone:
    """Wrap an in-memory model with the adapter of its family (the model is not modified)."""
    if isinstance(model, TokenBackbone):
        return model
    # A model of a host library's class exists only if that library was imported: look the base class
    # up in sys.modules instead of importing timm for an HF model (or transformers for a timm one).
    vit = _loaded_class("timm.models.vision_transformer", "VisionTransformer")
    if vit is not None and isinstance(model, vit):
        return TimmViTBackbone(model, **kwargs)
    hf = _loaded_class("transformers.modeling_utils", "PreTrainedModel")
    if hf is not None and isinstance(model, hf):
        return HFEncoderBackbone(model, **kwargs)
    raise UsageError(f"no token-pruning adapter for {type(model).__name__}: expected a timm ViT or HF encoder")


def _loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if that module is already imported, else None (importing it would not help)."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def load_backbone(
    spec: str | nn.Module,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **model_kwargs: Any,
) -> TokenBackbone:
    """Load a frozen backbone from a spec (see module docstring); it is returned in eval mode.

    ``pretrained=True`` lets timm fetch hub weights (users only; nothing in the tests downloads).
    ``checkpoint`` is a local timm state dict (safetensors or torch file) loaded into the model.
    """
    if isinstance(spec, nn.Module):
        return adapt(spec)
    pooling = model_kwargs.pop("pooling", None)
    hf_kwargs = {} if pooling is None else {"pooling": pooling}
    ref = hub.model_ref(spec)
    if spec.startswith("hf:") or (Path(ref).is_dir() and (Path(ref) / "config.json").exists()):
        model = _load_hf(ref)
        return HFEncoderBackbone(model.eval().requires_grad_(False), name=spec.removeprefix("hf:"), **hf_kwargs)
    name = spec.removeprefix("timm:")
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown backbone {spec!r}: not a timm model name, 'hf:<id>' or a model folder")
    # A checkpoint of the user's replaces the weights whole: fetching the hub's first would be a wasted download.
    fetch = pretrained and checkpoint is None
    with hub.hub_access(f"the pretrained weights of {name!r}") if fetch else nullcontext():
        model = timm.create_model(name, pretrained=fetch, **model_kwargs)
    if checkpoint is not None:
        state = _read_state_dict(Path(checkpoint))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # missing, unexpected or misshapen keys: the first of torch's lines names them
            detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise UserError(f"checkpoint {checkpoint} does not fit {name!r} as built (num_classes, img_size, ... in "
                            f"the preset): {detail}") from None
    return TimmViTBackbone(model.eval().requires_grad_(False), name=name)


def _load_hf(name_or_path: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    with hub.fetching(name_or_path, "model"):
        config = AutoConfig.from_pretrained(name_or_path)
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith("ForImageClassification") for a in archs):
            return AutoModelForImageClassification.from_pretrained(name_or_path)
        return AutoModel.from_pretrained(name_or_path)


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        # weights_only refuses arbitrary pickled objects: loading a checkpoint never runs foreign code.
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"checkpoint {path} cannot be read as a state dict (a safetensors file or a torch file of "
                        f"tensors): {first}") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state
