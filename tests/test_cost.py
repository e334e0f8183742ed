"""FLOPs of what runs: block, executed (padding included) and selection FLOPs agree with FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import random_scorer
from policy_prune.evaluation.baselines import BASELINES, learned_methods, make_baseline
from policy_prune.evaluation.cost import Work, batch_max, flops_columns, flops_ratios
from policy_prune.evaluation.solve import Point
from tests import tiny


def _counted(fn) -> int:
    # The math SDPA backend decomposes attention into the two counted matmuls (CPU flash is invisible).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _methods(backbone):
    return [make_baseline(n, [1, 2]) for n in BASELINES] + learned_methods(random_scorer(backbone, [1, 2], hidden=(16,)))


def _point(name: str) -> Point:
    points = {"none": Point("none"), "tome-native": Point("tome-r", [3, 1, 4, 2]), "learned": Point("threshold", [0.0, 0.0])}
    return points.get(name, Point("keep_ratio", [0.6, 0.3]))


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-vit-gap", "hf-bert", "hf-vit-classifier"])
def test_executed_plus_selection_equals_flop_counter(name: str) -> None:
    """The whole forward of every method, text rows of different lengths included: FlopCounterMode's count
    equals executed + selection FLOPs, and what it counts beyond the blocks is the selection FLOPs
    (within 3% of them, so a wrong selection formula fails even where selection is a small share)."""
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name, batch=3)
    for method in _methods(backbone):
        point = _point(method.name)
        with torch.no_grad():
            _, work = method.forward(backbone, x, point)  # warm the cached folded queries and projections
        counted = _counted(lambda m=method, p=point: m.forward(backbone, x, p))
        cols = flops_columns(backbone, work)
        executed, selection = float(cols["executed"].sum()), float(cols["selection"].sum())
        assert abs(counted - executed - selection) <= 0.03 * max(selection, 1.0), method.name
        if method.name not in ("none", "random", "token-norm"):
            assert selection > 0, method.name


def test_executed_pads_to_the_longest_row_of_each_batch() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    counts = torch.tensor([[12, 6], [6, 3], [9, 9], [3, 3]])  # [M, depth]: two blocks
    work = Work(counts, counts.clone(), torch.zeros(4, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), 12,
                torch.tensor([12, 6, 9, 3]))
    assert batch_max(counts, work.batch).tolist() == [[12, 6], [12, 6], [9, 9], [9, 9]]
    cols = flops_columns(backbone, work)
    per_row = [sum(backbone.block_flops(int(n)) for n in row) for row in [[12, 6], [12, 6], [9, 9], [9, 9]]]
    assert cols["executed"].tolist() == pytest.approx([float(v) for v in per_row])
    assert float(cols["block"][1]) == pytest.approx(float(backbone.block_flops(6) + backbone.block_flops(3)))


def test_unpruned_text_batch_executes_its_padding() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    x = tiny.inputs("hf-bert", batch=3)  # rows of 12, 9 and 6 tokens in one batch
    with torch.no_grad():
        _, work = make_baseline("none", []).forward(backbone, x, Point("none"))
    # The batch runs every row at 12 tokens: executed charges it, and ratios divide like by like (block by the
    # unpruned model's work on each row's own tokens, executed by its work on the same padded batch).
    cols = flops_columns(backbone, work)
    depth_flops = backbone.depth * backbone.block_flops(12)
    padding = 3 * depth_flops - sum(backbone.depth * backbone.block_flops(n) for n in (12, 9, 6))
    assert float(cols["executed"].sum() - cols["block"].sum()) == pytest.approx(float(padding))
    assert torch.equal(cols["full_executed"], cols["executed"]) and float(cols["executed"].sum()) > 1.1 * float(cols["full"].sum())
    ratios = flops_ratios(backbone, work)
    assert ratios["block"] == pytest.approx(1.0) and ratios["executed"] == pytest.approx(1.0)
