"""Glue from configs to live objects: backbone + data splits + batched env."""

from __future__ import annotations

from typing import Any

from policy_prune.config import EnvConfig
from policy_prune.env import PruneVecEnv


def resolve(env_cfg: EnvConfig, seed: int = 0, device: str = "cpu", console: Any = None) -> tuple[Any, dict[str, Any]]:
    """The frozen backbone (pretrained first if it is the embedded default) and its train/val/test splits."""
    from policy_prune.data import load_splits
    from policy_prune.embedded import resolve_backbone

    backbone, tokenizer = resolve_backbone(env_cfg, console=console)
    splits = load_splits(env_cfg, seed=seed, backbone=backbone, tokenizer=tokenizer)
    return backbone.to(device), splits


def make_vec_env(
    env_cfg: EnvConfig,
    backbone: Any,
    split: Any,
    n_envs: int,
    sequential: bool = False,
    device: str = "cpu",
    lam: float | None = None,
    group_size: int = 1,
) -> PruneVecEnv:
    """The batched env of an env preset on one split (``lam`` overrides the preset's lambda)."""
    reward = env_cfg.reward
    return PruneVecEnv(
        backbone,
        split,
        n_envs,
        env_cfg.sites,
        lam=reward.lam if lam is None else lam,
        task=reward.task,
        sequential=sequential,
        device=device,
        group_size=group_size,
    )
