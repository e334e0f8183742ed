"""Summary tables in a log file (no terminal) are printed whole: rich's 80-column fallback cut names to
"learned@…" (issue 25)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

from policy_prune.console import LOG_WIDTH, make_console
from policy_prune.training.train import print_summary

PACKAGE = Path(__file__).resolve().parents[1] / "policy_prune"


def test_train_summary_is_whole_without_a_terminal() -> None:
    out = io.StringIO()
    console = make_console(out)
    assert not console.is_terminal and console.width == LOG_WIDTH
    m = {"return": 0.1, "task": 0.2, "agreement": 0.9, "accuracy": 0.9, "flops_ratio": 0.5, "keep_ratio": [0.5, 0.25, 0.75]}
    names = ["learned@0.25", "learned@0.5", "learned@0.9", "cls-attention@0.5", "similarity-pre@0.35"]
    summary = {"split": "test", "samples": 2872, "lam": {"per": "budget"}, "methods": dict.fromkeys(names, m)}
    print_summary(console, summary, Path("runs/digits-vit__ppo-small__0__20261130-101010"))
    text = out.getvalue()
    assert "…" not in text and "runs/digits-vit__ppo-small__0__20261130-101010" in text
    rows = [line for line in text.splitlines() if "0.50 0.25 0.75" in line]  # every row on one line
    assert [next(n for n in names if f" {n} " in row) for row in rows] == names
    assert "keep ratio per site" in text and max(map(len, text.splitlines())) < 200  # not padded to LOG_WIDTH


def test_every_console_comes_from_make_console() -> None:
    """rich's Console is built in one place, so no verb prints cut tables to a log."""
    built = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Console":
                built.append(str(path.relative_to(PACKAGE)))
    assert built == ["console.py"]


def test_a_long_phase_says_when_it_starts_and_ends_in_a_log() -> None:
    """No spinner shows in a log: `train > log` printed nothing for the minutes of its final validation."""
    from policy_prune.console import status

    out = io.StringIO()
    with status(make_console(out), "final validation and scorer export") as phase:
        phase.update("calibrating")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["final validation and scorer export ...", "  calibrating"]
    assert lines[2].startswith("final validation and scorer export: done in ") and len(lines) == 3


def test_long_phases_go_through_the_log_aware_status() -> None:
    """Every spinner of the verbs is console.status's log-aware wrapper (a bare console.status is silent in a log)."""
    bare = [f"{p.relative_to(PACKAGE)}:{node.lineno}" for p in PACKAGE.rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Attribute) and node.attr == "status" and isinstance(node.value, ast.Name)
            and node.value.id == "console" and p.name != "console.py"]
    assert bare == []
