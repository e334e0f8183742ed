"""The rich console the verbs print through (tables, progress, messages).

In a terminal it is rich's own. Anywhere else (a log file, a pipe, ``nohup``) rich falls back to 80 columns
and cuts table cells with an ellipsis ("learned@…"); there the console is wide enough that nothing is cut:
a log is read later, in a viewer of any width.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

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
