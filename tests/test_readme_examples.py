"""The README's "Your own model and data" commands and its Gymnasium example, run as written: the commands
on a tiny sentence-transformers folder + JSONL corpus and on a random-weight deit_tiny checkpoint + image
folder made here (nothing downloaded), with only the training budget shrunk (SHORT)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from policy_prune.cli import main
from policy_prune.config import load_env_config

ROOT = Path(__file__).resolve().parents[1]
# Appended to each README command: one rollout of a small agent, small validation sets (a few hundred steps).
SHORT = ["--timesteps", "96", "--set", "agent.n_envs=8", "--set", "agent.hyperparams.n_steps=12",
         "--set", "agent.hyperparams.batch_size=32", "--set", "train.eval_every=96", "--set", "train.eval_samples=16",
         "--set", "train.final_samples=16", "--set", "train.calibration_samples=16"]

WORDS = ["the", "a", "model", "token", "prune", "fast", "slow", "text", "keep", "drop"]


def readme_block(heading: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {heading}\n"):]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def readme_commands() -> dict[str, list[str]]:
    """The README's own-model-and-data commands, keyed by preset."""
    lines = [shlex.split(line) for line in readme_block("Your own model and data", "bash").splitlines() if line.strip()]
    assert all(words[:2] == ["policy-prune", "train"] for words in lines)
    return {words[words.index("--env") + 1]: words[1:] for words in lines}


def _sentence_transformer(folder: Path, tmp: Path) -> None:
    """A 6-layer, 32-wide BERT with mean pooling saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    raw = tmp / "raw-bert"
    raw.mkdir()
    (raw / "vocab.txt").write_text("\n".join(words))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(raw)
    BertTokenizer(vocab_file=str(raw / "vocab.txt")).save_pretrained(raw)
    SentenceTransformer(str(raw), device="cpu").save(str(folder))


def test_readme_own_text_model_and_jsonl_corpus(tmp_path, monkeypatch) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("datasets")
    import random

    monkeypatch.chdir(tmp_path)
    _sentence_transformer(tmp_path / "my-encoder", tmp_path)
    (tmp_path / "my-corpus").mkdir()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))} for _ in range(120)]
    (tmp_path / "my-corpus" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = readme_commands()["minilm-text"]
    assert "env.data.options={}" not in " ".join(args)  # the preset's python-docs options go by themselves
    assert main([*args, *SHORT]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    # The local paths as typed, made absolute: the run folder is read again from any directory (eval, export, resume).
    assert config["env"]["backbone"]["spec"] == str(tmp_path / "my-encoder")
    assert config["env"]["data"]["dataset"] == f"hf:{tmp_path / 'my-corpus'}"
    assert config["env"]["data"]["options"] == {} and config["env"]["reward"]["task"] == "cosine"
    scorer = json.loads((run / "scorer" / "scorer.json").read_text())
    assert scorer["backbone"]["depth"] == 6 and scorer["sites"] == load_env_config("minilm-text").sites


def test_readme_own_timm_checkpoint_and_image_folder(tmp_path, monkeypatch) -> None:
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), "my-vit.safetensors")
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (tmp_path / "my-images" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 40), (colour[0] + 5 * i, colour[1], colour[2])).save(tmp_path / "my-images" / f"class{c}" / f"{i}.png")
    # The preset's pretrained: true must not fetch hub weights that the checkpoint replaces: no network here.
    monkeypatch.setattr("timm.models._builder.load_pretrained",
                        lambda *a, **k: pytest.fail("fetched hub weights despite a checkpoint"))
    assert main([*readme_commands()["custom-timm-imagefolder"], *SHORT]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["env"]["backbone"]["checkpoint"] == str(tmp_path / "my-vit.safetensors")
    assert config["env"]["data"]["dataset"] == f"imagefolder:{tmp_path / 'my-images'}"
    assert (run / "scorer" / "scorer.safetensors").is_file()
    # From another directory the run's model and data are still its own ("checkpoint not found" before).
    from policy_prune.embedded import resolve
    from policy_prune.training.train import load_run_config

    monkeypatch.chdir(tmp_path.parent)
    backbone, splits = resolve(load_run_config(run).env, seed=0)
    assert backbone.signature() == json.loads((run / "scorer" / "scorer.json").read_text())["backbone"]
    assert len(splits["test"]) == 3


def test_readme_gymnasium_example_runs_as_written(capsys) -> None:
    code = readme_block("The environment (Gymnasium)", "python")
    assert 'gym.make("PolicyPrune/TokenPrune-v0", preset="digits-vit-random")' in code
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Dict(") and "'tokens': Box(" in printed[0] and printed[1] == "MultiBinary(145)"
    flops, agreement = (float(v) for v in printed[2].split())
    assert 0.0 < flops < 1.0 and agreement in (0.0, 1.0)
    assert names["terminated"] and type(names["env"].unwrapped).__name__ == "TokenPruneEnv"


def test_a_preset_env_on_an_unknown_split_is_one_clear_error() -> None:
    import gymnasium as gym

    import policy_prune  # noqa: F401  (registers the env id)
    from policy_prune.errors import UserError

    with pytest.raises(UserError, match="split='foo': a preset's env runs on 'train', 'val' or 'test'"):
        gym.make("PolicyPrune/TokenPrune-v0", preset="digits-vit-random", split="foo")
