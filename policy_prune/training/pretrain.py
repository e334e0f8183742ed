"""``policy-prune pretrain``: fit the embedded digits-vit backbone on digits-cluttered, then cache it frozen.

The model is a plain timm ``VisionTransformer`` (48x48x1 input, patch 4: 144 patch tokens + CLS, 6
blocks). Training draws fresh canvases of the train source digits every epoch (augmentation that costs
nothing: the data is procedural) and follows a context curriculum: first only the tokens of the digit,
then more and more of the cluttered canvas (see :func:`fit`). The checkpoint lands in the user cache
(``$POLICY_PRUNE_CACHE`` or ``~/.cache/policy-prune``) under a hash of everything that shaped it, written
atomically, so every later call (and every run) reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policy_prune.cli_args import positive
from policy_prune.config import EnvConfig, from_dict
from policy_prune.core.embedded_models import (
    CACHE_FORMAT,
    DIGITS_VIT,
    META,
    WEIGHTS,
    DigitsViTConfig,
    build_digits_vit,
    cache_path,
    load_digits_vit,
    read_meta,
)
from policy_prune.errors import UserError

EMBEDDED_SPEC = DIGITS_VIT
EVAL_ONLY_OPTIONS = ("canvases_train", "canvases_val", "canvases_test")
"""Data options that size the env's splits but never change the fitted weights: not part of the cache key."""
VAL_PEEK = 256
"""Val images scored after each epoch (progress display only)."""


@dataclass
class PretrainConfig:
    """How digits-vit is fitted (``backbone.pretrain``)."""

    epochs: int = 20
    """Passes over the train source digits, each on freshly drawn canvases."""
    canvases_per_source: int = 2
    """Canvases drawn per train source digit per epoch."""
    batch_size: int = 32
    """Images per optimiser step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 0)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    context_start: float = 0.3
    """Share of the steps that see only the digit's own tokens (cheap steps in which the digits are learnt)."""
    context_end: float = 0.6
    """Share of the steps by which the rest of the canvas is phased in; later steps see whole canvases."""
    max_train: int | None = None
    """Cap on training canvases per epoch (None: all; small values are for tests)."""
    max_eval: int | None = None
    """Cap on val/test canvases evaluated (None: all)."""
    seed: int = 0
    """Seed of the initialisation and training canvases; independent of a run's ``--seed`` (every RL seed
    prunes the same cached backbone)."""


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns."""

    backbone: Any
    """The frozen TimmViTBackbone (eval mode, no gradients)."""
    path: Path
    """Cache folder holding ``model.safetensors`` and ``model.json``."""
    metrics: dict[str, Any]
    """Accuracies, sizes and timings recorded with the checkpoint."""
    cached: bool
    """True when the checkpoint was already in the cache (nothing was trained)."""
    seed: int = 0
    """The pretraining seed the checkpoint was fitted with."""


# ---- configs and cache ---------------------------------------------------------------------------------
def configs(env_cfg: EnvConfig, epochs: int | None = None) -> tuple[DigitsViTConfig, PretrainConfig]:
    """The architecture and training configs of an env's digits-vit (strictly parsed)."""
    model_cfg = from_dict(DigitsViTConfig, env_cfg.backbone.model_kwargs, "backbone.model_kwargs")
    train_cfg = from_dict(PretrainConfig, env_cfg.backbone.pretrain, "backbone.pretrain")
    if epochs is not None:
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs)
    return model_cfg, train_cfg


def cache_record(model_cfg: DigitsViTConfig, train_cfg: PretrainConfig, data_options: dict[str, Any], seed: int) -> dict[str, Any]:
    """Everything that shapes the checkpoint: hashed into its folder name and stored beside it."""
    from policy_prune.data import digits

    data = {k: v for k, v in digits.options_dict(data_options).items() if k not in EVAL_ONLY_OPTIONS}
    return {
        "format": CACHE_FORMAT,
        "spec": EMBEDDED_SPEC,
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg),
        "data": data,
        "seed": seed,
    }


