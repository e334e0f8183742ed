"""Every mistake in a run's config that can be seen without fitting or loading a backbone, caught before any work.

``check_run_config`` runs when ``train`` resolves its config, before the run folder exists (and on the run's own
config when it resumes): a typo in a hyperparameter, a negative lambda or a site past the model's last block costs
one line, not a backbone fit.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from policy_prune.config import TRACKERS, ConfigError
from policy_prune.training.budget import DRAWS

PPO_ONLY = ("batch_size", "n_epochs", "clip_range", "clip_range_vf", "target_kl")
"""PPO settings an a2c agent drops (so one hyperparameter file can serve both)."""
SET_BY_TRAIN = {"policy": "agent.scorer_hidden / critic_hidden", "env": "--env", "seed": "--seed",
                "device": "--device", "verbose": None, "policy_kwargs": "agent.scorer_hidden / critic_hidden",
                "_init_setup_model": None}
"""Constructor arguments ``train`` sets itself, and where the user sets them instead."""


def check_run_config(cfg: Any, algo_class: type) -> None:
    """Raise ConfigError (one line) for the first mistake in a RunConfig; ``algo_class`` is its SB3 algorithm."""
    check_warm_start(cfg.agent)
    params = init_parameters(algo_class)
    check_hyperparams(cfg.agent.hyperparams, params, cfg.agent.algo, algo_class.__name__)
    check_rollout(cfg, params)
    check_env(cfg.env)
    check_train(cfg.train)


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named constructor parameters of ``cls``, following ``**kwargs`` up the MRO (subclasses that pass them on)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)  # type: ignore[misc]
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


NUMERIC_HYPERPARAMS = ("ent_coef", "vf_coef", "max_grad_norm", "target_kl", "gamma", "gae_lambda")
"""Hyperparameters that must be numbers in a config (target_kl may be null)."""
SCHEDULED = ("learning_rate", "clip_range")
"""Hyperparameters a config may write as a positive number or as ``lin_<value>``, rl-baselines3-zoo's spelling: from
value at the first step linearly to 0 at the last (:func:`linear_start`)."""


def linear_start(value: Any) -> float | None:
    """The start of a ``lin_<value>`` schedule (a positive number), None for anything else."""
    if not isinstance(value, str) or not value.startswith("lin_"):
        return None
    try:
        start = float(value[len("lin_"):])
    except ValueError:
        return None
    return start if math.isfinite(start) and start > 0 else None


def check_hyperparams(hyper: dict[str, Any], params: dict[str, inspect.Parameter], algo: str, algo_name: str) -> None:
    """Names against the algorithm's constructor, values of the common ones against their ranges."""
    allowed = set(params) - set(SET_BY_TRAIN) | (set(PPO_ONLY) if algo == "a2c" else set())
    for key in hyper:
        if key in SET_BY_TRAIN:
            where = SET_BY_TRAIN[key]
            raise ConfigError(f"agent.hyperparams.{key} is set by policy-prune" + (f" (use {where})" if where else ""))
        if key not in allowed:
            raise ConfigError(f"agent.hyperparams: unknown key {key!r} for {algo_name}{_did_you_mean(key, allowed)}")
    _positive_int(hyper, "n_steps", "n_epochs")
    if "batch_size" in hyper and not (_is_int(hyper["batch_size"]) and hyper["batch_size"] >= 2):
        raise ConfigError(f"agent.hyperparams.batch_size must be an integer >= 2, got {hyper['batch_size']!r}")
    for key in ("gamma", "gae_lambda"):
        if key in hyper and not (_is_number(hyper[key]) and 0.0 <= hyper[key] <= 1.0):
            raise ConfigError(f"agent.hyperparams.{key} must lie in [0, 1], got {hyper[key]!r}")
    for key in SCHEDULED:
        if key in hyper and not (_is_number(hyper[key]) and hyper[key] > 0) and linear_start(hyper[key]) is None:
            raise ConfigError(f"agent.hyperparams.{key} must be a positive number, or lin_<positive number> for a "
                              f"linear decay to 0 over the run, got {hyper[key]!r}")
    if "normalize_returns" in hyper and not isinstance(hyper["normalize_returns"], bool):
        raise ConfigError(f"agent.hyperparams.normalize_returns must be true or false, got {hyper['normalize_returns']!r}")
    for key in NUMERIC_HYPERPARAMS:
        if key in hyper and not (key == "target_kl" and hyper[key] is None) and not _is_number(hyper[key]):
            raise ConfigError(f"agent.hyperparams.{key} must be a number, got {hyper[key]!r}")


