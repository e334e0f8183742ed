"""Users' own data: image folders (class per subfolder) and Hugging Face ``datasets``.

Images go through the backbone's own eval preprocessing (timm's ``resolve_data_config`` +
``create_transform``) so that pruning is evaluated on exactly what the model was trained to see.
Splits the source does not provide are carved from its train split, stratified, with
``data.options.split_seed`` (default 0, not the run seed: every run evaluates the same rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy_prune.config import ConfigError, DataConfig, from_dict
from policy_prune.core import hub
from policy_prune.data.split import SPLIT_NAMES, Split
from policy_prune.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation", "valid", "dev"), "test": ("test",)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class SplitOptions:
    """``data.options`` for image folders and HF datasets: how missing splits are carved out."""

    val_fraction: float = 0.1
    """Share of the train rows moved to val when the source has no val split."""
    test_fraction: float = 0.1
    """Share of the train rows moved to test when the source has no test split."""
    split_seed: int = 0
    """Seed of that carving and of the ``max_samples`` subsets (independent of the run seed)."""

    def __post_init__(self) -> None:
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("data.options: val_fraction and test_fraction must be >= 0 and sum below 1")


def split_options(cfg: DataConfig) -> SplitOptions:
    return from_dict(SplitOptions, cfg.options, "data.options")


# ---- splitting -------------------------------------------------------------------------------------
def carve(labels: np.ndarray | None, n: int, missing: Sequence[str], opts: SplitOptions) -> dict[str, np.ndarray]:
    """Row indices for "train" plus each missing held-out split, stratified by label when there are labels."""
    rng = np.random.default_rng(opts.split_seed)
    fractions = {"val": opts.val_fraction, "test": opts.test_fraction}
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    out: dict[str, list[np.ndarray]] = {s: [] for s in ("train", *missing)}
    for group in groups:
        idx = rng.permutation(group)
        start = 0
        for split in missing:
            count = int(round(len(idx) * fractions[split]))
            out[split].append(idx[start : start + count])
            start += count
        out["train"].append(idx[start:])
    return {s: np.sort(np.concatenate(parts)) for s, parts in out.items()}


def subset(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of at most ``max_samples`` of ``n`` rows."""
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_samples])


# ---- image preprocessing -----------------------------------------------------------------------------
def image_transform(cfg: DataConfig, backbone: Any = None) -> Callable[[Any], torch.Tensor]:
    """PIL image -> [C, H, W] float32 the way the backbone's eval pipeline prepares it."""
    from timm.data import create_transform, resolve_data_config

    model = getattr(backbone, "model", None)
    hf_config = getattr(backbone, "config", None)
    data_cfg: dict[str, Any]
    if hf_config is not None and getattr(backbone, "is_vision", False):
        # HF ViTs normalise with mean = std = 0.5 by default (ViTImageProcessor); no processor is loaded.
        size = getattr(hf_config, "image_size", 224)
        data_cfg = {"input_size": (hf_config.num_channels, size, size), "interpolation": "bilinear",
                    "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    elif model is not None:
        data_cfg = resolve_data_config({}, model=model)
        embed = getattr(model, "patch_embed", None)
        if embed is not None and getattr(embed, "img_size", None) is not None:
            # The pretrained cfg says 224 even for a model built with another img_size / in_chans.
            data_cfg["input_size"] = (int(embed.proj.in_channels), *(int(s) for s in embed.img_size))
    else:
        data_cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                    "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center"}
    if cfg.image_size is not None:
        data_cfg = {**data_cfg, "input_size": (data_cfg["input_size"][0], cfg.image_size, cfg.image_size)}
    channels = data_cfg["input_size"][0]
    mean, std = tuple(data_cfg["mean"])[:channels], tuple(data_cfg["std"])[:channels]
    transform = create_transform(**{**data_cfg, "mean": mean, "std": std}, is_training=False)
    mode = "L" if channels == 1 else "RGB"
    return lambda image: transform(image.convert(mode))


