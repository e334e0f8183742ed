"""Pruned execution equals removing the same tokens by hand; padding never leaks into kept rows."""

from __future__ import annotations

import pytest
import torch

from policy_prune.core import ops
from policy_prune.core.backbones import adapt
from tests import tiny


def _random_keep(seed: int):
    def keep_fn(state, site_index, layer):
        g = torch.Generator().manual_seed(seed * 100 + site_index)
        return torch.rand(state.valid.shape, generator=g) < 0.5  # different counts per row

    return keep_fn


def _manual_reference(backbone, x_row, sites, kept_positions):
    """One row at a time, no masks: drop by hand the tokens the batched run dropped."""
    state = backbone.embed(x_row)
    tokens = state.tokens
    layers = list(range(backbone.depth))
    alive = torch.arange(state.n_full)
    start = 0
    for site, keep_pos in zip(sites, kept_positions, strict=True):
        state.tokens = tokens
        tokens = backbone.run_blocks(state, start, site).tokens
        sel = torch.tensor([i for i, p in enumerate(alive.tolist()) if p in keep_pos])
        tokens, alive = tokens[:, sel], alive[sel]
        start = site
        state.valid = torch.ones(1, len(alive), dtype=torch.bool)
        state.positions = alive[None]
    state.tokens = tokens
    state = backbone.run_blocks(state, start, len(layers))
    return backbone.head(state)


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-vit-reg-gap", "timm-deit-distilled", "hf-bert", "hf-distilbert",
                                  "hf-roberta", "hf-vit-classifier"])
@pytest.mark.parametrize("sites", [[0], [1, 3]])
def test_pruned_batch_equals_manual_removal(name: str, sites: list[int]) -> None:
    model = tiny.make(name)
    backbone = adapt(model)
    x = tiny.inputs(name, batch=4, seed=1)
    kept: list[list[list[int]]] = [[] for _ in range(4)]

    def recording_keep(state, i, layer):
        keep = _random_keep(7)(state, i, layer)
        pruned = state.prune(keep)
        for row in range(4):
            kept[row].append(pruned.positions[row][pruned.valid[row]].tolist())
        return keep

    with torch.no_grad():
        out, final, counts = backbone.forward_pruned(x, sites, recording_keep)
        assert len({int(c) for c in counts[-1]}) > 1, "rows should keep different counts (padding exercised)"
        assert not bool(final.valid.all())
        for row in range(4):
            x_row = {k: v[row:row + 1, : int(x["attention_mask"][row].sum())] for k, v in x.items()} \
                if isinstance(x, dict) else x[row:row + 1]
            ref = _manual_reference(backbone, x_row, sites, kept[row])
            torch.testing.assert_close(out[row:row + 1], ref, rtol=1e-4, atol=1e-5)


def test_protected_tokens_survive_drop_all() -> None:
    backbone = adapt(tiny.make("timm-vit-reg4"))
    with torch.no_grad():
        _, final, counts = backbone.forward_pruned(tiny.inputs("timm-vit-reg4"), [0, 2], lambda s, i, layer: torch.zeros_like(s.valid))
    assert counts[0].tolist() == [5, 5, 5] and counts[1].tolist() == [5, 5, 5]
    assert final.positions[0].tolist() == [0, 1, 2, 3, 4]


def test_dropped_token_never_returns() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))
    seen = []

    def keep_fn(state, i, layer):
        seen.append(set(state.positions[0][state.valid[0]].tolist()))
        return torch.ones_like(state.valid) if i else state.positions % 2 == 0

    with torch.no_grad():
        backbone.forward_pruned(tiny.inputs("timm-vit-cls"), [1, 2], keep_fn)
    assert seen[1] == {p for p in seen[0] if p % 2 == 0} | {0}


def test_padding_changes_nothing_in_kept_rows() -> None:
    """A row's output is the same alone and inside a batch padded for another, longer row."""
    backbone = adapt(tiny.make("timm-vit-cls"))
    x = tiny.inputs("timm-vit-cls", batch=2)

    def keep_fn(state, i, layer):
        keep = torch.ones_like(state.valid)
        keep[0, 1:10] = False  # row 0 keeps 8 of 17, row 1 keeps all: row 0 is padded
        return keep[: state.valid.shape[0]]

    with torch.no_grad():
        batched, final, _ = backbone.forward_pruned(x, [1], keep_fn)
        alone, _, _ = backbone.forward_pruned(x[:1], [1], keep_fn)
    assert final.valid[0].sum() == 8 and final.valid[1].sum() == 17
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-6)