def _write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache file is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(folder: Path, model: Any, record: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Weights then JSON (the JSON's presence marks a complete checkpoint), each written atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, tmp))
    text = json.dumps({**record, "metrics": metrics}, indent=2, sort_keys=True)
    _write_atomic(folder / META, lambda tmp: Path(tmp).write_text(text))


# ---- model ----------------------------------------------------------------------------------------------
def load_cached(folder: Path) -> Any:
    """The frozen TimmViTBackbone stored in a cache folder (safetensors: no pickle on the load path)."""
    from policy_prune.core.backbones import TimmViTBackbone

    return TimmViTBackbone(load_digits_vit(folder), name=EMBEDDED_SPEC).eval()


# ---- training ---------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(
    epoch: int, seed: int, data: dict[str, Any], train_cfg: PretrainConfig
) -> Iterator[tuple[Any, Any, np.ndarray]]:
    """Fresh canvases of the train source digits for one epoch, shuffled into batches.

    Yields (images [b, 1, C, C], labels [b], digit corners [b, 2] (x, y) in pixels).
    """
    import torch

    from policy_prune.data import digits

    rng = np.random.default_rng([seed, epoch, 1])
    src = rng.permutation(np.tile(data["train_idx"], train_cfg.canvases_per_source))[: train_cfg.max_train]
    images, corners = digits.make_canvases(data["glyphs"], src, data["train_idx"], data["options"], int(rng.integers(2**31)))
    labels = torch.from_numpy(data["labels"][src])
    bs = train_cfg.batch_size
    for start in range(0, len(src) - bs + 1, bs):
        yield images[start : start + bs], labels[start : start + bs], corners[start : start + bs]


def steps_per_epoch(n_sources: int, train_cfg: PretrainConfig) -> int:
    n = n_sources * train_cfg.canvases_per_source
    if train_cfg.max_train is not None:
        n = min(n, train_cfg.max_train)
    return n // train_cfg.batch_size


def _fixed_keep(keep: Any) -> Any:
    """A keep function for `forward_pruned` that returns the same precomputed mask at every site."""

    def keep_fn(state: Any, i: int, layer: int) -> Any:
        return keep

    return keep_fn


def context_fraction(step: int, total: int, train_cfg: PretrainConfig) -> float:
    """Share of the non-digit tokens shown at ``step``: 0 until context_start, linear to 1 at context_end."""
    start, end = train_cfg.context_start * total, train_cfg.context_end * total
    if step >= end:
        return 1.0
    return max(0.0, (step - start) / max(1.0, end - start))


def digit_tokens(corners: np.ndarray, options: Any, patch: int) -> Any:
    """Patch indices [B, S*S] (row-major, without prefix tokens) of a fixed S x S block covering each digit.

    S is the digit's side in patches, plus one when digits are not aligned to the patch grid.
    """
    import torch

    grid = options.canvas // patch
    side = min(grid, -(-options.digit_size // patch) + (0 if options.snap % patch == 0 else 1))
    first = np.clip(corners // patch, 0, grid - side)  # [B, 2] (col, row) of the block's corner
    offsets = np.arange(side)
    rows = first[:, 1, None, None] + offsets[None, :, None]
    cols = first[:, 0, None, None] + offsets[None, None, :]
    return torch.from_numpy((rows * grid + cols).reshape(len(corners), -1))


def context_keep(blocks: Any, frac: float, n_patches: int, n_prefix: int, generator: Any) -> Any:
    """Keep mask [B, n_prefix + n_patches]: prefix tokens, the digit block and ``frac`` of the other patches.

    Every row keeps the same count, so the pruned batch needs no padding mask (the fast attention path).
    """
    import torch

    b = blocks.shape[0]
    keep = torch.zeros(b, n_prefix + n_patches, dtype=torch.bool)
    keep[:, :n_prefix] = True
    keep.scatter_(1, blocks + n_prefix, True)
    n_extra = round(frac * (n_patches - blocks.shape[1]))
    if n_extra:
        score = torch.rand(b, n_prefix + n_patches, generator=generator).masked_fill(keep, -1.0)
        keep.scatter_(1, score.topk(n_extra, dim=1).indices, True)
    return keep


def accuracy(model: Any, images: Any, labels: Any, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` on images [M, C, H, W] with labels [M]."""
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pred = model(images[start : start + batch]).argmax(dim=-1)
            correct += int((pred == labels[start : start + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]pretrain digits-vit[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def fit(model: Any, data: dict[str, Any], train_cfg: PretrainConfig, seed: int, console: Any,
        progress: Any = None) -> dict[str, Any]:
    """Train ``model`` in place with the context curriculum; returns loss and val accuracy per epoch.

    Early steps see only the tokens of the digit's block (through the TimmViTBackbone's own prune
    path, so they are cheap), then a growing random share of the rest of the canvas, then whole
    canvases. A ViT trained on whole cluttered canvases from the start has to discover the digit
    among ~10x more clutter tokens and stalls at chance for hundreds of steps.
    """
    import torch
    import torch.nn.functional as F

    from policy_prune.core.backbones import TimmViTBackbone

    per_epoch = steps_per_epoch(len(data["train_idx"]), train_cfg)
    total = per_epoch * train_cfg.epochs
    if total == 0:
        raise UserError("pretrain: no training steps (raise epochs or max_train, or lower batch_size)")
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, train_cfg.warmup_steps))
    adapter = TimmViTBackbone(model)
    gen = torch.Generator().manual_seed(seed)
    patch, n_patches = model.patch_embed.patch_size[0], model.patch_embed.num_patches
    history: dict[str, list[float]] = {"loss": [], "val_acc": []}
    step, peek = 0, ""
    model.train()
    # ``progress``: a caller's rich Progress (``policy-prune train`` shows fitting and training on one display).
    with nullcontext(progress) if progress is not None else _progress(console) as progress:
        task = progress.add_task(f"fit {EMBEDDED_SPEC}", total=total, status="")
        for epoch in range(train_cfg.epochs):
            losses = []
            for x, y, corners in epoch_batches(epoch, seed, data, train_cfg):
                frac = context_fraction(step, total, train_cfg)
                if frac < 1.0:
                    keep = context_keep(digit_tokens(corners, data["options"], patch), frac, n_patches,
                                        model.num_prefix_tokens, gen)
                    logits = adapter.forward_pruned(x, [0], _fixed_keep(keep))[0]
                else:
                    logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=train_cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                progress.update(task, advance=1, status=f"ep {epoch + 1}/{train_cfg.epochs} loss {losses[-1]:.2f}{peek}")
            history["loss"].append(float(np.mean(losses)))
            # A quick look for the progress bar; the full val/test accuracies are measured at the end.
            history["val_acc"].append(accuracy(model, data["val"][0][:VAL_PEEK], data["val"][1][:VAL_PEEK]))
            peek = f" val {history['val_acc'][-1]:.3f}"
    return history


def load_data(data_options: dict[str, Any], max_eval: int | None) -> dict[str, Any]:
    """Source glyphs, the train source indices and the fixed val/test canvases of digits-cluttered."""
    import torch

    from policy_prune.data import digits

    opts = digits.parse_options(data_options)
    glyphs, labels = digits.load_glyphs()
    idx = digits.split_sources(labels, opts)
    data: dict[str, Any] = {"glyphs": glyphs, "labels": labels, "train_idx": idx["train"], "options": opts}
    for split in ("val", "test"):
        src = digits.sources_for(split, idx[split], opts)[:max_eval]
        images = digits.make_images(glyphs, src, idx[split], opts, digits.split_seed(split, 0, opts))
        data[split] = (images, torch.from_numpy(labels[src]))
    return data


# ---- public entry points ------------------------------------------------------------------------------------
def checkpoint_for(env_cfg: EnvConfig, seed: int | None = None,
                   epochs: int | None = None) -> tuple[DigitsViTConfig, PretrainConfig, dict[str, Any], Path]:
    """(architecture, training settings, cache record, cache folder) of an env's digits-vit.

    ``seed`` overrides ``backbone.pretrain.seed`` (default 0), ``epochs`` ``backbone.pretrain.epochs``.
    """
    if env_cfg.backbone.spec != EMBEDDED_SPEC:
        raise UserError(f"pretrain fits the embedded {EMBEDDED_SPEC!r} backbone; env {env_cfg.name!r} uses {env_cfg.backbone.spec!r}")
    if env_cfg.data.dataset != "digits-cluttered":
        raise UserError(f"{EMBEDDED_SPEC} is fitted on digits-cluttered, not {env_cfg.data.dataset!r}")
    model_cfg, train_cfg = configs(env_cfg, epochs)
    if seed is not None:
        train_cfg = dataclasses.replace(train_cfg, seed=seed)
    record = cache_record(model_cfg, train_cfg, env_cfg.data.options, train_cfg.seed)
    return model_cfg, train_cfg, record, cache_path(record)


def cached(env_cfg: EnvConfig, seed: int | None = None, epochs: int | None = None) -> PretrainResult | None:
    """The env's digits-vit from the cache, or None if it was never fitted with these settings.

    Needs only the inference install (no rich, no scikit-learn): ``policy_prune.load_backbone`` calls it.
    """
    _, train_cfg, _, folder = checkpoint_for(env_cfg, seed, epochs)
    meta = read_meta(folder)
    if meta is None:
        return None
    return PretrainResult(load_cached(folder), folder, meta["metrics"], cached=True, seed=train_cfg.seed)


def pretrain(
    env_cfg: EnvConfig, seed: int | None = None, force: bool = False, epochs: int | None = None, console: Any = None,
    progress: Any = None,
) -> PretrainResult:
    """Get digits-vit from the cache, or fit and cache it (``force``: fit again regardless).

    ``seed`` overrides ``backbone.pretrain.seed`` (default 0); ``progress``: a rich Progress to show the
    fitting on (``policy-prune train`` shows fitting and training on one display).
    """
    hit = None if force else cached(env_cfg, seed, epochs)
    if hit is not None:
        return hit
    import torch

    from policy_prune.console import make_console
    from policy_prune.core.backbones import TimmViTBackbone

    console = console or make_console()
    model_cfg, train_cfg, record, folder = checkpoint_for(env_cfg, seed, epochs)
    seed = train_cfg.seed
    start = time.perf_counter()
    data = load_data(env_cfg.data.options, train_cfg.max_eval)
    # A private RNG stream: pretraining is reproducible from its seed and leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_digits_vit(model_cfg, data["options"].canvas)
        history = fit(model, data, train_cfg, seed, console, progress)
    model.eval().requires_grad_(False)
    metrics = {
        "test_acc": accuracy(model, *data["test"]),
        "val_acc": accuracy(model, *data["val"]),
        "history": history,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": int(model.patch_embed.num_patches + model.num_prefix_tokens),
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_checkpoint(folder, model, record, metrics)
    return PretrainResult(TimmViTBackbone(model, name=EMBEDDED_SPEC).eval(), folder, metrics, cached=False, seed=seed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="digits-vit", help="env preset name or YAML path (its backbone must be digits-vit)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the model initialisation and training canvases (default: backbone.pretrain.seed, 0)")
    p.add_argument("--force", action="store_true", help="fit again even if a cached checkpoint exists")
    p.add_argument("--epochs", type=positive, default=None, help="override backbone.pretrain.epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an env preset key as train takes it, e.g. --set env.backbone.pretrain.lr=0.002 "
                        "(the env. prefix may be left out; repeatable)")


def env_overrides(overrides: list[str]) -> list[str]:
    """``--set`` overrides of the env preset, written as train takes them (``env.backbone...``) or without the
    ``env.`` prefix; UserError for the keys of another section (agent., train.)."""
    keys = []
    for item in overrides:
        item = item.strip()
        scope, dot, rest = item.partition(".")
        if dot and rest and scope in ("agent", "train"):
            raise UserError(f"--set {item}: {scope}. keys set the RL run; pretrain fits the env's backbone "
                            "(env.backbone.pretrain.*, env.data.*)")
        keys.append(rest if scope == "env" and dot and rest else item)
    return keys


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from policy_prune.config import load_env_config
    from policy_prune.console import make_console

    console = make_console()
    env_cfg = load_env_config(args.env, env_overrides(args.overrides))
    if env_cfg.backbone.spec != EMBEDDED_SPEC:
        console.print(f"env {env_cfg.name!r} uses backbone {env_cfg.backbone.spec!r}: nothing to pretrain "
                      f"(only the embedded {EMBEDDED_SPEC!r} is fitted here)")
        return 0
    if args.epochs is not None and args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    result = pretrain(env_cfg, seed=args.seed, force=args.force, epochs=args.epochs, console=console)
    m = result.metrics
    if result.cached:
        console.print(f"cached: {result.path} (trained in {m['seconds']} s); use --force to fit again")
    table = Table(title=f"digits-vit (seed {result.seed})", show_header=False)
    table.add_row("test accuracy", f"{m['test_acc']:.4f}")
    table.add_row("val accuracy", f"{m['val_acc']:.4f}")
    table.add_row("tokens", f"{m['tokens']} (patches + CLS)")
    table.add_row("parameters", f"{m['params']:,}")
    table.add_row("fit time", f"{m['seconds']} s")
    table.add_row("checkpoint", str(result.path))
    console.print(table)
    if m["test_acc"] < 0.9:
        console.print(f"[yellow]warning: test accuracy {m['test_acc']:.3f} is below 0.90; "
                      "consider more epochs (--epochs) before training pruning policies[/]")
    return 0
