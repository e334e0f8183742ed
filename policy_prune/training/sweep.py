"""``policy-prune sweep``: many training runs at once, scheduled by Ray Tune (``pip install 'policy-prune[sweep]'``).

A sweep is a grid or random search over config keys (the dotted keys of ``--set``), written in YAML
with Ray Tune's own search-space primitives::

    env: digits-vit-random          # base presets, as for `policy-prune train`
    agent: ppo
    num_samples: 1                  # Tune's num_samples: repetitions of the grid, draws of random keys
    space:
      train.seed: {grid: [0, 1]}
      env.reward.lam: {grid: [0.05, 0.3]}
      agent.hyperparams.learning_rate: {loguniform: [3.0e-4, 3.0e-3]}
      train.timesteps: 20000        # a plain value: the same in every trial

or with ranges on the command line (``--set env.reward.lam=0.05,0.3``). Each trial is an ordinary run
folder made by ``train.train`` under ``SWEEP_DIR/runs/``; Tune's own experiment state sits in
``SWEEP_DIR/tune/`` (``Tuner.restore`` reads it on ``--resume``). A trial whose run folder is complete
is never trained again, and one with ``checkpoints/last.zip`` continues from it, so a resumed sweep
redoes nothing even when Tune's state predates the kill. The sweep ends with ``summary.md``,
``summary.json`` and ``runs.txt`` (one run folder per line, for ``policy-prune eval``).

Without ``--address`` a local Ray instance starts (no dashboard, usage stats off, loopback only);
with it the trials run on an existing cluster, which needs policy-prune installed on every node and
the sweep folder on storage all nodes share.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policy_prune.cli_args import at_least, positive, positive_number
from policy_prune.config import (
    TRACKERS,
    ConfigError,
    dump_yaml,
    from_dict,
    load_env_config,
    load_yaml,
    read_preset,
    to_dict,
)
from policy_prune.embedded import DTYPE_NAMES
from policy_prune.errors import UserError

SEARCH_KINDS = ("grid", "choice", "uniform", "quniform", "loguniform", "qloguniform", "randn", "qrandn",
                "randint", "qrandint", "lograndint", "qlograndint")
"""Ray Tune search-space primitives a space value may name: ``{grid: [...]}`` -> ``tune.grid_search``,
``{choice: [...]}`` -> ``tune.choice``, ``{uniform: [a, b]}`` -> ``tune.uniform(a, b)``, ..."""
SET_BY_SWEEP = ("train.name", "train.runs_dir")
SUMMARY_METRICS = ("return", "flops_ratio", "accuracy", "agreement", "cosine", "task")


@dataclass
class SweepConfig:
    """One sweep: base presets, the search space over config keys, trial resources."""

    env: str = "digits-vit"
    """Env preset name or YAML path that every trial starts from."""
    agent: str | None = None
    """Agent preset name or YAML path that every trial starts from (None: the env preset's, else ppo)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key (as in ``--set``) -> a value, or a search primitive (``{grid: [...]}``,
    ``{choice: [...]}``, ``{uniform: [a, b]}``, ``{loguniform: [a, b]}``, ``{randint: [a, b]}``, ...)."""
    num_samples: int = 1
    """Tune's num_samples: how often the grid is repeated, each time with fresh draws of random keys."""
    seed: int = 0
    """Seed of the random search, and the trials' train.seed unless the space sets it."""
    name: str | None = None
    """Sweep folder name (default sweep__<env>__<agent>__<time>)."""
    cpus_per_trial: float = 1.0
    """CPUs Ray reserves per trial (also the trial's torch threads unless train.threads is set)."""
    gpus_per_trial: float = 0.0
    """GPUs Ray reserves per trial (fractions share a GPU); above 0 the trials default to train.device cuda."""
    max_concurrent: int | None = None
    """Cap on trials running at once (None: as many as the reserved resources allow)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", nargs="?", type=Path, default=None, metavar="SWEEP.yaml",
                   help="sweep definition (env, agent, space, num_samples, ...); flags below override it")
    p.add_argument("--env", default=None, help="env preset name or YAML path (default digits-vit)")
    p.add_argument("--agent", default=None, help="agent preset name or YAML path (default: the env's, else ppo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=V[,V...]",
                   help="a config value for every trial, or a grid over comma-separated values "
                        "(--set train.seed=0,1 --set env.reward.lam=0.05,0.3); a YAML search primitive "
                        "works too: --set 'agent.hyperparams.learning_rate={loguniform: [3e-4, 3e-3]}'")
    p.add_argument("--timesteps", type=positive, default=None, help="train.timesteps of every trial")
    p.add_argument("--num-samples", type=positive, default=None, help="repetitions of the grid / draws of random keys")
    p.add_argument("--seed", type=int, default=None, help="seed of the random search and default train.seed (0)")
    p.add_argument("--device", default=None, help="train.device of every trial (default cpu; cuda with --gpus-per-trial)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="train.dtype of every trial")
    p.add_argument("--track", choices=TRACKERS, default=None, help="track every trial in W&B (one group per sweep)")
    p.add_argument("--name", default=None, help="sweep folder name")
    p.add_argument("--runs-dir", default="runs", help="where the sweep folder is created (default ./runs)")
    p.add_argument("--cpus-per-trial", type=positive_number, default=None, help="CPUs reserved per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=at_least(0.0, float), default=None, help="GPUs reserved per trial (default 0)")
    p.add_argument("--max-concurrent", type=positive, default=None, help="cap on trials running at once")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, ray://host:10001) "
                   "instead of starting a local instance")
    p.add_argument("--num-cpus", type=positive, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--resume", type=Path, default=None, metavar="SWEEP_DIR",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume")


# ---- the search space --------------------------------------------------------------------------------
def search_kind(value: Any) -> str | None:
    """The search primitive a space value names (``{grid: [...]}`` -> "grid"), None for a plain value."""
    if not isinstance(value, dict) or not set(value) & set(SEARCH_KINDS):
        return None
    if len(value) != 1:
        raise ConfigError(f"a search primitive has one key ({', '.join(SEARCH_KINDS)}), got {sorted(value)}")
    return next(iter(value))


def parse_set(item: str) -> tuple[str, Any]:
    """``key=v`` -> (key, v); ``key=a,b,c`` -> (key, {grid: [a, b, c]}); values are read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        values = load_yaml(f"[{raw}]")  # commas outside brackets separate grid values
    except yaml.YAMLError:
        values = [raw]
    return key, values[0] if len(values) == 1 else {"grid": values}


