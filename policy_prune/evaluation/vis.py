"""Pictures of what each method keeps: ``kept.png`` for images, ``kept.html`` for text.

A picture catches a broken baseline faster than a table (ToMe ships ``vis.py`` for the same reason).
Images: a grid with one row per method and, for each of a few val samples, one column per pruning
site, showing the tokens entering that site's block at one budget: dropped patches darkened, merged
patches tinted by their group's colour, patches fused into EViT's extra token hatched, kept patches
clear. Text: the same per method and site, as coloured words in an HTML page.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from policy_prune.core.backbones.base import TokenBackbone
from policy_prune.core.features import token_layout
from policy_prune.core.ops import to_device, trim_padding
from policy_prune.evaluation.baselines import Method
from policy_prune.evaluation.solve import Point


def method_points(methods: Sequence[Method], results: dict[str, Any], target: float) -> list[tuple[Method, Point]]:
    """Each method (a learned method from its first run only) at ``target``, as scored in ``results``."""
    picked: list[tuple[Method, Point]] = []
    seen: set[str] = set()
    for m in methods:
        if not m.sweeps or m.name in seen:
            continue
        row = next((r for r in results["results"] if r["method"] == m.name and r["run"] == m.run
                    and r["target"] is not None and abs(r["target"] - target) < 1e-9), None)
        if row is not None:
            seen.add(m.name)
            picked.append((m, Point(row["rule"], list(row["values"]), target, budget=row.get("told"))))
    return picked


def groupings(backbone: TokenBackbone, method: Method, point: Point, inputs: Any, sites: Sequence[int]) -> list[torch.Tensor]:
    """Per site: [B, n_full] slot of each embedded token entering that site's block (-1 dropped, -2 fused)."""
    watch: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        method.forward(backbone, inputs, point, watch)
    out = []
    for site in sites:
        before = [layer for layer in watch if layer <= site]
        if before:
            out.append(watch[max(before)].cpu())
        else:  # nothing reduced yet: every token in its own slot
            state = backbone.embed(inputs)
            slots = torch.arange(state.n_full).expand(state.valid.shape[0], -1)
            out.append(torch.where(state.valid.cpu(), slots, torch.full_like(slots, -1)))
    return out


def draw_kept(backbone: TokenBackbone, methods: Sequence[Method], results: dict[str, Any], split: Any, target: float,
              sites: Sequence[int], out_dir: Path, n_samples: int = 3, tokenizer: Any = None,
              device: str = "cpu") -> Path | None:
    """Write kept.png (images) or kept.html (text) for the first ``n_samples`` rows of ``split``; None (nothing
    written) where no method was scored at ``target`` (e.g. ``--methods none``)."""
    picks = method_points(methods, results, target)
    if not picks:
        return None
    sample = split.select(torch.arange(min(n_samples, len(split))))
    inputs = trim_padding(to_device(sample.inputs, device))
    maps = [(m.name, groupings(backbone, m, p, inputs, sites)) for m, p in picks]
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(inputs, dict):
        path = out_dir / "kept.html"
        path.write_text(text_page(inputs, maps, sites, tokenizer, target))
        return path
    path = out_dir / "kept.png"
    image_grid(backbone, inputs.cpu(), maps, sites, target, path)
    return path


def group_sizes(slots: torch.Tensor) -> torch.Tensor:
    """How many embedded tokens each slot holds, from [L] slots (-1 dropped and -2 fused count for none)."""
    alive = slots[slots >= 0]
    return torch.bincount(alive, minlength=int(slots.max().clamp_min(0)) + 1)


