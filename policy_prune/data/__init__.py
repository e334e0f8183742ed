"""Datasets as train/val/test :class:`Split` s of model-ready tensors.

A dataset is named in ``DataConfig.dataset``: a registry name (``DATASETS``), ``"imagefolder:<path>"``
or ``"hf:<name>[:<config>][:<split>]"``. Builders return every split already normalised (images) or
tokenised (text) for the backbone, so the env only indexes rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from policy_prune.config import DataConfig, EnvConfig
from policy_prune.data.split import SPLIT_NAMES, Inputs, Split, relevance_pairs
from policy_prune.errors import UserError

Builder = Callable[[DataConfig, int, Any, Any], dict[str, Split]]
"""(data config, seed, backbone or None, tokenizer or None) -> splits keyed train/val/test."""


def _digits(cfg: DataConfig, seed: int, backbone: Any, tokenizer: Any) -> dict[str, Split]:
    from policy_prune.data import digits

    splits = digits.build_splits(cfg.options, seed)
    groups = digits.source_groups(cfg.options)
    return {name: Split(name, digits.match_backbone(x, backbone), y, groups[name]) for name, (x, y) in splits.items()}


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


def cap_groups(split: Split, max_groups: int, seed: int) -> Split:
    """At most ``max_groups`` source items (``Split.groups``) with all their rows, and their queries.

    A retrieval query may answer with passages of other items (a query text shared by several items,
    a passage text kept once under its first item): such items are linked and kept or dropped
    together, so every kept query keeps all its relevant passages. Linked sets are drawn in a seeded
    order and taken while they fit (as ``text.cap_items`` caps whole items); rows keep their order.
    """
    ids, root = linked_groups(split)
    _, comp = torch.unique(root, return_inverse=True)  # [G] the linked set of every item
    size = torch.bincount(comp)
    order = torch.randperm(len(size), generator=torch.Generator().manual_seed(seed))
    keep, total = torch.zeros(len(size), dtype=torch.bool), 0
    for c in order.tolist():
        if total + int(size[c]) <= max_groups:
            keep[c], total = True, total + int(size[c])
    return split.select(torch.isin(split.group_ids(), ids[keep[comp]]))


def linked_groups(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [G]: the sorted items of the rows and queries, root [G]: the smallest item each is linked
    to through queries and their relevant passages; union-find over the [R, 2] relevant pairs)."""
    groups = split.group_ids()
    if split.queries is None or split.relevant is None:
        ids = torch.unique(groups)
        return ids, ids
    q_groups = split.queries.group_ids()
    ids = torch.unique(torch.cat([groups, q_groups]))
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    a = torch.searchsorted(ids, q_groups[split.relevant[:, 0]]).tolist()
    b = torch.searchsorted(ids, groups[split.relevant[:, 1]]).tolist()
    for i, j in zip(a, b, strict=True):
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    return ids, ids[[find(i) for i in range(len(ids))]]


__all__ = ["DATASETS", "SPLIT_NAMES", "Inputs", "Split", "cap", "cap_groups", "get_builder", "load_splits", "relevance_pairs"]