def test_sites_are_validated() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))
    x = tiny.inputs("timm-vit-cls")
    for bad in ([4], [-1], [2, 1], [1, 1]):
        with pytest.raises(ValueError, match="sites"):
            backbone.forward_pruned(x, bad)


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-deit-distilled", "timm-vit-reg4", "hf-vit-classifier"])
def test_keep_top_equals_prune_with_the_keep_ratio_rule(name: str) -> None:
    from policy_prune.core.scorer import decide

    backbone = adapt(tiny.make(name))
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(tiny.inputs(name, batch=3)), 0, 1)
    assert state.dense and state.key_padding_mask() is None
    n_protected = int(state.protected[0].sum())
    g = torch.Generator().manual_seed(0)
    random = torch.randn(state.valid.shape, generator=g)
    tied = torch.randint(0, 3, state.valid.shape, generator=g).float()  # ties: the earlier slot wins in both
    for scores in (random, tied, torch.zeros(state.valid.shape)):
        for ratio in (0.0, 0.3, 1.0):
            mask_path = state.prune(decide(scores, state, "keep_ratio", ratio))
            k = int(mask_path.alive_counts[0])
            static = state.keep_top(scores, k)
            assert static.dense and not mask_path.dense and k >= n_protected
            assert torch.equal(static.positions, mask_path.positions) and torch.equal(static.tokens, mask_path.tokens)
            assert torch.equal(static.protected, mask_path.protected) and bool(static.valid.all())


def test_keep_top_refuses_padded_states() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    state = backbone.embed(tiny.inputs("hf-bert", batch=3))
    assert not state.dense  # text rows carry padding
    with pytest.raises(ValueError, match="dense"):
        state.keep_top(torch.zeros(state.valid.shape), 2)


def test_absorb_averages_each_dropped_token_into_its_most_similar_kept_token() -> None:
    """ops.absorb against a loop over rows and tokens: cosine nearest kept (real) token, plain means."""
    g = torch.Generator().manual_seed(3)
    kept, dropped = torch.randn(2, 4, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    kept_ok = torch.tensor([[True, True, False, True], [True, True, True, True]])
    dropped_ok = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    out = ops.absorb(kept, kept_ok, dropped, dropped_ok)
    for b in range(2):
        sums, counts = kept[b].clone(), torch.ones(4)
        for j in range(6):
            if not dropped_ok[b, j]:
                continue
            cos = torch.nn.functional.cosine_similarity(dropped[b, j][None], kept[b], dim=-1).masked_fill(~kept_ok[b], -2)
            sums[int(cos.argmax())] += dropped[b, j]
            counts[int(cos.argmax())] += 1
        assert torch.allclose(out[b], sums / counts[:, None], atol=1e-6)
    assert torch.equal(ops.absorb(kept, kept_ok, dropped[:, :0], dropped_ok[:, :0]), kept)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_merging_prune_paths_agree(name: str) -> None:
    """keep_top, the keep-mask prune and a fixed-width prune give the same merged tokens; without merge
    nothing changes, with it the dropped tokens' content reaches the kept ones."""
    from dataclasses import replace

    from policy_prune.core.scorer import decide

    backbone = adapt(tiny.make(name))
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(tiny.inputs(name, batch=3)), 0, 1)
    scores = torch.randn(state.valid.shape, generator=torch.Generator().manual_seed(1))
    keep = decide(scores, state, "keep_ratio", 0.4)
    plain, merged = state.prune(keep), state.prune(keep, merge=True)
    k = merged.tokens.shape[1]
    fixed = replace(state, static=True).prune(keep, width=state.n_full, merge=True)
    assert torch.equal(fixed.valid[:, :k], merged.valid)
    assert torch.allclose(fixed.tokens[:, :k][merged.valid], merged.tokens[merged.valid], atol=1e-5)
    assert not torch.allclose(merged.tokens[merged.valid], plain.tokens[plain.valid])
    if state.dense:  # images: the static top-k path
        top = state.keep_top(scores, k, merge=True)
        assert torch.equal(top.positions, merged.positions) and torch.allclose(top.tokens, merged.tokens, atol=1e-5)
        assert torch.equal(state.keep_top(scores, state.tokens.shape[1], merge=True).tokens, state.tokens)
