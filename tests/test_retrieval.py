"""Retrieval metrics on hand-made embeddings, relevance through Split.select, and the split-level glue."""

from __future__ import annotations

import math

import pytest
import torch

from policy_prune.data import Split, relevance_pairs
from policy_prune.evaluation.metrics import rank, retrieval_at_k, retrieval_scores
from policy_prune.evaluation.retrieval import (
    embed_rows,
    encode_retrieval,
    evaluate_retrieval,
    retrieval_metrics,
)

# Passages p0..p3 and two queries. q0 ranks p0, p2, p1, p3; q1 = [0, 1] scores p1 1, p2 0.71, and p0 and
# p3 tie at 0: the lower row (p0) ranks first.
P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
Q = torch.tensor([[1.0, 0.1], [0.0, 3.0]])


def test_rank_orders_by_cosine_and_breaks_ties_by_row() -> None:
    assert rank(Q, P, k=4).tolist() == [[0, 2, 1, 3], [1, 2, 0, 3]]
    assert rank(Q, P, k=10).shape == (2, 4)  # k capped at the corpus size
    assert rank(Q, P, k=4, chunk=1).tolist() == rank(Q, P, k=4).tolist()


def test_recall_and_ndcg_hand_values() -> None:
    rel = relevance_pairs([[2], [3]])  # q0's answer is ranked 2nd, q1's 4th (after the tie)
    at1 = retrieval_scores(Q, P, rel, k=1)
    assert at1["recall@1"].tolist() == [0.0, 0.0] and at1["ndcg@1"].tolist() == [0.0, 0.0]
    at2 = retrieval_scores(Q, P, rel, k=2)
    assert at2["recall@2"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(at2["ndcg@2"], torch.tensor([1 / math.log2(3), 0.0]))
    at4 = retrieval_at_k(Q, P, rel, k=4)
    assert at4["recall@4"] == 1.0
    assert at4["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)


def test_several_relevant_passages() -> None:
    rel = relevance_pairs([[0, 1, 3], [2, 0]])
    got = retrieval_scores(Q, P, rel, k=2)  # q0 top-2: p0 (hit), p2; q1 top-2: p1, p2 (hit)
    torch.testing.assert_close(got["recall@2"], torch.tensor([0.5, 0.5]))  # over min(|relevant|, k) = 2
    ideal = 1 + 1 / math.log2(3)
    torch.testing.assert_close(got["ndcg@2"], torch.tensor([1 / ideal, (1 / math.log2(3)) / ideal]))
    perfect = retrieval_at_k(P[[0, 1]], P, relevance_pairs([[0], [1]]), k=10)
    assert perfect == {"recall@10": 1.0, "ndcg@10": 1.0}
    twice = retrieval_at_k(P[[0, 1]], P, relevance_pairs([[0, 0], [1]]), k=10)  # a pair given twice is one passage
    assert twice == {"recall@10": 1.0, "ndcg@10": 1.0}
    with pytest.raises(ValueError, match="no relevant"):
        retrieval_scores(Q, P, relevance_pairs([[0], []]), k=2)


def _split() -> Split:
    """Four passages (rows carry their embedding as 'input_ids') and three queries."""
    queries = Split("q", {"input_ids": torch.tensor([[10], [11], [12]]), "attention_mask": torch.ones(3, 1, dtype=torch.long)},
                    None, groups=torch.tensor([7, 8, 9]), kinds=["name", "summary", "title"])
    passages = {"input_ids": torch.arange(4)[:, None], "attention_mask": torch.ones(4, 1, dtype=torch.long)}
    return Split("test", passages, None, groups=torch.tensor([7, 8, 8, 9]), queries=queries,
                 relevant=relevance_pairs([[0], [1, 2], [3]]))


def test_select_keeps_the_retrieval_task_consistent() -> None:
    split = _split()
    sub = split.select(torch.tensor([3, 2]))
    assert sub.groups.tolist() == [9, 8] and sub.queries is not None
    assert sub.queries.inputs["input_ids"][:, 0].tolist() == [11, 12]  # query 0 lost its only passage
    assert sub.queries.kinds == ["summary", "title"] and sub.queries.groups.tolist() == [8, 9]
    assert sub.relevant.tolist() == [[0, 1], [1, 0]]
    masked = split.select(torch.tensor([True, False, True, True]))
    assert masked.relevant.tolist() == [[0, 0], [1, 1], [2, 2]] and len(masked.queries) == 3


def _encoder(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Looks up passage rows 0-3 in P and query rows 10-12; asserts trimming left no all-padding column."""
    table = torch.cat([P, torch.zeros(6, 2), Q, torch.tensor([[-1.0, 0.2]])])
    assert bool(x["attention_mask"][:, -1].any())
    return table[x["input_ids"][:, 0]]


def test_encode_and_score_a_split() -> None:
    split = _split()
    emb = encode_retrieval(_encoder, split, batch_size=3)
    torch.testing.assert_close(emb.passages, P)
    got = evaluate_retrieval(_encoder, split, batch_size=2, k=1, by_kind=True)
    # q0 -> p0 (hit), q1 = [0, 3] -> p1 (hit of 2: recall over min(2, 1)), q2 = [-1, 0.2] -> p3 (hit).
    assert got["ret_recall@1"] == 1.0 and got["ret_ndcg@1"] == 1.0 and got["ret_recall@1/summary"] == 1.0
    moved = type(emb)(emb.queries.flip(0), emb.passages)  # q0 and q2 swapped: both miss
    mixed = retrieval_metrics(split, moved, full=emb, k=1)
    assert mixed["ret_recall@1"] == pytest.approx(1 / 3)
    assert mixed["ret_recall@1:full_queries"] == 1.0 and mixed["ret_recall@1:full_passages"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no retrieval task"):
        encode_retrieval(_encoder, split.queries)


def test_trimmed_batches_match_the_padded_split() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 5, 3, 1, 5, 4])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (6, 6), generator=g) * mask
    split = Split("val", {"input_ids": ids, "attention_mask": mask}, None)
    weights = torch.randn(50, 3, generator=g)

    def mean_pool(x: dict[str, torch.Tensor]) -> torch.Tensor:
        w = x["attention_mask"][..., None].float()
        return (weights[x["input_ids"]] * w).sum(1) / w.sum(1)

    torch.testing.assert_close(embed_rows(mean_pool, split, 4, trim=True), embed_rows(mean_pool, split, 4))
    torch.testing.assert_close(embed_rows(mean_pool, split, 4), mean_pool(split.inputs))