def stack_images(images: Sequence[Any], transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """[M, C, H, W] float32 from PIL images (or paths to them)."""
    from PIL import Image

    def one(item: Any) -> torch.Tensor:
        if isinstance(item, str | Path):
            try:
                img = Image.open(item)
            except (OSError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
                raise UserError(f"{item}: not a readable image ({type(exc).__name__}); remove it from the folder") from None
            with img:
                return transform(img)
        return transform(item)

    if not len(images):
        return torch.empty(0, *one(Image.new("RGB", (8, 8))).shape)
    return torch.stack([one(item) for item in images])


# ---- image folders -------------------------------------------------------------------------------------
def _class_files(root: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if (root / alias).is_dir():
                found[split] = root / alias
                break
    return found if "train" in found else {}


def imagefolder_files(root: Path, opts: SplitOptions) -> dict[str, tuple[list[Path], np.ndarray]]:
    """Files and labels per split of a class-per-subfolder tree (optionally under train/val/test)."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    dirs = _split_dirs(root) or {"train": root}
    classes = sorted(p.name for p in dirs["train"].iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{dirs['train']}: expected one subfolder of images per class")
    per_split = {s: _class_files(d, classes) for s, d in dirs.items()}
    if not len(per_split["train"][0]):
        raise UserError(f"{dirs['train']}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    # A class folder is a label by its place in the sorted list: an empty one shifted every label after it (a
    # 3-class model scored 0.000 without a word), and one class is no classification.
    empty = [c for i, c in enumerate(classes) if not (per_split["train"][1] == i).any()]
    if empty:
        raise UserError(f"{dirs['train']}: class folder{'s' if len(empty) > 1 else ''} without images: {', '.join(empty)} "
                        "(each subfolder is a class, its label its place in sorted order; remove it or add images)")
    if len(classes) < 2:
        raise UserError(f"{dirs['train']}: one class folder ({classes[0]}); a classifier's folder holds one subfolder per class")
    missing = [s for s in ("val", "test") if s not in per_split]
    if missing:
        files, labels = per_split["train"]
        idx = carve(labels, len(files), missing, opts)
        per_split.update({s: ([files[i] for i in ix], labels[ix]) for s, ix in idx.items()})
    return per_split


def load_imagefolder(cfg: DataConfig, seed: int, backbone: Any = None, tokenizer: Any = None) -> dict[str, Split]:
    """``imagefolder:<path>``: labelled image splits, preprocessed for ``backbone``."""
    opts = split_options(cfg)
    root = Path(cfg.dataset.removeprefix("imagefolder:")).expanduser()
    per_split = imagefolder_files(root, opts)
    outputs = getattr(getattr(backbone, "model", None), "num_classes", None)
    classes = int(per_split["train"][1].max()) + 1
    if isinstance(outputs, int) and 0 < outputs < classes:  # labels past the head's outputs: accuracy is meaningless
        raise UserError(f"{root}: {classes} class folders, but the model's head has {outputs} outputs "
                        "(env.backbone.model_kwargs.num_classes)")
    transform = image_transform(cfg, backbone)
    out = {}
    for split in SPLIT_NAMES:
        files, labels = per_split[split]
        keep = subset(len(files), cfg.max_samples, opts.split_seed)
        images = stack_images([files[i] for i in keep], transform)
        out[split] = Split(split, images, torch.from_numpy(labels[keep]))
    return out


# ---- Hugging Face datasets -------------------------------------------------------------------------------
def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """"hf:<name>[:<config>][:<split>]" -> (name, config or None, split or None); a name "~/..." is the
    folder in your home (``datasets`` would take it for a hub id)."""
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad dataset spec {spec!r}: expected hf:<name>[:<config>][:<split>]")
    parts += [""] * (3 - len(parts))
    return hub.model_ref(parts[0]), parts[1] or None, parts[2] or None


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: datasets need the 'datasets' package: pip install datasets") from None
    return datasets


def hf_splits(spec: str, opts: SplitOptions, label_column: str | None) -> dict[str, Any]:
    """The dataset's own splits mapped to train/val/test, missing held-out splits carved from train."""
    datasets = _import_datasets()
    name, config, split = parse_hf_spec(spec)
    try:
        with hub.fetching(name, "dataset"):
            loaded = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    found = {s: loaded[a] for s, aliases in SPLIT_ALIASES.items() for a in aliases if a in loaded}
    if "train" not in found:
        if len(loaded) != 1:
            raise UserError(f"dataset {name!r} has splits {sorted(loaded)}; name one with hf:{name}:<config>:<split>")
        found = {"train": next(iter(loaded.values()))}
    missing = [s for s in ("val", "test") if s not in found]
    if missing:
        train = found["train"]
        label = _label_name(train, label_column)
        idx = carve(np.asarray(train[label]) if label else None, len(train), missing, opts)
        found.update({s: train.select(ix) for s, ix in idx.items()})
    return found


def _label_name(ds: Any, column: str | None) -> str | None:
    """``column`` if the dataset has it, else None (label-free)."""
    return column if column is not None and column in ds.column_names else None


def _labels(values: Sequence[Any], classes: list[Any] | None) -> torch.Tensor:
    """[M] long class ids: integers as they are, other labels (e.g. strings) by index in ``classes``."""
    if classes is None:
        return torch.as_tensor(np.asarray(values, dtype=np.int64))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[v] for v in values], dtype=torch.long)


def _class_list(splits: dict[str, Any], label: str) -> list[Any] | None:
    """Sorted label values when they are not integers (they then need an index), else None."""
    values = [v for ds in splits.values() for v in ds[label]]
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return None
    return sorted(set(values), key=str)


def load_hf(cfg: DataConfig, seed: int, backbone: Any = None, tokenizer: Any = None) -> dict[str, Split]:
    """``hf:<name>[:<config>][:<split>]``: text (tokenised) or image (preprocessed) splits."""
    from policy_prune.data.text import common_width, pad_id, tokenize

    opts = split_options(cfg)
    splits = hf_splits(cfg.dataset, opts, cfg.label_column)
    splits = {s: ds.select(subset(len(ds), cfg.max_samples, opts.split_seed)) for s, ds in splits.items()}
    columns = splits["train"].column_names
    is_text = cfg.text_column in columns
    if not is_text and cfg.image_column not in columns:
        raise UserError(
            f"dataset {cfg.dataset!r} has neither text_column {cfg.text_column!r} nor image_column "
            f"{cfg.image_column!r} (columns: {', '.join(columns)})"
        )
    if is_text and tokenizer is None:
        raise UserError(f"dataset {cfg.dataset!r} is text: its backbone must come with a tokenizer")
    transform = None if is_text else image_transform(cfg, backbone)
    label = _label_name(splits["train"], cfg.label_column)
    classes = _class_list(splits, label) if label else None
    if is_text:  # one width for every split (common_width: an env sized by train reads val and test too)
        inputs: dict[str, Any] = common_width({s: tokenize([str(t) for t in splits[s][cfg.text_column]], tokenizer,
                                                            cfg.max_length) for s in SPLIT_NAMES}, pad_id(tokenizer))
    else:
        inputs = {s: stack_images(splits[s][cfg.image_column], transform) for s in SPLIT_NAMES}  # type: ignore[arg-type]
    return {s: Split(s, inputs[s], _labels(splits[s][label], classes) if label else None) for s in SPLIT_NAMES}
