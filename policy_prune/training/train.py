"""``policy-prune train``: learn a token-pruning policy with stable-baselines3 on the batched env.

Writes ``runs/<env>__<agent>__<seed>__<time>/`` with ``config.yaml`` (the complete resolved config),
``metrics.jsonl`` (SB3 + pruning + validation metrics), ``checkpoints/last.zip`` (atomic), the exported
``scorer/`` and ``eval/summary.json`` (held-out comparison with keep-all and a random policy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy_prune.cli_args import positive
from policy_prune.config import (
    RUN_CONFIG_FILE,
    TRACKERS,
    AgentConfig,
    ConfigError,
    EnvConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_agent_config,
    load_env_config,
    override_labels,
    preset_names,
    read_run_config,
    to_dict,
)
from policy_prune.console import status
from policy_prune.core import hub
from policy_prune.core.budget import QUERY_SHARE, SPLIT_LOSS
from policy_prune.embedded import DTYPE_NAMES
from policy_prune.errors import UserError

ALGOS = ("ppo", "a2c")
CREDITS = ("step", "token")


@dataclass
class TrainConfig:
    """How long and how a run trains; everything else lives in the env and agent presets."""

    timesteps: int = 1_200_000
    """Environment steps (one step = one pruning decision for one row)."""
    seed: int = 0
    """Seed of torch, numpy, the env's sample order and SB3."""
    device: str = "cpu"
    """Torch device for the backbone and the policy."""
    dtype: str = "fp32"
    """Dtype of the frozen backbone: fp32, bf16 or fp16 (features, rewards and the policy stay fp32)."""
    eval_every: int = 15_000
    """Validate the deterministic policy every this many timesteps."""
    eval_samples: int = 512
    """Validation samples per periodic evaluation."""
    final_samples: int = 1024
    """Validation samples for the end-of-run comparison with keep-all and random policies (the test split
    is left to ``policy-prune eval --split test``: defaults are chosen on validation only)."""
    eval_targets: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.35])
    """Budget-conditioned runs: the target FLOPs ratios validation and the final summary are run at."""
    calibration_samples: int = 256
    """Budget-conditioned runs: validation samples on which the exported scorer's thresholds are solved."""
    calibration_step: float = 0.05
    """Budget-conditioned runs: spacing of the calibrated targets over the trained range (0.05: the budgets users
    ask for most, 0.15 / 0.25 / 0.35, are points of their own, with their own rule and idle sites)."""
    query_share: float = QUERY_SHARE
    """Budget-conditioned retrieval runs: the queries' share of the unpruned FLOPs up to which ``prune(...,
    flops=f)`` keeps one total over queries and documents at most f (``BudgetInput.query_share``)."""
    split_loss: float = SPLIT_LOSS
    """Budget-conditioned retrieval runs: how much further from their unpruned embeddings the documents may get to
    pay for fuller queries in the calibrated split of one total (``solve_splits``' ``loss``: 1 - their mean cosine
    may grow by this share of what it is with each kind at the target); 0 gives each kind the target."""
    checkpoint_every: int = 15_000
    """Save checkpoints/last.zip every this many timesteps (a kill loses at most this much)."""
    track: str | None = None
    """"wandb" to track the run in Weights & Biases; None touches nothing."""
    wandb_group: str | None = None
    """W&B group of the run (``policy-prune sweep`` puts the trials of one sweep in one group)."""
    name: str | None = None
    """Run folder name (default <env>__<agent>__<seed>__<time>)."""
    runs_dir: str = "runs"
    """Folder that holds run folders."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""


@dataclass
class RunConfig:
    """The complete resolved config of a run: written to config.yaml and logged to W&B."""

    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    agent_name: str = "ppo"
    """Name of the agent preset (used in the run folder name)."""


DEFAULT_ENV = "digits-vit"
RESUME_FIXED = {"env": "--env", "agent": "--agent", "lam": "--lam", "seed": "--seed", "name": "--name", "overrides": "--set",
                "device": "--device", "dtype": "--dtype", "track": "--track", "runs_dir": "--runs-dir"}
"""Flags (argument name -> flag) that --resume refuses: the run's config.yaml fixes them."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default=None, help=f"env preset name or YAML path (default {DEFAULT_ENV})")
    p.add_argument("--agent", default=None, help=f"agent preset name or YAML path ({', '.join(preset_names('agents'))}; default: the env's own, else ppo)")
    p.add_argument("--lam", type=float, default=None, help="compute penalty lambda (overrides the env preset)")
    p.add_argument("--timesteps", type=positive, default=None, help="total environment steps")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--name", default=None, help="run folder name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value: env.reward.task=teacher_agree, agent.hyperparams.n_steps=96, train.eval_every=5000")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="dtype of the frozen backbone (default fp32)")
    p.add_argument("--track", choices=TRACKERS, default=None, help="track the run in Weights & Biases")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint, with its own config (only --timesteps may "
                        "be given with it)")
    p.add_argument("--runs-dir", default=None, help="where run folders are created (default ./runs)")


