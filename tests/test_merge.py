"""ToMe merging: the pure tensor ops, size bookkeeping and proportional attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from policy_prune.core.backbones import HFEncoderBackbone, adapt
from policy_prune.evaluation import merge
from policy_prune.evaluation.baselines import forward_merged, merge_tokens, run_blocks_sized
from tests import tiny


def test_plan_pairs_most_similar_and_respects_eligibility() -> None:
    # Slots: 0 protected, sources at even slots 2 and 4, destinations at odd slots 1 and 3.
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0.1]]])
    eligible = torch.tensor([[False, True, True, True, True]])
    dst, merged = merge.bipartite_plan(metric, eligible, torch.tensor([1]))
    assert merged.tolist() == [[False, False, True, False, False]]  # slot 2 == slot 3 exactly: merged first
    assert dst.tolist() == [[0, 1, 3, 3, 4]]
    dst, merged = merge.bipartite_plan(metric, eligible, torch.tensor([5]))  # asks for more than possible
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
        _, state, counts, size = forward_merged(backbone, tiny.inputs(name), [1, 2], 0.3)
    n0 = backbone.embed(tiny.inputs(name)).alive_counts
    assert torch.equal(size.sum(dim=1), n0)
    assert torch.equal((size > 0), state.valid) and bool((size[state.protected] == 1).all())
    assert torch.equal(counts[-1], state.alive_counts)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-vit-classifier", "hf-bert"])
def test_r0_equals_unpruned(name: str) -> None:
    backbone = adapt(tiny.make(name))
    x = tiny.inputs(name)
    with torch.no_grad():
        out, _, counts, size = forward_merged(backbone, x, [0, 2], 1.0)
        assert torch.equal(out, backbone(x)) and bool((size[size > 0] == 1).all())


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-vit-classifier", "hf-bert"])
def test_merging_a_duplicate_with_proportional_attention_is_exact(name: str) -> None:
    """Two identical tokens stay identical through every block, so merging them into one token of
    size 2 with log(2) on its logits must reproduce the unmerged model (CLS output)."""
    model = tiny.make(name)
    backbone = HFEncoderBackbone(model, pooling="cls") if name == "hf-bert" else adapt(model)
    with torch.no_grad():
        state = backbone.embed(tiny.inputs(name))
        tokens = state.tokens.clone()
        tokens[:, 4] = tokens[:, 3]
        state = replace(state, tokens=tokens)
        reference = backbone.head(backbone.run_blocks(state, 0, backbone.depth))
        target = (state.valid & ~state.protected).sum(dim=1) - 1
        merged, size = merge_tokens(backbone, state, state.valid.long(), 0, target)
        assert merged.alive_counts.tolist() == (state.alive_counts - 1).tolist()
        assert (size == 2).sum(dim=1).tolist() == [1] * len(size)
        proportional = backbone.head(run_blocks_sized(backbone, merged, size, 0, backbone.depth))
        plain = backbone.head(run_blocks_sized(backbone, merged, None, 0, backbone.depth))
    assert torch.allclose(proportional, reference, atol=1e-5)
    assert not torch.allclose(plain, reference, atol=1e-4)  # without the bias the merge is not exact
