"""prune(SentenceTransformer, scorer): ST's own encode on the pruned encoder; the user's model untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from policy_prune import prune
from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import random_scorer
from policy_prune.core.sentence_transformer import PrunedTransformer
from policy_prune.errors import UserError
from tests import tiny

pytest.importorskip("sentence_transformers")
SITES = [1, 2]


@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    return tiny.sentence_transformer(tmp_path_factory.mktemp("st"))


def _scorer(st_model):
    return random_scorer(adapt(st_model[0].auto_model), SITES, seed=3)


def test_encode_returns_the_pruned_model_embeddings(st_model) -> None:
    """ST's encode (its batching, pooling) on the pruned encoder = the PrunedModel's mean over kept tokens."""
    texts = tiny.sentences(8)
    scorer = _scorer(st_model)
    fast = prune(st_model, scorer, keep_ratio=0.5)
    with torch.no_grad():
        got = fast.encode(texts, batch_size=8, convert_to_tensor=True)
        features = st_model.preprocess(texts)
        pruned = prune(st_model[0].auto_model, scorer, keep_ratio=0.5)
        expected = pruned(**{k: v for k, v in features.items() if k != "modality"}).sentence_embedding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    original = st_model.encode(texts, convert_to_tensor=True)
    assert not torch.allclose(got, original, atol=1e-3)  # something was pruned


def test_encode_keeps_its_arguments(st_model) -> None:
    texts = tiny.sentences(8, seed=1)
    fast = prune(st_model, _scorer(st_model), keep_ratio=0.5)
    as_numpy = fast.encode(texts, batch_size=3, show_progress_bar=False)
    as_tensor = fast.encode(texts, batch_size=8, convert_to_tensor=True)
    unit = fast.encode(texts, batch_size=3, normalize_embeddings=True, convert_to_numpy=True)
    one = fast.encode(texts[0])
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (8, 32) and isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_numpy, as_tensor.numpy(), rtol=1e-4, atol=1e-5)  # batches of 3 vs one of 8
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, as_numpy / np.linalg.norm(as_numpy, axis=1, keepdims=True), atol=1e-5)
    assert one.shape == (32,)
    np.testing.assert_allclose(one, as_numpy[0], rtol=1e-4, atol=1e-5)


def test_the_original_model_is_untouched(st_model) -> None:
    texts = tiny.sentences(6, seed=2)
    before = st_model.encode(texts, convert_to_tensor=True)
    first, modules = st_model[0], list(st_model)
    fast = prune(st_model, _scorer(st_model), keep_ratio=0.3)
    fast.encode(texts)
    assert st_model[0] is first and list(st_model) == modules and type(first).__name__ == "Transformer"
    assert isinstance(fast[0], PrunedTransformer) and fast[0].inner.auto_model is first.auto_model and fast[1] is st_model[1]
    assert fast[0].inner is not first and fast[0].inner.tokenizer is not first.tokenizer  # the copy's own settings
    assert torch.equal(st_model.encode(texts, convert_to_tensor=True), before)


def test_keep_all_reproduces_the_original_embeddings(tmp_path) -> None:
    st_model = tiny.sentence_transformer(tmp_path, normalize=True)
    texts = tiny.sentences(6, seed=3)
    for keep_all in ({"keep_ratio": 1.0}, {"threshold": float("-inf")}):
        fast = prune(st_model, _scorer(st_model), **keep_all)
        torch.testing.assert_close(fast.encode(texts, convert_to_tensor=True),
                                   st_model.encode(texts, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


def test_threshold_rule_and_what_is_refused(st_model, tmp_path) -> None:
    texts = tiny.sentences(4, seed=4)
    fast = prune(st_model, _scorer(st_model), threshold=0.0)
    assert fast.encode(texts).shape == (4, 32)
    assert fast.tokenizer.get_vocab() == st_model.tokenizer.get_vocab() and fast.max_seq_length == st_model.max_seq_length
    np.testing.assert_allclose(copy.deepcopy(fast).encode(texts), fast.encode(texts), rtol=1e-6, atol=1e-6)
    for save in (fast.save, fast.save_pretrained, copy.deepcopy(fast).save):
        with pytest.raises(UserError, match="save the original model"):
            save(str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()  # refused before sentence-transformers wrote its config files
    st_model.save(str(tmp_path / "original"))  # the original saves as before
    assert (tmp_path / "original" / "modules.json").is_file()


def test_max_seq_length_is_the_pruned_models_own(st_model) -> None:
    """Set on the pruned model it truncates what that model encodes (it was stored beside the tokenizer and
    changed nothing); set on the user's model it changes only that one (the tokenizer was shared)."""
    text = " ".join(tiny.sentences(6, seed=4))
    original = st_model.max_seq_length
    fast = prune(st_model, _scorer(st_model), keep_ratio=0.5)
    full = len(fast.encode([text], output_value=None)[0]["input_ids"])
    assert full > 10
    fast.max_seq_length = 10
    assert fast.max_seq_length == 10 and st_model.max_seq_length == original
    assert len(fast.encode([text], output_value=None)[0]["input_ids"]) == 10
    assert len(st_model.encode([text], output_value=None)[0]["input_ids"]) == full
    try:
        st_model.max_seq_length = 12
        assert fast.max_seq_length == 10
        assert fast[0].inner.auto_model is st_model[0].auto_model  # the weights stay shared
    finally:
        st_model.max_seq_length = original