def check_space(space: dict[str, Any]) -> None:
    """Keys are dotted config keys, search primitives are well formed (before Ray starts)."""
    for key, value in space.items():
        if key.split(".")[0] not in ("env", "agent", "train") or "." not in key:
            raise ConfigError(f"space key {key!r}: keys start with env., agent. or train.")
        if key in SET_BY_SWEEP:
            raise ConfigError(f"space key {key!r} is set by the sweep (one run folder per trial)")
        kind = search_kind(value)
        if kind is None:
            continue
        args = value[kind]
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space.{key}: {kind} takes a non-empty list, got {args!r}")
        try:
            tune_value(value)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"space.{key}: {{{kind}: {args}}}: {exc or 'invalid arguments'}") from None


def tune_value(value: Any) -> Any:
    """A space value as Ray Tune takes it: the primitive's domain object, or the plain value."""
    kind = search_kind(value)
    if kind is None:
        return value
    from ray import tune

    args = value[kind]
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "choice":
        return tune.choice(args)
    return getattr(tune, kind)(*args)


def swept_keys(space: dict[str, Any]) -> list[str]:
    """Keys that differ between trials (they name the run folders and the summary's columns)."""
    return [k for k, v in space.items() if search_kind(v) is not None]


def check_points(cfg: SweepConfig, presets: tuple[str, str | None], limit: int = 256, local: bool = True) -> list[Any]:
    """Resolve a trial config for every combination of grid and choice values (random keys drawn
    once; each value once when there are more than ``limit`` combinations), so a bad key or value
    fails now, in one line, not inside a trial. Returns the resolved RunConfigs.

    ``local=False`` (trials on a cluster): the device is not checked here, where there may be no GPU.
    """
    import random

    rng = random.Random(cfg.seed)
    axes: list[list[Any]] = []
    for value in cfg.space.values():
        kind = search_kind(value)
        if kind in ("grid", "choice"):
            axes.append(list(value[kind]))
        elif kind is not None:
            axes.append([tune_value(value).sample(random_state=rng.randrange(2**31))])
        else:
            axes.append([value])
    combos = math.prod(len(a) for a in axes)
    points = itertools.product(*axes) if combos <= limit else _each_value(axes)
    resolved = []
    for point in points:
        overrides = dict(zip(cfg.space, point, strict=True))
        checked = overrides if local else {**overrides, "train.device": "cpu"}
        try:
            resolved.append(resolve_trial(presets, checked, name="check", runs_dir="."))
        except UserError as exc:
            shown = {k: v for k, v in overrides.items() if k in swept_keys(cfg.space)}
            raise ConfigError(f"trial {shown or '(every trial)'}: {exc}") from None
    return resolved


