"""Pure tensor ops: keep-mask normalisation, gather/pack, merging dropped tokens, masked pooling and analytic FLOPs.

No module state lives here; adapters and the env call these. Shapes are in the docstrings:
B batch rows, N tokens, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def normalize_keep(keep: torch.Tensor, alive: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Force the pruning contract onto a raw keep mask.

    keep, alive, protected: [B, N] bool. Returns [B, N] bool where dead/padded slots are False and
    protected tokens that are alive are True. A dropped token never returns because dead stays dead.
    """
    return (keep.bool() | protected) & alive


def pack_indices(keep: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that move kept tokens to the front of each row, in their original order.

    keep: [B, N] bool. Returns (index [B, M] long, valid [B, M] bool) with M = max kept per row, or
    M = ``width`` when given (no device sync: a static shape; it must be at least every row's count);
    index slots past a row's count point at some dropped token and are marked invalid.
    """
    counts = keep.sum(dim=1)
    m = width if width is not None else int(counts.max().item()) if keep.numel() else 0
    # A stable sort on "not kept" puts kept tokens first without reordering them.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    return order, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token dimension.

    x: [B, N, ...]; index: [B, M] long. Returns [B, M, ...].
    """
    if index.shape[0] == 1 and x.shape[0] == 1:  # one row (batch 1): one index_select, no row index built
        return x.index_select(1, index[0])
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    # Advanced indexing copies whole rows of the trailing dims: about twice as fast on CPU as a
    # gather with an index expanded over them.
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, index]


def nearest_kept(kept: torch.Tensor, kept_ok: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """[B, K] the real kept slot (of kept [B, M, D], kept_ok [B, M]) most similar by cosine to each of the
    tokens ``dropped`` [B, K, D]: where :func:`absorb` sends each dropped token."""
    unit_k = torch.nn.functional.normalize(kept.float(), dim=-1)
    unit_d = torch.nn.functional.normalize(dropped.float(), dim=-1)
    sim = torch.bmm(unit_d, unit_k.transpose(1, 2)).masked_fill(~kept_ok.unsqueeze(1), float("-inf"))  # [B, K, M]
    return sim.argmax(dim=-1)


def absorb(kept: torch.Tensor, kept_ok: torch.Tensor, dropped: torch.Tensor, dropped_ok: torch.Tensor) -> torch.Tensor:
    """Each dropped token averaged into its most similar kept token (cosine of the hidden states).

    kept: [B, M, D] the tokens a prune keeps, kept_ok [B, M] bool the real ones (protected included);
    dropped: [B, K, D] the tokens it drops, dropped_ok [B, K] bool the real ones. A kept token that
    receives j dropped tokens becomes the plain mean of itself and them; others are unchanged. Returns
    [B, M, D]. Costs :func:`absorb_flops`.
    """
    if dropped.shape[1] == 0 or kept.shape[1] == 0:
        return kept
    dst = nearest_kept(kept, kept_ok, dropped)
    w = (dropped_ok & kept_ok.any(dim=1, keepdim=True)).to(kept.dtype)
    count = torch.zeros_like(kept_ok, dtype=kept.dtype).scatter_add(1, dst, w)
    total = torch.zeros_like(kept).scatter_add(1, dst.unsqueeze(-1).expand_as(dropped), dropped * w.unsqueeze(-1))
    return (kept + total) / (1.0 + count).unsqueeze(-1)


def absorb_flops(n: int, width: int) -> int:
    """Matmul FLOPs of :func:`absorb` per row at a site entered by n tokens: its K x M cosine product, at most
    n/2 dropped against n/2 kept (the bound: the split is known only after the rule runs). Normalising and the
    sums are elementwise, not counted, like the other selection costs."""
    return 2 * (n // 2) * (n - n // 2) * width


def masked_mean(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens where mask is True, each weighted by ``weight`` [B, N] when given (the sizes of merged
    slots: then the mean over the tokens they stand for).

    x: [B, N, D]; mask: [B, N] bool. Returns [B, D]; a row with no True tokens gives zeros.
    """
    w = mask.to(x.dtype) if weight is None else weight.to(x.dtype) * mask.to(x.dtype)
    w = w.unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def scatter_to_grid(values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Write per-slot values back to their original token positions (the inverse of a prune's gather).

    values: [B, M] or [B, M, D]; positions: [B, M] long (original index); valid: [B, M] bool; n: original N.
    Returns [B, n] or [B, n, D] with zeros where no valid slot maps. Valid slots of a row hold distinct
    positions and invalid ones add zeros, so adding is writing.
    """
    extra = (1,) * (values.dim() - 2)
    v = torch.where(valid.view(*valid.shape, *extra), values, torch.zeros((), dtype=values.dtype, device=values.device))
    index = positions.view(*positions.shape, *extra).expand_as(values)
    return values.new_zeros(values.shape[0], n, *values.shape[2:]).scatter_add(1, index, v)


def to_device(inputs: Any, device: str | torch.device) -> Any:
    """Adapter inputs (an image tensor or a tokenizer batch, a dict of tensors) on ``device``."""
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)


def trim_padding(inputs: Any) -> Any:
    """A tokenizer batch without the trailing columns that are padding in every row (a split is padded to
    its longest row overall, a batched forward to the batch's), so executed FLOPs count the padding a real
    batch carries. attention_mask [B, L] -> [B, L'] with L' the last column any row uses; other inputs
    (images, a batch without a mask) unchanged."""
    if not isinstance(inputs, dict) or inputs.get("attention_mask") is None:
        return inputs
    mask = inputs["attention_mask"]
    used = mask.any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else mask.shape[1]
    return {k: v[:, :width] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in inputs.items()}


@dataclass(frozen=True)
class BlockShape:
    """The dimensions that fix a transformer block's matmul FLOPs."""

    width: int
    """Residual width D."""
    attn_dim: int
    """Heads x head_dim (q, k and v each have this size)."""
    mlp_hidden: int
    """Hidden width of the MLP (e.g. 4 D)."""
    mlp_matrices: int = 2
    """Number of D x H matrices in the MLP: 2 for fc1/fc2, 3 for gated (SwiGLU) MLPs."""


def attention_flops(shape: BlockShape, n_tokens: int | torch.Tensor) -> torch.Tensor | int:
    """Matmul FLOPs of a block's attention half on ``n_tokens`` tokens: q/k/v and output projections plus
    both N^2 products (QK^T and AV). Works on ints or on [B] tensors of counts."""
    d, a = shape.width, shape.attn_dim
    return n_tokens * (2 * d * 3 * a + 2 * a * d + 2 * 2 * a * n_tokens)


def mlp_flops(shape: BlockShape, n_tokens: int | torch.Tensor) -> torch.Tensor | int:
    """Matmul FLOPs of a block's MLP half on ``n_tokens`` tokens."""
    return n_tokens * (2 * shape.width * shape.mlp_hidden * shape.mlp_matrices)


def block_flops(shape: BlockShape, n_tokens: int | torch.Tensor) -> torch.Tensor | int:
    """Matmul FLOPs of one block on `n_tokens` tokens (2 x multiply-accumulates).

    Counts what `torch.utils.flop_counter.FlopCounterMode` counts: the q/k/v and output projections,
    both N^2 attention products (QK^T and AV), and the MLP. Norms, softmax and activations are
    elementwise and not counted, as in FlopCounterMode. Works on ints or on [B] tensors of counts.
    The two halves are :func:`attention_flops` and :func:`mlp_flops` (ToMe merges between them).
    """
    return attention_flops(shape, n_tokens) + mlp_flops(shape, n_tokens)


def schedule_flops(
    shape: BlockShape,
    depth: int,
    sites: list[int],
    counts: list[int | torch.Tensor],
    n_start: int | torch.Tensor,
) -> torch.Tensor | int:
    """Block FLOPs of a whole keep schedule.

    sites: sorted layer indices where pruning happens before that block; counts[i] is the number of
    tokens alive after site i. Blocks before the first site run on `n_start` tokens.
    """
    total: torch.Tensor | int = 0
    n = n_start
    bounds = list(sites) + [depth]
    start = 0
    for i, stop in enumerate(bounds):
        total = total + block_flops(shape, n) * (stop - start)
        if i < len(sites):
            n = counts[i]
        start = stop
    return total