def patch_overlay(slots: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """[gh, gw, 4] RGBA over the patches of one sample from its [n_full] slots."""
    import matplotlib

    patches = slots[prefix : prefix + grid[0] * grid[1]]
    size = group_sizes(patches)
    rgba = torch.zeros(len(patches), 4)
    cmap = matplotlib.colormaps["tab20"]
    palette = [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19]  # tab20 without orange (fused) and grey
    for i, s in enumerate(patches.tolist()):
        if s == -1:
            rgba[i] = torch.tensor([0.0, 0.0, 0.0, 0.78])
        elif s == -2:
            rgba[i] = torch.tensor([1.0, 0.55, 0.0, 0.6])
        elif size[s] > 1:
            rgba[i] = torch.tensor([*cmap(palette[s % len(palette)])[:3], 0.55])
    return rgba.view(grid[0], grid[1], 4)


def image_grid(backbone: TokenBackbone, images: torch.Tensor, maps: Sequence[tuple[str, list[torch.Tensor]]],
               sites: Sequence[int], target: float, path: Path) -> None:
    """Rows = methods, columns = (sample, site); each cell the image under its patch overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix, grid = token_layout(backbone)
    assert grid is not None
    n_samples, n_sites = images.shape[0], len(sites)
    fig, axes = plt.subplots(len(maps), n_samples * n_sites, squeeze=False,
                             figsize=(1.6 * n_samples * n_sites, 1.7 * len(maps) + 0.6))
    h, w = images.shape[-2:]
    for row, (name, per_site) in enumerate(maps):
        for b in range(n_samples):
            for j, site in enumerate(per_site):
                ax = axes[row][b * n_sites + j]
                ax.imshow(images[b].float().mean(dim=0), cmap="gray", extent=(0, w, h, 0))
                ax.imshow(patch_overlay(site[b], prefix, grid).numpy(), extent=(0, w, h, 0), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"sample {b}, block {sites[j]}", fontsize=7)
                if b == 0 and j == 0:
                    ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"tokens entering each site's block at total FLOPs {target:g}: dark = dropped, "
                 "colour = merged group, orange = fused (EViT)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def text_page(inputs: dict[str, torch.Tensor], maps: Sequence[tuple[str, list[torch.Tensor]]], sites: Sequence[int],
              tokenizer: Any, target: float) -> str:
    """An HTML page: per sample, per method, per site, the words as kept (plain), dropped (grey, struck
    through), merged (tinted by group) or fused (orange)."""
    ids = inputs["input_ids"].cpu()
    palette = ["#8dd3c7", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f"]
    out = [f"<html><body style='font-family:sans-serif'><h3>Tokens entering each site's block at total FLOPs {target:g}</h3>",
           "<p>plain: kept; <span style='color:#aaa;text-decoration:line-through'>dropped</span>; "
           "<span style='background:#8dd3c7'>merged (one colour per group; hover: the group's words)</span>; "
           "<span style='background:orange'>fused into EViT's extra token</span></p>"]
    for b in range(ids.shape[0]):
        words = tokenizer.convert_ids_to_tokens(ids[b][inputs["attention_mask"][b].bool().cpu()].tolist()) if tokenizer else \
            [str(i) for i in ids[b].tolist()]
        out.append(f"<h4>sample {b}</h4><table>")
        for name, per_site in maps:
            for j, slots in enumerate(per_site):
                s = slots[b][: len(words)]
                size = group_sizes(s)
                members: dict[int, list[str]] = {}
                for word, slot in zip(words, s.tolist(), strict=True):
                    members.setdefault(slot, []).append(word)
                spans = []
                for word, slot in zip(words, s.tolist(), strict=True):
                    text = html.escape(word)
                    if slot == -1:
                        spans.append(f"<span style='color:#aaa;text-decoration:line-through'>{text}</span>")
                    elif slot == -2:
                        spans.append(f"<span style='background:orange'>{text}</span>")
                    elif size[slot] > 1:  # its group's words on hover: colours repeat across groups
                        group = html.escape(" ".join(members[slot]), quote=True)
                        spans.append(f"<span style='background:{palette[slot % len(palette)]}' title='one token: {group}'>{text}</span>")
                    else:
                        spans.append(text)
                out.append(f"<tr><td><b>{html.escape(name)}</b> block {sites[j]}</td><td>{' '.join(spans)}</td></tr>")
        out.append("</table>")
    return "\n".join(out + ["</body></html>"])
