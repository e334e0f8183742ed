"""What ``eval`` writes and prints: pareto.json, table.md, pareto.png and the console tables.

One table of every method at every target (a row per seed for learned methods, their mean with its
interval), and one of "learned minus the best baseline" per target, which says "better" only where the
paired interval lies above 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy_prune.evaluation.solve import TOLERANCE

SECONDARY = {"accuracy": "agreement", "agreement": None, "cosine": "recall@10"}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(interval: dict[str, float] | None) -> str:
    return "-" if not interval else f"[{interval['lo']:.3f}, {interval['hi']:.3f}]"


def _target_order(target: float | None, rule: str) -> tuple[int, float]:
    """Unpruned first, then targets from the largest down, own operating points last."""
    return (0, 0.0) if rule == "none" else (1, -target) if target is not None else (2, 0.0)


def main_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per target, every method; learned methods a row per seed, then their mean."""
    primary = results["primary"]
    second = SECONDARY.get(primary)
    header = ["target", "method", "seed", "point", "total", "executed", "selection", "block", primary, "95% CI"]
    header += [second] if second else []
    header += ["ms/sample @64", "ms/sample @1"]
    rows = results["results"]
    summary = {_key(s): s for s in results["summary"]}
    body: list[list[str]] = []
    keys = sorted(dict.fromkeys(_key(r) for r in rows),
                  key=lambda k: (*_target_order(k[1], k[2]), k[3] or 0.0, _method_rank(rows, k[0])))
    for key in keys:
        method, target, rule, _ = key
        mine = [r for r in rows if _key(r) == key]
        tgt = "-" if target is None else f"{target:.2f}"
        label = method if target is not None or rule == "none" else f"{method} (own point)"
        for r in mine:
            flag = "" if r.get("on_target", True) else "*"
            body.append([tgt, label,
                         r["run"] or "-", r["point"], _fmt(r["flops"]["total"]) + flag, _fmt(r["flops"]["executed"]),
                         _fmt(r["flops"]["selection"]), _fmt(r["flops"]["block"]), _fmt(r.get(primary)),
                         _ci(r["interval"]), *([_fmt(r.get(second))] if second else []),
                         _fmt(r.get("ms_b64"), 2), _fmt(r.get("ms_b1"), 2)])
        if len(mine) > 1:
            s = summary[key]
            mean = {k: sum(r["flops"][k] for r in mine) / len(mine) for k in ("total", "executed", "selection", "block")}
            body.append([tgt, label, "mean", "", _fmt(mean["total"]), _fmt(mean["executed"]), _fmt(mean["selection"]),
                         _fmt(mean["block"]), _fmt(s.get(primary)), _ci(s["interval"]),
                         *([_fmt(s.get(second))] if second else []), _mean(mine, "ms_b64"), _mean(mine, "ms_b1")])
    return header, body


def _key(r: dict[str, Any]) -> tuple[str, float | None, str, float | None]:
    """Rows of one method at one point: solved targets, or own points (a budgeted scorer's per budget told)."""
    return r["method"], r["target"], r["rule"], r.get("told") if r["target"] is None else None


def _method_rank(rows: Sequence[dict[str, Any]], method: str) -> int:
    """Learned methods first (in their order), then baselines in registry order."""
    order = list(dict.fromkeys(r["method"] for r in rows if r["run"] is not None))
    order += list(dict.fromkeys(r["method"] for r in rows if r["run"] is None))
    return order.index(method)