# ---- configuration --------------------------------------------------------------------------------
def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Presets + flags + --set overrides -> one validated RunConfig."""
    env_over: list[str] = []
    agent_over: list[str] = []
    train_over: list[str] = []
    for item in args.overrides:
        scope, _, rest = item.partition(".")
        target = {"env": env_over, "agent": agent_over, "train": train_over}.get(scope)
        if target is None or not rest:
            raise ConfigError(f"--set {item!r}: keys start with env., agent. or train.")
        target.append(rest)
    env_cfg = load_env_config(args.env or DEFAULT_ENV, env_over)
    agent_name = args.agent or env_cfg.agent or "ppo"
    agent_cfg = load_agent_config(agent_name, agent_over)
    train_raw: dict[str, Any] = dict(env_cfg.train)  # the env's recommended settings; flags and --set win
    for flag, key in (("timesteps", "timesteps"), ("seed", "seed"), ("device", "device"), ("dtype", "dtype"),
                      ("track", "track"), ("name", "name"), ("runs_dir", "runs_dir")):
        if getattr(args, flag, None) is not None:  # a Namespace built by hand may lack newer flags
            train_raw[key] = getattr(args, flag)
    train_cfg = from_dict(TrainConfig, apply_overrides(train_raw, train_over), "train", override_labels(train_over, "--set train."))
    if args.lam is not None:
        env_cfg.reward.lam = args.lam
    absolute_paths(env_cfg)
    cfg = RunConfig(env_cfg, agent_cfg, train_cfg, Path(agent_name).stem)
    validate(cfg)
    return cfg


def absolute_paths(env: EnvConfig) -> None:
    """The env's local paths (a model folder, a checkpoint, an ``hf:`` or ``imagefolder:`` data folder) made
    absolute, in place: the run folder's config.yaml is read again by eval, export and --resume from any directory
    (from another one they said "unknown backbone 'my-encoder'"). Names that are no local path (hub ids, timm and
    embedded names, registry datasets) stay as written."""
    from policy_prune.core.embedded_models import DIGITS_VIT, MINILM_SPECS
    from policy_prune.data.loaders import parse_hf_spec

    if env.backbone.spec not in (DIGITS_VIT, *MINILM_SPECS):
        env.backbone.spec = _absolute(env.backbone.spec)
    if env.backbone.checkpoint:
        env.backbone.checkpoint = _absolute(env.backbone.checkpoint)
    dataset = env.data.dataset
    if dataset.startswith("hf:"):  # hf:<name>[:<config>][:<split>], read by the loader's own parser
        name, config, split = parse_hf_spec(dataset)
        env.data.dataset = ":".join([_absolute(f"hf:{name}"), config or "", split or ""]).rstrip(":")
    elif dataset.startswith("imagefolder:"):
        env.data.dataset = "imagefolder:" + _absolute(dataset.removeprefix("imagefolder:"))


def _absolute(ref: str) -> str:
    """``ref`` (a path, or ``hf:`` and a path) with its path made absolute where it exists here, else ``ref``."""
    path = Path(hub.model_ref(ref))
    if not ref.removeprefix("hf:") or not hub.is_local(path):
        return ref
    return ("hf:" if ref.startswith("hf:") else "") + str(path.resolve())


def validate(cfg: RunConfig) -> None:
    if cfg.agent.algo not in ALGOS:
        raise ConfigError(f"agent.algo must be one of {', '.join(ALGOS)}, got {cfg.agent.algo!r}")
    if cfg.agent.credit not in CREDITS:
        raise ConfigError(f"agent.credit must be one of {', '.join(CREDITS)}, got {cfg.agent.credit!r}")
    if cfg.agent.credit == "token" and cfg.agent.algo != "ppo":
        raise ConfigError(f"agent.credit 'token' needs algo ppo, got {cfg.agent.algo!r}")
    if cfg.train.timesteps <= 0 or cfg.train.eval_every <= 0 or cfg.train.checkpoint_every <= 0:
        raise ConfigError("train.timesteps, train.eval_every and train.checkpoint_every must be positive")
    if cfg.train.dtype not in DTYPE_NAMES:
        raise ConfigError(f"train.dtype must be one of {', '.join(DTYPE_NAMES)}, got {cfg.train.dtype!r}")
    from policy_prune.training.checks import check_run_config

    check_run_config(cfg, algorithm_class(cfg))  # everything else that can be checked before any work


def load_run_config(run_dir: Path) -> RunConfig:
    return from_dict(RunConfig, read_run_config(run_dir), str(run_dir / RUN_CONFIG_FILE))


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _logged(run_dir: Path) -> bool:
    """Whether the run logged any training metrics (metrics.jsonl has a row)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def new_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.train.name or f"{cfg.env.name}__{cfg.agent_name}__{cfg.train.seed}__{stamp}"
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"run name {name!r} must be one folder name (no path separators); use --runs-dir for the place")
    run_dir = Path(cfg.train.runs_dir) / name
    if run_dir.exists():
        if not (run_dir / "checkpoints" / "last.zip").is_file():
            raise UserError(f"run folder already exists: {run_dir}, with no checkpoint to resume (a run that failed "
                            "before its first one): delete it or give another --name")
        raise UserError(f"run folder already exists: {run_dir} (use --resume to continue it, or another --name)")
    try:
        (run_dir / "checkpoints").mkdir(parents=True)
    except OSError as exc:  # --runs-dir is a file, or a folder this user cannot write to
        raise UserError(f"cannot make the run folder {run_dir}: {exc.strerror or exc} (check --runs-dir "
                        f"{cfg.train.runs_dir})") from None
    return run_dir