def check_rollout(cfg: Any, params: dict[str, inspect.Parameter]) -> None:
    """Env rows, groups and rollout length against each other and against the step budget."""
    agent = cfg.agent
    if agent.n_envs < 1:
        raise ConfigError(f"agent.n_envs must be at least 1, got {agent.n_envs}")
    if agent.amp not in (None, "bf16", "auto"):
        raise ConfigError(f"agent.amp must be null, bf16 or auto, got {agent.amp!r}")
    if agent.group_size < 1 or agent.n_envs % agent.group_size:
        raise ConfigError(f"agent.group_size {agent.group_size} must be a positive divisor of agent.n_envs {agent.n_envs}")
    if not agent.critic_hidden:
        raise ConfigError("agent.critic_hidden needs at least one layer width (the critic pools token features "
                          "through it); agent.scorer_hidden may be empty (a linear scorer)")
    if any(h < 1 for h in [*agent.scorer_hidden, *agent.critic_hidden]):
        raise ConfigError(f"agent.scorer_hidden / critic_hidden widths must be positive, got "
                          f"{agent.scorer_hidden} / {agent.critic_hidden}")
    n_steps = int(agent.hyperparams.get("n_steps", params["n_steps"].default))
    n_sites = len(cfg.env.sites)
    if n_sites and n_steps % n_sites:
        raise ConfigError(f"agent n_steps={n_steps} must be a multiple of the number of sites ({n_sites})")
    rollout = agent.n_envs * n_steps
    if cfg.train.timesteps < rollout:
        raise ConfigError(f"train.timesteps {cfg.train.timesteps} is below one rollout (n_envs {agent.n_envs} x "
                          f"n_steps {n_steps} = {rollout}): nothing would be learned")


def check_env(env: Any) -> None:
    """Reward, sites and data of an env preset; the backbone is described, never loaded."""
    from policy_prune.data import get_builder
    from policy_prune.embedded import describe_backbone
    from policy_prune.training.env import EMBEDDING_TASKS, LOGIT_TASKS, TASKS

    lam = env.reward.lam
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"env.reward.lam (lambda) must be a finite number >= 0, got {lam}")
    check_budget(env.reward)
    if env.reward.task not in TASKS:
        raise ConfigError(f"unknown env.reward.task {env.reward.task!r}: choose from {', '.join(TASKS)}"
                          f"{_did_you_mean(env.reward.task, TASKS)}")
    sites = env.sites
    if not sites or any(s < 0 for s in sites) or sites != sorted(set(sites)):
        raise ConfigError(f"env.sites {sites} must be a non-empty, strictly increasing list of block indices")
    if env.data.max_samples is not None and env.data.max_samples < 1:
        raise ConfigError(f"env.data.max_samples must be at least 1, got {env.data.max_samples}")
    from policy_prune.core.backbones.hf import POOLINGS

    if env.backbone.pooling is not None and env.backbone.pooling not in POOLINGS:
        raise ConfigError(f"env.backbone.pooling must be null or one of {', '.join(POOLINGS)}, got {env.backbone.pooling!r}")
    if env.data.max_length < 3:  # [CLS], one word, [SEP]
        raise ConfigError(f"env.data.max_length must be at least 3 tokens, got {env.data.max_length}")
    if env.data.image_size is not None and env.data.image_size < 1:
        raise ConfigError(f"env.data.image_size must be a positive number of pixels, got {env.data.image_size}")
    get_builder(env.data.dataset)  # an unknown dataset name fails here, listing the choices
    if env.backbone.spec == "digits-vit":
        from policy_prune.training.pretrain import checkpoint_for

        checkpoint_for(env)  # parses backbone.model_kwargs / pretrain and the digits options strictly
    kind, depth = describe_backbone(env.backbone)
    if depth is not None and sites[-1] >= depth:
        raise ConfigError(f"env.sites {sites}: {env.backbone.spec} has {depth} blocks, so sites must lie in [0, {depth - 1}]")
    task = env.reward.task
    if kind == "embedding" and task in LOGIT_TASKS:
        raise ConfigError(f"env.reward.task {task!r} needs a classifier; {env.backbone.spec} outputs embeddings (use 'cosine')")
    if kind == "logits" and task in EMBEDDING_TASKS:
        raise ConfigError(f"env.reward.task {task!r} is for embedding models; {env.backbone.spec} is a classifier "
                          f"(use one of {', '.join(LOGIT_TASKS)})")
    if task == "retrieval" and not (env.data.options or {}).get("train_queries"):
        raise ConfigError("env.reward.task 'retrieval' rewards the retrieval queries among the training rows: "
                          "set env.data.options.train_queries: true (a text dataset with queries, e.g. python-docs)")
    folder = env.data.dataset.removeprefix("imagefolder:")
    if folder != env.data.dataset and not Path(folder).is_dir():
        raise ConfigError(f"env.data.dataset: image folder not found: {folder}")