def trial_count(cfg: SweepConfig) -> int:
    """Trials Tune will run: the grid's points times num_samples (random keys are drawn per sample)."""
    return math.prod(len(v["grid"]) for v in cfg.space.values() if search_kind(v) == "grid") * cfg.num_samples


def fit_embedded_backbones(run_configs: Sequence[Any], console: Any) -> None:
    """Fit (or find cached) each distinct embedded digits-vit backbone once, before the trials start:
    concurrent trials would otherwise each fit the same one (minutes) on an empty cache."""
    from policy_prune.training.pretrain import pretrain

    seen: set[str] = set()
    for run_cfg in run_configs:
        env = run_cfg.env
        key = json.dumps(to_dict(env.backbone), sort_keys=True, default=str)
        if env.backbone.spec == "digits-vit" and key not in seen:
            seen.add(key)
            pretrain(env, console=console)


def _each_value(axes: list[list[Any]]) -> list[tuple[Any, ...]]:
    """Points that try every value of every axis once (the others at their first value)."""
    first = [a[0] for a in axes]
    return [tuple(first[:i] + [v] + first[i + 1:]) for i, a in enumerate(axes) for v in a]


# ---- one trial ---------------------------------------------------------------------------------------
@dataclass
class TrialSetup:
    """What every trial of a sweep shares; travels to the Ray workers with the trainable."""

    env: str
    """Absolute path of the env preset copied into the sweep folder."""
    agent: str
    """Absolute path of the agent preset copied into the sweep folder."""
    runs_dir: str
    """Absolute path of SWEEP_DIR/runs."""


def plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers as Python numbers (YAML / JSON friendly)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def resolve_trial(presets: tuple[str, str | None], overrides: dict[str, Any], name: str, runs_dir: str) -> Any:
    """The trial's RunConfig, resolved by ``train``'s own flags and --set path (agent None: the env's)."""
    from policy_prune.training.train import add_arguments as train_arguments
    from policy_prune.training.train import resolve_config

    parser = argparse.ArgumentParser(prog="policy-prune train")
    train_arguments(parser)
    argv = ["--env", presets[0], *(["--agent", presets[1]] if presets[1] else []), "--name", name,
            "--runs-dir", runs_dir]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(plain(value))}"]
    return resolve_config(parser.parse_args(argv))


def is_finished(run_dir: Path) -> bool:
    """A run folder that ``train`` completed: its end-of-run summary and scorer are written last."""
    return (run_dir / "eval" / "summary.json").is_file() and (run_dir / "scorer" / "scorer.json").is_file()


def end_of_run(run_dir: Path) -> list[tuple[float | None, dict[str, Any]]]:
    """(budget, metrics) of the learned policy in a finished run's eval/summary.json (its validation
    comparison): one entry, budget None, for a run at one lambda; one per target FLOPs ratio
    (``learned@0.5``, ...) for a budget-conditioned run."""
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    out = []
    for key, m in summary["methods"].items():
        name, _, budget = key.partition("@")
        if name == "learned":
            metrics = {k: m[k] for k in SUMMARY_METRICS if k in m}
            out.append((float(budget) if budget else None, {"timesteps": summary.get("timesteps"), **metrics}))
    return out