# ---- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from policy_prune.console import make_console

    console = make_console()
    if args.resume is not None:
        run_dir = args.resume
        # A run resumes with the config it was started with; only its length may change.
        given = [flag for name, flag in RESUME_FIXED.items() if getattr(args, name, None) not in (None, [])]
        if given:
            raise UserError(f"--resume continues {run_dir} with its own config.yaml: {', '.join(given)} cannot change "
                            "it (only --timesteps can)")
        cfg = load_run_config(run_dir)
        if args.timesteps is not None:
            cfg.train.timesteps = args.timesteps
        refuse_finished(cfg, run_dir)  # first: a finished run given fewer --timesteps than one rollout is finished
        validate(cfg)
        if not (run_dir / "checkpoints" / "last.zip").is_file():
            raise UserError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}")
    else:
        cfg = resolve_config(args)
        run_dir = new_run_dir(cfg)
    try:
        if args.resume is None:
            write_atomic(run_dir / "config.yaml", dump_yaml(to_dict(cfg)))
        summary = train(cfg, run_dir, console, resume=args.resume is not None)
    except BaseException as exc:  # a mistake found late, a crash or Ctrl-C
        if args.resume is None and not (run_dir / "checkpoints" / "last.zip").exists() \
                and (isinstance(exc, UserError | KeyboardInterrupt) or not _logged(run_dir)):
            # A run that never saved a checkpoint cannot be resumed: no folder is left to block its name. A crash
            # after training logged metrics keeps them (the evidence); its folder then says why it blocks the name.
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print_summary(console, summary, run_dir)
    return 0


