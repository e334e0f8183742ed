"""python-docs: passages of CPython's bundled reference topics (``pydoc_data.topics``), label-free.

Every CPython ships this text (what ``help("for")`` prints), so the corpus exists offline everywhere.
It changes a little between Python versions; the split is by topic so that no topic's passages leak
across splits, and is fixed by ``split_seed`` (not the run seed) so every run evaluates the same text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policy_prune.config import ConfigError, DataConfig, from_dict
from policy_prune.errors import UserError


@dataclass
class TextOptions:
    """``data.options`` of the python-docs dataset."""

    min_words: int = 40
    """Short paragraphs are merged with the next until a passage has at least this many words."""
    max_words: int = 120
    """Longer paragraphs are cut into chunks of at most this many words."""
    val_fraction: float = 0.1
    """Target share of passages (whole topics) held out for val."""
    test_fraction: float = 0.15
    """Target share of passages (whole topics) held out for test."""
    split_seed: int = 0
    """Seed of the topic split (independent of the run seed)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_words <= self.max_words:
            raise ConfigError("data.options: need 0 < min_words <= max_words")
        if self.val_fraction <= 0 or self.test_fraction <= 0 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("data.options: val_fraction and test_fraction must be > 0 and sum below 1")


def topics() -> dict[str, str]:
    """CPython's bundled help topics: name -> text."""
    from pydoc_data.topics import topics as bundled

    return dict(bundled)


def passages(text: str, min_words: int = 40, max_words: int = 120) -> list[str]:
    """Cut a topic into passages of about ``min_words``..``max_words`` words (whitespace collapsed).

    Paragraphs (blank-line separated) are the unit so that a passage rarely starts mid-thought; a
    tail shorter than ``min_words`` joins the previous passage when that stays within ``max_words``.
    """
    out: list[list[str]] = []
    pending: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        # reST heading underlines ("*****") carry no content.
        words = [w for w in para.split() if not set(w) <= set("*=-~^")]
        pending += words
        while len(pending) > max_words:
            out.append(pending[:max_words])
            pending = pending[max_words:]
        if len(pending) >= min_words:
            out.append(pending)
            pending = []
    if out and len(out[-1]) + len(pending) <= max_words:
        out[-1] = out[-1] + pending
    elif len(pending) >= min_words // 2:
        out.append(pending)  # a shorter tail is dropped: too little text to embed meaningfully
    return [" ".join(p) for p in out]


def split_topics(counts: dict[str, int], opts: TextOptions) -> dict[str, list[str]]:
    """Assign whole topics to train/val/test so each held-out split gets about its share of passages."""
    names = sorted(counts)
    order = np.random.default_rng(opts.split_seed).permutation(len(names))
    total = sum(counts.values())
    targets = {"test": opts.test_fraction * total, "val": opts.val_fraction * total}
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    filled = {"test": 0, "val": 0}
    for i in order:
        name = names[i]
        split = next((s for s in ("test", "val") if filled[s] < targets[s]), "train")
        if split != "train":
            filled[split] += counts[name]
        out[split].append(name)
    return out


def corpus(options: dict[str, Any] | None) -> dict[str, list[str]]:
    """Passages per split (train/val/test), deterministic for the given options."""
    opts = from_dict(TextOptions, options or {}, "data.options")
    per_topic = {k: passages(v, opts.min_words, opts.max_words) for k, v in topics().items()}
    per_topic = {k: v for k, v in per_topic.items() if v}
    assignment = split_topics({k: len(v) for k, v in per_topic.items()}, opts)
    return {split: [p for t in sorted(names) for p in per_topic[t]] for split, names in assignment.items()}


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, Any]:
    """{"input_ids", "attention_mask"} [M, L] long, padded to the longest row, truncated at max_length."""
    if not texts:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def build_splits(cfg: DataConfig, tokenizer: Any) -> dict[str, Any]:
    """Tokenised, label-free splits of python-docs."""
    from policy_prune.data import Split

    if tokenizer is None:
        raise UserError("dataset python-docs is text: its backbone must come with a tokenizer (e.g. spec minilm)")
    return {
        name: Split(name, tokenize(texts, tokenizer, cfg.max_length), None)
        for name, texts in corpus(cfg.options).items()
    }