def tune_metrics(run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics for Tune: the first budget's unprefixed, every budget's as ``key@budget``."""
    entries = end_of_run(run_dir)
    flat = dict(entries[0][1]) if entries else {}
    for budget, metrics in entries:
        if budget is not None:
            flat.update({f"{k}@{budget:g}": v for k, v in metrics.items() if k != "timesteps"})
    return flat


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune trainable: train one run folder (or resume it, or report it when already complete)."""
    from ray import tune

    name = tune.get_context().get_trial_name()
    run_dir = Path(setup.runs_dir) / name
    with trial_lock(Path(setup.runs_dir).parent / "locks" / f"{name}.lock"):
        if is_finished(run_dir):  # finished before an interruption that Tune's saved state predates
            tune.report({**tune_metrics(run_dir), "done": True, "kept": True})
            return
        _train_trial(config, setup, name, run_dir)
    tune.report({**tune_metrics(run_dir), "done": True})


@contextlib.contextmanager
def trial_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for a trial's work on its run folder.

    After a SIGKILL of the sweep, Ray stops the old trial processes within seconds, not at once: a
    resumed trial waits here until its predecessor is gone (the kernel drops a dead process's lock),
    so two processes never write one run folder.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _train_trial(config: dict[str, Any], setup: TrialSetup, name: str, run_dir: Path) -> None:
    """Train a trial's run folder, continuing from its checkpoint when it has one."""
    from policy_prune.console import make_console
    from policy_prune.training.train import load_run_config, new_run_dir, train, write_atomic
    from policy_prune.training.tune_callbacks import TuneReport

    resume = (run_dir / "checkpoints" / "last.zip").is_file()
    if resume:
        cfg = load_run_config(run_dir)
    else:
        cfg = resolve_trial((setup.env, setup.agent), config, name, setup.runs_dir)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to continue from
        run_dir = new_run_dir(cfg)
        write_atomic(run_dir / "config.yaml", dump_yaml(to_dict(cfg)))
    with (run_dir / "train.log").open("a") as log:  # the trial's console: progress, messages
        console = make_console(log)
        train(cfg, run_dir, console, resume=resume, callbacks=[TuneReport()])


# ---- the sweep ---------------------------------------------------------------------------------------
def resolve_sweep(args: argparse.Namespace) -> SweepConfig:
    """Sweep file + flags + --set ranges -> one checked SweepConfig."""
    data: dict[str, Any] = {}
    if args.sweep_file is not None:
        if not args.sweep_file.is_file():
            raise ConfigError(f"sweep file not found: {args.sweep_file}")
        try:
            data = load_yaml(args.sweep_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{args.sweep_file}: invalid YAML ({str(exc).splitlines()[0]})") from None
    cfg = from_dict(SweepConfig, data, str(args.sweep_file or "sweep"))
    for flag in ("env", "agent", "num_samples", "seed", "name", "cpus_per_trial", "gpus_per_trial", "max_concurrent"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    cfg.agent = agent_spec(cfg)  # explicit from here on: in sweep.yaml, the folder name, every trial
    space = dict(cfg.space)
    for flag, key in (("timesteps", "train.timesteps"), ("device", "train.device"), ("dtype", "train.dtype"),
                      ("track", "train.track")):
        if getattr(args, flag) is not None:
            space[key] = getattr(args, flag)
    space.update(parse_set(item) for item in args.overrides)
    space.setdefault("train.seed", cfg.seed)
    space.setdefault("train.threads", max(1, math.floor(cfg.cpus_per_trial)))
    if cfg.gpus_per_trial > 0:
        space.setdefault("train.device", "cuda")
    cfg.space = space
    if cfg.num_samples < 1 or cfg.cpus_per_trial <= 0 or cfg.gpus_per_trial < 0:
        raise ConfigError("num_samples and cpus_per_trial must be positive, gpus_per_trial not negative")
    check_space(space)
    return cfg


def agent_spec(cfg: SweepConfig) -> str:
    """The agent preset the trials use: the sweep's, else the env preset's, else ppo (as ``train`` picks)."""
    return cfg.agent or load_env_config(cfg.env).agent or "ppo"


def new_sweep_dir(cfg: SweepConfig, runs_dir: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"sweep__{Path(cfg.env).stem}__{Path(agent_spec(cfg)).stem}__{stamp}"
    sweep_dir = Path(runs_dir) / name
    if sweep_dir.exists():
        raise UserError(f"sweep folder already exists: {sweep_dir} (use --resume to continue it, or another --name)")
    return sweep_dir


def copy_presets(cfg: SweepConfig, sweep_dir: Path) -> tuple[str, str]:
    """The env and agent presets copied into the sweep folder: every trial (and a resume) reads the same."""
    paths = []
    for kind, spec in (("envs", cfg.env), ("agents", agent_spec(cfg))):
        data, _ = read_preset(kind, spec)
        if kind == "envs":
            data.setdefault("name", Path(spec).stem)
        path = sweep_dir / "presets" / kind / f"{Path(spec).stem}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_yaml(data))
        paths.append(str(path.resolve()))
    return paths[0], paths[1]


def stored_presets(sweep_dir: Path) -> tuple[str, str]:
    found = [sorted((sweep_dir / "presets" / kind).glob("*.yaml")) for kind in ("envs", "agents")]
    if any(len(f) != 1 for f in found):
        raise UserError(f"not a sweep folder (no presets/envs and presets/agents): {sweep_dir}")
    return str(found[0][0].resolve()), str(found[1][0].resolve())


def load_sweep(sweep_dir: Path) -> SweepConfig:
    path = sweep_dir / "sweep.yaml"
    if not path.is_file():
        raise UserError(f"not a sweep folder (no sweep.yaml): {sweep_dir}")
    try:
        return from_dict(SweepConfig, load_yaml(path.read_text()), str(path))
    except yaml.YAMLError:
        raise UserError(f"corrupt sweep.yaml in {sweep_dir}") from None


def run(args: argparse.Namespace) -> int:
    from policy_prune.console import make_console

    console = make_console()
    if args.resume is not None:
        if args.sweep_file is not None or args.overrides:
            raise UserError("--resume continues a sweep as it was defined: drop the sweep file and --set")
        sweep_dir = args.resume
        cfg = load_sweep(sweep_dir)
        presets = stored_presets(sweep_dir)
        _require_ray()
    else:  # everything that can fail in one line fails before a folder is made or Ray starts
        cfg = resolve_sweep(args)
        _require_ray()
        checked = check_points(cfg, (cfg.env, cfg.agent), local=args.address is None)
        sweep_dir = new_sweep_dir(cfg, args.runs_dir)
        if args.address is None:  # a cluster's nodes have their own caches
            fit_embedded_backbones(checked, console)
    start_ray(args.address, args.num_cpus)
    import ray

    try:
        check_resources(cfg)
        if args.resume is None:
            presets = create_sweep_dir(cfg, sweep_dir)
            console.print(f"sweep {sweep_dir}: {trial_count(cfg)} trials, swept "
                          f"{', '.join(swept_keys(cfg.space)) or 'nothing'}", soft_wrap=True)
        start = time.time()
        fit(cfg, sweep_dir, presets)
    finally:
        ray.shutdown()
    rows = summary_rows(cfg, sweep_dir)
    write_summary(cfg, sweep_dir, rows, time.time() - start)
    print_summary(console, sweep_dir, rows, time.time() - start)
    status = {r["status"] for r in rows}
    if status != {"finished"}:
        console.print(f"[yellow]{sum(r['status'] != 'finished' for r in rows)} trial(s) did not finish; continue "
                      f"them with: policy-prune sweep --resume {sweep_dir}[/]", soft_wrap=True)
    # Unfinished trials without errors mean Tune stopped on Ctrl-C: the exit code of an interrupt.
    return 0 if status == {"finished"} else 1 if "error" in status else 130


def create_sweep_dir(cfg: SweepConfig, sweep_dir: Path) -> tuple[str, str]:
    """The sweep folder with its presets and sweep.yaml (what --resume reads); returns the preset paths."""
    presets = copy_presets(cfg, sweep_dir)
    if cfg.space.get("train.track") == "wandb":
        cfg.space.setdefault("train.wandb_group", sweep_dir.name)
    (sweep_dir / "sweep.yaml").write_text(dump_yaml(to_dict(cfg)))
    return presets


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        raise UserError("policy-prune sweep needs Ray Tune: pip install 'policy-prune[sweep]'") from None


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """A local Ray instance that never needs a network (or a connection to ``address``)."""
    # Before importing ray: no usage-stats report, and no interactive prompt about it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_PROMPT_ENABLED", "0")
    _require_ray()
    import ray

    if address is not None:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError) as exc:  # no cluster there, or a malformed address
            raise UserError(f"--address {address}: {str(exc).splitlines()[0]}") from None
        return
    # address="local": a new instance even where `ray start` left a cluster (or RAY_ADDRESS names one);
    # loopback only: Ray would otherwise probe the network for this node's address.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False, _node_ip_address="127.0.0.1")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """One TCP connection to ``host:port`` first: Ray itself retries an unreachable address for minutes."""
    import socket

    if address == "auto" or ":" not in address:  # "auto": Ray reads the local cluster's address itself
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"--address {address}: no Ray cluster reachable there ({exc})") from None


def check_resources(cfg: SweepConfig) -> None:
    """A trial that asks for more than the cluster has would wait forever: say so instead."""
    import ray

    have = ray.cluster_resources()
    for key, want in (("CPU", cfg.cpus_per_trial), ("GPU", cfg.gpus_per_trial)):
        if want > have.get(key, 0.0):
            raise UserError(f"each trial asks for {want:g} {key}(s) but the Ray cluster has {have.get(key, 0.0):g}")


def fit(cfg: SweepConfig, sweep_dir: Path, presets: tuple[str, str]) -> None:
    """Run (or restore and continue) the sweep's Tune experiment (its state: SWEEP_DIR/tune) on the
    Ray instance this process is connected to."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from policy_prune.training.tune_callbacks import TrialLog

    setup = TrialSetup(presets[0], presets[1], str((sweep_dir / "runs").resolve()))
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    storage = sweep_dir.resolve()
    if tune.Tuner.can_restore(str(storage / "tune")):
        tuner = tune.Tuner.restore(str(storage / "tune"), trainable, resume_unfinished=True, resume_errored=True)
    else:  # a fresh sweep, or one killed before Tune saved any state (finished trials are skipped anyway)
        namer = TrialNamer(swept_keys(cfg.space))
        tuner = tune.Tuner(
            trainable,
            param_space={k: tune_value(v) for k, v in cfg.space.items()},
            tune_config=tune.TuneConfig(num_samples=cfg.num_samples, max_concurrent_trials=cfg.max_concurrent,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed),
                                        trial_name_creator=namer, trial_dirname_creator=namer),
            run_config=tune.RunConfig(name="tune", storage_path=str(storage), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0), callbacks=[TrialLog()]),
        )
    tuner.fit()


class TrialNamer:
    """Run folder names: the trial's index and its swept values, ``003__seed=1__lam=0.3``."""

    def __init__(self, keys: Sequence[str]) -> None:
        leaves = [k.rsplit(".", 1)[-1] for k in keys]
        # The last part of a key names it unless two keys share it (then the whole key).
        self.labels = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves, strict=True)}

    def __call__(self, trial: Any) -> str:
        index = int(str(trial.trial_id).rsplit("_", 1)[-1])
        return trial_name(index, {label: trial.config.get(key) for key, label in self.labels.items()})


def trial_name(index: int, values: dict[str, Any]) -> str:
    parts = [f"{index:03d}"] + [f"{label}={_short(v)}" for label, v in values.items()]
    name = "__".join(parts)
    return "".join(c if c.isalnum() or c in "._=-" else "-" for c in name)[:150]


def _short(value: Any) -> str:
    value = plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "-".join(_short(v) for v in value)
    return str(value)


# ---- the summary -------------------------------------------------------------------------------------
def tune_trials(sweep_dir: Path) -> list[tuple[str, dict[str, Any], str]]:
    """(name, config, Tune status) of every trial in the sweep's saved Tune state, started or not."""
    from ray import tune

    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.ERROR)  # trials that never reported: expected after an interruption
    try:
        analysis = tune.ExperimentAnalysis(str((sweep_dir / "tune").resolve()))
    finally:
        tune_logger.setLevel(level)
    return [(Path(str(t.path)).name, dict(t.config), str(t.status)) for t in analysis.trials]


