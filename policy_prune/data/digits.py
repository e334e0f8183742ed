"""digits-cluttered: scikit-learn's bundled 8x8 digits enlarged onto a cluttered canvas.

In the spirit of cluttered MNIST (Mnih et al. 2014, "Recurrent Models of Visual Attention"): one enlarged
digit at a random position among fragments cut from *other* digits, plus faint noise. Most patches are
background or clutter, so which tokens a ViT keeps matters. Everything ships with scikit-learn: no
download. Rendering is vectorised: per glyph layer, bilinear enlargement and placement are two small
batched matmuls. By default the digit's corner snaps to the 4 px patch grid (it still lands anywhere on
it): a small ViT then sees the same tokens for a digit wherever it is, which it learns far faster.

Splits never share a source image: the 1797 sources are split first (by a fixed ``split_seed``), then
each source is rendered on several canvases. Val/test canvases are fixed by ``split_seed`` so every run
evaluates on the same images; train canvases follow the run seed (and pretraining draws fresh ones
per epoch as augmentation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policy_prune.config import ConfigError, from_dict
from policy_prune.errors import UserError

GLYPH = 8
"""Side of a scikit-learn digit in pixels."""
MEAN, STD = 0.035, 0.15
"""Fixed normalisation constants (about the pixel statistics of the default canvases, values in [0, 1])."""
SPLITS = ("train", "val", "test")
CHUNK = 256


@dataclass
class DigitsOptions:
    """``data.options`` of the digits-cluttered dataset."""

    canvas: int = 48
    """Side of the square canvas in pixels."""
    digit_size: int = 12
    """Side in pixels that the 8x8 digit (and each fragment's source glyph) is enlarged to (1.5x: 3 x 3 patches)."""
    max_offset: int | None = None
    """Largest distance in pixels of the digit's corner from the centred position (None: anywhere)."""
    snap: int = 4
    """The digit's corner lies on multiples of this many pixels (4: the digits-vit patch grid; 1: anywhere)."""
    n_distractors: int = 4
    """Fragments of other digits scattered on each canvas."""
    fragment_min: int = 2
    """Smallest fragment side, in source (8x8) pixels."""
    fragment_max: int = 4
    """Largest fragment side, in source (8x8) pixels."""
    overlap: bool = False
    """Allow fragments on top of the digit (False keeps them off the digit's box when possible)."""
    noise: float = 0.05
    """Std of Gaussian pixel noise, relative to full ink intensity 1."""
    canvases_train: int = 4
    """Canvases rendered per train source image."""
    canvases_val: int = 2
    """Canvases rendered per val source image."""
    canvases_test: int = 2
    """Canvases rendered per test source image."""
    val_fraction: float = 0.1
    """Share of the 1797 source images held out for val."""
    test_fraction: float = 0.2
    """Share of the 1797 source images held out for test."""
    split_seed: int = 0
    """Seed of the source split and of the val/test canvases (independent of the run seed)."""

    def __post_init__(self) -> None:
        if not 0 < self.digit_size <= self.canvas:
            raise ConfigError(f"data.options.digit_size must be in (0, canvas={self.canvas}]")
        if self.snap < 1:
            raise ConfigError("data.options.snap must be at least 1")
        if not 1 <= self.fragment_min <= self.fragment_max <= GLYPH:
            raise ConfigError(f"data.options: need 1 <= fragment_min <= fragment_max <= {GLYPH}")
        if self.val_fraction <= 0 or self.test_fraction <= 0 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("data.options: val_fraction and test_fraction must be > 0 and sum below 1")
        if self.n_distractors < 0 or self.noise < 0 or (self.max_offset is not None and self.max_offset < 0):
            raise ConfigError("data.options: n_distractors, noise and max_offset must not be negative")
        if min(self.canvases_train, self.canvases_val, self.canvases_test) < 1:
            raise ConfigError("data.options: canvases_train, canvases_val and canvases_test must be at least 1")

    def canvases_per_source(self, split: str) -> int:
        return int(getattr(self, f"canvases_{split}"))


def parse_options(options: dict[str, Any] | None) -> DigitsOptions:
    """Strictly parse ``data.options`` (unknown keys are a ConfigError)."""
    return from_dict(DigitsOptions, options or {}, "data.options")


def load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits: glyphs [1797, 8, 8] float32 in [0, 1] and labels [1797] int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def split_sources(labels: np.ndarray, opts: DigitsOptions) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified, sorted index sets into the source glyphs for train / val / test."""
    rng = np.random.default_rng(opts.split_seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(idx) * opts.test_fraction)
        n_val = round(len(idx) * opts.val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


# ---- rendering (numpy: many small single-threaded ops beat torch's thread pool on a busy CPU) ----
def place(glyphs: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: int, canvas: int) -> np.ndarray:
    """Enlarge glyphs [K, 8, 8] to ``size`` px with top-left corner (x0, y0) on a blank canvas.

    Returns [K, canvas, canvas]. Scale and shift are axis-aligned, so bilinear resampling (zero outside
    the glyph, as ``grid_sample`` with zero padding) separates into Wy [K, canvas, 8] @ glyph @ Wx^T.
    """
    wy = _bilinear_weights(y0, size, canvas)
    wx = _bilinear_weights(x0, size, canvas)
    return wy @ glyphs @ wx.transpose(0, 2, 1)


def _bilinear_weights(offset: np.ndarray, size: int, canvas: int) -> np.ndarray:
    """[K, canvas, 8] weights of source pixels for each output pixel."""
    centre = np.arange(canvas, dtype=np.float32) + 0.5
    src = (centre - np.asarray(offset, dtype=np.float32)[:, None]) * (GLYPH / size) - 0.5  # [K, canvas]
    return np.maximum(1 - np.abs(src[:, :, None] - np.arange(GLYPH, dtype=np.float32)), 0)


def _fragments(
    glyphs: np.ndarray, rng: np.random.Generator, opts: DigitsOptions, tries: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Mask glyphs [K, 8, 8] to a random rectangle; returns masked glyphs and boxes [K, 4] (r, c, h, w).

    A crop that catches almost no ink is redrawn (up to ``tries`` times): an empty fragment is no clutter.
    """
    boxes = np.zeros((glyphs.shape[0], 4), dtype=np.int64)
    todo = np.arange(glyphs.shape[0])
    for _ in range(tries):
        h = rng.integers(opts.fragment_min, opts.fragment_max + 1, len(todo))
        w = rng.integers(opts.fragment_min, opts.fragment_max + 1, len(todo))
        boxes[todo] = np.stack([rng.integers(0, GLYPH - h + 1), rng.integers(0, GLYPH - w + 1), h, w], 1)
        ink = (glyphs[todo] * _box_masks(boxes[todo])).sum(axis=(1, 2))
        todo = todo[ink < 0.15 * h * w]
        if len(todo) == 0:
            break
    return glyphs * _box_masks(boxes), boxes


def _box_masks(boxes: np.ndarray) -> np.ndarray:
    """[K, 8, 8] float32 masks of the rectangles boxes [K, 4] = (r, c, h, w)."""
    rows = np.arange(GLYPH)
    r, c, h, w = (boxes[:, i, None] for i in range(4))
    in_r = (rows >= r) & (rows < r + h)
    in_c = (rows >= c) & (rows < c + w)
    return (in_r[:, :, None] & in_c[:, None, :]).astype(np.float32)


def _fragment_positions(
    digit_xy: np.ndarray, frag_wh: np.ndarray, rng: np.random.Generator, opts: DigitsOptions, tries: int = 64
) -> np.ndarray:
    """Top-left [K, 2] (x, y) of each fragment's visible box; off the digit box unless ``opts.overlap``."""
    hi = opts.canvas - frag_wh + 1
    xy = rng.integers(0, hi)
    if opts.overlap:
        return xy
    for _ in range(tries):
        hit = np.all((xy < digit_xy + opts.digit_size) & (xy + frag_wh > digit_xy), axis=1)
        if not hit.any():
            break
        xy[hit] = rng.integers(0, hi[hit])
    return xy


def render(
    glyphs: np.ndarray, sources: np.ndarray, pool: np.ndarray, opts: DigitsOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render one canvas per entry of ``sources`` (indices into glyphs [S, 8, 8]).

    Distractor fragments are cut from other glyphs of ``pool`` (sorted indices of the same split, so
    no image crosses splits). Returns canvases [M, canvas, canvas] in about [0, 1], without noise,
    and the digit's top-left corner [M, 2] (x, y) in pixels.
    """
    m, size, canvas = len(sources), opts.digit_size, opts.canvas
    lo, hi = 0, canvas - size
    if opts.max_offset is not None:
        lo, hi = max(lo, hi // 2 - opts.max_offset), min(hi, hi // 2 + opts.max_offset)
    digit_xy = rng.integers(-(-lo // opts.snap), hi // opts.snap + 1, (m, 2)) * opts.snap
    image = place(glyphs[sources], digit_xy[:, 0], digit_xy[:, 1], size, canvas)
    scale = size / GLYPH
    for _ in range(opts.n_distractors):
        other = pool[rng.integers(0, len(pool), m)]
        other = np.where(other == sources, pool[(np.searchsorted(pool, other) + 1) % len(pool)], other)
        frags, boxes = _fragments(glyphs[other], rng, opts)
        frag_wh = np.ceil(boxes[:, [3, 2]] * scale).astype(np.int64)
        xy = _fragment_positions(digit_xy, frag_wh, rng, opts)
        # Shift so that the fragment's visible box (not its whole glyph) lands at xy.
        x0 = xy[:, 0] - boxes[:, 1] * scale
        y0 = xy[:, 1] - boxes[:, 0] * scale
        np.maximum(image, place(frags, x0, y0, size, canvas), out=image)
    return image, digit_xy


def make_canvases(
    glyphs: np.ndarray, sources: np.ndarray, pool: np.ndarray, opts: DigitsOptions, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised images [M, 1, canvas, canvas] float32 and digit corners [M, 2] (x, y), deterministic in seed."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(sources), 1, opts.canvas, opts.canvas), dtype=np.float32)
    corners = np.empty((len(sources), 2), dtype=np.int64)
    # Fixed-size chunks keep temporaries cache-sized; the chunk size is a constant so the random
    # stream, hence every image, does not depend on it.
    for start in range(0, len(sources), CHUNK):
        image, corners[start : start + CHUNK] = render(glyphs, sources[start : start + CHUNK], pool, opts, rng)
        if opts.noise > 0:
            image += opts.noise * rng.standard_normal(image.shape, dtype=np.float32)
        out[start : start + CHUNK, 0] = (image - MEAN) / STD
    return torch.from_numpy(out), corners


def make_images(
    glyphs: np.ndarray, sources: np.ndarray, pool: np.ndarray, opts: DigitsOptions, seed: int
) -> torch.Tensor:
    """Normalised images [M, 1, canvas, canvas] float32 for the given source indices, deterministic in seed."""
    return make_canvases(glyphs, sources, pool, opts, seed)[0]


def sources_for(split: str, idx: np.ndarray, opts: DigitsOptions, copies: int | None = None) -> np.ndarray:
    """Source index of every canvas of a split: the split's sources, repeated ``copies`` times over."""
    copies = opts.canvases_per_source(split) if copies is None else copies
    return np.tile(idx, copies)


def split_seed(split: str, run_seed: int, opts: DigitsOptions) -> int:
    """Seed of a split's canvases: the run seed for train, the fixed split seed for val/test."""
    base = run_seed if split == "train" else opts.split_seed
    return int(np.random.SeedSequence([base, SPLITS.index(split), 7919]).generate_state(1)[0])


def build_splits(options: dict[str, Any] | None, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(images [M, 1, C, C], labels [M]) per split of digits-cluttered."""
    opts = parse_options(options)
    glyphs, labels = load_glyphs()
    out = {}
    for split, idx in split_sources(labels, opts).items():
        src = sources_for(split, idx, opts)
        out[split] = (make_images(glyphs, src, idx, opts, split_seed(split, seed, opts)), torch.from_numpy(labels[src]))
    return out


def source_groups(options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """[M] long source-digit index of every canvas, per split, in the row order of :func:`build_splits`.

    A source is drawn on several canvases (``canvases_<split>``), so its rows are not independent samples:
    confidence intervals resample sources, not canvases.
    """
    opts = parse_options(options)
    _, labels = load_glyphs()
    return {split: torch.from_numpy(sources_for(split, idx, opts)) for split, idx in split_sources(labels, opts).items()}


def options_dict(options: dict[str, Any] | None) -> dict[str, Any]:
    """The fully resolved options (defaults filled in): what cache keys and run records use."""
    return dataclasses.asdict(parse_options(options))


def match_backbone(images: torch.Tensor, backbone: Any) -> torch.Tensor:
    """Fit grey canvases [M, 1, C, C] to a backbone's input: channels repeated for RGB models (a view).

    A canvas of another size than the model's input is a UserError naming both fixes.
    """
    if backbone is None:
        return images
    model = getattr(backbone, "model", None)
    embed = getattr(model, "patch_embed", None)
    config = getattr(backbone, "config", None)
    if embed is not None:
        channels, size = int(embed.proj.in_channels), tuple(int(s) for s in embed.img_size)
    elif config is not None and getattr(backbone, "is_vision", False):
        channels, size = int(config.num_channels), (int(config.image_size),) * 2
    else:
        raise UserError("digits-cluttered is an image dataset: its backbone must be a vision model")
    if size != tuple(images.shape[-2:]):
        raise UserError(
            f"digits-cluttered canvas {images.shape[-1]} does not match the backbone's input {size[0]}: "
            "set data.options.canvas or the model's img_size"
        )
    return images if channels == images.shape[1] else images.expand(-1, channels, -1, -1)