def refuse_finished(cfg: RunConfig, run_dir: Path) -> None:
    """UserError where resuming would only redo the final eval and export: the checkpoint has every step asked
    for, and the scorer in ``run_dir/scorer`` was exported from that very checkpoint at the end of ``train``."""
    steps = checkpoint_timesteps(run_dir / "checkpoints" / "last.zip")
    try:
        exported = json.loads((run_dir / "scorer" / "scorer.json").read_text())["meta"]["timesteps"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no scorer, or not one train wrote at its end: the final eval and export run (again)
    if steps is not None and steps >= cfg.train.timesteps and exported == steps:
        again = f"; `policy-prune export {run_dir} --calibrate` calibrates its scorer again" \
            if cfg.env.reward.budget is not None else ""
        raise UserError(f"{run_dir} is finished ({steps} timesteps, its scorer in {run_dir / 'scorer'}): "
                        f"--timesteps N above {steps} trains it further{again}")


def checkpoint_timesteps(path: Path) -> int | None:
    """The steps an SB3 checkpoint was saved at, read from its JSON ``data`` entry (nothing unpickled)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            steps = json.loads(archive.read("data"))["num_timesteps"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return int(steps) if isinstance(steps, int) else None


def train(cfg: RunConfig, run_dir: Path, console: Any, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns the held-out summary.

    ``callbacks``: extra SB3 callbacks, called after the run's own (e.g. a sweep's report to Ray Tune).
    """
    import torch
    from stable_baselines3.common.utils import set_random_seed

    from policy_prune.embedded import resolve
    from policy_prune.training.callbacks import RunProgress, save_checkpoint

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_random_seed(cfg.train.seed)
    with RunProgress(console) as progress:
        backbone, splits = resolve(cfg.env, seed=cfg.train.seed, device=cfg.train.device, console=console,
                                   progress=progress, dtype=cfg.train.dtype)
        model, own, wandb_run = _setup(cfg, run_dir, console, backbone, splits, resume, progress)
        rollout = model.n_steps * model.n_envs
        remaining = max(cfg.train.timesteps - model.num_timesteps, 0)
        # SB3 learns in whole rollouts: the bar's total is the number of steps the run will really take.
        progress.start(model.num_timesteps + math.ceil(remaining / rollout) * rollout, model.num_timesteps)
        model.learn(remaining, callback=[own, *callbacks], reset_num_timesteps=not resume, log_interval=1)
    save_checkpoint(model, run_dir / "checkpoints" / "last.zip")
    with status(console, "final validation and scorer export"):
        summary = final_evaluation(cfg, model, backbone, splits["val"], run_dir)
        export_run_scorer(cfg, model, backbone, run_dir, summary, splits["val"])
    if wandb_run is not None:
        from policy_prune.training.tracking import log_summary

        log_summary(wandb_run, run_dir, summary)
        wandb_run.finish()
    return summary


def _setup(cfg: RunConfig, run_dir: Path, console: Any, backbone: Any, splits: dict[str, Any], resume: bool,
           progress: Any) -> tuple[Any, Any, Any]:
    """The agent on its env, its logger (metrics.jsonl, W&B) and its callbacks."""
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import VecMonitor

    from policy_prune.training.callbacks import make_callbacks
    from policy_prune.training.factory import make_vec_env
    from policy_prune.training.tracking import JsonlFormat, WandbFormat, start_wandb, truncate_metrics

    vec = make_vec_env(cfg.env, backbone, splits["train"], cfg.agent.n_envs, device=cfg.train.device,
                       group_size=cfg.agent.group_size)
    env = VecMonitor(vec)
    ckpt = run_dir / "checkpoints" / "last.zip"
    model = load_agent(cfg, env, ckpt) if resume else make_agent(cfg, env)
    if cfg.agent.warm_start.samples and (not resume or cfg.agent.warm_start.aux_coef):
        _warm_start(cfg, model, vec, run_dir, console, fit=not resume)
    if resume:
        truncate_metrics(run_dir / "metrics.jsonl", model.num_timesteps)
        console.print(f"resuming {run_dir.name} at {model.num_timesteps} / {cfg.train.timesteps} timesteps")
    wandb_run = None
    formats: list[Any] = [JsonlFormat(run_dir / "metrics.jsonl")]
    if cfg.train.track == "wandb":
        wandb_run = start_wandb(to_dict(cfg), run_dir, run_dir.name, console, resume_id=_wandb_id(run_dir),
                                group=cfg.train.wandb_group)
        (run_dir / "wandb_id").write_text(wandb_run.id)
        formats.append(WandbFormat(wandb_run))
    model.set_logger(Logger(folder=str(run_dir), output_formats=formats))
    controller = vec.core.controller
    callbacks = make_callbacks(cfg, run_dir, backbone, splits["val"], progress, controller)
    return model, callbacks, wandb_run


def _warm_start(cfg: RunConfig, model: Any, vec: Any, run_dir: Path, console: Any, fit: bool) -> None:
    """The occlusion ranking of the first site (agent.warm_start): the new agent's scorer fitted to it (``fit``;
    its figures go to warm_start.json in the run folder), and its loss added to PPO's with ``aux_coef``."""
    from policy_prune.training.warm_start import occlusion_ranking, warm_start

    w = cfg.agent.warm_start
    began = time.perf_counter()
    with status(console, f"warm start: occlusion values of {w.samples} train samples at site {cfg.env.sites[0]}"):
        ranking = occlusion_ranking(vec.core, w.samples, w.keep, w.smoothing, cfg.train.seed)
        fitted = warm_start(model.policy.scorer, ranking, w.epochs, w.lr) if fit else {}
    if w.aux_coef:
        model.ranking, model.ranking_coef = ranking, w.aux_coef
    if not fit:
        return
    stats = {"samples": len(ranking.free), "seconds": round(time.perf_counter() - began, 1), **fitted}
    write_atomic(run_dir / "warm_start.json", json.dumps(stats, indent=2) + "\n")
    console.print(f"warm start: site {cfg.env.sites[0]} fitted to the occlusion ranking of {stats['samples']} train "
                  f"samples in {stats['seconds']:.0f} s (top {w.keep:g} shared with it: {stats['overlap_before']:.2f}"
                  f" -> {stats['overlap_after']:.2f})")


def _wandb_id(run_dir: Path) -> str | None:
    path = run_dir / "wandb_id"
    return path.read_text().strip() if path.exists() else None


def algorithm_class(cfg: RunConfig) -> Any:
    from stable_baselines3 import A2C, PPO

    from policy_prune.training.token_ppo import TokenCreditPPO

    if cfg.agent.credit == "token":
        return TokenCreditPPO
    return {"ppo": PPO, "a2c": A2C}[cfg.agent.algo]


def make_agent(cfg: RunConfig, env: Any) -> Any:
    from stable_baselines3.common.utils import LinearSchedule

    from policy_prune.training.checks import SCHEDULED, linear_start
    from policy_prune.training.policy import TokenScorerPolicy, resolve_amp

    algo = algorithm_class(cfg)
    hyper = dict(cfg.agent.hyperparams)
    if cfg.agent.algo == "a2c":
        for key in ("batch_size", "n_epochs", "clip_range", "target_kl"):  # PPO-only settings
            hyper.pop(key, None)
    if cfg.agent.credit == "token":
        hyper.setdefault("gae_lambda", 1.0)  # per-token credit models Monte Carlo returns
    for key in SCHEDULED:  # "lin_<value>": SB3's picklable schedule, from value at the first step to 0 at the last
        if (start := linear_start(hyper.get(key))) is not None:
            hyper[key] = LinearSchedule(start, 0.0, 1.0)
    projection = env.unwrapped.core.projection
    policy_kwargs = {"scorer_hidden": cfg.agent.scorer_hidden, "critic_hidden": cfg.agent.critic_hidden,
                     "projection_shape": list(projection.shape), "token_baseline": cfg.agent.credit == "token",
                     "budget_knots": 0 if cfg.env.reward.budget is None else len(env.unwrapped.core.controller.knots),
                     "amp": resolve_amp(cfg.agent.amp, cfg.train.device)}
    try:
        model = algo(TokenScorerPolicy, env, seed=cfg.train.seed, device=cfg.train.device, verbose=0,
                     policy_kwargs=policy_kwargs, **hyper)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"agent.hyperparams: {exc}") from None
    model.policy.set_projection(projection)
    return model