def _mean(rows: Sequence[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return _fmt(sum(vals) / len(vals), 2) if vals else "-"


def comparison_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per target and learned method: the difference to the best baseline (chosen on val) and its verdict."""
    primary = results["primary"]
    header = ["target", "method", "best baseline (val)", f"delta {primary}", "95% CI (paired)", "verdict"]
    body = [[f"{c['target']:.2f}", c["method"], c["baseline"], f"{c['difference']['mean']:+.3f}",
             _ci(c["difference"]), c["verdict"]] for c in results["comparisons"]]
    return header, body


def describe(results: dict[str, Any]) -> str:
    """The paragraph above the tables: what was scored and how to read the numbers."""
    runs = ", ".join(results["runs"]) or "none (baselines only)"
    return (
        f"{results.get('env', '')}: {results['split']} split, {results['n_samples']} samples from {results['n_groups']} "
        f"source groups; learned runs: {runs}; eval batch {results['batch_size']}"
        f"{' (text rows batched in order of length)' if results.get('length_sorted') else ''}.\n\n"
        "FLOPs are ratios to the unpruned model on each row's own tokens. total = executed + selection: executed is "
        "what the batched forward computes (every row of a batch runs on its longest row: padding included), "
        "selection what choosing the tokens costs (scorer features and MLP, CLS query, similarities, ToMe keys and "
        "matching); block counts each row's blocks on its own tokens. Every operating point is solved on the val split "
        f"for total <= target (* : the scored total is above the target or more than {TOLERANCE} below it). "
        f"Intervals are 95% percentile bootstraps over source groups ({results['n_boot']} replicates; seeds averaged "
        "row by row). The best baseline at a target is the one with the highest val score there; \"better\" only "
        "where the paired interval of learned minus that baseline lies above 0. Times are medians of round-robin "
        "runs on this machine (ms per sample)."
    )


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def write_markdown(results: dict[str, Any], path: Path) -> None:
    parts = [describe(results), "## Every method at equal total FLOPs", markdown(*main_table(results))]
    if results["comparisons"]:
        parts += ["## Learned minus the best baseline", markdown(*comparison_table(results))]
    path.write_text("\n\n".join(parts) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> None:
    """The primary metric (and its companion) vs total FLOPs, one curve per method.

    Learned methods: the seeds' mean with per-seed points faint; error bars are the 95% intervals; a
    learned point is ringed where it is better than the best baseline (interval above 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = results["primary"]
    keys = [k for k in (primary, SECONDARY.get(primary)) if k]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _plot_metric(ax, results, key, with_ci=key == primary)
    fig.suptitle(f"{results.get('env') or results['signature'].get('architecture', '')}: {results['split']} split, "
                 f"{results['n_samples']} samples, runs: {len(results['runs'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_metric(ax: Any, results: dict[str, Any], key: str, with_ci: bool) -> None:
    rows = results["results"]
    better = {(c["method"], c["target"]) for c in results["comparisons"] if c["verdict"] == "better"}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        if mine[0]["rule"] == "none":
            ax.axhline(mine[0][key], color="black", ls="--", lw=1, label=f"{name} (FLOPs 1.0)")
            continue
        targets = sorted({r["target"] for r in mine if r["target"] is not None})
        xs, ys, lo, hi = [], [], [], []
        for t in targets:
            at = [r for r in mine if r["target"] == t]
            xs.append(sum(r["flops"]["total"] for r in at) / len(at))
            ys.append(sum(r[key] for r in at) / len(at))
            s = next(s for s in results["summary"] if s["method"] == name and s["target"] == t)
            lo.append(ys[-1] - s["interval"]["lo"] if with_ci else 0.0)
            hi.append(s["interval"]["hi"] - ys[-1] if with_ci else 0.0)
        line = ax.errorbar(xs, ys, yerr=[lo, hi] if with_ci else None, marker="o", ms=3, capsize=2, label=name)
        color = line.lines[0].get_color()
        if mine[0]["run"] is not None and len({r["run"] for r in mine}) > 1:
            seeds = [r for r in mine if r["target"] is not None]
            ax.plot([r["flops"]["total"] for r in seeds], [r[key] for r in seeds], ls="", marker=".", alpha=0.35, color=color)
        for x, y, t in zip(xs, ys, targets, strict=True):
            if (name, t) in better:
                ax.plot([x], [y], marker="o", ms=11, mfc="none", color=color)
        for r in mine:
            if r["target"] is None:
                ax.plot([r["flops"]["total"]], [r[key]], marker="*", ms=12, ls="", color=color)
    ax.set_xlabel("total FLOPs ratio (executed + selection) / unpruned")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """pareto.json, table.md and pareto.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pareto.json").write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=False))
    write_markdown(results, out_dir / "table.md")
    write_plot(results, out_dir / "pareto.png")


def _json_default(v: Any) -> Any:
    return str(v)


def print_tables(results: dict[str, Any], console: Any) -> None:
    """Both tables on a rich console."""
    from rich.table import Table

    for title, (header, body) in (
        (f"{results.get('env', '')} {results['split']}: {results['n_samples']} samples, {results['n_groups']} groups",
         main_table(results)),
        ("learned minus the best baseline (chosen on val)", comparison_table(results)),
    ):
        if not body:
            continue
        table = Table(title=title)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 4 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