def test_two_pruned_copies_keep_their_own_budgets(st_model) -> None:
    """Retrieval with a budget per side (README): passages through one pruned copy, queries through another that
    keeps more; each encodes as a copy of its own does, whichever of the two ran last."""
    texts = tiny.sentences(6, seed=2)
    scorer = _scorer(st_model)
    passages, queries = prune(st_model, scorer, keep_ratio=0.5), prune(st_model, scorer, keep_ratio=0.8)
    first = queries.encode(texts, convert_to_tensor=True)
    got = passages.encode(texts, convert_to_tensor=True)
    again = queries.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(got, prune(st_model, scorer, keep_ratio=0.5).encode(texts, convert_to_tensor=True))
    torch.testing.assert_close(again, first)
    assert not torch.allclose(got, first, atol=1e-3)  # the two budgets differ


def test_encode_query_and_encode_document_run_the_plan_of_their_task(st_model) -> None:
    """prune(st, scorer, flops=f) with a retrieval calibration: encode_query and encode_document run the
    scorer's plan for queries and for documents (each at most f on its own kind), encode the plan for the mix;
    a task whose plan cannot reach f runs the mix's plan, with a warning."""

    from policy_prune.core.calibration import measure

    scorer, docs, queries, batches = _task_scorer(st_model)
    encoder = st_model[0].auto_model
    backbone = adapt(encoder)
    fast = prune(st_model, scorer, flops=0.7)
    expected = {task: prune(encoder, scorer, flops=0.7, task=task) for task in (None, "query", "document")}
    spent = {task: measure(backbone, m.scorer, [batches[1]], "keep_ratio", m.values, executed=True).flops_ratio
             for task, m in expected.items()}
    assert spent["query"] <= 0.7 < spent[None]  # on the queries: their own plan meets f, the mix's does not
    with torch.no_grad():
        for texts, got in ((queries, fast.encode_query(queries, convert_to_tensor=True)),
                           (docs, fast.encode_document(docs, convert_to_tensor=True))):
            task = "query" if texts is queries else "document"
            want = expected[task](**_features(st_model, texts)).sentence_embedding
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        mixed = fast.encode(queries, convert_to_tensor=True)
        torch.testing.assert_close(mixed, expected[None](**_features(st_model, queries)).sentence_embedding,
                                   rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed, fast.encode_query(queries, convert_to_tensor=True), atol=1e-4)
    with pytest.warns(UserWarning, match="task='query' runs the plan for the mix"):
        tight = prune(st_model, scorer, flops=0.5)  # 4-word queries cannot be brought to 0.5 of their FLOPs
    assert sorted(tight[0].tasks) == ["document"]
    assert not prune(st_model, scorer, flops=0.7, rule="threshold")[0].tasks  # no plan per task for the threshold


