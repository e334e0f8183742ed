"""The TokenBackbone contract: a frozen model seen as embed -> blocks -> head over prunable tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from policy_prune import ops


@dataclass
class TokenState:
    """Tokens flowing through a (possibly pruned) backbone.

    After a prune the alive tokens of each row are packed to the front; rows with fewer tokens than
    the batch maximum are padded and those slots have ``valid`` False.
    """

    tokens: torch.Tensor
    """[B, N, D] hidden states."""
    protected: torch.Tensor
    """[B, N] bool: CLS, distillation, register and [SEP] tokens that are never pruned."""
    valid: torch.Tensor
    """[B, N] bool: a real, alive token (False for text padding and for pack padding)."""
    positions: torch.Tensor
    """[B, N] long: index of the token in the embedded (unpruned) sequence."""
    n_full: int
    """Token count of the embedded sequence (N before any pruning)."""

    @property
    def alive_counts(self) -> torch.Tensor:
        """[B] number of alive tokens per row."""
        return self.valid.sum(dim=1)

    def key_padding_mask(self) -> torch.Tensor | None:
        """[B, N] bool (True = attend) or None when every slot is a real token (fast path)."""
        return None if bool(self.valid.all()) else self.valid

    def prune(self, keep: torch.Tensor) -> TokenState:
        """Keep the tokens where ``keep`` [B, N] is True (protected forced on, dead forced off).

        Kept tokens are gathered, so later blocks really run on fewer tokens.
        """
        keep = ops.normalize_keep(keep, self.valid, self.protected)
        index, valid = ops.pack_indices(keep)
        return replace(
            self,
            tokens=ops.gather_rows(self.tokens, index),
            protected=ops.gather_rows(self.protected, index) & valid,
            valid=valid,
            positions=ops.gather_rows(self.positions, index),
        )


def _folded_cls_scores(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
                       heads: torch.Tensor | int) -> torch.Tensor:
    """CLS-query attention logits [B, H, 1, N] without projecting every key.

    q_h . (W_k,h x_j + b_k,h) = (W_k,h^T q_h) . x_j + const_h: the key bias adds the same number to a
    head's whole row, which softmax cancels, so one D-vector per head replaces the N x D x A key matmul.
    """
    b, n, d = x.shape
    h = int(heads)
    q = torch.nn.functional.linear(x[:, 0], wq, bq).view(b, h, -1)  # [B, H, hd]
    # Two plain bmm's (batched over heads, then over rows) rather than einsum: the same products without
    # einsum's per-call parsing, and no broadcast that would copy the weights or tokens per head or row.
    u = torch.bmm(q.transpose(0, 1), wk.view(h, -1, d)).transpose(0, 1)  # [B, H, D]
    return (torch.bmm(u, x.transpose(1, 2)) * q.shape[-1] ** -0.5).unsqueeze(2)  # [B, H, 1, N]


KeepFn = Callable[[TokenState, int, int], torch.Tensor]
"""(state, site_index, layer) -> keep mask [B, N] over the state's current slots."""


