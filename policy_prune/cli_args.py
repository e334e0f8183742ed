"""Argument types of the command line: a value outside its domain is refused by argparse with one line
("policy-prune eval: error: argument --targets: ...") before any model loads, never a traceback later.

No imports from the package: every verb module may use these at import time.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def ratio(text: str) -> float:
    """A FLOPs ratio (or any share of a whole that must keep something): finite, in (0, 1]."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a ratio in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    """A share that may be 0: finite, in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def threshold(text: str) -> float:
    """A logit threshold: a finite number, or -inf (keep every token at that site: no scorer runs there)."""
    try:
        if float(text) == float("-inf"):
            return float("-inf")
    except ValueError:
        pass
    return _number(text, float)


def positive_number(text: str) -> float:
    """A finite number above 0 (e.g. CPUs per trial)."""
    value = _number(text, float)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An integer (or, with ``kind=float``, a finite number) of at least ``low``."""
    def parse(text: str) -> Any:
        value = _number(text, kind)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low:g}"  # argparse names the type in its own messages
    return parse


def between(low: float, high: float) -> Callable[[str], float]:
    """A finite number in [low, high]."""
    def parse(text: str) -> float:
        value = _number(text, float)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low:g}, {high:g}], got {text}")
        return value

    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse


positive = at_least(1)
"""An integer of at least 1 (batch sizes, repeats, counts)."""
non_negative = at_least(0)
"""An integer of at least 0 (a count that may be none: warm-up calls, --repeats 0 skips timing)."""
