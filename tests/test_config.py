"""Strict presets and overrides."""

from __future__ import annotations

import pytest

from policy_prune.config import (
    ConfigError,
    EnvConfig,
    apply_overrides,
    from_dict,
    load_env_config,
    preset_names,
    to_dict,
)


def test_shipped_env_presets_parse() -> None:
    names = preset_names("envs")
    assert "digits-vit" in names
    cfg = load_env_config("digits-vit")
    assert cfg.name == "digits-vit" and cfg.reward.task and cfg.sites == sorted(cfg.sites)


def test_presets_of_a_source_checkout_that_was_not_installed(monkeypatch) -> None:
    """Without the installed package's preset modules (PYTHONPATH=. on a checkout), the repository's envs/
    and agents/ folders serve the same presets."""
    from policy_prune import config

    installed = preset_names("envs"), config.read_preset("agents", "ppo")[0]
    for kind in config.PRESET_PACKAGES:
        monkeypatch.setitem(config.PRESET_PACKAGES, kind, f"policy_prune._no_such_package.{kind}")
    assert preset_names("envs") == installed[0] and config.read_preset("agents", "ppo")[0] == installed[1]
    assert load_env_config("digits-vit").name == "digits-vit"


def test_overrides_and_roundtrip() -> None:
    cfg = load_env_config("digits-vit", ["reward.lam=0.5", "sites=[2, 4]", "backbone.model_kwargs.depth=3"])
    assert cfg.reward.lam == 0.5 and cfg.sites == [2, 4] and cfg.backbone.model_kwargs["depth"] == 3
    assert from_dict(EnvConfig, to_dict(cfg)) == cfg


def test_another_kind_of_dataset_drops_the_presets_options(tmp_path) -> None:
    """python-docs' options do not apply to a JSONL corpus: --set data.dataset=hf:... drops them (the hf
    loader refused them, so a user had to add --set "env.data.options={}"); options set as well stay."""
    assert load_env_config("minilm-text").data.options  # sources, queries, ...
    assert load_env_config("minilm-text", ["data.dataset=hf:my-corpus"]).data.options == {}
    kept = load_env_config("minilm-text", ["data.dataset=hf:my-corpus", "data.options.val_fraction=0.2"])
    assert kept.data.options == {"val_fraction": 0.2}
    same_kind = load_env_config("custom-timm-imagefolder", ["data.dataset=imagefolder:elsewhere"])
    assert same_kind.data.options == load_env_config("custom-timm-imagefolder").data.options != {}
    assert load_env_config("digits-vit", ["data.dataset=digits-cluttered"]).data.options  # the same dataset


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"reward": {"lamda": 0.3}}, "unknown key 'lamda'"),
        ({"sites": "1,2"}, "expected a list"),
        ({"reward": {"lam": "high"}}, "reward.lam"),
        ({"backbone": 3}, "expected a mapping"),
    ],
)
def test_bad_keys_and_types_are_user_errors(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(EnvConfig, data)


def test_bad_preset_names_and_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown env preset 'nope'.*digits-vit"):
        load_env_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_env_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_env_config(str(bad))
    own = tmp_path / "mine.yaml"
    own.write_text("backbone: {spec: vit_tiny_patch16_224}\nsites: [2]\n")
    assert load_env_config(str(own)).name == "mine"
    own.write_text("backbone: {spec: vit_tiny_patch16_224}\nsites: [2]\nreward: {lam: high}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: reward\.lam: expected float"):  # the file, then the key
        load_env_config(str(own))
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["reward.lam"])


def test_errors_name_the_override_or_the_file_that_gave_the_value(tmp_path) -> None:
    """A value from --set is named as the user typed it, not as a line of the preset file it never was in; one
    from a run's config.yaml is named with its section (``env.``), as the file has it."""
    from policy_prune.config import AgentConfig, load_agent_config, run_env_config

    with pytest.raises(ConfigError, match=r"^--set env\.reward\.lam: expected float, got 'abc'$"):
        load_env_config("digits-vit", ["reward.lam=abc"])
    with pytest.raises(ConfigError, match=r"^--set env\.reward\.lamda: unknown key 'lamda' \(allowed: budget"):
        load_env_config("digits-vit", ["reward={lamda: 1}"])  # a whole mapping set: its keys are the override's
    with pytest.raises(ConfigError, match=r"^overrides: sites: expected a list"):
        load_env_config("digits-vit", ["sites=1"], scope="overrides: ")
    with pytest.raises(ConfigError, match=r"^--set agent\.group_size: expected int, got 'x'$"):
        load_agent_config("ppo", ["group_size=x"])
    own = tmp_path / "mine.yaml"
    own.write_text("backbone: {spec: vit_tiny_patch16_224}\nsites: [2]\nreward: {lam: high}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: reward\.lam: expected float"):  # not overridden: the file
        load_env_config(str(own), ["sites=[3]"])
    with pytest.raises(ConfigError, match=r"^unknown key 'lamda' in envs/digits-vit\.yaml: reward \(allowed"):
        from_dict(EnvConfig, {"reward": {"lamda": 1}}, "envs/digits-vit.yaml")
    run = {"env": {"reward": {"lam": "high"}}, "train": {"seed": 0}}
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/config\.yaml: env\.reward\.lam: expected float"):
        run_env_config(run, tmp_path)
    assert run_env_config({"env": {"reward": {"lam": 0.2}}}, tmp_path).reward.lam == 0.2
    assert from_dict(AgentConfig, {"group_size": 4}, "x.yaml", {"n_envs": "--set agent.n_envs"}).group_size == 4


def test_the_readme_describes_the_default_run_as_shipped() -> None:
    """The README's digits-vit tables say what the preset trains (sites, budgets, steps, the backbone's dtype in
    training, PPO's epochs): a preset edit that leaves them describing another run fails here."""
    import argparse
    from pathlib import Path

    from policy_prune.training.train import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = resolve_config(parser.parse_args([]))  # what `policy-prune train` with no flags resolves
    low, high = cfg.env.reward.budget  # type: ignore[misc]
    steps = f"{cfg.train.timesteps // 1_000_000}M" if cfg.train.timesteps % 1_000_000 == 0 else f"{cfg.train.timesteps // 1000}k"
    epochs = {1: "one", 2: "two", 3: "three", 4: "four"}[cfg.agent.hyperparams["n_epochs"]]
    shipped = (f"(the preset as shipped: sites {' '.join(map(str, cfg.env.sites))}, budgets {low:g}-{high:g}, {steps} steps "
               f"with the frozen ViT in {cfg.train.dtype} and {epochs} PPO epochs per rollout)")
    assert cfg.env.name == "digits-vit" and shipped in (Path(__file__).resolve().parents[1] / "README.md").read_text()
