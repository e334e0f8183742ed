"""Users' own data: image folders and local Hugging Face datasets (no hub), plus every shipped preset."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from policy_prune.config import DataConfig, EnvConfig, load_env_config, preset_names
from policy_prune.data import load_splits
from policy_prune.data.loaders import SplitOptions, carve, parse_hf_spec
from policy_prune.errors import UserError
from tests import tiny

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _write_images(root: Path, per_class: int, size: int = 20) -> None:
    from PIL import Image

    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size + i, size), rgb).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def backbone():
    from policy_prune.core.backbones import adapt

    return adapt(tiny.make("timm-vit-cls"))  # 32x32 RGB input, ImageNet mean/std


def _env(dataset: str, **data) -> EnvConfig:
    return EnvConfig(data=DataConfig(dataset=dataset, **data))


def test_imagefolder_carves_stratified_splits_normalised_for_the_model(tmp_path, backbone) -> None:
    _write_images(tmp_path, per_class=10)
    splits = load_splits(_env(f"imagefolder:{tmp_path}"), seed=0, backbone=backbone)
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 3, "test": 3}
    for split in splits.values():
        assert split.inputs.shape[1:] == (3, 32, 32) and split.labels.bincount(minlength=3).tolist() == [len(split) // 3] * 3
    # A solid red image normalised with the model's mean/std: (1 - 0.485) / 0.229 in channel 0.
    red = splits["train"].inputs[splits["train"].labels == 2]
    torch.testing.assert_close(red[:, 0], torch.full_like(red[:, 0], (1 - 0.485) / 0.229), atol=1e-4, rtol=0)
    torch.testing.assert_close(red[:, 1], torch.full_like(red[:, 1], -0.456 / 0.224), atol=1e-4, rtol=0)
    again = load_splits(_env(f"imagefolder:{tmp_path}"), seed=5, backbone=backbone)
    assert torch.equal(again["test"].inputs, splits["test"].inputs)  # split_seed, not the run seed


def test_imagefolder_uses_its_own_split_folders_and_caps(tmp_path, backbone) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _write_images(tmp_path / split, per_class=n)
    splits = load_splits(_env(f"imagefolder:{tmp_path}", image_size=16), seed=0, backbone=backbone)
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 6, "test": 9}
    assert splits["val"].inputs.shape[-2:] == (16, 16)  # image_size overrides the model's size
    capped = load_splits(_env(f"imagefolder:{tmp_path}", max_samples=5), seed=0, backbone=backbone)
    assert all(len(s) == 5 for s in capped.values())


def test_imagefolder_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="image folder not found"):
        load_splits(_env(f"imagefolder:{tmp_path / 'nope'}"), seed=0)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_splits(_env(f"imagefolder:{tmp_path / 'empty'}"), seed=0)


def test_imagefolder_mistakes_that_gave_wrong_labels_or_a_traceback(tmp_path, backbone) -> None:
    """An empty class folder shifted every later label (a trained run then scored 0.000 without a word); one class,
    or more classes than the model's outputs, trained as if fine; a broken image was PIL's traceback."""
    _write_images(tmp_path / "gap", per_class=4)
    (tmp_path / "gap" / "amber").mkdir()  # sorts first: every real class's label would move up by one
    with pytest.raises(UserError, match="class folder without images: amber"):
        load_splits(_env(f"imagefolder:{tmp_path / 'gap'}"), seed=0, backbone=backbone)
    _write_images(tmp_path / "one", per_class=4)
    for name in ("green", "red"):
        shutil.rmtree(tmp_path / "one" / name)
    with pytest.raises(UserError, match=r"one class folder \(blue\)"):
        load_splits(_env(f"imagefolder:{tmp_path / 'one'}"), seed=0, backbone=backbone)
    _write_images(tmp_path / "many", per_class=4)
    for extra in ("a", "b", "c"):  # 6 classes for the tiny model's 5 outputs
        shutil.copytree(tmp_path / "many" / "red", tmp_path / "many" / extra)
    with pytest.raises(UserError, match="6 class folders, but the model's head has 5 outputs"):
        load_splits(_env(f"imagefolder:{tmp_path / 'many'}"), seed=0, backbone=backbone)
    _write_images(tmp_path / "broken", per_class=4)
    (tmp_path / "broken" / "red" / "9.png").write_text("not an image")
    with pytest.raises(UserError, match=r"9.png: not a readable image \(UnidentifiedImageError\)"):
        load_splits(_env(f"imagefolder:{tmp_path / 'broken'}", max_samples=None), seed=0, backbone=backbone)


def test_carve_is_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(4), 25)
    idx = carve(labels, 100, ["val", "test"], SplitOptions(val_fraction=0.2, test_fraction=0.2))
    assert [len(idx[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    assert np.bincount(labels[idx["val"]]).tolist() == [5, 5, 5, 5]
    assert len(np.unique(np.concatenate(list(idx.values())))) == 100


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("hf:imdb", ("imdb", None, None)), ("hf:glue:sst2", ("glue", "sst2", None)), ("hf:/data/x::train", ("/data/x", None, "train"))],
)
def test_parse_hf_spec(spec: str, parsed: tuple) -> None:
    assert parse_hf_spec(spec) == parsed


def _tokenizer(tmp_path: Path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "plot"]
    try:  # transformers >= 5 takes the vocab itself
        return BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    except TypeError:  # transformers 4 reads a vocab file
        (tmp_path / "vocab.txt").write_text("\n".join(words))
        return BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("from_home", [False, True])
def test_hf_local_text_folder(tmp_path, monkeypatch, from_home: bool) -> None:
    """A local dataset folder, given by its path or as ~/... (your home: datasets would look the name up on
    the Hub)."""
    pytest.importorskip("datasets")
    data = tmp_path / "reviews"
    data.mkdir()
    rows = [{"text": " ".join(["good"] * (1 + i % 4)) + " movie", "label": i % 2} for i in range(40)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]))
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = "hf:~/reviews" if from_home else f"hf:{data}"
    splits = load_splits(_env(spec, max_length=4), seed=0, tokenizer=_tokenizer(tmp_path))
    assert {k: len(v) for k, v in splits.items()} == {"train": 36, "val": 4, "test": 6}  # val carved from train
    ids = splits["test"].inputs["input_ids"]
    assert ids.shape == (6, 4) and ids[0, :3].tolist() == [2, 5, 7]  # [CLS] good movie, truncated at 4
    assert splits["test"].labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_hf_text_splits_share_one_width(tmp_path) -> None:
    """Every split of a text corpus is padded to one width (the widest split's): an env sized by train's rows reads
    val and test rows in the final eval (padded per split, train 7 and test 4 columns did not fit its policy)."""
    pytest.importorskip("datasets")
    data = tmp_path / "short"
    data.mkdir()
    rows = [{"text": " ".join(["good"] * (1 + i % 4)) + " movie", "label": i % 2} for i in range(40)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::4][:6]))  # "good movie" only
    splits = load_splits(_env(f"hf:{data}", max_length=16), seed=0, tokenizer=_tokenizer(tmp_path))
    widths = {k: v.inputs["input_ids"].shape[1] for k, v in splits.items()}
    assert widths == {"train": 7, "val": 7, "test": 7}  # [CLS] good x4 movie [SEP]
    test = splits["test"].inputs
    assert test["attention_mask"].sum(dim=1).tolist() == [4] * 6  # [CLS] good movie [SEP], the rest padding
    assert (test["input_ids"][:, 4:] == 0).all() and (test["attention_mask"][:, 4:] == 0).all()


def test_hf_string_labels_image_column_and_missing_columns(tmp_path, backbone) -> None:
    pytest.importorskip("datasets")
    from PIL import Image

    data = tmp_path / "pics"
    data.mkdir()
    rows = []
    for i in range(12):
        name = "red" if i % 2 else "blue"
        Image.new("RGB", (24, 24), COLOURS[name]).save(data / f"{i}.png")
        rows.append(f"{data / f'{i}.png'},{name}")
    (data / "train.csv").write_text("path,kind\n" + "\n".join(rows))
    cfg = _env(f"hf:{data}", image_column="path", label_column="kind", options={"val_fraction": 0.17, "test_fraction": 0.17})
    splits = load_splits(cfg, seed=0, backbone=backbone)
    assert splits["train"].inputs.shape == (8, 3, 32, 32)  # 1 of 6 per class to val, 1 to test
    labels = splits["train"].labels  # "blue" -> 0, "red" -> 1
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4
    blue = splits["train"].inputs[labels == 0]
    assert float(blue[:, 2].mean()) == pytest.approx((1 - 0.406) / 0.225, abs=1e-3)
    with pytest.raises(UserError, match="neither text_column 'text' nor image_column 'image'"):
        load_splits(_env(f"hf:{data}"), seed=0)


def test_hf_without_datasets_package_hints_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="pip install datasets"):
        load_splits(_env("hf:anything"), seed=0)


def test_every_shipped_env_preset_parses() -> None:
    names = preset_names("envs")
    assert {"digits-vit", "minilm-text", "custom-timm-imagefolder"} <= set(names)
    for name in names:
        cfg = load_env_config(name)
        assert cfg.sites == sorted(set(cfg.sites)) and cfg.data.dataset
    assert load_env_config("minilm-text").reward.task == "cosine"


def test_env_readme_documents_every_key() -> None:
    import dataclasses

    from policy_prune.config import AgentConfig, BackboneConfig, RewardConfig, WarmStartConfig

    readme = (Path(__file__).parents[1] / "envs" / "README.md").read_text()
    for cls in (EnvConfig, BackboneConfig, DataConfig, RewardConfig, AgentConfig, WarmStartConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in readme, f"envs/README.md does not document {cls.__name__}.{f.name}"
