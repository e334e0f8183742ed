"""python-docs: the documentation that ships with this Python, as passages and a retrieval task; label-free.

Two offline sources, both part of every CPython install:

- ``topics``: the bundled reference topics (``pydoc_data.topics``, what ``help("for")`` prints), cut
  into sections at their headings; each section is one *item*.
- ``stdlib``: the standard library's own docstrings, every public module, class, function, method and
  attribute (``policy_prune.data.stdlib_docs``, read in a child interpreter and cached per Python
  build); each documented object is one *item*.

An item's text becomes passages of ``min_words``..``max_words`` words, and gives natural queries whose
relevant passages are that item's: ``title`` (a topic section's heading), ``summary`` (a docstring's
first sentence, removed from its passages) and ``name`` (the object's qualified name, ``json.dumps``).
Splits are by *unit* (a top-level module with all its submodules, or a help topic), so that no module's
or topic's passages appear in two splits, and are fixed by ``split_seed`` (not the run seed) so every
run evaluates the same text. The text changes a little between Python versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy_prune.config import ConfigError, DataConfig, from_dict
from policy_prune.errors import UserError

SOURCES = ("topics", "stdlib")
QUERY_KINDS = ("title", "summary", "name")
MAX_SUMMARY_WORDS = 40
"""A first sentence longer than this is not a summary line: the docstring stays whole, with no summary query."""
TRAIN_ROWS_ONLY = ("train_queries",)
"""Options that change the train split's rows alone: runs that differ only in these are evaluated side by side."""


@dataclass
class TextOptions:
    """``data.options`` of the python-docs dataset."""

    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    """Corpus sources: ``topics`` (CPython's help topics) and/or ``stdlib`` (the standard library's docstrings)."""
    queries: list[str] = field(default_factory=lambda: list(QUERY_KINDS))
    """Retrieval query kinds: ``title`` (topic section heading), ``summary`` (a docstring's first
    sentence), ``name`` (a documented object's qualified name)."""
    min_words: int = 24
    """Short paragraphs of an item are merged with the next until a passage has at least this many words."""
    max_words: int = 64
    """Longer text is cut (after a sentence end where possible) into passages of at most this many words
    (MiniLM's tokenizer makes about 1.75 wordpieces of a word here: 98% of passages fit in 128 tokens)."""
    min_item_words: int = 5
    """Items with less text are dropped ("Structure/Union member"); a docstring keeps its first sentence
    in its passages (and has no summary query) unless the rest has at least this many words."""
    val_fraction: float = 0.15
    """Target share of passages (whole units) held out for val."""
    test_fraction: float = 0.35
    """Target share of passages (whole units) held out for test."""
    split_seed: int = 0
    """Seed of the unit split and of ``max_passages`` subsets (independent of the run seed)."""
    max_passages: dict[str, int] = field(default_factory=dict)
    """Cap on passages per split, e.g. ``{train: 4000}``: a seeded subset of whole items (their queries
    stay complete); a split not named is uncapped."""
    train_queries: bool = False
    """The train split's rows are its passages and then its retrieval queries (a deployed encoder embeds
    both, and queries are short: a policy trained on passages alone never sees a 5-token input). Val and
    test keep passages as rows and queries as their retrieval task."""

    def __post_init__(self) -> None:
        if not 0 < self.min_words <= self.max_words or self.min_item_words < 1:
            raise ConfigError("data.options: need 0 < min_words <= max_words and min_item_words >= 1")
        if self.val_fraction <= 0 or self.test_fraction <= 0 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("data.options: val_fraction and test_fraction must be > 0 and sum below 1")
        _check_names("sources", self.sources, SOURCES)
        _check_names("queries", self.queries, QUERY_KINDS, allow_empty=True)
        _check_names("max_passages", list(self.max_passages), ("train", "val", "test"), allow_empty=True)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.max_passages.values()):
            raise ConfigError("data.options.max_passages: caps must be positive integers")


