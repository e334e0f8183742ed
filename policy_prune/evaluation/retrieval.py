"""Retrieval quality of an encoder on a split that carries a retrieval task (``Split.queries``).

Protocol. The model under test encodes both sides: a user who swaps their encoder for the pruned one
embeds the corpus and the queries with it, so the headline numbers (``ret_recall@10``, ``ret_ndcg@10``)
rank pruned passage embeddings for pruned query embeddings. Given the unpruned model's embeddings
too (``full``), two mixed settings are reported at no extra encoding cost: ``:full_queries`` (an index
built with the pruned model, queried with the unpruned one) and ``:full_passages`` (an existing
unpruned index, queries encoded by the pruned model). The unpruned model's own numbers are the
reference row. Relevance is binary: the passages of the item a query came from (see
``policy_prune.data.text``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from policy_prune.cli_args import positive
from policy_prune.evaluation.metrics import retrieval_scores

Encoder = Callable[[Any], torch.Tensor]
"""A batch of backbone inputs (a tokenizer-style dict of [B, L] tensors) -> embeddings [B, D]: a
TokenBackbone itself, or e.g. ``lambda x: method.forward(backbone, x, sites, rule, value)[0]``."""


@dataclass
class RetrievalEmbeddings:
    """One encoder's embeddings of a split's retrieval task."""

    queries: torch.Tensor
    """[Q, D] float32, CPU."""
    passages: torch.Tensor
    """[M, D] float32, CPU."""


def embed_rows(encode: Encoder, split: Any, batch_size: int = 64, device: str = "cpu", trim: bool = False) -> torch.Tensor:
    """[M, D] float32 CPU embeddings of every row of ``split``, in batches of ``batch_size``.

    ``trim`` (text): batch rows of similar length (a stable sort by length) and drop the columns that
    are padding in every row of a batch. Several times faster on short rows and exact for the unpruned
    model up to float rounding; a scorer whose features read the padded length (``n_full``) sees other
    inputs than on the split's common padding, so keep it off for pruned models unless that is the point.
    """
    inputs = split.inputs
    masked = trim and isinstance(inputs, dict) and "attention_mask" in inputs
    lengths = inputs["attention_mask"].sum(1) if masked else None
    order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(len(split))
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for idx in order.split(batch_size):
            x = {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]
            if lengths is not None:
                x = {k: v[:, : int(lengths[idx].max())] for k, v in x.items()}
            x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
            emb = encode(x).float().cpu()
            out = emb.new_zeros(len(split), emb.shape[-1]) if out is None else out
            out[idx] = emb
    return out if out is not None else torch.zeros(0, 0)


def encode_retrieval(encode: Encoder, split: Any, batch_size: int = 64, device: str = "cpu",
                     trim: bool = False) -> RetrievalEmbeddings:
    """The queries and passages of ``split`` embedded by ``encode`` (``trim``: see :func:`embed_rows`)."""
    if split.queries is None or split.relevant is None:
        raise ValueError(f"split {split.name!r} has no retrieval task (no queries)")
    return RetrievalEmbeddings(embed_rows(encode, split.queries, batch_size, device, trim),
                               embed_rows(encode, split, batch_size, device, trim))


def retrieval_values(relevant: torch.Tensor, emb: RetrievalEmbeddings, full: RetrievalEmbeddings | None = None,
                     k: int = 10) -> dict[str, torch.Tensor]:
    """Per-query recall@k / nDCG@k [Q] (``ret_`` prefixed) of ``emb`` for the [R, 2] (query, passage)
    ``relevant`` pairs; with ``full`` (the unpruned model's embeddings) also the two mixed settings."""
    settings = {"": (emb.queries, emb.passages)}
    if full is not None:
        settings[":full_queries"] = (full.queries, emb.passages)
        settings[":full_passages"] = (emb.queries, full.passages)
    return {f"ret_{key}{suffix}": per_query for suffix, (q, p) in settings.items()
            for key, per_query in retrieval_scores(q, p, relevant, k).items()}


def retrieval_metrics(split: Any, emb: RetrievalEmbeddings, full: RetrievalEmbeddings | None = None,
                      k: int = 10, by_kind: bool = False) -> dict[str, float]:
    """Mean recall@k / nDCG@k (``ret_`` prefixed) of ``emb`` on ``split``'s task; with ``full`` (the
    unpruned model's embeddings) also the two mixed settings; ``by_kind`` adds ``/<query kind>`` means."""
    out = {}
    for key, per_query in retrieval_values(split.relevant, emb, full, k).items():
        out[key] = float(per_query.mean())
        if by_kind and ":" not in key and split.queries.kinds is not None:
            out.update(_kind_means(key, per_query, split.queries.kinds))
    return out


def _kind_means(key: str, per_query: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    out = {}
    for kind in dict.fromkeys(kinds):
        mask = torch.tensor([k == kind for k in kinds])
        out[f"{key}/{kind}"] = float(per_query[mask].mean())
    return out


def evaluate_retrieval(encode: Encoder, split: Any, full: RetrievalEmbeddings | None = None, batch_size: int = 64,
                       device: str = "cpu", k: int = 10, by_kind: bool = False, trim: bool = False) -> dict[str, float]:
    """Encode ``split``'s queries and passages with ``encode`` and score the retrieval (see the module
    docstring for the protocol). Pass ``full = encode_retrieval(backbone, split)`` once to get the
    mixed settings for every pruned method."""
    return retrieval_metrics(split, encode_retrieval(encode, split, batch_size, device, trim), full, k, by_kind)


def main(argv: list[str] | None = None) -> int:
    """``python -m policy_prune.evaluation.retrieval --env minilm-text``: the unpruned model's retrieval
    numbers per split (the reference row of every pruned method)."""
    import argparse
    import json
    import time

    from policy_prune.config import load_env_config
    from policy_prune.data import load_splits
    from policy_prune.embedded import resolve_backbone

    p = argparse.ArgumentParser(prog="python -m policy_prune.evaluation.retrieval", description=main.__doc__)
    p.add_argument("--env", default="minilm-text", help="env preset (name or YAML) with a retrieval dataset")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--k", type=positive, default=10)
    p.add_argument("--no-trim", action="store_true", help="encode at the split's common padding (slower)")
    p.add_argument("--seed", type=int, default=0, help="run seed (train subsets under data.max_samples)")
    args = p.parse_args(argv)
    cfg = load_env_config(args.env)
    backbone, tokenizer = resolve_backbone(cfg)
    splits = load_splits(cfg, args.seed, backbone, tokenizer)
    for name in args.splits:
        split, start = splits[name], time.perf_counter()
        res = evaluate_retrieval(backbone, split, batch_size=args.batch_size, k=args.k, by_kind=True, trim=not args.no_trim)
        print(json.dumps({"split": name, "passages": len(split), "queries": len(split.queries or []),
                          **{k: round(v, 4) for k, v in res.items()}, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
