"""digits-cluttered: rendering math, determinism, disjoint splits, options, the Split contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from policy_prune.config import ConfigError, DataConfig, EnvConfig
from policy_prune.data import DATASETS, Split, load_splits
from policy_prune.data import digits as dg
from policy_prune.errors import UserError
from tests import tiny

SMALL = {"canvases_train": 1, "canvases_val": 1, "canvases_test": 1}


@pytest.fixture(scope="module")
def small_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return dg.build_splits(SMALL, seed=0)


def test_place_matches_grid_sample_reference() -> None:
    glyphs, _ = dg.load_glyphs()
    g = glyphs[:6]
    x0 = np.array([0.0, 3.5, 10.0, 28.0, -4.0, 40.0])
    y0 = np.array([7.0, 0.0, 28.0, 12.25, 30.0, -2.0])
    got = dg.place(g, x0, y0, size=20, canvas=48)
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 48 / 20
    theta[:, 0, 2] = torch.from_numpy((48 - 2 * x0) / 20 - 1)
    theta[:, 1, 2] = torch.from_numpy((48 - 2 * y0) / 20 - 1)
    grid = F.affine_grid(theta, [6, 1, 48, 48], align_corners=False)
    ref = F.grid_sample(torch.from_numpy(g)[:, None], grid, align_corners=False)[:, 0]
    torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-5, rtol=0)
    # One lit source pixel (row 2, col 5) lands where the scale says: centre x0 + 5.5 * 2.5 - 0.5.
    dot = np.zeros((1, 8, 8), dtype=np.float32)
    dot[0, 2, 5] = 1.0
    out = dg.place(dot, np.array([10.0]), np.array([4.0]), size=20, canvas=48)[0]
    assert np.unravel_index(out.argmax(), out.shape) in {(4 + 5, 10 + 13), (4 + 6, 10 + 13), (4 + 5, 10 + 14), (4 + 6, 10 + 14)}
    assert dg.place(dot, np.array([60.0]), np.array([0.0]), 20, 48).max() == 0  # off the canvas


def test_sources_split_is_disjoint_complete_and_stratified() -> None:
    _, labels = dg.load_glyphs()
    parts = dg.split_sources(labels, dg.parse_options({}))
    ids = [set(p.tolist()) for p in parts.values()]
    assert sum(len(s) for s in ids) == 1797 == len(set.union(*ids))
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(parts["test"]) == pytest.approx(0.2 * 1797, abs=10)
    assert np.bincount(labels[parts["test"]], minlength=10).min() >= 34  # every class in test


def test_shapes_counts_and_normalisation(small_splits) -> None:
    _, labels = dg.load_glyphs()
    sizes = {k: len(v) for k, v in dg.split_sources(labels, dg.parse_options({})).items()}
    for name, (x, y) in small_splits.items():
        assert x.shape == (sizes[name], 1, 48, 48) and x.dtype == torch.float32
        assert y.shape == (sizes[name],) and y.dtype == torch.long
    x = small_splits["train"][0]
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1  # fixed constants fit the defaults


def test_deterministic_and_seed_only_moves_train(small_splits) -> None:
    again = dg.build_splits(SMALL, seed=0)
    other = dg.build_splits(SMALL, seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(small_splits[name][0], again[name][0])
    assert not torch.equal(small_splits["train"][0], other["train"][0])
    assert torch.equal(small_splits["train"][1], other["train"][1])  # same sources, new canvases
    assert torch.equal(small_splits["test"][0], other["test"][0])  # every run evaluates the same images


def test_canvases_per_source_repeat_sources() -> None:
    out = dg.build_splits({"canvases_train": 1, "canvases_val": 3, "canvases_test": 1}, seed=0)
    x, y = out["val"]
    n = len(y) // 3
    assert torch.equal(y[:n], y[n : 2 * n])  # the same source digits, drawn again
    assert not torch.equal(x[:n], x[n : 2 * n])  # at other places with other clutter


def test_clutter_adds_ink_and_stays_off_the_digit() -> None:
    glyphs, labels = dg.load_glyphs()
    src = np.arange(50)
    clean = dg.parse_options({"n_distractors": 0, "noise": 0.0})
    busy = dg.parse_options({"n_distractors": 6, "noise": 0.0})
    a, xy = dg.render(glyphs, src, src, clean, np.random.default_rng(0))
    b, xy_busy = dg.render(glyphs, src, src, busy, np.random.default_rng(0))
    assert (b.sum(axis=(1, 2)) > a.sum(axis=(1, 2)) + 1).all()
    # Same rng stream start: the digit is at the same place; fragments stay off its box (bilinear
    # smear reaches ~1.25 px past a fragment's box, hence the 2 px margin).
    size = busy.digit_size
    assert np.array_equal(xy, xy_busy) and xy.min() >= 0 and xy.max() <= 48 - size and (xy % busy.snap == 0).all()
    for i, (x, y) in enumerate(xy):
        inner = (slice(y + 2, y + size - 2), slice(x + 2, x + size - 2))
        np.testing.assert_allclose(b[i][inner], a[i][inner], atol=1e-6)


def test_fragment_positions_avoid_digit_box() -> None:
    opts = dg.parse_options({})
    rng = np.random.default_rng(3)
    digit = rng.integers(0, 29, (500, 2))
    wh = rng.integers(8, 13, (500, 2))
    xy = dg._fragment_positions(digit, wh, rng, opts)
    hit = np.all((xy < digit + opts.digit_size) & (xy + wh > digit), axis=1)
    assert hit.mean() < 0.01 and (xy >= 0).all() and (xy + wh <= 48).all()


@pytest.mark.parametrize(
    ("options", "match"),
    [({"canvass": 48}, "unknown key 'canvass'"), ({"digit_size": 64}, "digit_size"), ({"fragment_min": 6, "fragment_max": 4}, "fragment_min"),
     ({"n_distractors": -1}, "must not be negative"), ({"noise": -0.1}, "must not be negative"),
     ({"canvases_val": 0}, "must be at least 1")],
)
def test_bad_options_are_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dg.parse_options(options)


def test_load_splits_caps_and_registry() -> None:
    cfg = EnvConfig(data=DataConfig(max_samples=40, options=SMALL))
    splits = load_splits(cfg, seed=0)
    assert set(splits) == {"train", "val", "test"} and all(len(s) == 40 for s in splits.values())
    assert set(splits["test"].labels.tolist()) >= set(range(8))  # a random subset, not the first rows
    other = load_splits(cfg, seed=1)
    assert torch.equal(other["test"].inputs, splits["test"].inputs)  # held-out rows do not follow the run seed
    assert not torch.equal(other["train"].inputs, splits["train"].inputs)
    assert {"digits-cluttered", "python-docs"} <= set(DATASETS)
    with pytest.raises(UserError, match=r"unknown dataset 'mnist'.*digits-cluttered.*imagefolder:<path>"):
        load_splits(EnvConfig(data=DataConfig(dataset="mnist")), seed=0)


def test_canvas_fits_an_rgb_backbone() -> None:
    backbone = tiny_backbone()
    cfg = EnvConfig(data=DataConfig(max_samples=4, options={**SMALL, "canvas": 32, "digit_size": 16}))
    split = load_splits(cfg, seed=0, backbone=backbone)["val"]
    assert split.inputs.shape == (4, 3, 32, 32)
    assert torch.equal(split.inputs[:, 0], split.inputs[:, 2])  # grey repeated
    assert backbone(split.inputs).shape == (4, 5)
    with pytest.raises(UserError, match="canvas 48 does not match the backbone's input 32"):
        load_splits(EnvConfig(data=DataConfig(max_samples=4, options=SMALL)), seed=0, backbone=backbone)


def test_split_select_on_tensors_and_dicts() -> None:
    images = Split("val", torch.arange(24.0).view(6, 1, 2, 2), torch.arange(6))
    picked = images.select(torch.tensor([4, 1]))
    assert len(picked) == 2 and picked.labels.tolist() == [4, 1] and picked.inputs[0, 0, 0, 0] == 16
    text = Split("test", {"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3)}, None)
    mask = torch.tensor([True, False, False, True])
    sub = text.select(mask)
    assert len(sub) == 2 and sub.labels is None and sub.inputs["input_ids"][:, 0].tolist() == [0, 9]


def tiny_backbone():
    from policy_prune.core.backbones import adapt

    return adapt(tiny.make("timm-vit-cls"))


def test_source_groups_follow_the_canvases() -> None:
    """Each canvas carries its source digit: the unit confidence intervals resample (#15)."""
    opts = {"canvases_train": 1, "canvases_val": 3, "canvases_test": 2}
    groups = dg.source_groups(opts)
    splits = dg.build_splits(opts, seed=0)
    glyph_labels = torch.from_numpy(dg.load_glyphs()[1])
    for name, (_, y) in splits.items():
        g = groups[name]
        assert len(g) == len(y) and torch.equal(glyph_labels[g], y)  # a canvas's label is its source's label
    val = groups["val"]
    n = len(val) // 3
    assert torch.equal(val[:n], val[n : 2 * n]) and len(val.unique()) == n
    assert not set(groups["val"].tolist()) & set(groups["test"].tolist())


def test_split_select_and_cap_carry_groups() -> None:
    from policy_prune.data import cap

    split = Split("test", torch.zeros(6, 1, 2, 2), torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert split.select(torch.tensor([1, 4])).groups.tolist() == [0, 2]
    assert cap(split, 4, seed=0).group_ids().shape == (4,)
    assert Split("x", torch.zeros(3, 1), None).group_ids().tolist() == [0, 1, 2]
