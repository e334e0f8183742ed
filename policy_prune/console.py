"""The rich console the verbs print through (tables, progress, messages).

In a terminal it is rich's own. Anywhere else (a log file, a pipe, ``nohup``) rich falls back to 80 columns
and cuts table cells with an ellipsis ("learned@…"); there the console is wide enough that nothing is cut:
a log is read later, in a viewer of any width.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

LOG_WIDTH = 10_000
"""Columns of a console that is not a terminal: wider than any table or line policy-prune prints."""


def make_console(file: IO[str] | None = None) -> Console:
    """A rich Console on ``file`` (default stdout) that never truncates when it is not a terminal."""
    from rich.console import Console

    console = Console(file=file)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


@contextmanager
def status(console: Console, message: str) -> Iterator[Any]:
    """A long phase: rich's spinner in a terminal; in a log, where no spinner shows (``train > log`` was silent for
    the minutes of its final validation and calibration), a line when it starts, one per ``update`` and one when
    it ends."""
    if console.is_terminal:
        with console.status(message) as spinner:
            yield spinner
        return
    start = time.perf_counter()
    console.print(f"{message} ...")
    yield _LogStatus(console)
    console.print(f"{message}: done in {time.perf_counter() - start:.0f} s")


class _LogStatus:
    """``update`` of a phase in a log: the new text on a line of its own."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def update(self, text: str) -> None:
        self.console.print(f"  {text}")
