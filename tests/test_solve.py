"""Reaching a FLOPs target: every method's solved total is at most the target and within a token of it."""

from __future__ import annotations

import pytest
import torch

from policy_prune.core.backbones import load_backbone
from policy_prune.evaluation.baselines import make_baseline
from policy_prune.evaluation.cost import total_ratio
from policy_prune.evaluation.solve import (
    TOLERANCE,
    BatchedCounts,
    Point,
    SolveContext,
    descend,
    solve_threshold,
)


@pytest.fixture(scope="module")
def digits_shape():
    """The digits-vit shape (48 px, patch 4: 144 patches + CLS, 6 blocks, width 64) with random weights."""
    return load_backbone("vit_tiny_patch16_224", img_size=48, patch_size=4, in_chans=1, embed_dim=64, depth=6,
                         num_heads=4, num_classes=10)


def _context(backbone, rows: int = 8, batch: int = 4) -> SolveContext:
    n = backbone.embed(torch.zeros(1, 1, 48, 48)).n_full
    tc = BatchedCounts(torch.full((rows,), n), torch.ones(rows, dtype=torch.long), n, torch.arange(rows) // batch)
    return SolveContext(backbone, tc, [])


@pytest.mark.parametrize("name", ["random", "cls-attention", "evit", "similarity", "tome-sites", "tome-native"])
@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.35])
def test_solved_total_is_at_most_the_target_and_within_tolerance(digits_shape, name: str, target: float) -> None:
    """digits-vit at sites 1, 3, 5: a constant keep ratio moves in steps of ~0.006; the per-site descent
    lands within 0.002 below every target, selection FLOPs included."""
    ctx = _context(digits_shape)
    method = make_baseline(name, [1, 3, 5])
    point = method.solve(ctx, target)
    total = total_ratio(digits_shape, method.predict(digits_shape, ctx.counts, point))
    assert point.solved == pytest.approx(total)
    assert target - TOLERANCE <= total <= target, (point.values, total)


@pytest.mark.parametrize("name", ["similarity-pre", "token-norm"])
@pytest.mark.parametrize("target", [0.7, 0.5, 0.35, 0.25])
def test_rows_of_many_lengths_land_within_tolerance(digits_shape, name: str, target: float) -> None:
    """Rows of 12 to 145 tokens (text-like): a token of the longest row is a coarse step for every other
    row, so the solver keeps the constant ratio found by bisection where it lands closer below the target
    (similarity-pre ran 0.494 at 0.5 on minilm-text's val by the descent alone)."""
    n = digits_shape.embed(torch.zeros(1, 1, 48, 48)).n_full
    lengths = torch.linspace(12, n, 64).round().long()
    tc = BatchedCounts(lengths, torch.ones(64, dtype=torch.long), n, torch.arange(64) // 8)
    ctx = SolveContext(digits_shape, tc, [])
    method = make_baseline(name, [0] if name == "similarity-pre" else [1, 3, 5])
    point = method.solve(ctx, target)
    total = total_ratio(digits_shape, method.predict(digits_shape, ctx.counts, point))
    assert target - TOLERANCE <= total <= target, (point.values, total)


def test_constant_ratio_alone_is_too_coarse(digits_shape) -> None:
    """Why the descent exists: neighbouring constant ratios straddle a target by more than the tolerance."""
    ctx = _context(digits_shape)
    method = make_baseline("random", [1, 3, 5])

    def total(r: float) -> float:
        return total_ratio(digits_shape, method.predict(digits_shape, ctx.counts, Point("keep_ratio", [r] * 3)))

    values = sorted({round(total(r / 400), 6) for r in range(401)})
    gaps = [b - a for a, b in zip(values, values[1:], strict=False) if 0.3 < a < 0.75]
    assert max(gaps) > TOLERANCE


def test_descend_takes_the_closest_crossing() -> None:
    # Two knobs: the first saves 5 per step, the second 1; start at 23 with target 10.
    def cost(v: list[float]) -> float:
        return 23 - 5 * v[0] - v[1]

    def step(v: list[float], k: int) -> list[float] | None:
        return None if v[k] >= 10 else [x + (1 if i == k else 0) for i, x in enumerate(v)]

    found = descend([0.0, 0.0], step, 2, cost, 10.0)
    assert found is not None and cost(found) == 10.0
    assert descend([10.0, 10.0], step, 2, cost, 0.0) is None


def test_threshold_solver_stays_below_within_tolerance() -> None:
    calls: list[float] = []

    def fn(t: float) -> float:  # FLOPs falling smoothly from 1 to 0 around t = 0.4
        calls.append(t)
        return float(torch.sigmoid(torch.tensor(-(t - 0.4) * 3)))

    t = solve_threshold(fn, 0.5)
    assert 0.5 - TOLERANCE <= fn(t) <= 0.5
    assert len(calls) == len(set(calls)) + 1  # every value measured once (and once more above)
    assert solve_threshold(lambda t: 0.9, 0.5) == 64.0  # out of reach: the deepest threshold tried


def test_threshold_solver_needs_fewer_calls_than_bisection() -> None:
    """Illinois false position on seeded FLOPs curves (smooth, and stepped as counts of tokens are): every
    solve within the tolerance in 8.1 calls on average, where bisection from the same brackets took 11.7."""
    import math
    import random

    rng, calls, solves = random.Random(0), 0, 200
    for _ in range(solves):
        centre, scale, target = rng.uniform(-3, 3), rng.uniform(0.5, 5), rng.uniform(0.1, 0.9)
        steps = rng.choice([0, 500, 2000])

        def fn(t: float, centre: float = centre, scale: float = scale, steps: int = steps) -> float:
            nonlocal calls
            calls += 1
            v = 1.0 / (1.0 + math.exp((t - centre) * scale))
            return math.floor(v * steps) / steps if steps else v

        t = solve_threshold(fn, target, tol=TOLERANCE)
        calls -= 1  # the check below
        assert target - TOLERANCE <= fn(t) <= target
    assert calls / solves < 10.0