def load_agent(cfg: RunConfig, env: Any, ckpt: Path) -> Any:
    import zipfile

    try:
        return algorithm_class(cfg).load(ckpt, env=env, device=cfg.train.device)
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError) as exc:  # SB3 checkpoints are zip files
        raise UserError(f"cannot resume from {ckpt}: {str(exc).strip() or type(exc).__name__}") from None


# ---- end-of-run comparison and export ---------------------------------------------------------------
def final_evaluation(cfg: RunConfig, model: Any, backbone: Any, split: Any, run_dir: Path) -> dict[str, Any]:
    """Learned policy vs keep-all vs a random policy with the learned policy's keep ratio per site, on
    the validation split (a budget-conditioned policy at each of ``train.eval_targets``)."""
    from policy_prune.training.callbacks import eval_targets
    from policy_prune.training.rollout import (
        evaluate_policy_split,
        evaluation_env,
        keep_all_policy,
        model_policy,
        random_policy,
    )

    n = min(cfg.train.final_samples, len(split))
    env: Any = model.get_env()
    controller = env.unwrapped.core.controller
    vec = evaluation_env(cfg.env, backbone, split, n, cfg.train.device, controller=controller)

    def run(policy: Any, target: float | None) -> dict[str, Any]:
        return evaluate_policy_split(policy, cfg.env, backbone, split, n, device=cfg.train.device, target=target, vec=vec)

    methods: dict[str, Any] = {}
    for t in eval_targets(cfg) if controller is not None else [None]:
        tag = "" if t is None else f"@{t:g}"
        learned = methods[f"learned{tag}"] = run(model_policy(model), t)
        methods[f"random-same-ratio{tag}"] = run(random_policy(learned["free_keep_ratio"], cfg.train.seed), t)
    methods["keep-all"] = run(keep_all_policy(), eval_targets(cfg)[0] if controller is not None else None)
    lam: Any = cfg.env.reward.lam if controller is None else {f"{k:g}": float(v) for k, v in zip(controller.knots, controller.lam, strict=True)}
    summary = {"split": split.name, "samples": n, "lam": lam, "task": cfg.env.reward.task,
               "timesteps": int(model.num_timesteps), "methods": methods}
    (run_dir / "eval").mkdir(exist_ok=True)
    write_atomic(run_dir / "eval" / "summary.json", json.dumps(summary, indent=2))
    return summary


