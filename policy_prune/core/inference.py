"""``prune(model, scorer) -> PrunedModel``: the user's own model, called as before, on fewer tokens.

    scorer = policy_prune.load_scorer("runs/.../scorer")
    fast = policy_prune.prune(model, scorer)            # threshold rule from scorer.json
    logits = fast(images)                               # or fast(**tokenizer(texts, ...))
    logits, kept = fast(images, return_kept=True)       # kept [B, N]: the tokens that reached the end

The model is wrapped through its TokenBackbone adapter and never modified. Kept tokens are gathered
(really removed), so measured speed follows FLOPs. Decisions come from ``make_keep_fn``: the same code
path and the same decisions as the trained policy's deterministic mode in the env.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from policy_prune.core import ops
from policy_prune.core.artifact import RULES, check_signature, load_scorer, normalize_rule
from policy_prune.core.backbones import HFEncoderBackbone, KeepFn, TokenBackbone, TokenState, adapt
from policy_prune.core.backbones.base import tracing
from policy_prune.core.backbones.hf import POOLINGS, TEXT_PROTECTED
from policy_prune.core.budget import SPLITS
from policy_prune.core.features import make_projection, token_layout
from policy_prune.core.schedule import TokenCounts, keep_ratios_for, keep_schedule, lowest_flops_ratio
from policy_prune.core.scorer import (
    LearnedScorer,
    TokenScorer,
    context_rows,
    idle_sites,
    make_keep_fn,
    site_values,
    spent_fraction,
)
from policy_prune.core.selection import learned_flops, model_has_cls
from policy_prune.core.sentence_transformer import is_sentence_transformer, prune_sentence_transformer
from policy_prune.errors import UsageError, UserError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

TEXT_ARGS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_PLAN_TOKENS = 128
"""Text length for which ``flops=`` solves keep ratios (the ratio of a schedule barely depends on it)."""
# Accepted for call compatibility with HF models; only their default (off) values are supported.
OFF_FLAGS = ("output_attentions", "output_hidden_states", "interpolate_pos_encoding")
HF_OUTPUTS = ("PrunedEncoderOutput", "PrunedClassifierOutput")


def __getattr__(name: str) -> Any:
    # The HF output classes subclass transformers' ModelOutput: import them (and transformers) only when
    # asked for, so that pruning a timm model never imports transformers.
    if name in HF_OUTPUTS:
        from policy_prune.core import hf_outputs

        return getattr(hf_outputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PrunedModel(nn.Module):
    """The user's model run with a scorer pruning tokens at its sites; called exactly like the model.

    timm ViT: ``pruned(images) -> logits``. HF text encoder: ``pruned(**tokenizer_output)`` ->
    ``PrunedEncoderOutput``. HF ViT classifier: ``pruned(pixel_values) -> PrunedClassifierOutput``.

    Kept tokens, the same way for every family: ``output, kept = pruned(..., return_kept=True)``, where
    ``kept`` [B, N] bool marks the tokens of the embedded sequence (prefix / special tokens included,
    text padding False) that reached the last block.

    The wrapped model's parameters are shared, not copied. ``.to()``, ``.half()``, ``.cuda()`` move the
    model, the scorer's MLP and the feature projection (a buffer of this module; the scorer passed to
    ``prune`` keeps its own). ``run`` gives the raw head output, the final TokenState and the per-site
    alive counts.
    """

    projection: torch.Tensor

    def __init__(self, backbone: TokenBackbone, scorer: LearnedScorer, rule: str, values: Sequence[float]) -> None:
        super().__init__()
        self.training = bool(backbone.training)  # the wrapped model's mode, not a new module's default (train)
        self.backbone = backbone
        self.scorer_net: TokenScorer = scorer.net  # registered so .to() / .eval() reach the scorer too
        projection = scorer.projection if scorer.projection is not None else make_projection(backbone, scorer.spec)
        self.register_buffer("projection", projection.detach().clone())
        # A private copy of the scorer that reads this module's buffer (kept in step by _apply).
        self.scorer = dataclasses.replace(scorer, projection=self.projection)
        self.rule = rule
        self.values = [float(v) for v in values]
        self.sites = list(scorer.sites)
        self._plans: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._widths: dict[int, list[int]] = {}
        if rule == "keep_ratio":
            self._plan_ahead()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PrunedModel:
        super()._apply(fn, recurse)
        self.scorer.projection = self.projection  # .to() / .half() replaced the buffer: follow it
        # Planned contexts are made again where the projection now is (a traced call then reads them as constants
        # on the right device), never converted: a .half().float() round trip would round them (1e-4) away from
        # the contexts the keep-mask path builds.
        self._plans = {}
        if self.rule == "keep_ratio":
            self._plan_ahead()
        return self

    def extra_repr(self) -> str:
        return f"sites={self.sites}, rule={self.rule!r}, values={self.values}" + (", merge=True" if self.scorer.merge else "")

    def keep_fn(self) -> KeepFn:
        """A fresh KeepFn for one forward pass (it tracks the pass's compute spent)."""
        return make_keep_fn(self.backbone, self.scorer, self.rule, self.values)

    def step_fn(self, keep_fn: KeepFn | None = None) -> Callable[[TokenState, int, int], TokenState]:
        """The per-site pruning step of one forward pass (``TokenBackbone.forward_sites``).

        keep_ratio takes a static path (no device sync, fixed shapes: what ``torch.compile`` and export
        want). On a dense state (images; on the CPU outside tracing, text rows embedded unpadded, as at batch 1):
        a fixed count and context per site, then top-k and gather.
        On a static state (padded text, see :meth:`static_text`): the keep mask's own per-row decisions
        (counts proportional to each row's length, contexts per row) packed to a fixed width per site,
        with a padding mask for rows that keep fewer. Everything else goes through the keep mask of
        ``keep_fn`` packed to the largest row. All give the same decisions.
        """
        fn = keep_fn or self.keep_fn()
        static, merge = keep_fn is None and self.rule == "keep_ratio", self.scorer.merge
        idle = [keep_fn is None and site for site in self.idle_sites()]
        # Whether a scored site follows each site: its context (compute spent) needs this site's counts.
        counted = [not all(idle[i + 1:]) for i in range(len(idle))]

        def step(state: TokenState, site_index: int, layer: int) -> TokenState:
            if static and site_index == 0 and state.static and state.unpadded():
                # Text rows embedded at one length (batch 1): the dense path of images, planned for that
                # length (the plan holds for rows embedded unpadded, so it is decided on the embedded rows).
                state = dataclasses.replace(state, dense=True)
            if idle[site_index]:  # keeps every token: no scorer (the keep mask only counts them)
                if static and state.dense:
                    return state
                if site_index and not counted[site_index]:
                    return state  # nothing to count for: no later site reads the counts
                keep = fn(state, site_index, layer)
                # The first site packs padded rows to their longest; after it every state is packed (a static
                # state keeps its planned width), so packing again would change nothing.
                return state if state.dense or state.static or site_index else state.prune(keep)
            if static and state.dense:
                count, context = self._plan(state.n_full)[site_index]  # one context row [1, G] for every row
                return state.keep_top(self.scorer.logits(self.backbone, state, layer, context.to(state.tokens.device)), count,
                                      merge)
            width = self.text_widths(state.n_full)[site_index] if state.static else None
            return state.prune(fn(state, site_index, layer), width, merge)

        return step

    def idle_sites(self) -> list[bool]:
        """Per site: whether the rule keeps every token there (keep_ratio 1, threshold -inf), so the scorer
        never runs at it (:func:`policy_prune.core.scorer.keeps_all`)."""
        return idle_sites(self.rule, self.values, len(self.sites))

    def static_text(self, inputs: Any, keep_fn: KeepFn | None = None) -> bool:
        """Whether ``run`` takes the static keep_ratio path for text ``inputs`` (padded rows, no sync).

        Needs right padding and the default protection ([CLS] and the last real token, see
        ``HFEncoderBackbone``): rows given a ``special_tokens_mask`` may protect more tokens than the
        planned widths hold, so they take the keep-mask path (same decisions, a sync per site).
        """
        b = self.backbone
        return (keep_fn is None and self.rule == "keep_ratio" and isinstance(b, HFEncoderBackbone)
                and not b.is_vision and isinstance(inputs, Mapping) and inputs.get("special_tokens_mask") is None)

    def text_widths(self, n_full: int) -> list[int]:
        """Slots per row after each site on the static text path, for rows padded to ``n_full`` tokens.

        The keep_ratio rule's count grows with a row's length, so a row with every slot real (its
        [CLS] and [SEP] protected) keeps the most and every row fits.
        """
        if n_full not in self._widths:
            self._plan_text(n_full)
        return self._widths[n_full]

    def _plan(self, n_full: int) -> list[tuple[int, torch.Tensor]]:
        """Per site: (slots kept, context row [1, G]) of the keep_ratio schedule on a dense input.

        Computed with the mask path's own formulas (keep_schedule, spent_fraction, context_rows) for a
        row with every token alive, so the static path sees the same context and keeps the same count.
        Images protect their prefix tokens; an unpadded text row its [CLS] and last token.
        """
        if n_full not in self._plans:
            n0 = torch.tensor([n_full])
            prefix, grid = token_layout(self.backbone)
            kept = keep_schedule(self._site_values(), n0, prefix if grid else min(n_full, TEXT_PROTECTED))
            device = self.projection.device
            # Normal tensors whatever mode the first call for this length ran in (a text plan is made on first use:
            # one made under inference_mode would break a later call with gradients on).
            with torch.inference_mode(False), torch.no_grad():
                self._plans[n_full] = [
                    (int(kept[i]), context_rows(i, len(self.sites), (kept[i - 1] if i else n0).float() / n_full,
                                                spent_fraction(self.backbone, self.sites, n0, kept[:i], n_full),
                                                device, self.scorer.budget_value))
                    for i in range(len(kept))
                ]
        return self._plans[n_full]

    def _plan_text(self, n_max: int) -> None:
        """Text widths for every padded length up to ``n_max``, in one pass."""
        n = torch.arange(n_max + 1)
        counts = torch.stack(keep_schedule(self._site_values(), n, n.clamp_max(TEXT_PROTECTED)), dim=1)
        self._widths.update(enumerate(counts.tolist()))

    def _plan_ahead(self) -> None:
        """Plan the static path at construction: a traced call (torch.compile, export) then reads Python
        ints and constant contexts, and never runs the planning's tensor-to-int conversions."""
        prefix, grid = token_layout(self.backbone)
        if grid is not None:
            self._plan(prefix + grid[0] * grid[1])
        elif isinstance(self.backbone, HFEncoderBackbone) and not self.backbone.is_vision:
            n_max = int(getattr(self.backbone.config, "max_position_embeddings", 512))
            if n_max not in self._widths:  # ints, device-free: a .to() keeps them
                self._plan_text(n_max)

    def _site_values(self) -> list[float]:
        return site_values(self.values, len(self.sites))

    def run(self, inputs: Any, keep_fn: KeepFn | None = None) -> tuple[torch.Tensor, TokenState, list[torch.Tensor]]:
        """(head output, final state, per-site alive counts [B]) for adapter-style ``inputs``.

        ``keep_fn`` replaces the scorer's decisions (then every state takes the keep-mask path).
        """
        static = self.static_text(inputs, keep_fn)
        sites = self.sites if keep_fn is not None else self.run_sites()
        out, state, counts = self.backbone.forward_sites(inputs, sites, self.step_fn(keep_fn), static=static)
        return out, state, counts + counts[-1:] * (len(self.sites) - len(sites))

    def run_sites(self) -> list[int]:
        """The sites a call splits the blocks at: up to the last scored one. The sites after it keep every
        token and no later site reads their counts, so the blocks run through them in one segment (each
        boundary cost ~35 us per call at batch 1 on the CPU)."""
        scored = [i for i, idle in enumerate(self.idle_sites()) if not idle]
        return self.sites[: max(scored, default=0) + 1]

    def forward(self, *args: Any, return_kept: bool = False, **kwargs: Any) -> Any:
        """The wrapped model's output on pruned tokens; with ``return_kept``, ``(output, kept [B, N] bool)``."""
        return_dict = kwargs.pop("return_dict", None)
        inputs = self._inputs(args, kwargs)
        if _empty(inputs):  # nothing to prune: the wrapped model's own answer (or its own error)
            if return_dict is not None:
                kwargs["return_dict"] = return_dict
            kwargs.pop("special_tokens_mask", None)  # ours, not the model's
            out = self.backbone.model(*args, **kwargs)
            kept = torch.zeros(0, self._n_full(inputs), dtype=torch.bool, device=_lead(inputs).device)
            return (out, kept) if return_kept else out
        out, state, _ = self.run(inputs)
        result = self._format(out, state)
        if return_dict is False and hasattr(result, "to_tuple"):
            result = result.to_tuple()
        return (result, kept_mask(state)) if return_kept else result

    def _n_full(self, inputs: Any) -> int:
        """Tokens of the embedded sequence for ``inputs``: the prefix and patch grid, or the padded length."""
        prefix, grid = token_layout(self.backbone)
        return prefix + grid[0] * grid[1] if grid is not None else int(_lead(inputs).shape[1])

    # ---- calling conventions ------------------------------------------------------------------------
    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The adapter's inputs from the original model's call arguments."""
        for flag in OFF_FLAGS:
            if kwargs.pop(flag, None):
                raise UsageError(f"PrunedModel does not support {flag}=True")
        b = self.backbone
        if isinstance(b, HFEncoderBackbone) and not b.is_vision:
            named = dict(zip(TEXT_ARGS, args, strict=False))
            extra = set(kwargs) - set(TEXT_ARGS) - {"special_tokens_mask"}
            if len(args) > len(TEXT_ARGS) or extra or set(named) & set(kwargs):
                raise UsageError(f"PrunedModel takes input_ids, attention_mask, token_type_ids, special_tokens_mask; "
                                f"got unsupported arguments {sorted(extra) or 'positional'}")
            inputs = {**named, **kwargs}
            if inputs.get("input_ids") is None:
                raise UsageError("PrunedModel needs input_ids")
            return {k: v for k, v in inputs.items() if v is not None}
        key = "pixel_values" if isinstance(b, HFEncoderBackbone) else "x"
        if len(args) + len(kwargs) != 1 or (kwargs and key not in kwargs):
            raise UsageError(f"PrunedModel takes one input ({key}), got {len(args)} positional and {sorted(kwargs)}")
        return args[0] if args else kwargs[key]

    def _format(self, out: torch.Tensor, state: TokenState) -> Any:
        b = self.backbone
        if not isinstance(b, HFEncoderBackbone):
            return out  # timm and other adapters: the head output is what the model returns
        from policy_prune.core.hf_outputs import PrunedClassifierOutput, PrunedEncoderOutput

        if b.output_kind == "logits":
            return PrunedClassifierOutput(logits=out, kept_mask=kept_mask(state))
        hidden = ops.scatter_to_grid(b.final_hidden(state), state.positions, state.valid, state.n_full)
        pooler = getattr(b.base, "pooler", None)
        pooled = pooler(hidden) if isinstance(pooler, nn.Module) else None
        return PrunedEncoderOutput(last_hidden_state=hidden, pooler_output=pooled, sentence_embedding=out,
                                   kept_mask=kept_mask(state))


def _lead(inputs: Any) -> Any:
    """The batch-leading tensor of adapter-style ``inputs``: the images, or a mapping's input_ids."""
    return inputs["input_ids"] if isinstance(inputs, Mapping) else inputs


def _empty(inputs: Any) -> bool:
    """Whether adapter-style ``inputs`` hold no row. Never while tracing: a traced batch size is a symbol
    (``torch.export`` with a dynamic batch), not a number to branch on."""
    first = _lead(inputs)
    return isinstance(first, torch.Tensor) and not tracing() and first.shape[0] == 0


def kept_mask(state: TokenState) -> torch.Tensor:
    """[B, n_full] bool: the embedded-sequence tokens alive in ``state``."""
    return ops.scatter_to_grid(state.valid.float(), state.positions, state.valid, state.n_full) > 0


# ---- the public entry point -----------------------------------------------------------------------------
@overload  # a SentenceTransformer is an nn.Module too: the narrower case first
def prune(model: SentenceTransformer,  # type: ignore[overload-overlap]
          scorer: LearnedScorer | str | Path, rule: str | None = None,
          keep_ratio: float | Sequence[float] | None = None, threshold: float | Sequence[float] | None = None,
          strict: bool = True, flops: float | None = None, task: str | None = None,
          split: str | None = None) -> SentenceTransformer: ...


@overload
def prune(model: nn.Module, scorer: LearnedScorer | str | Path, rule: str | None = None,
          keep_ratio: float | Sequence[float] | None = None, threshold: float | Sequence[float] | None = None,
          strict: bool = True, flops: float | None = None, task: str | None = None,
          split: str | None = None) -> PrunedModel: ...


def prune(
    model: nn.Module,
    scorer: LearnedScorer | str | Path,
    rule: str | None = None,
    keep_ratio: float | Sequence[float] | None = None,
    threshold: float | Sequence[float] | None = None,
    strict: bool = True,
    flops: float | None = None,
    task: str | None = None,
    split: str | None = None,
) -> Any:
    """Wrap ``model`` (timm ViT or HF encoder, in memory) so that ``scorer`` prunes its tokens.

    ``scorer`` is a LearnedScorer or the path of an exported artifact. The rule is ``threshold`` (keep
    tokens whose logit > value; per-sample counts, rows packed with a padding mask) or ``keep_ratio``
    (keep that fraction of the prunable alive tokens at each site; fixed counts, static shapes).
    Values are one number or one per site; with neither given, scorer.json's default rule is used.
    ``rule="threshold"`` without a value (and without ``flops``) is threshold 0, the policy's own
    deterministic decision (keep probability > 0.5): no FLOPs target is calibrated or met by it.

    ``flops`` asks for a FLOPs ratio instead (e.g. 0.5: half the unpruned model's FLOPs, the scorer's own
    features and MLP included). A budget-conditioned scorer is told that budget and runs the rule its
    calibration chose on validation data at the nearest calibrated target (``rule=`` overrides it):
    ``keep_ratio`` (per-site shares of each row's own prunable tokens, static shapes; the allocation is
    the policy's own, scaled so that validation-like data, batched as deployed, runs at ``flops``) or
    ``threshold`` (the calibrated logit threshold: per-sample counts whose total meets ``flops`` on
    such data, a batch packed to its largest row; its total follows the data, so on inputs unlike
    them it can run above ``flops``: minilm-text's calibrated threshold at 0.5 ran 0.58 on the test split,
    where keep_ratio runs close to ``flops`` on every kind of row: 0.49 on passages, 0.51 on queries).
    A scorer without a budget input meets it with one constant keep_ratio on a full-length input. See
    :mod:`policy_prune.core.budget`.

    ``task`` ("query" or "document", with ``flops``; retrieval scorers, whose calibration held both): the
    keep_ratio plan solved on that kind of input alone, which runs at most the FLOPs it is asked for on it (one plan
    for the mix runs above it on short queries alone: minilm-text's at 0.35 ran 0.368 on val queries), asked as
    ``split`` says. See ``BudgetInput.tasks``.

    ``split`` (with ``task``, or a SentenceTransformer): what ``flops`` bounds for retrieval. ``"total"`` (the
    default where the calibration has a split, ``BudgetInput.splits``): one total over queries and documents, each
    task's plan asked for its share of it (``BudgetInput.task_flops``: queries above ``flops``, documents below,
    the pair that retrieved best on val), so any mix whose queries carry at most ``BudgetInput.query_share`` of the
    unpruned FLOPs runs at most ``flops``; a query encoder alone runs above it. ``"each"``: each task's plan at
    ``flops`` itself, at most ``flops`` on each kind of input. UserError for ``"total"`` with a scorer that has no
    split, and for ``split`` without a task on a plain model (it has no effect there).

    A scorer trained for another backbone raises ScorerMismatchError (``strict=False`` tolerates a
    different architecture name or class count when every shape matches).

    A ``sentence_transformers.SentenceTransformer`` gives a shallow copy of it whose own ``encode``
    runs the pruned encoder (same arguments: batch_size, normalize_embeddings, convert_to_tensor, ...);
    the original model is left as it was. With ``flops`` and a keep_ratio rule, its ``encode_query`` and
    ``encode_document`` (sentence-transformers 5 and newer) run the scorer's keep_ratio plan for that task,
    where it has one (unless ``rule="threshold"``), split as ``split`` says; ``encode`` runs the call for the mix.
    """
    if isinstance(model, PrunedModel):
        raise UsageError("the model is already a PrunedModel; pass the original model")
    if flops is not None:
        flops = _flops_number(flops)
    if isinstance(scorer, str | Path):
        scorer = load_scorer(scorer)
    if not isinstance(scorer, LearnedScorer):
        raise UsageError(f"scorer must be a LearnedScorer (policy_prune.load_scorer) or the path of a scorer folder, "
                         f"got {type(scorer).__name__}")
    if split == "total" and (scorer.budget is None or not scorer.budget.splits):
        raise UserError("split='total': this scorer's calibration has no split of one total between queries and "
                        "documents (a retrieval run calibrated again, policy-prune export RUN --calibrate, has one)")
    if task is not None and flops is None:
        raise UserError(f"task={task!r} picks the plan for a FLOPs target: give flops=... too")
    if split not in (None, *SPLITS):
        raise UserError(f"split={split!r}: one of {', '.join(repr(s) for s in SPLITS)} (what flops bounds for retrieval)")
    if split is not None and flops is None:
        raise UserError(f"split={split!r} says what a FLOPs target bounds: give flops=... too")
    if is_sentence_transformer(model):  # the optional integration: sentence_transformers is not imported
        if task is not None:
            raise UserError("a pruned SentenceTransformer picks the task itself: encode_query and encode_document run "
                            "the plan for queries and for documents (leave task out)")

        def prune_encoder(encoder: nn.Module) -> tuple[PrunedModel, dict[str, PrunedModel]]:
            pruned = prune(encoder, scorer, rule, keep_ratio, threshold, strict, flops)
            return (pruned, {}) if rule == "threshold" else _with_tasks(pruned, encoder, flops, split)

        if split is not None and rule == "threshold":
            raise UserError(f"split={split!r}: rule='threshold' runs one threshold for every task (no plan per task)")

        return prune_sentence_transformer(model, prune_encoder)
    backbone = _adapt_for(model, scorer)
    check_signature(scorer, backbone.signature(), strict=strict)
    try:
        backbone.check_sites(scorer.sites)
    except ValueError as exc:
        raise UserError(f"scorer does not fit this model: {exc}") from None
    if split is not None and task is None:
        raise UserError(f"split={split!r} splits one total between task plans: give task='query' or 'document' too "
                        "(a pruned SentenceTransformer routes encode_query / encode_document itself)")
    if flops is not None:
        if keep_ratio is not None or threshold is not None:
            raise UserError("give one of flops, keep_ratio or threshold")
        if task is not None and split != "each" and scorer.budget is not None and scorer.budget.splits:
            try:
                flops = scorer.budget.task_flops(flops, task)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        name, values, scorer = rule_for_flops(backbone, scorer, flops, rule, task)
    else:
        scorer = scorer.at(None)
        name, values = resolve_rule(scorer, rule, keep_ratio, threshold)
    # The scorer's MLP and projection go where the model is (a CUDA model, a CPU-loaded scorer); their dtype stays.
    device = next(model.parameters(), torch.empty(0)).device
    return PrunedModel(backbone, scorer, name, values).to(device)


def _with_tasks(pruned: PrunedModel, encoder: nn.Module, flops: float | None,
                split: str | None = None) -> tuple[PrunedModel, dict[str, PrunedModel]]:
    """(``pruned``, {task: the call with that task's keep_ratio plan}) for a SentenceTransformer's encode_query /
    encode_document: where ``pruned`` runs at ``flops`` (its default rule, the threshold included: a task's plan
    is keep_ratio's) and its scorer has plans per task (none otherwise: every task runs ``pruned``). They share
    the encoder and the scorer's weights, and split ``flops`` as ``split`` says (:func:`prune`). Where one total
    cannot be split (a task's part of it runs above what it is asked for on its calibration data), every task
    runs its plan at ``flops`` instead (a part alone would break the total), and a warning says so; a task whose
    plan at ``flops`` does not reach it runs ``pruned``, with a warning too."""
    budget = pruned.scorer.budget
    if flops is None or budget is None:
        return pruned, {}
    if split != "each" and budget.splits:
        try:
            return pruned, {task: prune(encoder, pruned.scorer, "keep_ratio", strict=False, flops=flops, task=task,
                                        split="total") for task in budget.tasks}
        except UserError as exc:
            warnings.warn(f"flops={flops:g} cannot be split between queries and documents here ({exc}): each runs its "
                          "plan at flops", stacklevel=5)
    tasks = {}
    for task in budget.tasks:
        try:
            tasks[task] = prune(encoder, pruned.scorer, "keep_ratio", strict=False, flops=flops, task=task, split="each")
        except UserError as exc:
            warnings.warn(f"encode with task={task!r} runs the plan for the mix, above flops={flops:g} on that kind "
                          f"of input: {exc}", stacklevel=5)
    return pruned, tasks


def _flops_number(flops: Any) -> float:
    """``flops`` as a float: a number of any kind (numpy and 0-d torch scalars too), never text or a bool."""
    try:
        if not isinstance(flops, str | bool):
            return float(flops)
    except (TypeError, ValueError):
        pass
    raise UsageError(f"flops must be a number (a FLOPs ratio in (0, 1]), got {flops!r}")


def rule_for_flops(backbone: TokenBackbone, scorer: LearnedScorer, flops: float, rule: str | None = None,
                   task: str | None = None) -> tuple[str, list[float], LearnedScorer]:
    """(rule, one value per site, the scorer told its budget) that run ``scorer`` at ``flops``.

    The default rule is the one calibration chose at the nearest calibrated target (``BudgetInput.rule``:
    the better of the two on validation data, issue #23); keep_ratio for scorers without calibration.
    keep_ratio: fixed per-site counts, the policy's calibrated allocation scaled so that they execute
    ``flops`` on the calibration batches (``BudgetInput.plan``; uncalibrated: on a full-length input), the
    scorer's own cost included (:func:`static_ratios`). threshold (budget-conditioned scorers): the calibrated threshold.
    Sites the calibration left idle at ``flops`` for the rule (``BudgetInput.idle``) keep every token
    (keep_ratio 1, threshold -inf) and run no scorer.
    UserError, never a silently different budget, for an ``flops`` below what keep_ratio reaches
    (:func:`check_reachable`) or, with threshold, one the calibration did not reach or without calibration.
    ``task``: keep_ratio's plan solved on that kind of input alone (``BudgetInput.plan``), the default rule
    with a task (also where the mix's default at ``flops`` is the threshold); UserError for ``rule="threshold"``,
    which has no plan per task.
    """
    if not 0.0 < flops <= 1.0:
        raise UserError(f"flops must be a FLOPs ratio in (0, 1], got {flops:g}")
    budget = scorer.budget
    if rule not in (None, *RULES):
        raise UserError(f"unknown decision rule {rule!r} (threshold or keep_ratio)")
    try:
        told = scorer.at(flops) if budget is not None else scorer
        # A task's plan is keep_ratio's: with a task, keep_ratio unless the threshold is asked for.
        rule = rule or (budget.rule(flops) if budget is not None and task is None else "keep_ratio")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if task is not None and (rule == "threshold" or budget is None):
        why = "the threshold rule has none (ask rule='keep_ratio')" if budget is not None else \
            "this scorer has no budget input, so no calibration"
        raise UserError(f"task={task!r} picks a keep_ratio plan solved for that kind of input: {why}")
    if rule == "threshold":
        if budget is None:
            raise UserError("this scorer has no budget input, so no threshold is calibrated for a FLOPs target: "
                            "use rule='keep_ratio' (or no rule) with flops=...")
        budget.check_reached(flops)
        t = budget.threshold(flops)
        return "threshold", [-math.inf if i else t for i in budget.idle(flops, len(scorer.sites))], told
    if budget is None:
        return "keep_ratio", static_ratios(backbone, told, flops), told
    try:
        plan = budget.plan(flops, task)
        budget.check_spent(flops, "keep_ratio", task=task)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    idle = budget.idle(flops, len(scorer.sites), "keep_ratio")
    return "keep_ratio", static_ratios(backbone, told, plan, budget.keep_ratios(flops), idle), told


def static_ratios(backbone: TokenBackbone, scorer: LearnedScorer, flops: float,
                  profile: Sequence[float] | None = None, idle: Sequence[bool] | None = None) -> list[float]:
    """Per-site keep ratios shaped like ``profile`` (default: 0.5 everywhere) whose FLOPs on a full-length
    input (images: every patch; text: ``TEXT_PLAN_TOKENS``), the scorer's own cost included, are ``flops``;
    ``idle`` sites keep every token and run no scorer. Text's 128-token row stands for rows of every length: its
    counts are not rounded, so the ratios move continuously with ``flops``."""
    counts, selection = _full_length_plan(backbone, scorer)
    check_reachable(backbone, scorer.sites, counts, flops, selection, idle)
    text = token_layout(backbone)[1] is None
    return keep_ratios_for(backbone, scorer.sites, counts, flops, profile or [0.5] * len(scorer.sites), selection, idle,
                           smooth=text)


def static_floor(backbone: TokenBackbone, scorer: LearnedScorer, idle: Sequence[bool] | None = None) -> float:
    """The lowest ``flops`` :func:`static_ratios` plans for (every prunable token dropped at the first site)."""
    counts, selection = _full_length_plan(backbone, scorer)
    return lowest_flops_ratio(backbone, scorer.sites, counts, selection, idle)


def _full_length_plan(backbone: TokenBackbone, scorer: LearnedScorer) -> tuple[TokenCounts, Callable[[int, int], float]]:
    """(a full-length input's token counts, the scorer's selection cost per site) for static plans (the
    schedules charge none at a site planned at ratio 1, where no scorer runs)."""
    prefix, grid = token_layout(backbone)
    n_full = prefix + grid[0] * grid[1] if grid else TEXT_PLAN_TOKENS
    n_protected = prefix if grid else 2  # [CLS] and [SEP]

    def selection(site_index: int, n: int) -> float:
        return learned_flops(backbone, scorer, scorer.sites[site_index], n, has_cls=model_has_cls(backbone))

    return TokenCounts.dense(n_full, n_protected), selection


def check_reachable(backbone: TokenBackbone, sites: Sequence[int], counts: TokenCounts, flops: float,
                    selection: Callable[[int, int], float], idle: Sequence[bool] | None = None) -> None:
    """UserError when ``flops`` is below what any keep_ratio schedule at ``sites`` reaches (the solver would
    fall to keep ratio 0 and run at that floor instead)."""
    floor = lowest_flops_ratio(backbone, sites, counts, selection, idle)
    if flops < floor - 1e-9:
        first = next((s for s, i in zip(sites, idle or [False] * len(sites), strict=True) if not i), sites[-1])
        why = (f"blocks 0-{first - 1} before it still run" if first > 1 else "block 0 before it still runs") \
            + " on every token" if first else "the protected tokens still run every block"
        lowest = math.ceil(floor * 1000) / 1000
        raise UserError(f"flops={flops:g} is below the lowest FLOPs ratio this scorer reaches on this model, {lowest:.3f} "
                        f"(every prunable token dropped at its first site, block {first}; {why}; its own features "
                        f"and MLP counted): ask for flops >= {lowest:.3f}")


def _adapt_for(model: nn.Module, scorer: LearnedScorer) -> TokenBackbone:
    """The model's adapter, with the text pooling the scorer was trained with."""
    backbone = adapt(model)
    stored = scorer.meta.get("backbone") or {}
    pooling = stored.get("pooling")
    if isinstance(backbone, HFEncoderBackbone) and not backbone.is_vision and pooling in POOLINGS \
            and pooling != backbone.pooling:
        backbone = adapt(model, pooling=pooling)
    return backbone


def resolve_rule(
    scorer: LearnedScorer,
    rule: str | None,
    keep_ratio: float | Sequence[float] | None,
    threshold: float | Sequence[float] | None,
) -> tuple[str, list[float]]:
    """(rule name, one value per site) from ``prune``'s arguments and the scorer's default rule."""
    if keep_ratio is not None and threshold is not None:
        raise UserError("give keep_ratio or threshold, not both")
    if rule is None:
        rule = "keep_ratio" if keep_ratio is not None else "threshold" if threshold is not None else None
    default = scorer.meta.get("default_rule") or {"rule": "threshold", "values": [0.0]}
    rule = rule or default["rule"]
    if rule not in RULES:
        raise UserError(f"unknown decision rule {rule!r} (threshold or keep_ratio)")
    if (rule == "threshold" and keep_ratio is not None) or (rule == "keep_ratio" and threshold is not None):
        raise UserError(f"rule={rule!r} does not take {'keep_ratio' if keep_ratio is not None else 'threshold'}")
    value = keep_ratio if rule == "keep_ratio" else threshold
    if value is None:
        if rule == default["rule"]:
            value = default["values"]
        elif rule == "threshold":
            value = 0.0  # the policy's deterministic decision: keep probability > 0.5
        else:
            raise UserError("rule='keep_ratio' needs keep_ratio=... (this scorer's default rule is threshold)")
    # +inf thresholds are legitimate here (keep nothing), unlike in a saved default rule (-inf, keep all, is both).
    checked = normalize_rule({"rule": rule, "values": value}, len(scorer.sites), finite=rule == "keep_ratio")
    return checked["rule"], checked["values"]
