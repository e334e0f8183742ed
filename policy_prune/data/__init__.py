"""Datasets as train/val/test :class:`Split` s of model-ready tensors.

A dataset is named in ``DataConfig.dataset``: a registry name (``DATASETS``), ``"imagefolder:<path>"``
or ``"hf:<name>[:<config>][:<split>]"``. Builders return every split already normalised (images) or
tokenised (text) for the backbone, so the env only indexes rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from policy_prune.config import DataConfig, EnvConfig
from policy_prune.errors import UserError

Inputs = torch.Tensor | dict[str, torch.Tensor]
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """One split of a dataset, ready for the backbone."""

    name: str
    """"train", "val" or "test"."""
    inputs: Inputs
    """Images [M, C, H, W] float32 (normalised for the model) or tokenizer output {"input_ids",
    "attention_mask"} [M, L] long, padded to a common L."""
    labels: torch.Tensor | None
    """[M] long class labels, or None for label-free data."""

    def __len__(self) -> int:
        first = self.inputs if isinstance(self.inputs, torch.Tensor) else next(iter(self.inputs.values()))
        return int(first.shape[0])

    def select(self, idx: torch.Tensor) -> Split:
        """The rows ``idx`` [K] (long indices or a [M] bool mask) as a new split."""
        if isinstance(self.inputs, torch.Tensor):
            inputs: Inputs = self.inputs[idx]
        else:
            inputs = {k: v[idx] for k, v in self.inputs.items()}
        return Split(self.name, inputs, None if self.labels is None else self.labels[idx])


Builder = Callable[[DataConfig, int, Any, Any], dict[str, Split]]
"""(data config, seed, backbone or None, tokenizer or None) -> splits keyed train/val/test."""


def _digits(cfg: DataConfig, seed: int, backbone: Any, tokenizer: Any) -> dict[str, Split]:
    from policy_prune.data import digits

    splits = digits.build_splits(cfg.options, seed)
    return {name: Split(name, digits.match_backbone(x, backbone), y) for name, (x, y) in splits.items()}


def _python_docs(cfg: DataConfig, seed: int, backbone: Any, tokenizer: Any) -> dict[str, Split]:
    from policy_prune.data import text

    return text.build_splits(cfg, tokenizer)


DATASETS: dict[str, Builder] = {
    "digits-cluttered": _digits,
    "python-docs": _python_docs,
}
"""Named datasets bundled with the package (no download)."""
PREFIXES = ("imagefolder:", "hf:")


def get_builder(dataset: str) -> Builder:
    """The builder for a dataset name or prefixed spec; UserError listing the choices otherwise."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    if dataset.startswith("imagefolder:"):
        from policy_prune.data.loaders import load_imagefolder

        return load_imagefolder
    if dataset.startswith("hf:"):
        from policy_prune.data.loaders import load_hf

        return load_hf
    choices = ", ".join([*DATASETS, "imagefolder:<path>", "hf:<name>[:<config>][:<split>]"])
    raise UserError(f"unknown dataset {dataset!r} (available: {choices})")


def load_splits(env_cfg: EnvConfig, seed: int, backbone: Any = None, tokenizer: Any = None) -> dict[str, Split]:
    """Train/val/test splits of ``env_cfg.data``, each capped at ``max_samples`` rows.

    ``backbone`` supplies image size / normalisation for users' image data; ``tokenizer`` is needed
    for text. The cap keeps a seeded random subset so that a capped split still covers every class:
    seeded by ``seed`` for train, fixed for val/test so that every run is evaluated on the same rows.
    """
    cfg = env_cfg.data
    splits = get_builder(cfg.dataset)(cfg, seed, backbone, tokenizer)
    if cfg.max_samples is not None:
        splits = {k: cap(s, cfg.max_samples, seed if k == "train" else 0) for k, s in splits.items()}
    return splits


def cap(split: Split, max_samples: int, seed: int) -> Split:
    """At most ``max_samples`` rows: a seeded random subset, kept in the original order."""
    if len(split) <= max_samples:
        return split
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=gen)[:max_samples].sort().values
    return split.select(idx)


__all__ = ["DATASETS", "SPLIT_NAMES", "Split", "cap", "get_builder", "load_splits"]