def _check_names(key: str, got: list[str], allowed: tuple[str, ...], allow_empty: bool = False) -> None:
    bad = [g for g in got if g not in allowed]
    if bad or (not got and not allow_empty):
        raise ConfigError(f"data.options.{key}: {bad[0] if bad else 'empty'!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Item:
    """One documented thing: a help topic's section or a stdlib object's docstring."""

    unit: str
    """Split unit: ``topic:<key>`` or ``stdlib:<top-level module>``; a unit's items share one split."""
    name: str
    """Section heading or qualified name (``json.dumps``): the ``title`` / ``name`` query."""
    source: str
    """``topics`` or ``stdlib``."""
    summary: str | None
    """First sentence (the ``summary`` query), not part of any passage; None when it was kept in the text."""
    passages: tuple[str, ...]

    def queries(self) -> list[tuple[str, str]]:
        """(kind, text) of the queries whose relevant passages are this item's."""
        out = [("title" if self.source == "topics" else "name", self.name)]
        return out + ([("summary", self.summary)] if self.summary else [])


# ---- cutting text ------------------------------------------------------------------------------------
DECORATION = set("*=-~^+|")
"""reST heading underlines ("*****") and table rules ("+----+", "|") carry no content."""


def passages(text: str, min_words: int = 24, max_words: int = 64) -> list[str]:
    """Cut text into passages of about ``min_words``..``max_words`` words (whitespace collapsed).

    Paragraphs (blank-line separated) are the unit so that a passage rarely starts mid-thought; a
    paragraph longer than ``max_words`` is cut after its last sentence end that leaves at least
    ``min_words``. A tail shorter than ``min_words`` joins the previous passage when that stays within
    ``max_words``, is kept when it is all the text or at least ``min_words // 2`` words, else dropped.
    """
    out: list[list[str]] = []
    pending: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        pending += [w for w in para.split() if not set(w) <= DECORATION]
        while len(pending) > max_words:
            cut = _sentence_cut(pending, min_words, max_words)
            out.append(pending[:cut])
            pending = pending[cut:]
        if len(pending) >= min_words:
            out.append(pending)
            pending = []
    if out and len(out[-1]) + len(pending) <= max_words:
        out[-1] = out[-1] + pending
    elif pending and (not out or len(pending) >= min_words // 2):
        out.append(pending)  # a shorter tail is dropped: too little text to embed meaningfully
    return [" ".join(p) for p in out]


def _sentence_cut(words: list[str], min_words: int, max_words: int) -> int:
    """Length of the first chunk of an over-long run of words: through the last word in
    [min_words, max_words] that ends a sentence, else ``max_words``."""
    for i in range(max_words, min_words - 1, -1):
        if words[i - 1].endswith((".", "!", "?", ":")):
            return i
    return max_words


HEADING = re.compile(r"^[*=\-~^]{3,}$")
SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*-+>.*)?$")
"""Old-style C docstrings open with call signatures ("getattr(object, name[, default]) -> value")."""
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z\"'`(*])")


def sections(text: str) -> list[tuple[str, str]]:
    """A help topic as (heading, body) pairs: a heading is a line underlined with ``*``, ``=``, ``-``, ...

    Text before the first heading belongs to a section titled ``""``.
    """
    out: list[tuple[str, list[str]]] = [("", [])]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if HEADING.match(line.strip()) and i > 0 and lines[i - 1].strip():
            out[-1][1].pop()  # the heading line itself, already appended as body
            out.append((lines[i - 1].strip(), []))
        else:
            out[-1][1].append(line)
    return [(title, "\n".join(body)) for title, body in out if title or any(s.strip() for s in body)]


def split_doc(doc: str) -> tuple[str, str]:
    """(first sentence, the rest) of a docstring, leading signature lines dropped."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if paras and all(SIGNATURE.match(line.strip()) for line in paras[0].splitlines()):
        paras = paras[1:]
    if not paras:
        return "", ""
    first, *rest = SENTENCE_END.split(" ".join(paras[0].split()), maxsplit=1)
    return first, "\n\n".join(rest + paras[1:])


# ---- sources -----------------------------------------------------------------------------------------
def topics() -> dict[str, str]:
    """CPython's bundled help topics: name -> text."""
    from pydoc_data.topics import topics as bundled

    return dict(bundled)


def topic_items(opts: TextOptions) -> list[Item]:
    """One item per section of every help topic (sorted by topic key), with its heading as title."""
    items = []
    for key, text in sorted(topics().items()):
        for title, body in sections(text):
            chunks = passages(body, opts.min_words, opts.max_words)
            if title and _words(chunks) >= opts.min_item_words:
                items.append(Item(f"topic:{key}", title, "topics", None, tuple(chunks)))
    return items


def doc_item(record: dict[str, str], opts: TextOptions) -> Item | None:
    """A stdlib docstring as an item: summary query + body passages when the body has enough text,
    else the whole docstring as passages with no summary query; None when there is too little text."""
    summary, body = split_doc(record["doc"])
    unit = f"stdlib:{record['unit']}"
    chunks = passages(body, opts.min_words, opts.max_words)
    if 3 <= len(summary.split()) <= MAX_SUMMARY_WORDS and _words(chunks) >= opts.min_item_words:
        return Item(unit, record["name"], "stdlib", summary, tuple(chunks))
    whole = passages(f"{summary}\n\n{body}", opts.min_words, opts.max_words)
    return Item(unit, record["name"], "stdlib", None, tuple(whole)) if _words(whole) >= opts.min_item_words else None


