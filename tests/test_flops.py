"""Analytic FLOPs agree with torch's FlopCounterMode on the real shapes (within 2%)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from policy_prune.core.backbones import adapt
from tests import tiny


def _counted(fn) -> int:
    # CPU flash attention is invisible to FlopCounterMode; the math backend decomposes SDPA into the
    # two counted matmuls, so the N^2 terms are measured rather than assumed.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-deit-distilled", "hf-bert", "hf-distilbert", "hf-vit-classifier"])
@pytest.mark.parametrize("n_keep", [None, 9, 4, 1])
def test_block_flops_agree_with_flop_counter(name: str, n_keep: int | None) -> None:
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name, batch=1)
    state = backbone.embed(x)
    if n_keep is not None:
        keep = torch.zeros_like(state.valid)
        keep[:, :n_keep] = True
        state = state.prune(keep)
    n = int(state.alive_counts[0])
    counted = _counted(lambda: backbone.run_blocks(state, 0, 1))
    assert abs(backbone.block_flops(n) - counted) <= 0.02 * counted


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-vit-reg-gap", "hf-vit-classifier", "hf-bert"])
def test_full_model_and_schedule_flops_agree(name: str) -> None:
    model = tiny.make(name)
    backbone = adapt(model)
    x = tiny.inputs(name, batch=1)
    n = backbone.embed(x).n_full
    counted_full = _counted(lambda: tiny.original_output(name, model, x))
    assert abs(backbone.full_flops(n) - counted_full) <= 0.02 * counted_full

    def keep_fn(state, i, layer):
        keep = torch.zeros_like(state.valid)
        keep[:, : max(2, state.valid.shape[1] // 2)] = True
        return keep

    with torch.no_grad():
        _, _, counts = backbone.forward_pruned(x, [1, 2], keep_fn)
    counted = _counted(lambda: backbone.forward_pruned(x, [1, 2], keep_fn))
    predicted = backbone.schedule_flops([1, 2], [int(c[0]) for c in counts], n)
    assert predicted < backbone.full_flops(n)
    assert abs(predicted - counted) <= 0.02 * counted


def test_deit_small_shape_flops() -> None:
    """The real deit_small shape (random weights): full model and a half-token block."""
    from policy_prune.core.backbones import load_backbone

    backbone = load_backbone("deit_small_patch16_224", depth=1)
    x = torch.randn(1, 3, 224, 224)
    counted = _counted(lambda: backbone.model(x))
    assert abs(backbone.full_flops(197) - counted) <= 0.02 * counted
    state = backbone.embed(x).prune(torch.arange(197)[None] < 99)
    counted = _counted(lambda: backbone.run_blocks(state, 0, 1))
    assert abs(backbone.block_flops(99) - counted) <= 0.02 * counted
