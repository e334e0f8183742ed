"""digits-vit pretraining: cache files, reuse without retraining, exact reload, CLI, embedded resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from policy_prune import cli
from policy_prune.config import BackboneConfig, DataConfig, EnvConfig, load_env_config
from policy_prune.core.backbones import TimmViTBackbone
from policy_prune.core.embedded_models import META, WEIGHTS, cache_root
from policy_prune.embedded import resolve_backbone
from policy_prune.errors import UserError
from policy_prune.training.pretrain import load_cached, lr_factor, pretrain

TINY_MODEL = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 8}
TINY_TRAIN = {"epochs": 1, "batch_size": 16, "max_train": 48, "max_eval": 24, "warmup_steps": 1}
TINY_DATA = {"canvas": 32, "digit_size": 16, "canvases_val": 1, "canvases_test": 1}


def tiny_env(**train) -> EnvConfig:
    return EnvConfig(
        name="tiny-digits",
        backbone=BackboneConfig(spec="digits-vit", model_kwargs=TINY_MODEL, pretrain={**TINY_TRAIN, **train}),
        data=DataConfig(options=TINY_DATA),
        sites=[1],
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POLICY_PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def quiet() -> Console:
    return Console(quiet=True)


def test_pretrain_writes_cache_then_reuses_it(cache) -> None:
    first = pretrain(tiny_env(), seed=0, console=quiet())
    assert not first.cached and first.path.parent == cache / "digits-vit"
    assert {p.name for p in first.path.iterdir()} == {WEIGHTS, META}  # no temporary files left behind
    meta = json.loads((first.path / META).read_text())
    assert meta["seed"] == 0 and meta["model"]["embed_dim"] == 16 and meta["data"]["canvas"] == 32
    assert meta["metrics"]["tokens"] == 17 and 0.0 <= meta["metrics"]["test_acc"] <= 1.0
    stamp = (first.path / WEIGHTS).stat().st_mtime_ns

    second = pretrain(tiny_env(), seed=0, console=quiet())
    assert second.cached and second.path == first.path and second.metrics == meta["metrics"]
    assert (first.path / WEIGHTS).stat().st_mtime_ns == stamp  # nothing retrained or rewritten

    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = first.backbone.model(x)
        torch.testing.assert_close(second.backbone(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(load_cached(first.path)(x), expected, rtol=0, atol=0)


def test_cache_key_follows_config_and_seed(cache) -> None:
    a = pretrain(tiny_env(), seed=0, console=quiet())
    b = pretrain(tiny_env(), seed=1, console=quiet())
    c = pretrain(tiny_env(lr=0.002), seed=0, console=quiet())
    assert len({a.path, b.path, c.path}) == 3 and not (b.cached or c.cached)
    more_rl_data = tiny_env()
    more_rl_data.data.options = {**TINY_DATA, "canvases_train": 7}  # sizes the env's split, not the fit
    assert pretrain(more_rl_data, seed=0, console=quiet()).cached
    forced = pretrain(tiny_env(), seed=0, force=True, console=quiet())
    assert not forced.cached and forced.path == a.path
    # Training is reproducible from its seed: the forced refit equals the first fit.
    for (k, v), w in zip(a.backbone.model.state_dict().items(), forced.backbone.model.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def test_incomplete_cache_is_refitted(cache) -> None:
    first = pretrain(tiny_env(), seed=0, console=quiet())
    (first.path / META).write_text("{not json")
    again = pretrain(tiny_env(), seed=0, console=quiet())
    assert not again.cached and json.loads((first.path / META).read_text())["seed"] == 0


def test_pretrain_leaves_the_global_rng_alone(cache) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    pretrain(tiny_env(), seed=0, console=quiet())
    assert torch.equal(torch.random.get_rng_state(), before)


def test_fitting_drives_the_train_bar(cache) -> None:
    """From an empty cache ``train`` fits digits-vit inside its one RunProgress bar (the first phase)."""
    from policy_prune.training.callbacks import RunProgress

    console = quiet()
    with RunProgress(console) as progress:
        backbone, _ = resolve_backbone(tiny_env(), console=console, progress=progress)
        task = progress.progress.tasks[0]
        assert len(progress.progress.tasks) == 1 and task.description.startswith("fit") and task.completed == task.total > 0
        progress.start(total=100)
        assert len(progress.progress.tasks) == 1 and task.description == "train" and task.total == 100
    assert backbone.depth == 2


def test_resolve_backbone_gets_or_fits_digits_vit(cache) -> None:
    backbone, tokenizer = resolve_backbone(tiny_env())
    assert tokenizer is None and isinstance(backbone, TimmViTBackbone)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert backbone.signature()["grid"] == [4, 4] and backbone.depth == 2
    assert len(list((cache / "digits-vit").iterdir())) == 1


def test_bad_settings_are_user_errors(cache) -> None:
    with pytest.raises(UserError, match="unknown key 'epoch'"):
        pretrain(tiny_env(epoch=3), console=quiet())
    with pytest.raises(UserError, match="fitted on digits-cluttered, not .python-docs."):
        pretrain(EnvConfig(data=DataConfig(dataset="python-docs")), console=quiet())
    with pytest.raises(UserError, match="no training steps"):
        pretrain(tiny_env(max_train=4), console=quiet())


def test_context_curriculum_masks() -> None:
    from policy_prune.data.digits import parse_options
    from policy_prune.training.pretrain import PretrainConfig, context_fraction, context_keep, digit_tokens

    opts = parse_options({"canvas": 48, "digit_size": 12, "snap": 4})
    blocks = digit_tokens(np.array([[0, 0], [36, 8]]), opts, patch=4)  # (x, y) corners
    assert blocks[0].tolist() == [0, 1, 2, 12, 13, 14, 24, 25, 26]  # 3 x 3 patches from the top-left
    assert blocks[1].tolist()[:3] == [2 * 12 + 9, 2 * 12 + 10, 2 * 12 + 11]
    unaligned = digit_tokens(np.array([[45, 45]]), parse_options({"digit_size": 12, "snap": 1}), patch=4)
    assert unaligned.shape == (1, 16) and int(unaligned.max()) == 143  # one more row/column, kept on the grid
    g = torch.Generator().manual_seed(0)
    keep = context_keep(blocks, 0.0, 144, 1, g)
    assert keep.shape == (2, 145) and keep.sum(1).tolist() == [10, 10] and keep[:, 0].all()
    half = context_keep(blocks, 0.5, 144, 1, g)
    assert half.sum(1).tolist() == [10 + 68, 10 + 68] and (half & keep).sum() == keep.sum()
    cfg = PretrainConfig(context_start=0.25, context_end=0.75)
    assert [context_fraction(s, 100, cfg) for s in (0, 25, 50, 75, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(55, 100, 10) == pytest.approx(0.5) and lr_factor(100, 100, 10) == 0.0


def test_cache_root_default(monkeypatch) -> None:
    monkeypatch.delenv("POLICY_PRUNE_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "policy-prune"


def test_cli_pretrain_then_cached(cache, tmp_path, capsys) -> None:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        f"backbone: {{spec: digits-vit, model_kwargs: {json.dumps(TINY_MODEL)}, pretrain: {json.dumps(TINY_TRAIN)}}}\n"
        f"data: {{options: {json.dumps(TINY_DATA)}}}\nsites: [1]\n"
    )
    assert cli.main(["pretrain", "--env", str(preset), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "cached:" not in out and "below 0.90" in out  # a 1-epoch toy
    assert cli.main(["pretrain", "--env", str(preset), "--epochs", "1"]) == 0
    assert "cached:" in capsys.readouterr().out
    assert cli.main(["pretrain", "--env", str(preset), "--set", "backbone.pretrain.epoch=2"]) == 2
    assert "unknown key 'epoch'" in capsys.readouterr().err
    # Keys as train takes them (env.): the same config, so the same cached fit.
    assert cli.main(["pretrain", "--env", str(preset), "--set", "env.backbone.pretrain.epochs=1"]) == 0
    assert "cached:" in capsys.readouterr().out
    assert cli.main(["pretrain", "--env", str(preset), "--set", "env.backbone.pretrain.epoch=2"]) == 2
    assert "unknown key 'epoch'" in capsys.readouterr().err  # the env. key reached the preset
    assert cli.main(["pretrain", "--env", str(preset), "--set", "train.threads=1"]) == 2
    assert "train. keys set the RL run" in capsys.readouterr().err


def test_cli_pretrain_other_backbone_is_a_no_op(capsys) -> None:
    assert cli.main(["pretrain", "--env", "minilm-text"]) == 0
    assert "nothing to pretrain" in capsys.readouterr().out


@pytest.mark.expensive
def test_default_digits_vit_reaches_90_percent(cache) -> None:
    result = pretrain(load_env_config("digits-vit"), seed=0, console=quiet())
    assert result.metrics["test_acc"] >= 0.9 and result.metrics["tokens"] == 145


def test_run_seed_does_not_refit_the_backbone(cache) -> None:
    from policy_prune.embedded import resolve

    a, _ = resolve(tiny_env(), seed=0)
    b, _ = resolve(tiny_env(), seed=7)  # another RL seed: the same cached backbone
    assert len(list((cache / "digits-vit").iterdir())) == 1
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    other = pretrain(tiny_env(seed=3), console=quiet())  # the backbone's own seed is a new checkpoint
    assert not other.cached and other.seed == 3 and len(list((cache / "digits-vit").iterdir())) == 2
