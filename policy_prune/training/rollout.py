"""Run a policy (learned, keep-all, random) through the env on a split and aggregate the episodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from policy_prune.training.policy import PROTECTED_COLUMN

PolicyFn = Callable[[dict[str, np.ndarray], int], np.ndarray]
"""(observation batch, site index) -> keep actions [B, N]."""

EPISODE_KEYS = ("task", "flops_ratio", "agreement", "accuracy", "cosine", "tokens_kept")


def model_policy(model: Any) -> PolicyFn:
    """The SB3 model's deterministic policy (keep where the scorer's logit > 0)."""
    return lambda obs, site: model.predict(obs, deterministic=True)[0]


def keep_all_policy() -> PolicyFn:
    return lambda obs, site: np.ones_like(obs["alive"])


def random_policy(free_keep_ratio: Sequence[float], seed: int) -> PolicyFn:
    """Keep each free (alive, unprotected) token with the given per-site probability."""
    rng = np.random.default_rng(seed)
    return lambda obs, site: (rng.random(obs["alive"].shape) < free_keep_ratio[site]).astype(np.int8)


def free_mask(obs: dict[str, np.ndarray]) -> np.ndarray:
    """[B, N] bool: alive tokens that the policy may drop."""
    return (obs["alive"] > 0) & ~(obs["tokens"][..., PROTECTED_COLUMN] > 0.5)


def evaluation_env(env_cfg: Any, backbone: Any, split: Any, n_samples: int, device: str = "cpu", batch: int = 64,
                   lam: float | None = None, controller: Any = None) -> Any:
    """A sequential batched env over the first ``n_samples`` samples of ``split`` (reusable: its
    teacher outputs are cached; set ``.target`` to evaluate a budget-conditioned policy at a budget)."""
    from policy_prune.training.factory import make_vec_env

    n_envs = min(batch, n_samples, len(split))
    return make_vec_env(env_cfg, backbone, split, n_envs, sequential=True, device=device, lam=lam, controller=controller)


def evaluate_policy_split(
    policy: PolicyFn,
    env_cfg: Any,
    backbone: Any,
    split: Any,
    n_samples: int,
    device: str = "cpu",
    batch: int = 64,
    lam: float | None = None,
    target: float | None = None,
    vec: Any = None,
) -> dict[str, Any]:
    """Mean episode metrics of ``policy`` over the first ``n_samples`` samples of ``split`` (each once).

    ``target``: the budget every row is told (budget-conditioned envs); ``vec``: an env from
    :func:`evaluation_env` to reuse (else one is made).
    """
    n_samples = min(n_samples, len(split))
    if vec is None:
        vec = evaluation_env(env_cfg, backbone, split, n_samples, device, batch, lam)
    vec.target = target
    n_envs = vec.num_envs
    n_sites = len(env_cfg.sites)
    episodes: dict[int, dict[str, Any]] = {}
    kept_free, free_total = np.zeros(n_sites), np.zeros(n_sites)
    obs: Any = vec.reset()
    while len(episodes) < n_samples:
        returns = np.zeros(n_envs)
        for site in range(n_sites):
            actions = np.asarray(policy(obs, site)).reshape(obs["alive"].shape)
            free = free_mask(obs)
            kept_free[site] += (actions.astype(bool) & free).sum()
            free_total[site] += free.sum()
            obs, rewards, dones, infos = vec.step(actions)
            returns += rewards
        for info, ret in zip(infos, returns, strict=True):
            if info["sample"] < n_samples and info["sample"] not in episodes:
                episodes[info["sample"]] = {**info, "return": float(ret)}
    return aggregate(list(episodes.values()), kept_free / np.maximum(free_total, 1))


def aggregate(episodes: list[dict[str, Any]], free_keep_ratio: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"episodes": len(episodes), "return": float(np.mean([e["return"] for e in episodes]))}
    for key in EPISODE_KEYS:
        values = [e[key] for e in episodes if key in e]
        if values:
            out[key] = float(np.mean(values))
    out["keep_ratio"] = np.mean([e["keep_ratio"] for e in episodes], axis=0).tolist()
    out["free_keep_ratio"] = free_keep_ratio.tolist()
    return out