def _words(chunks: list[str]) -> int:
    return sum(len(c.split()) for c in chunks)


def stdlib_items(opts: TextOptions) -> list[Item]:
    """One item per documented stdlib object, in the walk's (sorted) order; a docstring that repeats
    one seen earlier (aliases, shared boilerplate) is dropped so that every name query has one answer."""
    seen: set[str] = set()
    items = []
    for record in stdlib_records():
        if record["doc"] in seen:
            continue
        seen.add(record["doc"])
        item = doc_item(record, opts)
        if item is not None:
            items.append(item)
    return items


def stdlib_cache_path() -> Path:
    """``<cache root>/python-docs/stdlib-<hash of the walk format and this Python build>.json``."""
    from policy_prune.core.embedded_models import cache_root
    from policy_prune.data.stdlib_docs import FORMAT

    key = hashlib.sha256(f"{FORMAT}|{sys.version}|{sys.platform}".encode()).hexdigest()[:16]
    return cache_root() / "python-docs" / f"stdlib-{key}.json"


@lru_cache(maxsize=1)
def stdlib_records() -> tuple[dict[str, str], ...]:
    """The stdlib docstring records of this Python (see ``stdlib_docs``), read from the user cache or
    walked once in a child interpreter and cached."""
    path = stdlib_cache_path()
    if not path.is_file():
        _walk_stdlib(path)
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8"))["items"])
    except (OSError, ValueError, KeyError):
        raise UserError(f"corrupt stdlib docstring cache {path}: delete it to rebuild") from None


def _walk_stdlib(path: Path) -> None:
    from policy_prune.data import stdlib_docs

    path.parent.mkdir(parents=True, exist_ok=True)
    # -S -P and an empty environment: only the standard library is importable, nothing of the caller's
    # environment (PYTHONPATH, DISPLAY, ...) leaks in, and a fixed hash seed keeps any set order stable.
    cmd = [sys.executable, "-S", "-P", stdlib_docs.__file__, str(path)]
    env = {"PYTHONHASHSEED": "0", **{k: v for k, v in os.environ.items() if k == "SYSTEMROOT"}}  # Windows needs it
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        raise UserError("reading the standard library's docstrings took over 10 minutes") from None
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"reading the standard library's docstrings failed: {last}")


def items(opts: TextOptions) -> list[Item]:
    """Every item of the chosen sources, topics first, each in its deterministic order."""
    out: list[Item] = []
    if "topics" in opts.sources:
        out += topic_items(opts)
    if "stdlib" in opts.sources:
        out += stdlib_items(opts)
    return out


# ---- splits ------------------------------------------------------------------------------------------
@dataclass
class TextSplit:
    """One split's passages and retrieval queries, as text."""

    passages: list[str]
    groups: list[int]
    """Per passage: the index of its item (in ``items(opts)``)."""
    queries: list[str]
    query_kinds: list[str]
    query_groups: list[int]
    """Per query: the index of the item it came from."""
    relevant: list[list[int]]
    """Per query: indices into ``passages`` of its relevant passages (never empty)."""
    units: list[int] = field(default_factory=list)
    """Per passage: the index of its item's unit (a top-level module or a help topic) in the sorted units."""
    query_units: list[int] = field(default_factory=list)
    """Per query: the index of its item's unit."""


def split_units(counts: dict[str, int], opts: TextOptions) -> dict[str, list[str]]:
    """Assign whole units to train/val/test so each held-out split gets about its share of passages."""
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


def cap_items(ids: list[int], all_items: list[Item], max_passages: int, seed: int) -> list[int]:
    """A seeded subset of whole items with at most ``max_passages`` passages, in the original order."""
    chosen, total = [], 0
    for j in np.random.default_rng(seed).permutation(len(ids)):
        n = len(all_items[ids[j]].passages)
        if total + n <= max_passages:
            chosen.append(ids[j])
            total += n
    return sorted(chosen)