def check_warm_start(agent: Any) -> None:
    """``agent.warm_start``: its values' ranges, and a ranking loss only where the update adds it (per-token credit)."""
    w = agent.warm_start
    for name, ok, rule in (("samples", w.samples >= 0, ">= 0"), ("keep", 0 < w.keep < 1, "in (0, 1)"),
                           ("epochs", w.epochs >= 0, ">= 0"), ("lr", w.lr > 0, "> 0"),
                           ("smoothing", 0 <= w.smoothing < 1, "in [0, 1)"), ("aux_coef", w.aux_coef >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"agent.warm_start.{name} must be {rule}, got {getattr(w, name)!r}")
    if w.aux_coef and agent.credit != "token":
        raise ConfigError("agent.warm_start.aux_coef needs agent.credit: token (its update adds the loss)")


def check_budget(reward: Any) -> None:
    """A budget-conditioned reward: the range of target FLOPs ratios and its multipliers' settings."""
    if reward.budget is None:
        return
    budget = reward.budget
    if len(budget) != 2 or not all(_is_number(b) for b in budget) or not 0.0 < budget[0] <= budget[1] <= 1.0:
        raise ConfigError(f"env.reward.budget must be [low, high] FLOPs ratios with 0 < low <= high <= 1, got {budget}")
    if reward.budget_draw not in DRAWS:
        raise ConfigError(f"env.reward.budget_draw must be one of {', '.join(map(repr, DRAWS))}, got {reward.budget_draw!r}")
    if reward.budget_knots < 1:
        raise ConfigError(f"env.reward.budget_knots must be at least 1, got {reward.budget_knots}")
    if not (math.isfinite(reward.budget_lr) and reward.budget_lr > 0):
        raise ConfigError(f"env.reward.budget_lr must be a positive number, got {reward.budget_lr}")


def check_train(train: Any) -> None:
    from policy_prune.embedded import check_device

    for key in ("eval_samples", "final_samples", "calibration_samples"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(train, key)}")
    if not train.eval_targets or not all(_is_number(t) and 0.0 < t <= 1.0 for t in train.eval_targets):
        raise ConfigError(f"train.eval_targets must be FLOPs ratios in (0, 1], got {train.eval_targets}")
    if not (_is_number(train.calibration_step) and 0.0 < train.calibration_step <= 1.0):
        raise ConfigError(f"train.calibration_step must lie in (0, 1], got {train.calibration_step}")
    if not (_is_number(train.query_share) and 0.0 < train.query_share < 1.0):
        raise ConfigError(f"train.query_share must lie in (0, 1), got {train.query_share}")
    if not (_is_number(train.split_loss) and train.split_loss >= 0.0):
        raise ConfigError(f"train.split_loss must be a number of at least 0, got {train.split_loss}")
    if train.threads is not None and train.threads < 1:
        raise ConfigError(f"train.threads must be a positive integer or null (torch's default), got {train.threads!r}")
    if train.track not in (None, *TRACKERS):
        raise ConfigError(f"train.track must be null or {' or '.join(TRACKERS)}, got {train.track!r}")
    check_device(train.device, "train.device")


def _did_you_mean(key: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(hyper: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key in hyper and not (_is_int(hyper[key]) and hyper[key] >= 1):
            raise ConfigError(f"agent.hyperparams.{key} must be a positive integer, got {hyper[key]!r}")
