"""The TokenBackbone contract: a frozen model seen as embed -> blocks -> head over prunable tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from policy_prune.core import ops
from policy_prune.errors import UserError


def tracing() -> bool:
    """Whether the running code is being traced into a graph (torch.compile, torch.export, TorchScript/ONNX
    tracing): no device syncs, and no state kept between calls."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


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
    dense: bool = False
    """Every slot is known, without reading ``valid``, to be a real alive token (images, static
    top-k pruning). Dense states skip the padding mask and its device sync: the compile-friendly path."""
    static: bool = False
    """Padded rows (text) whose layout is known without reading the tensors: [CLS] sits in slot 0 of
    every row (right padding, as BERT-family tokenizers pad) and blocks take the padding mask (on the CPU
    outside tracing, only where a row is padded). Static states never sync with the device; prune them with
    a fixed ``width``."""

    @property
    def alive_counts(self) -> torch.Tensor:
        """[B] number of alive tokens per row."""
        return self.valid.sum(dim=1)

    def key_padding_mask(self) -> torch.Tensor | None:
        """[B, N] bool (True = attend) or None when every slot is a real token (fast path). A static state
        keeps its mask (reading ``valid`` would sync the device and break a traced graph), except on the CPU
        outside tracing, where reading it costs nothing: an unpadded row (batch 1) then runs unmasked."""
        if self.dense:
            return None
        if self.static and not self.readable:
            return self.valid
        return None if bool(self.valid.all()) else self.valid

    @property
    def readable(self) -> bool:
        """Whether reading ``valid`` on the host costs no device sync and breaks no traced graph (the CPU,
        outside tracing): only then does a static state look at which slots are real."""
        return self.valid.device.type == "cpu" and not tracing()

    @property
    def unpruned(self) -> bool:
        """Dense with every embedded token still in its slot (before any pruning, or a site that kept all):
        slot i holds token i, so positions are 0..n_full-1 without reading them."""
        return self.dense and self.tokens.shape[1] == self.n_full

    def unpadded(self) -> bool:
        """Whether every slot is known to be a real token: dense, or read where that is free (:attr:`readable`)."""
        return self.dense or (self.readable and bool(self.valid.all()))

    def with_tokens(self, tokens: torch.Tensor) -> TokenState:
        """The same slots holding new hidden states (after running blocks)."""
        return replace(self, tokens=tokens)

    def prune(self, keep: torch.Tensor, width: int | None = None, merge: bool = False) -> TokenState:
        """Keep the tokens where ``keep`` [B, N] is True (protected forced on, dead forced off).

        Kept tokens are gathered, so later blocks really run on fewer tokens. Rows are packed to the
        largest count, or to ``width`` slots (at least every row's count: a static shape, no sync).
        ``merge``: each dropped token is first averaged into its most similar kept one (:func:`ops.absorb`).
        """
        if self.static and width is None:
            raise ValueError("a static state is pruned to a fixed width: prune(keep, width)")
        keep = ops.normalize_keep(keep, self.valid, self.protected)
        index, valid = ops.pack_indices(keep, width)
        tokens = ops.gather_rows(self.tokens, index)
        if merge:
            gone = self.valid & ~keep
            # The dropped rows packed like the kept ones (a static state takes every slot: no sync).
            d_index, d_valid = ops.pack_indices(gone, self.tokens.shape[1] if self.static else None)
            tokens = ops.absorb(tokens, valid, ops.gather_rows(self.tokens, d_index), d_valid)
        return replace(
            self,
            tokens=tokens,
            protected=ops.gather_rows(self.protected, index) & valid,
            valid=valid,
            positions=ops.gather_rows(self.positions, index),
            dense=False,
        )

    def keep_top(self, scores: torch.Tensor, count: int, merge: bool = False) -> TokenState:
        """Keep ``count`` slots of every row: the protected tokens, then the best-scored others.

        Only for dense states whose rows have the same number of protected tokens (images; unpadded text
        rows), with ``count`` at least that number. The decisions are those of ``decide(..., "keep_ratio")``
        (a stable descending sort: ties go to the earlier slot) and kept tokens stay in their original
        order, so this equals ``self.prune(decide(...))`` without its count sync; the state stays dense.
        Scores are clamped to the finite range first, so a protected token ranks above any score, an
        infinite or NaN one too (text's [SEP] is the last slot and would lose a tie at +inf). ``merge`` as in
        :meth:`prune`.
        """
        if not self.dense:
            raise ValueError("keep_top needs a dense state (no padding); use prune(keep) instead")
        big = torch.finfo(scores.dtype).max
        finite = scores.nan_to_num(nan=big, posinf=big, neginf=-big)
        ranked = finite.masked_fill(self.protected, float("inf")).argsort(dim=1, descending=True, stable=True)
        index = ranked[:, :count].sort(dim=1).values
        tokens = ops.gather_rows(self.tokens, index)
        if merge:  # the rest of the ranking is what is dropped (every slot real: nothing to mask)
            gone = ranked[:, count:]
            tokens = ops.absorb(tokens, torch.ones_like(index, dtype=torch.bool), ops.gather_rows(self.tokens, gone),
                                torch.ones_like(gone, dtype=torch.bool))
        return replace(
            self,
            tokens=tokens,
            protected=ops.gather_rows(self.protected, index),
            valid=self.valid[:, : index.shape[1]],
            positions=ops.gather_rows(self.positions, index),
        )