def assemble(ids: list[int], all_items: list[Item], kinds: list[str], unit_of: dict[str, int] | None = None,
             earlier: set[str] | frozenset[str] = frozenset()) -> TextSplit:
    """The passages and queries of items ``ids``. A passage text seen before in the split is one row;
    a query text seen before is one query whose relevant set is the union.

    ``earlier``: texts of earlier splits. A passage or query whose text is in it is left out (pydoc topics
    and docstrings repeat text across units: issue #23 found 157 test passages verbatim in train), and
    so are the queries of an item left with no passage. ``unit_of``: unit name -> index, for
    :attr:`TextSplit.units`.
    """
    out = TextSplit([], [], [], [], [], [])
    rows: dict[str, int] = {}
    asked: dict[str, int] = {}
    for i in ids:
        unit = (unit_of or {}).get(all_items[i].unit, -1)
        mine = []
        for p in all_items[i].passages:
            if p in earlier:
                continue
            if p not in rows:
                rows[p] = len(out.passages)
                out.passages.append(p)
                out.groups.append(i)
                out.units.append(unit)
            mine.append(rows[p])
        if not mine:
            continue
        for kind, text in all_items[i].queries():
            if kind not in kinds or text in earlier:
                continue
            if text not in asked:
                asked[text] = len(out.queries)
                out.queries.append(text)
                out.query_kinds.append(kind)
                out.query_groups.append(i)
                out.query_units.append(unit)
                out.relevant.append([])
            rel = out.relevant[asked[text]]
            rel += [r for r in dict.fromkeys(mine) if r not in rel]
    return out


def corpus(options: dict[str, Any] | None) -> dict[str, TextSplit]:
    """Passages and queries per split (train/val/test), deterministic for the given options. No passage or
    query text is in two splits: val leaves out the texts of train's units, test those of train's and
    val's (whole splits, so capping train with ``max_passages`` changes neither val nor test)."""
    opts = from_dict(TextOptions, options or {}, "data.options")
    all_items = items(opts)
    by_unit: dict[str, list[int]] = {}
    for i, item in enumerate(all_items):
        by_unit.setdefault(item.unit, []).append(i)
    unit_of = {u: k for k, u in enumerate(sorted(by_unit))}
    counts = {u: sum(len(all_items[i].passages) for i in ids) for u, ids in by_unit.items()}
    out = {}
    seen: set[str] = set()
    for k, (split, units) in enumerate(split_units(counts, opts).items()):
        ids = sorted(i for u in units for i in by_unit[u])
        kept = cap_items(ids, all_items, opts.max_passages[split], opts.split_seed + k) \
            if split in opts.max_passages else ids
        out[split] = assemble(kept, all_items, opts.queries, unit_of, frozenset(seen))
        for i in ids:
            seen.update(all_items[i].passages, (text for _, text in all_items[i].queries()))
    return out


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, Any]:
    """{"input_ids", "attention_mask"} [M, L] long, padded to the longest row, truncated at max_length."""
    if not texts:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def common_width(inputs: dict[str, dict[str, Any]], pad_id: int) -> dict[str, dict[str, Any]]:
    """The tokenised splits ``inputs`` (name: {"input_ids", "attention_mask"}), each right-padded to the widest of
    them: an env is sized by train's width and reads val and test rows too (a corpus of short texts, padded per
    split to its own longest row, gave train 26 columns and val 25, and the final eval's observations did not
    fit the policy's)."""
    width = max((x["input_ids"].shape[1] for x in inputs.values()), default=0)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) if len(t) else t.new_zeros(0, width)

    return {name: {"input_ids": padded(x["input_ids"], pad_id), "attention_mask": padded(x["attention_mask"], 0)}
            for name, x in inputs.items()}


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (0 where it names none, as BERT's [PAD])."""
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


def build_splits(cfg: DataConfig, tokenizer: Any) -> dict[str, Any]:
    """Tokenised, label-free splits of python-docs, each with its retrieval queries."""
    from policy_prune.data.split import Split, relevance_pairs

    if tokenizer is None:
        raise UserError("dataset python-docs is text: its backbone must come with a tokenizer (e.g. spec minilm)")
    rows_with_queries = from_dict(TextOptions, cfg.options or {}, "data.options").train_queries
    out = {}
    for name, ts in corpus(cfg.options).items():
        queries = Split(f"{name}-queries", tokenize(ts.queries, tokenizer, cfg.max_length), None,
                        groups=torch.tensor(ts.query_groups, dtype=torch.long), kinds=ts.query_kinds,
                        units=torch.tensor(ts.query_units, dtype=torch.long))
        texts, groups, units, kinds = ts.passages, ts.groups, ts.units, None
        if rows_with_queries and name == "train":  # the queries after the passages (pairs still name passage rows)
            texts, groups, units = texts + ts.queries, groups + ts.query_groups, units + ts.query_units
            kinds = ["passage"] * len(ts.passages) + ts.query_kinds
        out[name] = Split(name, tokenize(texts, tokenizer, cfg.max_length), None,
                          groups=torch.tensor(groups, dtype=torch.long), kinds=kinds,
                          queries=queries, relevant=relevance_pairs(ts.relevant),
                          units=torch.tensor(units, dtype=torch.long))
    padded = common_width({name: dict(split.inputs) for name, split in out.items()}, pad_id(tokenizer))
    return {name: dataclasses.replace(split, inputs=padded[name]) for name, split in out.items()}
