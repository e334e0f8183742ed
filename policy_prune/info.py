"""``policy-prune info``: versions, shipped presets and adapters; runs a tiny pruned forward as a self-check."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the self-check's random model")


def self_check(seed: int) -> tuple[float, float]:
    """Prune half the tokens of a tiny random timm ViT; returns (keep-all max error, FLOPs ratio)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from policy_prune.core.backbones import adapt
    from policy_prune.evaluation.bench import random_keep_fn

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    backbone = adapt(model)
    x = backbone.example_inputs(2, torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        err = float((backbone(x) - model(x)).abs().max())
        _, state, counts = backbone.forward_pruned(x, [1], random_keep_fn(0.5, seed))
    ratio = backbone.schedule_flops([1], [int(counts[0][0])], state.n_full) / backbone.full_flops(state.n_full)
    return err, float(ratio)


def run(args: argparse.Namespace) -> int:
    import gymnasium
    import stable_baselines3
    import timm
    import torch
    import transformers
    from rich.table import Table

    from policy_prune import __version__
    from policy_prune.config import preset_names
    from policy_prune.console import make_console
    from policy_prune.core.backbones import BACKBONES

    table = Table(title=f"policy-prune {__version__}", show_header=False)
    for name, mod in (("torch", torch), ("timm", timm), ("transformers", transformers),
                      ("gymnasium", gymnasium), ("stable-baselines3", stable_baselines3)):
        table.add_row(name, mod.__version__)
    table.add_row("adapters", ", ".join(BACKBONES))
    table.add_row("env presets", ", ".join(preset_names("envs")))
    table.add_row("agent presets", ", ".join(preset_names("agents")) or "-")
    err, ratio = self_check(args.seed)
    table.add_row("self-check", f"keep-all max |diff| {err:.1e}; half tokens dropped at block 1 -> FLOPs ratio {ratio:.3f}")
    make_console().print(table)
    return 0 if err < 1e-4 else 1
