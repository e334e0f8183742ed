"""Dataclass configs, one per concern, and strict YAML presets.

An env preset (``envs/*.yaml``) fills :class:`EnvConfig`; an agent preset (``agents/*.yaml``) fills
:class:`AgentConfig`. Unknown keys are user errors (:class:`ConfigError`), never silently ignored.
The whole resolved config is what a run writes to ``config.yaml`` and logs to W&B.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from policy_prune.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in a preset, a --set override or a flag: reported in one line, exit code 2."""


TRACKERS = ("wandb",)
"""Experiment trackers a run can log to (``train.track``, ``--track``)."""


# YAML 1.1 (PyYAML) reads a float only with a dot: "3e-4" and "1e5" are strings there, and a learning rate
# written as everyone writes it reached the agent as the text '3e-4'. Configs read YAML 1.2's floats too.
_FLOAT = r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$"""


@functools.cache
def _config_yaml() -> tuple[Any, Any]:
    """(loader, dumper): yaml's safe ones with YAML 1.2's floats added, so the dumper quotes a string such as
    "1e5" that the loader would read as a number (made once)."""
    import re

    import yaml

    class ConfigLoader(yaml.SafeLoader):
        pass

    class ConfigDumper(yaml.SafeDumper):
        pass

    for cls in (ConfigLoader, ConfigDumper):
        cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT, re.X), list("-+0123456789."))
    return ConfigLoader, ConfigDumper


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats ("3e-4" is 0.0003, not a string); raises yaml.YAMLError as it does."""
    import yaml

    return yaml.load(text, Loader=_config_yaml()[0])  # noqa: S506 (a SafeLoader)


def dump_yaml(data: Any) -> str:
    """``yaml.safe_dump`` (keys in order) that :func:`load_yaml` reads back to ``data``."""
    import yaml

    return yaml.dump(data, Dumper=_config_yaml()[1], sort_keys=False)


@dataclass
class BackboneConfig:
    """Which frozen model to prune."""

    spec: str = "digits-vit"
    """"digits-vit" (embedded, pretrained on first use), a timm name, "hf:<id>" or a model folder."""
    checkpoint: str | None = None
    """Local timm state dict (safetensors or torch file) to load into ``spec``."""
    pretrained: bool = False
    """Let timm download hub weights for ``spec`` (users only; needs network)."""
    pooling: str | None = None
    """HF text encoders: "mean" (sentence-transformers style, default) or "cls"."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. num_classes, img_size); for digits-vit, the
    VisionTransformer's (embed_dim, depth, num_heads, mlp_ratio, patch_size)."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """digits-vit only: training settings for ``policy-prune pretrain`` (epochs, batch_size, lr, ...)."""


@dataclass
class DataConfig:
    """Where samples come from."""

    dataset: str = "digits-cluttered"
    """Registry name ("digits-cluttered", "python-docs"), "imagefolder:<path>" or "hf:<name>[:<config>][:<split>]"."""
    image_size: int | None = None
    """Resize images to this square size (image folders / HF image datasets); None keeps the model's size."""
    text_column: str = "text"
    """Column holding the text of an HF dataset."""
    image_column: str = "image"
    """Column holding the image of an HF dataset."""
    label_column: str | None = "label"
    """Column holding integer labels (None: the dataset has no labels)."""
    max_length: int = 128
    """Tokenizer truncation length for text."""
    max_samples: int | None = None
    """Cap on samples per split (None: all)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Dataset-specific options (e.g. canvas size and clutter for digits-cluttered)."""


@dataclass
class RewardConfig:
    """Reward = task term - lam * FLOPs fraction."""

    task: str = "teacher_kl"
    """Task term: teacher_kl, teacher_agree, label_ce, label_prob, label_acc or cosine."""
    lam: float = 0.3
    """Weight of the compute penalty; the episode's penalty sums to lam * (used FLOPs / full FLOPs). With a
    ``budget``, the starting value of every budget's multiplier."""
    budget: list[float] | None = None
    """[low, high]: train one scorer for every budget. Each episode draws a target FLOPs ratio from this
    range, the policy sees it, and its compute is charged at a multiplier lambda(target) that dual ascent
    moves until the mean FLOPs ratio meets the target (policy_prune/training/budget.py). None: one lambda."""
    budget_draw: str = "uniform"
    """How each episode draws its target from ``budget``: "uniform", or "log" (uniform in log f: as many
    episodes in [0.1, 0.2] as in [0.2, 0.4], where uniform gives the tight end few)."""
    budget_knots: int = 8
    """Knots of the piecewise-linear lambda(target) curve."""
    budget_lr: float = 0.05
    """Dual-ascent step: each knot moves by this times (mean FLOPs ratio - target) after every rollout."""


