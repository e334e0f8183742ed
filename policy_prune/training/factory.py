"""Glue from configs to the batched env of a split."""

from __future__ import annotations

from typing import Any

from policy_prune.config import EnvConfig
from policy_prune.training.env import PruneVecEnv


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