@dataclass(frozen=True)
class ClsQuery:
    """A block's attention folded for the one query row of CLS: logits over all keys in two bmm's (fp32).

    q . (W_k,h y_j + b_k,h) = (W_k,h^T q_h) . y_j + const_h: the key bias adds the same number to a
    head's whole row, which softmax cancels, so one D-vector per head replaces the N x D x A key matmul.
    A LayerNorm before attention is folded in too (its gain into W_q and W_k, its shift into b_q), so
    the input is the tokens normalised without affine: the same normalised tokens the features project.
    """

    eps: float | None
    """The pre-attention LayerNorm's eps; None when attention reads the tokens as they are (post-norm)."""
    wq: torch.Tensor
    """[A, D] query weights (gain folded in)."""
    bq: torch.Tensor
    """[A] query bias (shift folded in)."""
    wk: torch.Tensor
    """[H, head_dim, D] key weights per head (gain and the 1/sqrt(head_dim) scale folded in)."""
    last: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, compare=False, repr=False)
    """[(raw CLS rows, their directions)] of the last :meth:`directions_of` call that stored them (one tuple,
    read and replaced whole: a concurrent caller never pairs one call's rows with another's directions)."""

    @property
    def heads(self) -> int:
        return int(self.wk.shape[0])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The attention input this query reads: [B, N, D] tokens, normalised without affine if pre-norm."""
        return x if self.eps is None else torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)

    def directions(self, cls_input: torch.Tensor) -> torch.Tensor:
        """[B, D, H]: per row, the vector each head's CLS-row logit takes a dot product with.

        ``cls_input`` [B, D] is ``normalize(tokens)[:, 0]``; the logits are ``bmm(normalize(tokens), directions)``.
        """
        b = cls_input.shape[0]
        q = torch.nn.functional.linear(cls_input, self.wq, self.bq).view(b, self.heads, -1)  # [B, H, hd]
        # Batched over heads: no broadcast copies the weights per row.
        return torch.bmm(q.transpose(0, 1), self.wk).permute(1, 2, 0)  # [H, B, D] -> [B, D, H]

    def directions_of(self, cls_rows: torch.Tensor) -> torch.Tensor:
        """:meth:`directions` of ``normalize(cls_rows)`` for raw CLS rows [B, D], the last result again where the
        rows equal the last ones exactly. For the site before block 0, where CLS is the model's own embedding
        whatever the input, so the two weight reads (W_q, W_k: 1.2 MB on MiniLM) and five ops become one
        comparison; compared only on the CPU outside tracing (no device sync, no graph break) and without
        gradients (a stored result would cut them off)."""
        if cls_rows.device.type != "cpu" or cls_rows.requires_grad or tracing():
            return self.directions(self.normalize(cls_rows))
        hit = self.last[-1] if self.last else None
        if hit is not None and hit[0].shape == cls_rows.shape and hit[0].dtype == cls_rows.dtype \
                and torch.equal(hit[0], cls_rows):
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():  # stored: usable inside and outside inference mode
            out = self.directions(self.normalize(cls_rows))
            self.last[:] = [(cls_rows.clone(), out)]
        return out

    @staticmethod
    def fold(norm: nn.Module | None, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
             heads: int) -> ClsQuery | None:
        """From the block's pre-attention norm (nn.LayerNorm or None) and its q / k weights [A, D]."""
        if norm is not None and not isinstance(norm, nn.LayerNorm):
            return None  # e.g. RMSNorm: not folded (the generic q / k path serves it)
        a, d = wq.shape
        # Folded in fp32 whatever the model's dtype: the features that read it are computed in fp32.
        bias = torch.zeros(a, device=wq.device) if bq is None else bq.detach().float()
        gain = shift = None
        if norm is not None:
            gain = norm.weight.detach().float() if norm.weight is not None else None
            shift = norm.bias.detach().float() if norm.bias is not None else None
        wq_f, wk_f = wq.detach().float(), wk.detach().float()
        if shift is not None:
            bias = bias + wq_f @ shift
        if gain is not None:
            wq_f, wk_f = wq_f * gain, wk_f * gain
        wk_f = wk_f.reshape(heads, a // heads, d) * (a // heads) ** -0.5
        eps = None if norm is None else float(norm.eps)
        return ClsQuery(eps, wq_f, bias, wk_f.contiguous())


def cls_row_attention(logits: torch.Tensor, state: TokenState) -> torch.Tensor:
    """[B, N] attention each slot receives from CLS, averaged over heads, from logits [B, N, H].

    Padded slots take no attention and get 0 (a dense state skips the masking: it has none).
    """
    if state.dense:
        return logits.softmax(dim=1).mean(dim=-1)
    valid = state.valid
    attn = logits.masked_fill(~valid.unsqueeze(-1), float("-inf")).softmax(dim=1).nan_to_num(0.0)
    return attn.mean(dim=-1) * valid


def in_dtype_of(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Floating inputs in the dtype of the weight that reads them, so fp32 data (the env's, eval's, a
    user's images) goes straight into a bf16 / fp16 model; integer inputs (token ids) pass unchanged."""
    return x.to(weight.dtype) if x.is_floating_point() and x.dtype != weight.dtype else x


FINGERPRINT_SAMPLES = 4
"""Elements per parameter in ``TokenBackbone.weights_fingerprint``."""

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
    def head(self, state: TokenState, size: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + pooling + head: logits [B, C] or pooled embedding [B, D].

        ``size`` [B, N]: the embedded tokens each slot stands for (token merging); an average pool then
        weights each slot by it, the mean over the embedded tokens that ``merge_wavg`` preserves."""

    @abstractmethod
    def final_hidden(self, state: TokenState) -> torch.Tensor:
        """[B, N, D] last hidden state after the final norm (what the wrapped model returns)."""

    @abstractmethod
    def attention_qk(self, state: TokenState, layer: int, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, heads, N or 1, head_dim] and keys [B, heads, N, head_dim] of block ``layer``.

        cls_only projects only token 0's query (all a CLS row needs: a third of the q/k cost).
        """

    def cls_query_parts(self, layer: int) -> tuple[nn.Module | None, torch.Tensor, torch.Tensor | None, torch.Tensor, int] | None:
        """(pre-attention LayerNorm or None, W_q [A, D], b_q [A] or None, W_k [A, D], heads) of block
        ``layer``, or None where q/k are normalised after projection (then the CLS row is not folded)."""
        return None

    def cls_query(self, layer: int) -> ClsQuery | None:
        """Block ``layer``'s folded CLS query (cached; rebuilt when the model's weights change)."""
        parts = self.cls_query_parts(layer)
        if parts is None:
            return None
        if torch.compiler.is_compiling():  # traced into the graph, where weight folding is constant work
            return ClsQuery.fold(*parts)
        norm = parts[0]
        sources = [t for t in (*parts[1:4], getattr(norm, "weight", None), getattr(norm, "bias", None))
                   if isinstance(t, torch.Tensor)]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        cache: dict[int, tuple[Any, ClsQuery | None]] = self.__dict__.setdefault("_cls_query_cache", {})
        hit = cache.get(layer)
        if hit is None or hit[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # usable inside and outside inference mode
                hit = cache[layer] = (key, ClsQuery.fold(*parts))
        return hit[1]

    def block_modules(self) -> Sequence[nn.Module]:
        """The transformer blocks as modules (their Linear layers set the features' projection)."""
        return []

    def weights_fingerprint(self) -> list[float]:
        """[FINGERPRINT_SAMPLES x K] weights of the first and the last block: from each of their K parameters
        in order, the elements at evenly spread fixed positions (float64 values). The signature's ``weights``
        entry, which tells checkpoints of one architecture apart (compared with ``artifact.same_weights``).

        A few elements, not every weight: cheap on any model. A dtype cast moves each by at most its unit
        roundoff, a device move not at all. Cached until a tensor changes (its storage, version, dtype or
        device). Empty for a model on the meta device.
        """
        blocks = list(self.block_modules())
        params = [p for b in dict.fromkeys(blocks[:1] + blocks[-1:]) for p in b.parameters() if p.numel()]
        if any(p.is_meta for p in params):
            return []
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        hit = self.__dict__.get("_weights_fingerprint")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                picks = [p.detach().reshape(-1)[torch.linspace(0, p.numel() - 1, FINGERPRINT_SAMPLES).round().long()
                                                 .to(p.device)].double().cpu() for p in params]
            hit = self.__dict__["_weights_fingerprint"] = (key, torch.cat(picks).tolist() if picks else [])
        return list(hit[1])

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
        """Architecture id, width, depth, token grid and the ``weights`` fingerprint
        (:meth:`weights_fingerprint`): stored in scorers and checked on load."""

    # ---- derived, shared by every adapter ------------------------------------------------------
    def attention_from_cls(self, state: TokenState, layer: int, query: str = "cls") -> torch.Tensor:
        """Attention that each token receives in block ``layer``, averaged over heads.

        query="cls" takes the row of token 0 (CLS); "mean" averages the rows of all valid queries,
        for models without a CLS token. Computed from the block's own q/k because fused attention
        never materialises the map. Returns [B, N]; invalid slots get 0.
        """
        folded = self.cls_query(layer) if query == "cls" else None
        if folded is not None:
            y = folded.normalize(state.tokens.float())  # the folded query is fp32 (see ClsQuery.fold)
            return cls_row_attention(torch.bmm(y, folded.directions(y[:, 0])), state)
        q, k = self.attention_qk(state, layer, cls_only=query == "cls")
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, 1 or N, N]
        if query == "cls":
            return cls_row_attention(scores[:, :, 0].transpose(1, 2), state)
        valid = state.valid
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1).nan_to_num(0.0)  # a row with no valid key gives 0, not NaN
        w = valid[:, None, :, None].to(attn.dtype)
        return ((attn * w).sum(dim=2) / w.sum(dim=2).clamp_min(1.0)).mean(dim=1) * valid

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
        self, inputs: Any, sites: Sequence[int], keep_fn: KeepFn | None = None, merge: bool = False
    ) -> tuple[torch.Tensor, TokenState, list[torch.Tensor]]:
        """Run the whole model, pruning before each block in ``sites`` with ``keep_fn`` (``merge``: see
        :meth:`TokenState.prune`).

        Returns (output, final state, per-site alive counts [B]). With keep_fn None nothing is pruned.
        """
        if keep_fn is None:
            return self.forward_sites(inputs, sites, lambda state, i, layer: state)
        return self.forward_sites(inputs, sites,
                                  lambda state, i, layer: state.prune(keep_fn(state, i, layer), merge=merge))

    def forward_sites(
        self, inputs: Any, sites: Sequence[int], step: Callable[[TokenState, int, int], TokenState],
        static: bool = False,
    ) -> tuple[torch.Tensor, TokenState, list[torch.Tensor]]:
        """Run the whole model, replacing the state by ``step(state, site_index, layer)`` before each site.

        ``static`` marks a padded embedded state static (see ``TokenState.static``): no device sync from
        the embedding to the head, for torch.compile and export. Returns (output, final state, per-site
        alive counts [B]).
        """
        self.check_sites(sites)
        state = self.embed(inputs)
        if static and not state.dense:
            state = replace(state, static=True)
        counts: list[torch.Tensor] = []
        start = 0
        for i, site in enumerate(sites):
            state = step(self.run_blocks(state, start, site), i, site)
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
            raise UserError(f"pruning sites {list(sites)} must lie in [0, {self.depth - 1}]")
        if list(sites) != sorted(set(sites)):
            raise UserError(f"pruning sites {list(sites)} must be strictly increasing")