def test_encode_query_and_encode_document_split_one_total(st_model) -> None:
    """Where the calibration has a split of one total (retrieval runs), prune(st, scorer, flops=f) runs
    encode_query and encode_document at their parts of f (split="total", the default; as prune(encoder, flops=f,
    task=...) does); split="each" runs each kind's plan at f."""
    from policy_prune.core.calibration import solve_splits

    scorer, docs, queries, _ = _task_scorer(st_model)
    scorer.budget = solve_splits(scorer.budget, lambda q, d: (q, 1.0), share=0.3)  # queries as full as the range lets them
    encoder = st_model[0].auto_model
    assert scorer.budget.task_flops(0.7, "query") == pytest.approx(0.9)
    for split in ("total", "each", None):
        fast = prune(st_model, scorer, flops=0.7, split=split)
        for task, texts, encode in (("query", queries, fast.encode_query), ("document", docs, fast.encode_document)):
            flops = 0.7 if split == "each" else scorer.budget.task_flops(0.7, task)
            want = prune(encoder, scorer, flops=flops, task=task, split="each")
            with torch.no_grad():
                torch.testing.assert_close(encode(texts, convert_to_tensor=True),
                                           want(**_features(st_model, texts)).sentence_embedding, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        total, each = (prune(st_model, scorer, flops=0.7, split=s).encode_document(docs, convert_to_tensor=True)
                       for s in ("total", "each"))
    assert not torch.allclose(total, each, atol=1e-4)
    with pytest.raises(UserError, match="split='any'"):
        prune(st_model, scorer, flops=0.7, split="any")
    with pytest.raises(UserError, match="rule='threshold' runs one threshold for every task"):
        prune(st_model, scorer, flops=0.7, split="each", rule="threshold")
    # A split whose queries' part cannot run (4-word queries at 0.4): no part alone, so each kind runs its plan at f
    # (the queries' at 0.5 cannot either: they run the mix's), with warnings.
    import dataclasses

    from policy_prune.core.budget import BudgetInput

    low = [dataclasses.replace(p, split={"query": p.flops - 0.1, "document": (p.flops - 0.3 * (p.flops - 0.1)) / 0.7})
           for p in scorer.budget.calibration]
    scorer.budget = BudgetInput(0.4, 0.9, 0.5, low, query_share=0.3)
    with pytest.warns(UserWarning, match="cannot be split between queries and documents") as caught:
        fast = prune(st_model, scorer, flops=0.5)
    assert any("task='query' runs the plan for the mix" in str(w.message) for w in caught)
    assert sorted(fast[0].tasks) == ["document"]
    assert fast[0].tasks["document"].values == prune(encoder, scorer, flops=0.5, task="document", split="each").values


def _task_scorer(st_model):
    """(a scorer calibrated on 8 docs of 14 words and 8 queries of 4, with plans per task; docs; queries; their
    batches), or a skip before sentence-transformers 5 (no encode_query)."""
    from policy_prune.core.budget import BudgetInput
    from policy_prune.core.calibration import batch_counts, calibrate

    if not hasattr(st_model, "encode_query"):
        pytest.skip("sentence-transformers before 5 has no encode_query")
    words = tiny.WORDS
    docs = [" ".join(words[(7 * i + j) % len(words)] for j in range(14)) for i in range(8)]
    queries = [" ".join(words[(5 * i + j) % len(words)] for j in range(4)) for i in range(8)]
    backbone = adapt(st_model[0].auto_model)
    batches = [_features(st_model, docs), _features(st_model, queries)]
    scorer = random_scorer(backbone, SITES, seed=3, hidden=(16,), budget=BudgetInput.over(0.4, 0.9))
    scorer.budget = BudgetInput.over(0.4, 0.9, calibrate(backbone, scorer, batches, [0.5, 0.7], parts=[0, 1],
                                                         counted=batch_counts(backbone, batches), counted_parts=[0, 1]))
    return scorer, docs, queries, batches


def _features(st_model, texts):
    features = st_model.preprocess(texts)
    return {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
