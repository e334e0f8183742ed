"""Pure tensor ops: keep-mask normalisation, packing, masked pooling."""

from __future__ import annotations

import torch

from policy_prune.core import ops


def test_normalize_keep_forces_contract() -> None:
    keep = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    alive = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    protected = torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool)
    assert ops.normalize_keep(keep, alive, protected).int().tolist() == [[1, 1, 0, 0, 1]]


def test_pack_indices_keeps_order_and_pads() -> None:
    keep = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index, valid = ops.pack_indices(keep)
    assert index.shape == (2, 3)
    assert index[0].tolist() == [1, 3, 4]
    assert index[1, 0].item() == 0
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_gather_rows_matches_indexing() -> None:
    x = torch.randn(2, 5, 3)
    index = torch.tensor([[4, 0], [2, 2]])
    out = ops.gather_rows(x, index)
    assert torch.equal(out[0], x[0, [4, 0]]) and torch.equal(out[1], x[1, [2, 2]])
    assert torch.equal(ops.gather_rows(x[..., 0], index), out[..., 0])
    # One row (batch 1) takes index_select: the same rows, for 2-D and 3-D inputs and any index dtype layout.
    for row in range(2):
        one = ops.gather_rows(x[row:row + 1], index[row:row + 1])
        assert one.shape == (1, 2, 3) and torch.equal(one, out[row:row + 1])
        assert torch.equal(ops.gather_rows(x[row:row + 1, :, 0], index[row:row + 1]), out[row:row + 1, :, 0])


def test_masked_mean_ignores_masked_tokens() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert ops.masked_mean(x, torch.tensor([[True, True, False]])).item() == 2.0
    assert ops.masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_scatter_to_grid_roundtrip() -> None:
    values = torch.tensor([[0.5, 0.25, 9.0]])
    positions = torch.tensor([[3, 0, 1]])
    valid = torch.tensor([[True, True, False]])
    assert ops.scatter_to_grid(values, positions, valid, 4).tolist() == [[0.25, 0.0, 0.0, 0.5]]


def test_scatter_to_grid_of_vectors_is_the_inverse_of_the_prune_gather() -> None:
    """[B, M, D] values (hidden states, features) go back to their positions; invalid slots, even NaN, add 0."""
    x = torch.randn(2, 6, 3)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    index, valid = ops.pack_indices(keep)
    packed = ops.gather_rows(x, index)
    packed[~valid] = float("nan")
    grid = ops.scatter_to_grid(packed, index, valid, 6)
    assert torch.equal(grid, x * keep.unsqueeze(-1))


def test_schedule_flops_is_sum_of_blocks() -> None:
    shape = ops.BlockShape(width=8, attn_dim=8, mlp_hidden=32)
    total = ops.schedule_flops(shape, depth=4, sites=[1, 3], counts=[5, 2], n_start=10)
    expected = ops.block_flops(shape, 10) + 2 * ops.block_flops(shape, 5) + ops.block_flops(shape, 2)
    assert total == expected
    counts = torch.tensor([5, 7])
    batched = ops.schedule_flops(shape, 4, [1], [counts], 10)
    assert batched.tolist() == [ops.schedule_flops(shape, 4, [1], [int(c)], 10) for c in counts]