@dataclass
class EnvConfig:
    """One environment preset: backbone + data + pruning sites + reward."""

    name: str = "digits-vit"
    """Preset name, used in run folder names."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The frozen model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The samples."""
    sites: list[int] = field(default_factory=lambda: [1, 3, 5])
    """Block indices before which the policy prunes (sorted, within the model's depth)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward definition."""
    merge: bool = False
    """Each dropped token is averaged into its most similar kept token (cosine of the hidden states) instead of
    discarded: in training, in the scorer it exports and in ``prune``."""
    agent: str | None = None
    """Agent preset this env trains with when ``--agent`` is not given (None: ppo)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Train settings this env recommends (``train.*`` keys, e.g. timesteps): applied before the command
    line's flags and ``--set train.*``, which win."""


@dataclass
class WarmStartConfig:
    """A supervised warm start of the scorer at the first site before RL (policy_prune.training.warm_start)."""

    samples: int = 0
    """Train samples whose first-site occlusion values the scorer is fitted to (0: no warm start)."""
    keep: float = 0.14
    """Share of each sample's prunable tokens around which the values are measured: the tight end."""
    epochs: int = 10
    """Passes of the fit before RL (0: none, the ranking only as ``aux_coef``'s loss)."""
    lr: float = 3e-3
    smoothing: float = 0.1
    """Share of the target spread over every prunable token: bounds the logit gap the fit opens."""
    aux_coef: float = 0.0
    """Weight of the ranking's cross-entropy added to every PPO minibatch's loss (credit: token), so that RL
    does not wash the ranking out (0: the fit before RL only)."""


@dataclass
class AgentConfig:
    """One agent preset: algorithm + hyperparameters + scorer size."""

    algo: str = "ppo"
    """stable-baselines3 algorithm: ppo or a2c."""
    n_envs: int = 32
    """Rows of the batched env advancing in lockstep."""
    hyperparams: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the SB3 algorithm (n_steps, batch_size, learning_rate, ...)."""
    scorer_hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden widths of the per-token scorer MLP."""
    critic_hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden widths of the pooled critic MLP."""
    group_size: int = 1
    """Rows that prune the same sample in one training batch. Above 1, each row's final reward is
    baselined by the mean return of the other rows of its group (leave-one-out, as in RLOO): the
    sample's difficulty cancels, the gradient stays unbiased. Must divide n_envs."""
    amp: str | None = None
    """"bf16": the scorer and critic run under bf16 autocast in rollouts and updates (about 2.3x faster
    per-token networks on CPUs with native bf16); "auto": bf16 where the device computes it natively;
    None: fp32. The exported scorer is fp32 either way."""
    credit: str = "step"
    """"step": SB3's own update, one advantage per step shared by all its token decisions; "token"
    (ppo only): each token decision gets its own advantage, the other tokens' predicted contributions
    taken out by a per-token critic head (policy_prune.training.token_ppo)."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """The scorer's first site fitted to a label-free occlusion ranking before RL (``samples: 0``: off)."""


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "", overridden: Mapping[str, str] | None = None,
              key: str = "") -> T:
    """Build a dataclass from a nested dict, rejecting unknown keys and wrong scalar types.

    Errors name a key where it was written: in ``where`` (a file, ``envs/x.yaml: reward.lam``, or a section,
    ``data.options.min_words``), or in the ``--set`` that gave it: ``overridden`` maps a dotted key of ``data``
    to what the user typed for it (:func:`override_labels`). ``key``: ``data``'s own dotted key (nested calls).
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{_label(where, key, overridden) or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        allowed = f"(allowed: {', '.join(sorted(names))})"
        if given := _given(_join(key, unknown[0]), overridden):
            raise ConfigError(f"{given}: unknown key {unknown[0]!r} {allowed}")
        raise ConfigError(f"unknown key {unknown[0]!r} in {_label(where, key, overridden) or cls.__name__} {allowed}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, where, overridden, _join(key, name))  # type: ignore[arg-type]
        else:
            kwargs[name] = _check_type(value, hint, _label(where, _join(key, name), overridden))
    return cls(**kwargs)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _label(where: str, key: str, overridden: Mapping[str, str] | None) -> str:
    """How an error names ``key``: as the override that gave it (or a mapping above it) was written, else where it
    is written: ``file.yaml: reward.lam`` in a file, ``reward.lam`` in a section."""
    if (given := _given(key, overridden)) is not None:
        return given
    if not where or not key:
        return where or key
    return f"{where}: {key}" if where.endswith((".yaml", ".yml")) else f"{where}.{key}"


def _given(key: str, overridden: Mapping[str, str] | None) -> str | None:
    """``key`` as the override that set it (or a mapping above it) was written; None where no override did."""
    parts = key.split(".") if key and overridden else []
    for i in range(len(parts), 0, -1):
        if (given := overridden.get(".".join(parts[:i]))) is not None:  # type: ignore[union-attr]
            return given + "".join(f".{p}" for p in parts[i:])
    return None


def _check_type(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not a valid {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(v, args[0], path) for v in value] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (YAML / W&B friendly)."""
    return dataclasses.asdict(cfg)