def export_run_scorer(cfg: RunConfig, model: Any, backbone: Any, run_dir: Path, summary: dict[str, Any],
                      val: Any = None) -> Path:
    """Export the actor as the run's scorer artifact (run_dir/scorer).

    A budget-conditioned scorer is calibrated first (:func:`calibrated_scorer`): at targets every
    ``train.calibration_step`` over its range, both rules solved to meet the target on
    ``train.calibration_samples`` validation samples, and the better one recorded as that target's default.
    """
    from policy_prune.core.artifact import learned_metrics, save_scorer

    reward = cfg.env.reward
    scorer = model.policy.learned_scorer(cfg.env.sites)
    scorer.merge = cfg.env.merge
    rule = {"rule": "threshold", "values": [0.0] * len(cfg.env.sites)}
    if reward.budget is not None:
        scorer, rule = calibrated_scorer(cfg, scorer, backbone, val)
    budget = scorer.budget
    lam = reward.lam if budget is None else None
    scorer.meta["timesteps"] = int(model.num_timesteps)  # a finished run: resuming it is refused (refuse_finished)
    return save_scorer(scorer, run_dir / "scorer", backbone.signature(), lam, learned_metrics(summary["methods"]), rule)


def calibrated_scorer(cfg: RunConfig, scorer: Any, backbone: Any, val: Any) -> tuple[Any, dict[str, Any]]:
    """(the scorer with its calibrated budget input, the default rule its artifact stores): what
    ``prune(model, scorer)`` runs without a budget, the calibrated rule at the default budget."""
    import dataclasses

    from policy_prune.core.inference import rule_for_flops
    from policy_prune.errors import UserError

    scorer = dataclasses.replace(scorer, budget=calibrated_budget(cfg, scorer, backbone, val))
    try:
        name, values, _ = rule_for_flops(backbone, scorer, scorer.budget.default)
    except UserError:  # no rule met the default budget on val (inputs too short to reach it): the policy's own
        name, values = "threshold", [0.0] * len(scorer.sites)
    return scorer, {"rule": name, "values": values}


