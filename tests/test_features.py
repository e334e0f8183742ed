"""Token features: definitions checked against explicit computations, bounds, padding."""

from __future__ import annotations

import pytest
import torch

from policy_prune.core.backbones import adapt
from policy_prune.core.features import (
    BASE_FEATURES,
    FEATURE_BOUND,
    FeatureSpec,
    make_projection,
    token_features,
)
from policy_prune.evaluation.baselines import redundancy
from tests import tiny


def _state(name: str):
    backbone = adapt(tiny.make(name))
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(tiny.inputs(name, batch=3)), 0, 1)
        keep = torch.rand(state.valid.shape, generator=torch.Generator().manual_seed(0)) < 0.6
        return backbone, state.prune(keep)  # rows keep different counts: padding is exercised


def test_feature_values_match_definitions() -> None:
    backbone, state = _state("timm-vit-cls")
    spec = FeatureSpec()
    with torch.no_grad():
        feats = token_features(backbone, state, 1, make_projection(32, spec), spec)
    col = {name: i for i, name in enumerate(BASE_FEATURES)}
    for row in range(3):
        v = state.valid[row]
        x = state.tokens[row][v]
        f = feats[row][v]
        unit = torch.nn.functional.normalize(x, dim=-1)
        sims = unit @ unit.T
        n = len(x)
        # The seed paper's score, as similarity-pre computes it: mean cosine to the other prunable tokens
        # (the protected CLS, slot 0, is not compared).
        p = ~state.protected[row][v]
        other = (sims[:, p].sum(1) - p.float()) / (int(p.sum()) - 1)
        torch.testing.assert_close(f[:, col["redundancy"]], other, atol=1e-5, rtol=1e-5)
        eligible = state.valid[row:row + 1] & ~state.protected[row:row + 1]
        torch.testing.assert_close(f[p, col["redundancy"]], redundancy(state.tokens[row:row + 1], eligible)[0][v][p],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f[:, col["cos_cls"]], sims[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f[:, col["norm"]], x.norm(dim=-1) / x.norm(dim=-1).mean(), atol=1e-5, rtol=1e-5)
        attn = backbone.attention_from_cls(state, 1)[row][v]
        torch.testing.assert_close(f[:, col["cls_attention"]], torch.log1p(attn * n), atol=1e-5, rtol=1e-5)
        assert f[0, col["protected"]] == 1 and (f[1:, col["protected"]] == 0).all()
        assert (feats[row][~v] == 0).all()
    assert feats.abs().max() <= FEATURE_BOUND and torch.isfinite(feats).all()
    assert feats.shape[-1] == spec.dim == len(spec.all_names())


def test_positions_follow_the_patch_grid() -> None:
    backbone, state = _state("timm-vit-reg4")
    spec = FeatureSpec(projection_dim=0)
    with torch.no_grad():
        feats = token_features(backbone, state, 1, make_projection(32, spec), spec)
    y, x = feats[..., BASE_FEATURES.index("pos_y")], feats[..., BASE_FEATURES.index("pos_x")]
    patch = state.positions - 5  # 4 registers + CLS come first; grid is 4 x 4
    is_patch = state.valid & (patch >= 0)
    torch.testing.assert_close(y[is_patch], (patch[is_patch] // 4).float() / 3)
    torch.testing.assert_close(x[is_patch], (patch[is_patch] % 4).float() / 3)


def test_projection_is_fixed_by_seed() -> None:
    spec = FeatureSpec(projection_seed=3, projection_kind="random")
    assert torch.equal(make_projection(32, spec), make_projection(32, spec))
    assert not torch.equal(make_projection(32, spec), make_projection(32, FeatureSpec(projection_seed=4)))


def test_weights_projection_spans_what_the_blocks_read() -> None:
    """"weights": orthonormal top right-singular vectors of the blocks' width-D Linear weights."""
    backbone = adapt(tiny.make("timm-vit-cls"))
    spec = FeatureSpec(projection_dim=4)
    p = make_projection(backbone, spec)
    assert p.shape == (32, 4) and torch.equal(p, make_projection(backbone, spec))
    torch.testing.assert_close(p.T @ p, torch.eye(4), atol=1e-5, rtol=0)
    rows = torch.cat([m.weight for blk in backbone.block_modules() for m in blk.modules()
                      if isinstance(m, torch.nn.Linear) and m.in_features == 32]).detach()
    energy = (rows @ p).square().sum(0)  # each direction captures a top singular value squared
    s = torch.linalg.svdvals(rows)[:4]
    torch.testing.assert_close(energy, s.square(), rtol=1e-4, atol=1e-4)


def test_local_norm_is_the_mean_over_the_alive_grid_neighbourhood() -> None:
    backbone, state = _state("timm-vit-reg4")  # 4 x 4 grid after CLS + 4 registers
    spec = FeatureSpec(projection_dim=0)
    with torch.no_grad():
        feats = token_features(backbone, state, 1, make_projection(32, spec), spec)
    norm, local = feats[..., BASE_FEATURES.index("norm")], feats[..., BASE_FEATURES.index("local_norm")]
    _assert_grid_neighbourhood_mean(state, norm.unsqueeze(-1), local.unsqueeze(-1))


def _assert_grid_neighbourhood_mean(state, values, pooled) -> None:
    """pooled [B, N, C] is the mean of values [B, N, C] over each patch's 3 x 3 neighbourhood of a 4 x 4 grid
    after 5 prefix tokens, pruned patches counting 0; prefix tokens and padding get 0."""
    for row in range(state.valid.shape[0]):
        grid = torch.zeros(4, 4, values.shape[-1])  # pruned patches stay 0
        cells = {}
        for slot in range(state.valid.shape[1]):
            p = int(state.positions[row, slot]) - 5
            if state.valid[row, slot] and p >= 0:
                grid[p // 4, p % 4] = values[row, slot]
                cells[slot] = (p // 4, p % 4)
        for slot in range(state.valid.shape[1]):
            if slot not in cells:
                assert (pooled[row, slot] == 0).all()  # prefix tokens and padding
                continue
            r, c = cells[slot]
            expected = grid[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2].sum((0, 1)) / 9
            torch.testing.assert_close(pooled[row, slot], expected, atol=1e-5, rtol=1e-5)


def test_neighbourhood_projection_is_the_local_mean_of_the_projection() -> None:
    backbone, state = _state("timm-vit-reg4")  # 4 x 4 grid after CLS + 4 registers
    spec = FeatureSpec(projection_dim=3)
    with torch.no_grad():
        feats = token_features(backbone, state, 1, make_projection(backbone, spec), spec)
    names = spec.all_names()
    proj = feats[..., names.index("proj_0"): names.index("proj_0") + 3]
    nbr = feats[..., names.index("nbr_proj_0"): names.index("nbr_proj_0") + 3]
    _assert_grid_neighbourhood_mean(state, proj, nbr)


def test_local_norm_on_text_uses_a_three_token_window() -> None:
    backbone, state = _state("hf-bert")
    spec = FeatureSpec(projection_dim=0)
    with torch.no_grad():
        feats = token_features(backbone, state, 1, make_projection(32, spec), spec)
    norm, local = feats[..., BASE_FEATURES.index("norm")], feats[..., BASE_FEATURES.index("local_norm")]
    line = torch.zeros(state.n_full)
    row = 0
    for slot in range(state.valid.shape[1]):
        if state.valid[row, slot]:
            line[int(state.positions[row, slot])] = norm[row, slot]
    for slot in range(state.valid.shape[1]):
        if state.valid[row, slot]:
            p = int(state.positions[row, slot])
            expected = line[max(p - 1, 0): p + 2].sum() / 3
            torch.testing.assert_close(local[row, slot], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert", "hf-vit"])
def test_projection_is_the_layer_normalised_tokens_times_the_projection(name: str) -> None:
    """The features never materialise layer_norm(x): check the folded algebra against it, padding included."""
    backbone, state = _state(name)
    spec = FeatureSpec(projection_dim=5, projection_kind="random")
    projection = make_projection(backbone, spec)
    folded = backbone.cls_query(1)
    eps = folded.eps if folded is not None and folded.eps is not None else 1e-5
    with torch.no_grad():
        feats = token_features(backbone, state, 1, projection, spec)
        expected = torch.nn.functional.layer_norm(state.tokens, state.tokens.shape[-1:], eps=eps) @ projection
    names = spec.all_names()
    got = feats[..., names.index("proj_0"): names.index("proj_0") + 5]
    v = state.valid
    torch.testing.assert_close(got[v], expected[v].clamp(-FEATURE_BOUND, FEATURE_BOUND), atol=1e-4, rtol=1e-4)
    assert (got[~v] == 0).all()


def test_dense_and_padded_states_give_the_same_features() -> None:
    """The dense fast path (no masks) equals the masked path on the same all-alive tokens."""
    from dataclasses import replace

    backbone = adapt(tiny.make("timm-vit-reg4"))
    spec = FeatureSpec(projection_dim=4)
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(tiny.inputs("timm-vit-reg4", batch=2)), 0, 1)
        dense = token_features(backbone, state, 1, make_projection(backbone, spec), spec)
        masked = token_features(backbone, replace(state, dense=False), 1, make_projection(backbone, spec), spec)
    assert state.dense
    torch.testing.assert_close(dense, masked, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-vit-reg4", "hf-vit", "hf-bert"])
def test_unpruned_dense_states_take_the_neighbourhoods_without_a_scatter_and_get_the_same_features(name: str) -> None:
    """Before any pruning (site 0) slot i holds token i: the neighbourhood means skip the scatter onto the grid
    and the gather back; every feature equals the general path's, which a padded (non-dense) state takes."""
    from dataclasses import replace

    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name, batch=2)
    if isinstance(x, dict):  # text: one unpadded row, marked dense and static as the deployed batch-1 path marks it
        x = {k: v[:1] for k, v in x.items()}
    spec = FeatureSpec(projection_dim=4)
    projection = make_projection(backbone, spec)
    with torch.no_grad():
        state = backbone.embed(x)
        dense = replace(state, dense=True, static=not state.dense)
        general = replace(state, dense=False, static=not state.dense)
        fast, slow = (token_features(backbone, s, 0, projection, spec) for s in (dense, general))
    assert bool(state.valid.all()) and state.tokens.shape[1] == state.n_full
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-vit", "hf-bert"])
def test_site_zero_reuses_the_cls_query_directions_of_the_same_cls_row(name: str) -> None:
    """Before block 0 every input's CLS row is the model's own [CLS] embedding: the CLS query's directions are
    stored and reused, equal to computing them; another CLS row computes them again, rows that need gradients
    are never stored, and a result stored under inference_mode serves a call with gradients on."""
    backbone = adapt(tiny.make(name))
    folded = backbone.cls_query(0)
    assert folded is not None
    spec = FeatureSpec(projection_dim=4)
    projection = make_projection(backbone, spec)
    a, b = tiny.inputs(name, batch=2, seed=0), tiny.inputs(name, batch=2, seed=1)
    for x in (a, b):
        if isinstance(x, dict):  # text: the tokenizer's [CLS] id opens every row
            x["input_ids"][:, 0] = 1
    with torch.inference_mode():
        sa, sb = backbone.embed(a), backbone.embed(b)
        cls_b = sb.tokens[:, 0].float()
        assert torch.equal(sa.tokens[:, 0], sb.tokens[:, 0]) and not torch.equal(sa.tokens, sb.tokens)
        token_features(backbone, sa, 0, projection, spec)
        stored = folded.last[-1][1]
        token_features(backbone, sb, 0, projection, spec)
        assert folded.last[-1][1] is stored  # reused, not computed again
        torch.testing.assert_close(stored, folded.directions(folded.normalize(cls_b)), rtol=0, atol=0)
        other = cls_b + 1.0
        torch.testing.assert_close(folded.directions_of(other), folded.directions(folded.normalize(other)), rtol=0, atol=0)
        assert torch.equal(folded.last[-1][0], other)
    needs_grad = cls_b.clone().requires_grad_()
    assert folded.directions_of(needs_grad).requires_grad and torch.equal(folded.last[-1][0], other)
    tokens = torch.randn(2, 5, cls_b.shape[1], requires_grad=True)
    torch.bmm(tokens, folded.directions_of(other.clone())).sum().backward()  # stored under inference_mode
    assert tokens.grad is not None