# ---- presets -------------------------------------------------------------------------------------
PRESET_PACKAGES = {"envs": "policy_prune._presets.envs", "agents": "policy_prune._presets.agents"}


def preset_root(kind: str) -> Any:
    """The folder of the shipped presets for ``kind`` ("envs" or "agents"): the installed package's, or in a
    source checkout that was not installed (``PYTHONPATH=.``) the repository's own ``envs/`` or ``agents/``."""
    try:
        return resources.files(PRESET_PACKAGES[kind])
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / kind
        if not checkout.is_dir():
            raise
        return checkout


def preset_names(kind: str) -> list[str]:
    """Names of the presets shipped in the wheel for ``kind`` ("envs" or "agents")."""
    root = preset_root(kind)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_preset(kind: str, name_or_path: str) -> tuple[dict[str, Any], str]:
    """Raw mapping of a shipped preset name or a user's YAML path, and where it came from."""
    import yaml  # the training extra: the inference core reads no YAML

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file not found: {path}")
        text, where = path.read_text(), str(path)
    else:
        names = preset_names(kind)
        if name_or_path not in names:
            raise ConfigError(f"unknown {kind[:-1]} preset {name_or_path!r} (available: {', '.join(names)})")
        text = preset_root(kind).joinpath(f"{name_or_path}.yaml").read_text()
        where = f"{kind}/{name_or_path}.yaml"
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a preset must be a mapping")
    return data, where


def override_labels(overrides: list[str], scope: str) -> dict[str, str]:
    """{dotted key: how an error names it} of ``key=value`` overrides of one section, for :func:`from_dict`
    (``scope``: what comes before the key, ``--set env.`` on the command line)."""
    return {item.split("=", 1)[0]: scope + item.split("=", 1)[0] for item in overrides}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return data


def dataset_kind(dataset: str) -> str:
    """What a ``data.dataset`` value's options are written for: a registry name, or its prefix
    ("hf:", "imagefolder:")."""
    prefix, sep, _ = dataset.partition(":")
    return prefix + sep if sep else dataset


def load_env_config(name_or_path: str, overrides: list[str] | None = None, scope: str = "--set env.") -> EnvConfig:
    """Resolve an env preset (shipped name or YAML path) plus ``--set`` overrides (``scope``: how an error names
    an overridden key, before the key itself).

    A preset's ``data.options`` are written for its dataset: overrides that move ``data.dataset`` to
    another kind of dataset (``--env minilm-text --set data.dataset=hf:my-corpus``) drop them (the hf
    loader refuses python-docs' options); ``data.options`` given in the overrides still apply.
    """
    data, where = read_preset("envs", name_or_path)
    data.setdefault("name", Path(name_or_path).stem)
    after = _dataset_of(apply_overrides(copy.deepcopy(data), overrides or []))
    if dataset_kind(after) != dataset_kind(_dataset_of(data)) and isinstance(data.get("data"), dict):
        data["data"].pop("options", None)
    return from_dict(EnvConfig, apply_overrides(data, overrides or []), where, override_labels(overrides or [], scope))


def _dataset_of(data: dict[str, Any]) -> str:
    section = data.get("data")
    dataset = section.get("dataset") if isinstance(section, dict) else None
    return dataset if isinstance(dataset, str) else DataConfig.dataset


def load_agent_config(name_or_path: str, overrides: list[str] | None = None) -> AgentConfig:
    """Resolve an agent preset (shipped name or YAML path) plus ``--set`` overrides."""
    data, where = read_preset("agents", name_or_path)
    return from_dict(AgentConfig, apply_overrides(data, overrides or []), where, override_labels(overrides or [], "--set agent."))


# ---- run folders ---------------------------------------------------------------------------------
RUN_CONFIG_FILE = "config.yaml"
"""The resolved config a run folder records (written by ``train``, read by ``train --resume``, ``export``, ``eval``)."""


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml`` as a mapping: the one reader of it."""
    import yaml

    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"not a run folder (no {RUN_CONFIG_FILE}): {run_dir}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return data


def run_env_config(data: Mapping[str, Any], run_dir: str | Path) -> EnvConfig:
    """The env config a run was trained with, from its ``config.yaml`` mapping ``data`` (:func:`read_run_config`):
    its ``env`` section (the whole mapping where there is none), errors named ``runs/x/config.yaml: env.reward.lam``."""
    where = str(Path(run_dir) / RUN_CONFIG_FILE)
    return from_dict(EnvConfig, data["env"], where, key="env") if "env" in data else from_dict(EnvConfig, dict(data), where)
