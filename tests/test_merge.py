"""ToMe merging: the pure tensor ops, balanced rounds, size bookkeeping, proportional attention, and
ToMe in every block (tome-native) driven through the host's own block submodules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from policy_prune.core.backbones import HFEncoderBackbone, adapt
from policy_prune.evaluation import merge, tome
from policy_prune.evaluation.baselines import forward_merged, merge_tokens, run_blocks_sized
from tests import tiny


def test_plan_pairs_most_similar_and_respects_eligibility() -> None:
    # Slots: 0 protected, sources at even slots 2 and 4, destinations at odd slots 1 and 3.
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0.1]]])
    eligible = torch.tensor([[False, True, True, True, True]])
    dst, merged, rank = merge.bipartite_plan(metric, eligible, torch.tensor([1]))
    assert merged.tolist() == [[False, False, True, False, False]]  # slot 2 == slot 3 exactly: merged first
    assert dst.tolist() == [[0, 1, 3, 3, 4]] and rank.tolist() == [[2, 5, 0, 5, 1]]  # ineligible slot 0 ranks last among A
    dst, merged, _ = merge.bipartite_plan(metric, eligible, torch.tensor([5]))  # asks for more than possible
    assert merged.tolist() == [[False, False, True, False, True]] and dst.tolist() == [[0, 1, 3, 3, 1]]


def test_merge_wavg_hand_computed() -> None:
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    size = torch.tensor([[1, 3, 1, 2]])
    dst = torch.tensor([[0, 1, 1, 3]])  # slot 2 (size 1) merges into slot 1 (size 3)
    x2, size2 = merge.merge_wavg(x, size, dst)
    assert size2.tolist() == [[1, 4, 0, 2]]
    assert torch.allclose(x2[0, :, 0], torch.tensor([1.0, (3 * 2 + 4) / 4, 4.0, 8.0]))


def test_size_bias_is_proportional_attention() -> None:
    # softmax(q.k + log s) over one key of size 2 == softmax over that key written twice.
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    bias = merge.size_bias(torch.tensor([[1, 2, 1]]), torch.ones(1, 3, dtype=torch.bool), torch.float32)
    merged = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    k_dup, v_dup = k[:, :, [0, 1, 1, 2]], v[:, :, [0, 1, 1, 2]]
    assert torch.allclose(merged, torch.nn.functional.scaled_dot_product_attention(q, k_dup, v_dup), atol=1e-6)


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-deit-distilled", "timm-vit-reg4", "hf-bert", "hf-distilbert"])
def test_sizes_sum_to_original_count(name: str) -> None:
    backbone = adapt(tiny.make(name))
    with torch.no_grad():
        _, state, counts, size, _ = forward_merged(backbone, tiny.inputs(name), [1, 2], 0.3)
    n0 = backbone.embed(tiny.inputs(name)).alive_counts
    assert torch.equal(size.sum(dim=1), n0)
    assert torch.equal((size > 0), state.valid) and bool((size[state.protected] == 1).all())
    assert torch.equal(counts[-1], state.alive_counts)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-vit-classifier", "hf-bert"])
def test_r0_equals_unpruned(name: str) -> None:
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name)
    with torch.no_grad():
        out, _, counts, size, _ = forward_merged(backbone, x, [0, 2], 1.0)
        assert torch.equal(out, backbone(x)) and bool((size[size > 0] == 1).all())


def _duplicate_merged(name: str, pooling: str):
    """(backbone, the unmerged model's output on inputs whose token 4 repeats token 3, that state with the pair
    merged into one token of size 2, its sizes) with ``pooling`` for the text model."""
    model = tiny.make(name)
    backbone = HFEncoderBackbone(model, pooling=pooling) if name == "hf-bert" else adapt(model)
    state = backbone.embed(tiny.inputs(name))
    tokens = state.tokens.clone()
    tokens[:, 4] = tokens[:, 3]
    state = replace(state, tokens=tokens)
    reference = backbone.head(backbone.run_blocks(state, 0, backbone.depth))
    target = (state.valid & ~state.protected).sum(dim=1) - 1
    merged, size, _, _ = merge_tokens(backbone, state, state.valid.long(), 0, target)
    assert merged.alive_counts.tolist() == (state.alive_counts - 1).tolist()
    assert (size == 2).sum(dim=1).tolist() == [1] * len(size)
    return backbone, reference, merged, size


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-vit-classifier", "hf-bert"])
def test_merging_a_duplicate_with_proportional_attention_is_exact(name: str) -> None:
    """Two identical tokens stay identical through every block, so merging them into one token of
    size 2 with log(2) on its logits must reproduce the unmerged model (CLS output)."""
    with torch.no_grad():
        backbone, reference, merged, size = _duplicate_merged(name, "cls")
        proportional = backbone.head(run_blocks_sized(backbone, merged, size, 0, backbone.depth))
        plain = backbone.head(run_blocks_sized(backbone, merged, None, 0, backbone.depth))
    assert torch.allclose(proportional, reference, atol=1e-5)
    assert not torch.allclose(plain, reference, atol=1e-4)  # without the bias the merge is not exact


@pytest.mark.parametrize("name", ["hf-bert", "timm-vit-gap"])
def test_average_pool_weighted_by_size_keeps_a_duplicate_merge_exact(name: str) -> None:
    """A mean-pooling head (a sentence encoder's mean pool, a GAP ViT) sees the merged token once: weighted by
    its size it averages the embedded tokens again and the duplicate merge stays exact; the reference's
    unweighted pool counts the pair as one token and is not. ToMe's eval methods pool with the sizes."""
    with torch.no_grad():
        backbone, reference, merged, size = _duplicate_merged(name, "mean")
        ran = run_blocks_sized(backbone, merged, size, 0, backbone.depth)
        weighted, unweighted = backbone.head(ran, size), backbone.head(ran)
        # The eval methods: tome-sites and tome-native pool with their final sizes unless told not to.
        x = tiny.inputs(name)
        out, final, _, sizes, _ = forward_merged(backbone, x, [1], 0.5)
        assert bool((sizes > 1).any()) and torch.allclose(out, backbone.head(final, sizes))
        assert not torch.allclose(out, forward_merged(backbone, x, [1], 0.5, size_pool=False)[0], atol=1e-5)
        native = tome.forward_native(backbone, x, [2] * backbone.depth)[0]
        assert not torch.allclose(native, tome.forward_native(backbone, x, [2] * backbone.depth, size_pool=False)[0],
                                  atol=1e-5)
    assert torch.allclose(weighted, reference, atol=1e-5)
    assert not torch.allclose(unweighted, reference, atol=1e-4)


# ---- the ToMe fix (#15): no round merges as many tokens as A holds ------------------------------------
@pytest.mark.parametrize("n, target", [(144, 36), (144, 3), (144, 100), (9, 3), (4, 3), (3, 1), (50, 49), (2, 1)])
def test_merge_rounds_are_balanced_and_below_half(n: int, target: int) -> None:
    shares, rounds = merge.merge_rounds(torch.tensor([n]), torch.tensor([target]))
    reachable = max(target, min(n, merge.MIN_MERGE_LEFT))
    assert int(shares.sum()) == n - reachable and int(rounds[0]) == shares.shape[0]
    left = n
    for r in shares[:, 0].tolist():
        assert r <= left // 2 - 1 or r == 0  # A holds at least left // 2 of the eligible tokens
        left -= r
    if shares.shape[0] > 1:  # geometric: the same fraction per round, so no round is a small remainder
        fractions = [r / c for r, c in zip(shares[:, 0].tolist(), (n - shares[:, 0].cumsum(0) + shares[:, 0]).tolist(), strict=True)]
        assert max(fractions) - min(fractions) < 0.2


def test_rounds_take_every_row_to_its_own_target() -> None:
    n, target = torch.tensor([144, 60, 10, 3]), torch.tensor([20, 50, 10, 1])
    shares, rounds = merge.merge_rounds(n, target)
    assert (n - shares.sum(dim=0)).tolist() == [20, 50, 10, 3]
    assert rounds.tolist()[2:] == [0, 0] and shares.shape[0] == int(rounds.max())


def test_distinctive_token_survives_a_deep_cut() -> None:
    """Regression (#15): one token unlike all others among near-duplicates stays its own token when a site
    must remove most tokens; the old one-shot plan merged every A token, however dissimilar."""
    backbone = adapt(tiny.make("timm-vit-cls"))  # 16 patches + CLS
    with torch.no_grad():
        state = backbone.embed(tiny.inputs("timm-vit-cls", batch=1))
        g = torch.Generator().manual_seed(0)
        base = torch.randn(state.tokens.shape[-1], generator=g)
        tokens = base + 1e-3 * torch.randn(state.tokens.shape, generator=g)  # near-duplicates
        odd = 6  # an even slot: in A, where the old plan merged everything at a deep cut
        tokens[:, odd] = -5 * base + torch.randn(state.tokens.shape[-1], generator=g)
        state = replace(state, tokens=tokens)
        size = state.valid.long()
        merged, size, _, slot_of = merge_tokens(backbone, state, size, 0, torch.tensor([4]), tome.initial_slots(state))
    assert int((merged.valid & ~merged.protected).sum()) == 4
    kept = int(slot_of[0, odd])
    assert kept >= 0 and int(size[0, kept]) == 1  # alone in its slot: nothing merged into it, it merged nowhere


# ---- ToMe in every block ----------------------------------------------------------------------------------
def test_tome_order_puts_protected_then_unmerged_a_then_b() -> None:
    survive = torch.tensor([[True, True, False, True, True, True, True]])  # slot 2 merged away
    is_b = torch.tensor([[False, True, False, True, False, True, False]])
    protected = torch.tensor([[True, False, False, False, False, False, True]])  # CLS and a [SEP]
    index, valid = merge.tome_order(survive, is_b, protected)
    assert index[valid].tolist() == [0, 6, 4, 1, 3, 5]  # CLS, [SEP], A survivors in order, then B in order
    no_cls = torch.zeros_like(protected)
    rank = torch.tensor([[1, 7, 7, 7, 0, 7, 2]])  # A slots 0, 4, 6 by similarity: 4 first
    index, valid = merge.tome_order(survive, is_b, no_cls, rank)
    assert index[valid].tolist() == [4, 0, 6, 1, 3, 5]  # the reference's score order without a class token


def test_parse_r_matches_the_authors_schedules() -> None:
    assert tome.parse_r(6, 8) == [8] * 6
    assert tome.parse_r(6, 8, -1.0) == [16, 12, 9, 6, 3, 0]  # the paper's decreasing schedule
    assert tome.parse_r(12, 0, 0.5) == [0] * 12


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-deit-distilled", "hf-bert", "hf-vit-classifier", "hf-distilbert"])
def test_native_r0_equals_unpruned_and_leaves_no_hook(name: str) -> None:
    model = tiny.make(name)
    backbone = adapt(model)
    x = tiny.inputs(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out, work = tome.forward_native(backbone, x, [0] * backbone.depth)
        assert torch.allclose(out, backbone(x), atol=1e-5)
        merged, work = tome.forward_native(backbone, x, [2] * backbone.depth)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    n0 = backbone.embed(x).alive_counts
    assert torch.equal(work.attn[:, 0], n0) and bool((work.mlp[:, -1] < n0).all())
    assert torch.equal(work.attn[:, 1:], work.mlp[:, :-1])  # merging happens inside blocks only


def test_native_merges_r_per_block_capped_at_half() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))  # 16 patches + CLS, depth 4
    with torch.no_grad():
        _, work = tome.forward_native(backbone, tiny.inputs("timm-vit-cls"), [3, 5, 9, 1])
    # 16 -> 13 -> 8 -> 4 (9 capped at 8 // 2) -> 3 patches, plus CLS
    assert work.attn[0].tolist() == [17, 14, 9, 5] and work.mlp[0].tolist() == [14, 9, 5, 4]


def test_native_keeps_sizes_and_follows_groups() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))
    watch: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        tome.forward_native(backbone, tiny.inputs("timm-vit-cls"), [4, 4, 4, 4], watch=watch)
    last = watch[3]  # entering block 3: 17 - 12 = 5 tokens
    assert all(len(row.unique()) == 5 for row in last) and bool((last[:, 0] == 0).all())  # CLS stays in slot 0
