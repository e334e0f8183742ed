"""What a pruned forward computes, and its FLOPs three ways: block, executed and selection.

- **block** FLOPs: every row's blocks on its own alive tokens (the ideal a per-row implementation reaches).
- **executed** FLOPs: what the batched forward really computes at the eval batch size. A batch is one
  tensor, so every row of it runs on the batch's longest row (pack padding, text padding): a row is
  charged its batch's largest count at every block.
- **selection** FLOPs: what choosing the tokens costs (the learned scorer's features and MLP, the CLS
  query and its logits, a similarity matrix, ToMe's keys and matching), also on the padded batch shapes.

All three count matmul FLOPs (2 x multiply-accumulates) as ``torch.utils.flop_counter.FlopCounterMode``
does: norms, softmax, pooling, sorting and scatters are not counted, for the blocks as for selection.
Ratios divide like by like: block FLOPs by the unpruned model's FLOPs on each row's own tokens, executed,
selection and total FLOPs by the unpruned model's executed FLOPs on the same batches (each row at its
batch's longest row): what ``FlopCounterMode`` shows a user who runs the pruned and the unpruned model on
the same batches, so the unpruned model's executed ratio is 1 and a ratio does not move with how much a
split's batches pad (the unpruned model's own executed work was 1.075 of its unpadded work on minilm-text's
val, 1.038 on test, and every budget solved on val ran 0.02 lower on test). Budgets are matched on
``total = executed + selection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone
from policy_prune.core.scorer import row_full_flops
from policy_prune.core.selection import cls_row_flops, learned_flops, mean_query_flops, mlp_flops


@dataclass
class Work:
    """What a forward ran, per row; rows of several batches concatenate (:meth:`cat`)."""

    attn: torch.Tensor
    """[M, depth] long: alive tokens entering each block's attention."""
    mlp: torch.Tensor
    """[M, depth] long: alive tokens entering each block's MLP (fewer where ToMe merges inside a block)."""
    selection: torch.Tensor
    """[M] float64: selection FLOPs charged to each row (its batch's total over its rows)."""
    batch: torch.Tensor
    """[M] long: the eval batch each row ran in (executed FLOPs pad to the batch's longest row)."""
    n_full: int
    """Embedded sequence length (sets the embedding's FLOPs)."""
    n0: torch.Tensor
    """[M] long: alive tokens at embedding (the unpruned model's work on the row)."""

    @staticmethod
    def cat(parts: list[Work]) -> Work:
        """Rows of consecutive batches as one Work; batch ids are renumbered to stay distinct."""
        offset, batches = 0, []
        for p in parts:
            batches.append(p.batch + offset)
            offset += int(p.batch.max()) + 1 if len(p.batch) else 0
        return Work(torch.cat([p.attn for p in parts]), torch.cat([p.mlp for p in parts]),
                    torch.cat([p.selection for p in parts]), torch.cat(batches), parts[0].n_full,
                    torch.cat([p.n0 for p in parts]))


def site_work(depth: int, sites: list[int], n0: torch.Tensor, counts: list[torch.Tensor],
              selection: torch.Tensor, batch: torch.Tensor, n_full: int) -> Work:
    """Work of a method that reduces tokens only before ``sites``: n0 [M] tokens until the first site,
    counts[i] [M] after site i. Attention and MLP of a block see the same tokens."""
    cols, n, bounds = [], n0.long().cpu(), [*sites, depth]
    start = 0
    for i, stop in enumerate(bounds):
        cols += [n] * (stop - start)
        if i < len(sites):
            n = counts[i].long().cpu()
        start = stop
    per_block = torch.stack(cols, dim=1)
    return Work(per_block, per_block.clone(), selection.double().cpu(), batch.long().cpu(), n_full, n0.long().cpu())


def batch_max(values: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """[M, ...] each row's value replaced by the largest in its batch (what a padded batch computes)."""
    n_batches = int(batch.max()) + 1 if len(batch) else 0
    shape = (n_batches, *values.shape[1:])
    index = batch.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    top = torch.zeros(shape, dtype=values.dtype).scatter_reduce(0, index, values, reduce="amax", include_self=False)
    return top[batch]


def _blocks(backbone: TokenBackbone, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    shape = backbone.block_shape
    flops = ops.attention_flops(shape, attn.double()) + ops.mlp_flops(shape, mlp.double())
    return torch.as_tensor(flops).sum(dim=1)


def flops_columns(backbone: TokenBackbone, work: Work) -> dict[str, torch.Tensor]:
    """[M] FLOPs per row: "block", "executed", "selection", "total" (= executed + selection), and the unpruned
    model's: "full" (on the row's own tokens) and "full_executed" (at its batch's longest row)."""
    fixed = backbone.embed_flops(work.n_full) + backbone.head_flops()
    block = _blocks(backbone, work.attn, work.mlp) + fixed
    executed = _blocks(backbone, batch_max(work.attn, work.batch), batch_max(work.mlp, work.batch)) + fixed
    full = row_full_flops(backbone, work.n0, work.n_full).expand(len(block))
    full_executed = row_full_flops(backbone, batch_max(work.n0, work.batch), work.n_full).expand(len(block))
    return {"block": block, "executed": executed, "selection": work.selection,
            "total": executed + work.selection, "full": full, "full_executed": full_executed}


def flops_ratios(backbone: TokenBackbone, work: Work) -> dict[str, float]:
    """Each column summed over the rows, over the unpruned model's: block FLOPs over its FLOPs on the rows'
    own tokens, the others over its executed FLOPs on the same batches."""
    cols = flops_columns(backbone, work)
    full, full_executed = float(cols.pop("full").sum()), float(cols.pop("full_executed").sum())
    return {k: float(v.sum()) / (full if k == "block" else full_executed) for k, v in cols.items()}


def total_ratio(backbone: TokenBackbone, work: Work) -> float:
    """(executed + selection) FLOPs over unpruned FLOPs: the number budgets are matched on."""
    return flops_ratios(backbone, work)["total"]


# ---- selection FLOPs: the CLS row, the mean query and the learned scorer live in core.selection -------
__all__ = ["cls_row_flops", "learned_flops", "mean_query_flops", "mlp_flops"]


def key_flops(backbone: TokenBackbone, n: Any) -> Any:
    """``attention_qk(cls_only=True)`` as ToMe-at-sites calls it for its keys: k for n tokens, q for one
    (n: an int or a tensor of counts)."""
    d, a = backbone.block_shape.width, backbone.block_shape.attn_dim
    return 2 * n * d * a + 2 * d * a
