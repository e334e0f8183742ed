"""Quality of a pruned model's outputs against the full model's: embeddings and classifiers alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_fidelity(pruned_emb: torch.Tensor, full_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pruned embedding to the full model's: [M, D], [M, D] -> [M]."""
    if pruned_emb.shape != full_emb.shape:
        raise ValueError(f"shape mismatch: pruned {tuple(pruned_emb.shape)} vs full {tuple(full_emb.shape)}")
    return F.cosine_similarity(pruned_emb.float(), full_emb.float(), dim=-1)


def neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [M, k] of the k most cosine-similar keys [M, D] to each query [M, D], row i excluding key i."""
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # [M, M]
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=-1).indices


def neighbour_recall(pruned_emb: torch.Tensor, full_emb: torch.Tensor, k: int = 10) -> torch.Tensor:
    """[M] float64: each row's share of its k nearest neighbours (cosine, among the full embeddings,
    itself excluded) that the pruned embedding retrieves; 1.0 means retrieval is unchanged by pruning.

    pruned_emb, full_emb: [M, D]. ``k`` is capped at M - 1 (there are no more neighbours); with one row
    there is no neighbour and the row's value is NaN.
    """
    if pruned_emb.shape != full_emb.shape:
        raise ValueError(f"shape mismatch: pruned {tuple(pruned_emb.shape)} vs full {tuple(full_emb.shape)}")
    k = min(k, full_emb.shape[0] - 1)
    truth = neighbours(full_emb, full_emb, k)  # [M, k]
    found = neighbours(pruned_emb, full_emb, k)  # [M, k]
    return (truth[:, :, None] == found[:, None, :]).any(dim=-1).sum(dim=-1).double() / k


def recall_at_k(pruned_emb: torch.Tensor, full_emb: torch.Tensor, k: int = 10) -> float:
    """The mean of :func:`neighbour_recall` over the rows (at least 2)."""
    if full_emb.shape[0] < 2:
        raise ValueError("recall_at_k needs at least 2 rows")
    return float(neighbour_recall(pruned_emb, full_emb, k).mean())


# ---- retrieval: queries against a passage corpus, binary relevance ------------------------------------
def rank(query_emb: torch.Tensor, passage_emb: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Rows [Q, k] of the k passages [M, D] most cosine-similar to each query [Q, D], best first.

    Equal scores rank the lower passage row first (a stable sort), so rankings are deterministic.
    """
    p = F.normalize(passage_emb.float(), dim=-1)
    k = min(k, p.shape[0])
    out = []
    for q in F.normalize(query_emb.float(), dim=-1).split(chunk):
        order = torch.sort(q @ p.T, dim=-1, descending=True, stable=True).indices  # [chunk, M]
        out.append(order[:, :k])
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def retrieval_scores(query_emb: torch.Tensor, passage_emb: torch.Tensor, relevant: torch.Tensor,
                     k: int = 10) -> dict[str, torch.Tensor]:
    """Per-query recall@k and nDCG@k [Q] of ranking passages [M, D] for queries [Q, D] by cosine.

    ``relevant``: [R, 2] long (query row, passage row) pairs, binary relevance, every query at least one.
    recall@k = relevant passages in the top k / min(|relevant|, k), so a perfect ranking scores 1 even
    when a query has more than k relevant passages; nDCG@k = sum over relevant ranks r <= k of
    1 / log2(r + 1), over its ideal, the sum for ranks 1..min(|relevant|, k).
    """
    n_q, n_p = query_emb.shape[0], passage_emb.shape[0]
    relevant = torch.unique(relevant, dim=0)  # a pair given twice is one relevant passage (it counted twice in the denominator)
    n_rel = torch.bincount(relevant[:, 0], minlength=n_q)
    if (n_rel == 0).any():
        raise ValueError(f"{int((n_rel == 0).sum())} queries have no relevant passage")
    top = rank(query_emb, passage_emb, k)  # [Q, k']
    keys = torch.arange(n_q)[:, None] * n_p + top
    hits = torch.isin(keys, relevant[:, 0] * n_p + relevant[:, 1]).float()  # [Q, k']
    discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, dtype=torch.float32))  # [k']
    ideal = discount.cumsum(0)[n_rel.clamp(max=top.shape[1]) - 1]  # [Q]
    return {
        f"recall@{k}": hits.sum(1) / n_rel.clamp(max=k).float(),
        f"ndcg@{k}": (hits * discount).sum(1) / ideal,
    }


def retrieval_at_k(query_emb: torch.Tensor, passage_emb: torch.Tensor, relevant: torch.Tensor,
                   k: int = 10) -> dict[str, float]:
    """Mean recall@k and nDCG@k over the queries (see :func:`retrieval_scores`)."""
    return {key: float(v.mean()) for key, v in retrieval_scores(query_emb, passage_emb, relevant, k).items()}
