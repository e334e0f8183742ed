"""Glue from configs to the batched env of a split."""

from __future__ import annotations

from typing import Any

from policy_prune.config import EnvConfig
from policy_prune.training.budget import BudgetController
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
    target: float | None = None,
    controller: BudgetController | None = None,
) -> PruneVecEnv:
    """The batched env of an env preset on one split (``lam`` overrides the preset's lambda).

    Budget-conditioned presets (``reward.budget``): ``target`` fixes every row's target FLOPs ratio
    (evaluation), else each group draws one; ``controller`` holds the multipliers (a run shares one
    between its training and validation envs), else the env makes its own.
    """
    reward = env_cfg.reward
    if reward.budget is not None and controller is None:
        controller = BudgetController(reward.budget[0], reward.budget[1], knots=reward.budget_knots, init_lam=reward.lam,
                                      lr=reward.budget_lr)
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
        budget=reward.budget,
        target=target,
        controller=controller,
    )