def summary_rows(cfg: SweepConfig, sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial (per trial and budget for budget-conditioned runs): name, swept values, status,
    the learned policy's end-of-run metrics."""
    keys = swept_keys(cfg.space)
    rows = []
    for name, config, status in sorted(tune_trials(sweep_dir)):
        run_dir = sweep_dir / "runs" / name
        finished = is_finished(run_dir)
        row: dict[str, Any] = {"trial": name, "config": {k: plain(config.get(k)) for k in keys},
                               "status": "finished" if finished else "error" if status == "ERROR" else "unfinished",
                               "run_dir": str(run_dir.resolve()), "budget": None}
        for budget, metrics in end_of_run(run_dir) if finished else [(None, {})]:
            rows.append({**row, "budget": budget, **metrics})
    return rows


def write_summary(cfg: SweepConfig, sweep_dir: Path, rows: list[dict[str, Any]], wall_s: float) -> None:
    """summary.json (every row), summary.md (the table) and runs.txt (finished run folders, one a line)."""
    from policy_prune.training.train import write_atomic

    keys = swept_keys(cfg.space)
    payload = {"sweep": sweep_dir.name, "env": cfg.env, "agent": cfg.agent, "swept": keys, "wall_s": wall_s,
               "trials": rows}
    write_atomic(sweep_dir / "summary.json", json.dumps(payload, indent=2))
    budgets = any(r["budget"] is not None for r in rows)
    header = ["trial", *keys, *(["budget"] if budgets else []), "status", "return", "FLOPs ratio", "accuracy", "cosine",
              "run folder"]
    trials = len({r["trial"] for r in rows})
    lines = [f"# {sweep_dir.name}", "", f"{trials} trials of {cfg.env} + {cfg.agent}, {wall_s:.0f} s (this "
             "invocation). The learned policy of each run on validation (its eval/summary.json; test with "
             "`policy-prune eval`).", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["trial"].split("__")[0], *(_short(r["config"].get(k)) for k in keys), *metric_cells(r, budgets),
                 f"runs/{r['trial']}"]
        lines.append("| " + " | ".join(cells) + " |")
    write_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    done = dict.fromkeys(r["run_dir"] for r in rows if r["status"] == "finished")
    write_atomic(sweep_dir / "runs.txt", "".join(f"{d}\n" for d in done))


def metric_cells(row: dict[str, Any], budgets: bool = False) -> list[str]:
    """[budget,] status, return, FLOPs ratio, accuracy, cosine of a summary row, formatted."""
    budget = ["-" if row["budget"] is None else f"{row['budget']:g}"] if budgets else []
    return [*budget, row["status"], _fmt(row.get("return"), 4), _fmt(row.get("flops_ratio")),
            _fmt(row.get("accuracy")), _fmt(row.get("cosine"))]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(console: Any, sweep_dir: Path, rows: list[dict[str, Any]], wall_s: float) -> None:
    from rich.table import Table

    budgets = any(r["budget"] is not None for r in rows)
    table = Table(title=f"sweep {sweep_dir.name}: {len({r['trial'] for r in rows})} trials, {wall_s:.0f} s "
                        "(validation)")
    for col in ("trial", *(["budget"] if budgets else []), "status", "return", "FLOPs ratio", "accuracy", "cosine"):
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for r in rows:
        table.add_row(r["trial"], *metric_cells(r, budgets))
    console.print(table)
    console.print(f"summary: {sweep_dir / 'summary.md'}; finished run folders: {sweep_dir / 'runs.txt'}", soft_wrap=True)
    console.print(f"multi-seed evaluation: policy-prune eval $(cat {sweep_dir / 'runs.txt'})", soft_wrap=True)
