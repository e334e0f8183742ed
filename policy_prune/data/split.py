"""A dataset split of model-ready tensors (:class:`Split`): the type every loader returns, one floor below
the registry in ``policy_prune.data`` so that the loaders it calls do not import it back (issue 25)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Inputs = torch.Tensor | dict[str, torch.Tensor]
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """One split of a dataset, ready for the backbone; text splits may carry a retrieval task."""

    name: str
    """"train", "val" or "test"."""
    inputs: Inputs
    """Images [M, C, H, W] float32 (normalised for the model) or tokenizer output {"input_ids",
    "attention_mask"} [M, L] long, padded to a common L."""
    labels: torch.Tensor | None
    """[M] long class labels, or None for label-free data."""
    groups: torch.Tensor | None = None
    """[M] long: the source item of each row (a passage's docstring or help-topic section; the source
    digit drawn on a digits-cluttered canvas); rows of one item are resampled together in paired
    bootstraps. None: every row is its own item."""
    kinds: list[str] | None = None
    """Per row, what the row is (retrieval queries: "title", "summary", "name"), or None."""
    queries: Split | None = None
    """Retrieval: the queries, tokenised like ``inputs`` (their ``groups``: the item each came from);
    the rows of this split are the passages they search. None: no retrieval task."""
    relevant: torch.Tensor | None = None
    """Retrieval: [R, 2] long (query row, passage row) pairs, one per relevant passage of a query
    (binary relevance); every query has at least one. See :func:`relevance_pairs`."""
    units: torch.Tensor | None = None
    """[M] long: the unit the splits were drawn by, where it is coarser than ``groups`` (python-docs: a
    top-level module or a help topic, each holding many items). Intervals resample units (issue #23: a
    split drawn by unit is a sample of units). None: the groups are the units."""

    def __len__(self) -> int:
        first = self.inputs if isinstance(self.inputs, torch.Tensor) else next(iter(self.inputs.values()))
        return int(first.shape[0])

    def select(self, idx: torch.Tensor) -> Split:
        """The rows ``idx`` [K] (long indices or a [M] bool mask) as a new split.

        A retrieval task follows its passages: relevant pairs are renumbered to the kept rows and a
        query left with no relevant passage is dropped.
        """
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(1)
        if isinstance(self.inputs, torch.Tensor):
            inputs: Inputs = self.inputs[idx]
        else:
            inputs = {k: v[idx] for k, v in self.inputs.items()}
        queries, relevant = self.queries, self.relevant
        if queries is not None and relevant is not None:
            queries, relevant = self._follow(idx, queries, relevant)
        return Split(self.name, inputs, None if self.labels is None else self.labels[idx],
                     None if self.groups is None else self.groups[idx],
                     None if self.kinds is None else [self.kinds[i] for i in idx.tolist()], queries, relevant,
                     None if self.units is None else self.units[idx])

    def group_ids(self) -> torch.Tensor:
        """[M] long source-item id of every row (each row its own item when the dataset has no groups)."""
        return self.groups if self.groups is not None else torch.arange(len(self))

    def unit_ids(self) -> torch.Tensor:
        """[M] long: the unit of every row that intervals resample (``units``, else :meth:`group_ids`)."""
        return self.units if self.units is not None else self.group_ids()

    def _follow(self, idx: torch.Tensor, queries: Split, relevant: torch.Tensor) -> tuple[Split, torch.Tensor]:
        """The queries and [R', 2] relevant pairs of the passages ``idx`` [K] (long)."""
        new_row = torch.full((len(self),), -1, dtype=torch.long)
        new_row[idx] = torch.arange(len(idx))  # a row picked twice maps to its last pick
        pairs = relevant[new_row[relevant[:, 1]] >= 0]
        kept = pairs[:, 0].unique()  # sorted
        pairs = torch.stack([torch.searchsorted(kept, pairs[:, 0].contiguous()), new_row[pairs[:, 1]]], dim=1)
        return queries.select(kept), pairs


def relevance_pairs(relevant: list[list[int]]) -> torch.Tensor:
    """[R, 2] long (query, passage) pairs from per-query lists of relevant passage rows."""
    pairs = [(q, p) for q, rows in enumerate(relevant) for p in rows]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
