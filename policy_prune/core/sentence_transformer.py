"""sentence-transformers glue: ``prune(st_model, scorer)`` -> a SentenceTransformer whose own ``encode``
(batching, length sorting, pooling, normalisation, numpy / tensor conversion) runs on the pruned encoder.

Imported only when a SentenceTransformer is passed to ``prune`` (extra ``policy-prune[st]``). The user's
model is never modified: the result is a shallow copy whose input module (ST's ``Transformer``, which
holds the HF encoder) is a copy with its own tokenizer, wrapped by :class:`PrunedTransformer`; the weights
and the other modules (Pooling, Dense, Normalize, ...) are the user's own, shared.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any

from torch import nn

from policy_prune.errors import UserError

TEXT_FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def is_sentence_transformer(model: Any) -> bool:
    """True for a ``sentence_transformers.SentenceTransformer`` (checked without importing the package)."""
    return any(c.__name__ == "SentenceTransformer" and c.__module__.startswith("sentence_transformers")
               for c in type(model).__mro__)


class PrunedTransformer(nn.Module):
    """ST's input module with its encoder call replaced by a :class:`~policy_prune.PrunedModel`.

    ``forward`` writes the pruned token embeddings [B, N, D] (zeros where a token was pruned) under the
    module's output name and sets ``attention_mask`` [B, N] to the kept tokens, so ST's own Pooling
    (mean, max, CLS, ...) reads only what the pruned model kept. Everything else (``preprocess``,
    ``tokenizer``, ``max_seq_length``, ...) is the wrapped module's.

    ``tasks``: the PrunedModel for a task that sentence-transformers passes (``encode_query``: "query",
    ``encode_document``: "document"; ``forward_kwargs`` asks for it), ``pruned`` for any other.
    """

    forward_kwargs = frozenset({"task"})
    """The keyword arguments sentence-transformers passes to this module's forward (5 and newer)."""

    def __init__(self, inner: nn.Module, pruned: nn.Module, tasks: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.pruned = pruned
        self.tasks = nn.ModuleDict(tasks or {})

    def forward(self, features: dict[str, Any], task: str | None = None, **kwargs: Any) -> dict[str, Any]:
        if features.get("modality", "text") != "text" or "cu_seq_lens_q" in features:
            raise UserError("a pruned SentenceTransformer encodes padded text batches only (no images, no "
                            "flattened flash-attention inputs)")
        pruned = self.tasks[task] if task is not None and task in self.tasks else self.pruned
        out = pruned(**{k: features[k] for k in TEXT_FEATURES if k in features})
        features[getattr(self.inner, "module_output_name", "token_embeddings")] = out.last_hidden_state
        features["attention_mask"] = out.kept_mask.to(features["attention_mask"].dtype)
        return features

    def save(self, *args: Any, **kwargs: Any) -> None:
        refuse_save()

    def __setattr__(self, name: str, value: Any) -> None:
        # A setting of ST's input module (max_seq_length, do_lower_case, ...) goes to the wrapped copy, which
        # tokenizes: stored here it would shadow the module's own and change nothing.
        inner = self.__dict__.get("_modules", {}).get("inner")
        if inner is not None and name not in _MODULE_ATTRS and name not in self.__dict__ and hasattr(inner, name) \
                and not hasattr(type(self), name) and not isinstance(value, nn.Module):
            setattr(inner, name, value)
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Not while copy / pickle rebuild the object (no modules yet), nor for dunder look-ups.
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


_MODULE_ATTRS = frozenset(vars(nn.Module())) | {"inner", "pruned", "tasks"}
"""Attributes a PrunedTransformer keeps for itself (nn.Module's own state and its submodules)."""


def own_input_module(inner: nn.Module) -> nn.Module:
    """A shallow copy of ST's input module with its own tokenizer (or processor): the encoder's weights stay
    shared, while settings such as ``max_seq_length`` (held by the tokenizer in sentence-transformers 5 and
    newer, by the module before) are the pruned model's own and the user's model keeps its own."""
    own = copy.copy(inner)
    own.__dict__["_modules"] = OrderedDict(inner._modules)
    for name in ("processor", "tokenizer"):
        if name in inner.__dict__ and inner.__dict__[name] is not None:
            try:
                own.__dict__[name] = copy.deepcopy(inner.__dict__[name])
            except Exception as exc:  # a tokenizer that cannot be copied: shared, as before, and said so
                warnings.warn(f"the pruned model shares the {name} of yours ({type(exc).__name__} copying it): "
                              "a setting such as max_seq_length made on one applies to both", stacklevel=3)
    return own


def refuse_save(*args: Any, **kwargs: Any) -> None:
    raise UserError("a pruned SentenceTransformer is not saved: save the original model and the scorer, "
                    "then prune again after loading")


SAVING = ("save", "save_pretrained", "push_to_hub", "save_to_hub")
"""SentenceTransformer's methods that write the model: refused on a pruned copy before they write anything (its
input module's own ``save`` ran after ST had written its config files into the folder)."""


def prune_sentence_transformer(model: Any, prune_encoder: Any) -> Any:
    """A shallow copy of ``model`` whose input module runs what ``prune_encoder(hf_encoder)`` returns: (a
    PrunedModel, {task: the PrunedModel for that task})."""
    first = next(iter(model._modules))
    inner = model._modules[first]
    encoder = getattr(inner, "auto_model", None)
    if not isinstance(encoder, nn.Module):
        raise UserError(f"cannot prune this SentenceTransformer: its first module ({type(inner).__name__}) holds "
                        "no Hugging Face encoder; use a Transformer-based model (e.g. all-MiniLM-L6-v2)")
    fast = copy.copy(model)
    # copy.copy shares the module dict itself: give the copy its own before replacing the input module.
    fast._modules = OrderedDict(model._modules)
    fast._modules[first] = PrunedTransformer(own_input_module(inner), *prune_encoder(encoder))
    fast.__dict__.update({name: refuse_save for name in SAVING if hasattr(model, name)})
    return fast
