"""scripts/digits_site0_probe.py scores site 0 against where each canvas's digit is: its digit and clutter
masks must be the patches the digit and the fragments were drawn on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from policy_prune.config import load_env_config
from policy_prune.data import digits as D

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "digits_site0_probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("digits_site0_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _ink(images: torch.Tensor) -> torch.Tensor:
    """[M, 144] patches holding ink, row-major over the 12 x 12 grid: pooled by a reshape, not by the script's
    unfold, so an order mix-up in either shows."""
    pixels = images[:, 0] * D.STD + D.MEAN
    return pixels.reshape(len(images), 12, 4, 12, 4).amax(dim=(2, 4)).reshape(len(images), -1) > 0.3


def test_digit_mask_is_where_the_digit_was_drawn() -> None:
    probe = _probe()
    # No clutter and no noise: every inked patch is the digit's, and the digit's 3 x 3 patches hold its ink.
    cfg = load_env_config("digits-vit", ["data.options.n_distractors=0", "data.options.noise=0.0"])
    images, labels, digit, clutter = probe.canvases(cfg, None, "val", 0)
    assert digit.shape == (len(images), 145) and digit.sum(1).eq(9).all() and not digit[:, 0].any()
    ink = _ink(images)
    assert not (ink & ~digit[:, 1:]).any()  # no ink outside the digit's patches
    assert (ink & digit[:, 1:]).sum(1).float().mean() > 6  # most of its 9 patches are inked
    assert not clutter.any()
    assert len(labels) == len(images)


def test_clutter_mask_is_ink_off_the_digit() -> None:
    probe = _probe()
    cfg = load_env_config("digits-vit", ["data.options.noise=0.0"])
    images, _, digit, clutter = probe.canvases(cfg, None, "val", 0)
    ink = _ink(images)
    assert torch.equal(clutter[:, 1:], ink & ~digit[:, 1:])
    assert clutter.sum(1).float().mean() > 3  # four fragments per canvas, each on a patch or more
    assert not (clutter & digit).any()


def test_teacher_tables_are_cls_attention_and_the_true_class_gradient() -> None:
    """The last block's [CLS] attention sums to 1 over the tokens; the gradient norm predicts what a small step
    of one token along its gradient does to the true class's log-probability (a finite difference)."""
    from policy_prune.core.backbones import adapt
    from tests import tiny

    torch.manual_seed(0)
    backbone = adapt(tiny.make("timm-vit-cls")).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 4])
    tables = _probe().teacher_tables(backbone, x, y)
    attention, gradient = tables["teacher-attention"], tables["teacher-gradient"]
    n = backbone.embed(x).tokens.shape[1]
    assert attention.shape == gradient.shape == (3, n)
    torch.testing.assert_close(attention.sum(1), torch.ones(3))

    def log_prob(tokens: torch.Tensor) -> torch.Tensor:
        state = backbone.embed(x)
        return backbone.head(backbone.run_blocks(state.with_tokens(tokens), 0, backbone.depth)).log_softmax(1)[1, 2]

    tokens = backbone.embed(x).tokens.detach()
    j = int(gradient[1].argmax())
    direction = torch.zeros_like(tokens)
    with torch.enable_grad():
        t = tokens.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(log_prob(t), t)
    direction[1, j] = g[1, j] / g[1, j].norm()
    eps = 1e-3
    with torch.no_grad():
        slope = (log_prob(tokens + eps * direction) - log_prob(tokens - eps * direction)) / (2 * eps)
    assert float(slope) == pytest.approx(float(gradient[1, j]), rel=1e-2)


def test_occlusion_is_what_adding_or_removing_one_token_does_to_the_class_probability() -> None:
    """Against the model run on a boolean selection of the embedded tokens (another path than the script's
    index sets): a patch outside the base set is worth p(S + i) - p(S), one inside p(S) - p(S - i)."""
    from policy_prune.core.backbones import adapt
    from policy_prune.evaluation.baselines import redundancy
    from tests import tiny

    torch.manual_seed(0)
    backbone = adapt(tiny.make("timm-vit-cls")).eval()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    table = _probe().occlusion_table(backbone, x, target, base=5)
    state = backbone.embed(x)
    n = state.tokens.shape[1]
    assert table.shape == (2, n) and torch.isinf(table[:, 0]).all() and torch.isfinite(table[:, 1:]).all()

    def prob(row: int, keep: torch.Tensor) -> float:
        tokens = state.tokens[row, keep][None]
        sub = type(state)(tokens, state.protected[row, keep][None], torch.ones(1, len(tokens[0]), dtype=torch.bool),
                        torch.arange(n)[keep][None], n)
        return float(backbone.head(backbone.run_blocks(sub, 0, backbone.depth)).softmax(-1)[0, target[row]])

    with torch.no_grad():
        for row in range(2):
            score = -redundancy(state.tokens[row:row + 1], ~state.protected[row:row + 1])[0]
            score[0] = -torch.inf
            base = torch.zeros(n, dtype=torch.bool)
            base[score.argsort(descending=True)[:5]] = True
            base[0] = True
            inside, outside = int(base[1:].nonzero()[0]) + 1, int((~base[1:]).nonzero()[0]) + 1
            without, with_ = base.clone(), base.clone()
            without[inside], with_[outside] = False, True
            assert float(table[row, inside]) == pytest.approx(prob(row, base) - prob(row, without), abs=1e-5)
            assert float(table[row, outside]) == pytest.approx(prob(row, with_) - prob(row, base), abs=1e-5)


def test_site0_table_replaces_the_scorers_site_0_only() -> None:
    """Site 0 keeps the table's top tokens; a later site and a table of None score as the scorer itself does."""
    import dataclasses

    from policy_prune.core.backbones import adapt
    from policy_prune.core.scorer import LearnedScorer, make_keep_fn, random_scorer
    from tests import tiny

    torch.manual_seed(0)
    backbone = adapt(tiny.make("timm-vit-cls")).eval()
    scorer = random_scorer(backbone, [0, 1], seed=1)
    x = torch.randn(2, 3, 32, 32)
    n = backbone.embed(x).tokens.shape[1]
    table = torch.arange(n, dtype=torch.float).flip(0).repeat(2, 1)  # the first patches rank highest
    probe = _probe()

    def run(told, values):
        with torch.no_grad():
            out, state, _ = backbone.forward_pruned(x, scorer.sites, make_keep_fn(backbone, told, "keep_ratio", values))
        return out, state.positions.sort(dim=1).values

    copy = {f.name: getattr(scorer, f.name) for f in dataclasses.fields(LearnedScorer)}
    _, kept = run(probe.Site0Table(**copy, table=table), [0.5, 1.0])
    assert 1 < kept.shape[1] < n and torch.equal(kept, torch.arange(kept.shape[1]).repeat(2, 1))  # the first ones
    assert not torch.equal(kept, run(scorer, [0.5, 1.0])[1])  # the scorer itself keeps others
    for values in ([0.5, 0.5], [1.0, 0.5]):
        assert torch.equal(run(probe.Site0Table(**copy, table=None), values)[1], run(scorer, values)[1])
    # Site 0 idle: site 1 ranks by the scorer, table or not.
    assert torch.equal(run(probe.Site0Table(**copy, table=table), [1.0, 0.5])[1], run(scorer, [1.0, 0.5])[1])