def calibrated_budget(cfg: RunConfig, scorer: Any, backbone: Any, val: Any) -> Any:
    """The BudgetInput of a budget-conditioned run's scorer, calibrated on the validation split as deployed:
    the backbone in fp32 (whatever dtype it trained in), a sample drawn across val (:func:`calibration_batches`)
    for the outputs and every val batch for keep_ratio's FLOPs (counted from the lengths; with retrieval queries,
    also per kind of input: the plans of ``prune(..., task=...)``)."""
    import dataclasses

    import numpy as np

    from policy_prune.core.budget import BudgetInput
    from policy_prune.core.calibration import batch_counts, calibrate

    low, high = cfg.env.reward.budget  # type: ignore[misc]
    scorer = dataclasses.replace(scorer, budget=BudgetInput.over(low, high))
    backbone = deployed_backbone(cfg, backbone)
    inputs, labels, parts = calibration_batches(val, cfg.train.calibration_samples, cfg.train.seed, cfg.train.device)
    # keep_ratio plans are solved on every val row as deployed (counted from their lengths, no model run).
    every, _, every_part = calibration_batches(val, len(val), cfg.train.seed, cfg.train.device)
    counted = batch_counts(backbone, every)
    steps = max(int(round((high - low) / cfg.train.calibration_step)), 1)
    targets = [round(float(t), 6) for t in np.linspace(low, high, steps + 1)]
    budget = BudgetInput.over(low, high, calibrate(backbone, scorer, inputs, targets, labels=labels, parts=parts,
                                                   counted=counted, counted_parts=every_part))
    if val.queries is None or val.relevant is None or not budget.tasks:
        return budget
    return retrieval_splits(dataclasses.replace(scorer, budget=budget), backbone, val, cfg.train.query_share,
                            cfg.train.device, loss=cfg.train.split_loss)


def retrieval_splits(scorer: Any, backbone: Any, val: Any, share: float, device: str, batch_size: int = 64,
                     loss: float = SPLIT_LOSS) -> Any:
    """``scorer``'s calibrated budget with its split of one total (:func:`~policy_prune.core.calibration.solve_splits`
    at ``loss``), each pair scored by :func:`split_score`."""
    from policy_prune.core.calibration import solve_splits

    return solve_splits(scorer.budget, split_score(scorer, backbone, val, device, batch_size), share, loss=loss)


def split_score(scorer: Any, backbone: Any, val: Any, device: str, batch_size: int = 64) -> Any:
    """``score(q, d)`` of :func:`~policy_prune.core.calibration.solve_splits`: recall@10 of every val passage, encoded
    through the documents' plan at ``d``, for every val query, encoded through the queries' at ``q`` (the PrunedModel
    ``prune(..., flops=..., task=..., split="each")`` builds, run on ``backbone`` itself, in length-sorted batches as
    deployed), and the passages' fidelity: their mean cosine to their unpruned embeddings. Each kind's embeddings
    are computed once per FLOPs ratio."""
    import functools

    import torch

    from policy_prune.core.inference import PrunedModel, rule_for_flops
    from policy_prune.evaluation.metrics import retrieval_scores
    from policy_prune.evaluation.retrieval import embed_rows

    @functools.cache
    def embedded(task: str, flops: float | None) -> Any:
        rows = val.queries if task == "query" else val
        if flops is None:
            return embed_rows(backbone, rows, batch_size, device, trim=True)
        # prune()'s own last steps (its rule, then the PrunedModel), without rebuilding the adapter: the calibration's
        # backbone holds the run's pooling, which a scorer not yet saved does not carry in its meta.
        rule, values, told = rule_for_flops(backbone, scorer, flops, "keep_ratio", task)
        call = PrunedModel(backbone, told, rule, values).to(device)
        return embed_rows(lambda x: call.run(x)[0], rows, batch_size, device, trim=True)

    def score(q: float, d: float) -> tuple[float, float]:
        docs = embedded("document", d)
        recall = float(retrieval_scores(embedded("query", q), docs, val.relevant, 10)["recall@10"].mean())
        return recall, float(torch.nn.functional.cosine_similarity(docs, embedded("document", None)).mean())

    return score


