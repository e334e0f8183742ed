"""Glue from configs to the envs: the batched env of a split, and the single-row env of a preset."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from policy_prune.config import EnvConfig, RewardConfig, load_env_config
from policy_prune.errors import UserError
from policy_prune.training.budget import BudgetController
from policy_prune.training.env import PruneVecEnv, TokenPruneEnv


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
    if controller is None:
        controller = budget_controller(reward)
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
        merge=env_cfg.merge,
    )


def budget_controller(reward: RewardConfig) -> BudgetController | None:
    """The multipliers and target draw of a budget-conditioned reward (None without ``reward.budget``)."""
    budget = reward.budget
    if budget is None:
        return None
    if not (isinstance(budget, list | tuple) and len(budget) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in budget)):
        raise UserError(f"budget must be [low, high] FLOPs ratios with 0 < low <= high <= 1, got {budget!r}")
    return BudgetController(float(budget[0]), float(budget[1]), knots=reward.budget_knots, init_lam=reward.lam,
                            lr=reward.budget_lr, draw=reward.budget_draw)


def make_env(preset: str | None = None, split: Any = "train", seed: int = 0, device: str = "cpu",
             overrides: Sequence[str] = (), **kwargs: Any) -> TokenPruneEnv:
    """The entry point of ``gym.make("PolicyPrune/TokenPrune-v0", ...)``.

    With ``preset`` (an env preset name or YAML path, plus ``key=value`` ``overrides`` as ``--set env.``
    takes them): the preset's frozen backbone (the embedded digits-vit is fitted on first use) on its
    ``split`` ("train", "val" or "test"), its sites and reward; ``kwargs`` override TokenPruneEnv's
    arguments (``sequential=True``, ``lam=0.1``). Without: TokenPruneEnv(split=split, **kwargs), a
    backbone and a Split of your own.
    """
    if preset is None:
        return TokenPruneEnv(split=split, **kwargs)
    from policy_prune.embedded import resolve

    if split not in ("train", "val", "test"):
        raise UserError(f"split={split!r}: a preset's env runs on 'train', 'val' or 'test'")
    env_cfg = load_env_config(preset, list(overrides), scope="overrides: ")
    backbone, splits = resolve(env_cfg, seed=seed, device=device)
    reward = env_cfg.reward
    # The preset's multipliers and target draw, at the budget range and starting lambda the env gets.
    reward = dataclasses.replace(reward, **{k: kwargs[k] for k in ("budget", "lam") if k in kwargs})
    args: dict[str, Any] = {"lam": reward.lam, "task": reward.task, "device": device, "budget": reward.budget,
                            "controller": budget_controller(reward), "merge": env_cfg.merge}
    return TokenPruneEnv(backbone, splits[split], env_cfg.sites, **{**args, **kwargs})
