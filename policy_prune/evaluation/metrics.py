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


def recall_at_k(pruned_emb: torch.Tensor, full_emb: torch.Tensor, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours (cosine, among the full embeddings, itself excluded)
    that the pruned embedding retrieves: 1.0 means retrieval is unchanged by pruning.

    pruned_emb, full_emb: [M, D]. ``k`` is capped at M - 1 (there are no more neighbours).
    """
    if pruned_emb.shape != full_emb.shape:
        raise ValueError(f"shape mismatch: pruned {tuple(pruned_emb.shape)} vs full {tuple(full_emb.shape)}")
    m = full_emb.shape[0]
    if m < 2:
        raise ValueError("recall_at_k needs at least 2 rows")
    k = min(k, m - 1)
    truth = neighbours(full_emb, full_emb, k)  # [M, k]
    found = neighbours(pruned_emb, full_emb, k)  # [M, k]
    hits = (truth[:, :, None] == found[:, None, :]).any(dim=-1).sum(dim=-1)  # [M]
    return float(hits.float().mean() / k)