class TokenBackbone(ABC, nn.Module):
    """A frozen transformer split into embed / blocks / head with prunable tokens.

    Adapters wrap (never copy or mutate) the user's model; its parameters are shared, not cloned.
    """

    family: str = ""
    output_kind: str = "logits"  # "logits" (classifier) or "embedding" (pooled encoder output)
    # The wrapped host model; typed Any because host modules are reached through dynamic attributes.
    model: Any

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper reports the wrapped model's mode (never changes it)

    # ---- the contract -------------------------------------------------------------------------
    @abstractmethod
    def embed(self, inputs: Any) -> TokenState:
        """Inputs (images [B,C,H,W] or tokenizer output) -> token state before block 0."""

    @abstractmethod
    def run_blocks(self, state: TokenState, start: int, stop: int) -> TokenState:
        """Run blocks[start:stop] on the current tokens with a key-padding mask where needed."""

    @abstractmethod
    def head(self, state: TokenState) -> torch.Tensor:
        """Final norm + pooling + head: logits [B, C] or pooled embedding [B, D]."""

    @abstractmethod
    def final_hidden(self, state: TokenState) -> torch.Tensor:
        """[B, N, D] last hidden state after the final norm (what the wrapped model returns)."""

    @abstractmethod
    def attention_qk(self, state: TokenState, layer: int, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, heads, N or 1, head_dim] and keys [B, heads, N, head_dim] of block ``layer``.

        cls_only projects only token 0's query (all a CLS row needs: a third of the q/k cost).
        """

    def qk_weights(self, state: TokenState, layer: int) -> tuple[Any, ...] | None:
        """(attention input [B,N,D], W_q [A,D], b_q [A] or None, W_k [A,D], heads) of block ``layer``,
        or None where q/k are normalised after projection (then the CLS row cannot be folded)."""
        return None

    def block_modules(self) -> Sequence[nn.Module]:
        """The transformer blocks as modules (their Linear layers set the features' projection)."""
        return []

    @property
    @abstractmethod
    def depth(self) -> int:
        """Number of transformer blocks."""

    @property
    @abstractmethod
    def block_shape(self) -> ops.BlockShape:
        """Dimensions that set per-block FLOPs."""

    @abstractmethod
    def embed_flops(self, n_tokens: int) -> int:
        """Matmul FLOPs of the embedding stage (e.g. the patch projection) per sample."""

    @abstractmethod
    def head_flops(self) -> int:
        """Matmul FLOPs of the head per sample."""

    @abstractmethod
    def example_inputs(self, batch: int, generator: torch.Generator, device: str = "cpu") -> Any:
        """Random inputs of the model's kind and size (images, or token ids with a full attention mask)."""

    @abstractmethod
    def signature(self) -> dict[str, Any]:
        """Architecture id, width, depth, token grid: stored in scorers and checked on load."""

    # ---- derived, shared by every adapter ------------------------------------------------------
    def attention_from_cls(self, state: TokenState, layer: int, query: str = "cls") -> torch.Tensor:
        """Attention that each token receives in block ``layer``, averaged over heads.

        query="cls" takes the row of token 0 (CLS); "mean" averages the rows of all valid queries,
        for models without a CLS token. Computed from the block's own q/k because fused attention
        never materialises the map. Returns [B, N]; invalid slots get 0.
        """
        folded = self.qk_weights(state, layer) if query == "cls" else None
        if folded is not None:
            scores = _folded_cls_scores(*folded)  # [B, H, 1, N]
        else:
            q, k = self.attention_qk(state, layer, cls_only=query == "cls")
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, 1 or N, N]
        valid = state.valid
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1).nan_to_num(0.0)  # a row with no valid key gives 0, not NaN
        if query == "cls":
            row = attn[:, :, 0]
        else:
            w = valid[:, None, :, None].to(attn.dtype)
            row = (attn * w).sum(dim=2) / w.sum(dim=2).clamp_min(1.0)
        return row.mean(dim=1) * valid

    def block_flops(self, n_tokens: int | torch.Tensor) -> torch.Tensor | int:
        """Matmul FLOPs of one block on ``n_tokens`` tokens."""
        return ops.block_flops(self.block_shape, n_tokens)

    def full_flops(self, n_tokens: int) -> int:
        """FLOPs of the unpruned model per sample."""
        return int(self.embed_flops(n_tokens) + self.depth * self.block_flops(n_tokens) + self.head_flops())

    def schedule_flops(
        self, sites: Sequence[int], counts: Sequence[int | torch.Tensor], n_tokens: int
    ) -> torch.Tensor | int:
        """FLOPs per sample of a keep schedule: counts[i] tokens alive after pruning at sites[i]."""
        blocks = ops.schedule_flops(self.block_shape, self.depth, list(sites), list(counts), n_tokens)
        return blocks + self.embed_flops(n_tokens) + self.head_flops()

    def forward_pruned(
        self, inputs: Any, sites: Sequence[int], keep_fn: KeepFn | None = None
    ) -> tuple[torch.Tensor, TokenState, list[torch.Tensor]]:
        """Run the whole model, pruning before each block in ``sites`` with ``keep_fn``.

        Returns (output, final state, per-site alive counts [B]). With keep_fn None nothing is pruned.
        """
        self.check_sites(sites)
        state = self.embed(inputs)
        counts: list[torch.Tensor] = []
        start = 0
        for i, site in enumerate(sites):
            state = self.run_blocks(state, start, site)
            if keep_fn is not None:
                state = state.prune(keep_fn(state, i, site))
            counts.append(state.alive_counts)
            start = site
        state = self.run_blocks(state, start, self.depth)
        return self.head(state), state, counts

    def forward(self, inputs: Any) -> torch.Tensor:
        """Unpruned output through the adapter (equals the wrapped model's output)."""
        return self.head(self.run_blocks(self.embed(inputs), 0, self.depth))

    def check_sites(self, sites: Sequence[int]) -> None:
        """Sites must be strictly increasing block indices in [0, depth)."""
        if any(s < 0 or s >= self.depth for s in sites):
            raise ValueError(f"pruning sites {list(sites)} must lie in [0, {self.depth - 1}]")
        if list(sites) != sorted(set(sites)):
            raise ValueError(f"pruning sites {list(sites)} must be strictly increasing")