def deployed_backbone(cfg: RunConfig, backbone: Any) -> Any:
    """The backbone as deployed, in fp32: a run whose frozen backbone ran in another dtype (minilm-text: bf16)
    holds weights rounded to it, so it is built again as ``train`` built it (seeded first) and used where it is
    the same checkpoint (:func:`~policy_prune.core.artifact.same_weights`); else, or where it cannot be built,
    the rounded weights cast back. ``export --calibrate`` builds it so too: both calibrate on the weights a user
    loads (on the rounded ones, minilm-text's seed 2 left other sites idle at 0.25)."""
    import torch

    from policy_prune.core.artifact import same_weights
    from policy_prune.embedded import resolve_backbone

    backbone.to(dtype=torch.float32)  # the caller's copy too, as before (what follows the calibration runs fp32)
    if cfg.train.dtype != "fp32":
        rng = torch.random.get_rng_state()
        try:
            torch.manual_seed(cfg.train.seed)
            fresh = resolve_backbone(cfg.env)[0]
        except Exception:  # a model that cannot be built again here: the rounded weights, cast back
            fresh = None
        finally:
            torch.random.set_rng_state(rng)
        if fresh is not None and same_weights(fresh.weights_fingerprint(), backbone.weights_fingerprint()):
            return fresh.to(device=next(backbone.model.parameters()).device, dtype=torch.float32)
    return backbone


def calibration_batches(split: Any, n: int, seed: int, device: str,
                        batch_size: int = 64) -> tuple[list[Any], Any, list[int]]:
    """(batches, labels [M] or None, per batch its kind: 0 rows of the split, 1 its retrieval queries): a seeded
    sample of about ``n`` rows drawn across ``split`` in batches as deployed, and, where it has a retrieval task,
    the same share of its queries (a deployed encoder embeds both).

    Images (one length): ``n`` random rows in batches of ``batch_size``. Text: the batches a deployment makes
    (``SentenceTransformer.encode`` and ``eval``: the whole part sorted by length, cut into batches of
    ``batch_size``, each trimmed to its longest row), about n / batch_size of them taken at even steps through
    the sorted order from a seeded start. A batch of a random sample sorted on its own spans a quarter of the
    lengths (256 rows in 4 batches) and is charged padding that a deployment's batches of near-equal lengths
    never run: keep_ratio solved on it ran 0.56 of the FLOPs on minilm-text's val when told 0.7."""
    import torch

    from policy_prune.core.ops import to_device, trim_padding

    g = torch.Generator().manual_seed(seed)
    parts = [split] if split.queries is None or not len(split.queries) else [split, split.queries]
    text = isinstance(split.inputs, dict) and "attention_mask" in split.inputs
    batches, labels, kinds = [], [], []
    for kind, part in enumerate(parts):
        rows = min(n, len(split)) if kind == 0 else round(min(n, len(split)) * len(part) / max(len(split), 1))
        if text:
            deployed = part.inputs["attention_mask"].sum(dim=1).argsort(stable=True).split(batch_size)
            take = len(deployed) if rows >= len(part) else min(max(round(rows / batch_size), 1), len(deployed))
            step = len(deployed) / take
            first = float(torch.rand((), generator=g)) * step
            chosen = [deployed[int(first + i * step)] for i in range(take)]
        else:
            chosen = list(torch.randperm(len(part), generator=g)[:rows].split(batch_size))
        for idx in chosen:
            batches.append(trim_padding(to_device(part.select(idx).inputs, device)))
            kinds.append(kind)
            if part.labels is not None:
                labels.append(part.labels[idx])
    return batches, (torch.cat(labels) if labels and len(labels) == len(batches) else None), kinds


def print_summary(console: Any, summary: dict[str, Any], run_dir: Path) -> None:
    from rich.table import Table

    lam = summary["lam"] if not isinstance(summary["lam"], dict) else "per budget"
    table = Table(title=f"{summary['split']} split ({summary['samples']} samples, lambda={lam})")
    for col in ("policy", "return", "task", "agreement", "accuracy", "FLOPs ratio", "keep ratio per site"):
        table.add_column(col, justify="right")
    for name, m in summary["methods"].items():
        table.add_row(name, f"{m['return']:.4f}", f"{m['task']:.4f}", _fmt(m.get("agreement")), _fmt(m.get("accuracy")),
                      f"{m['flops_ratio']:.3f}", " ".join(f"{r:.2f}" for r in m["keep_ratio"]))
    console.print(table)
    console.print(f"run folder: {run_dir}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
