"""What ``eval`` writes and prints: pareto.json, table.md, pareto.png and the console tables.

One table of every method at every target (a row per seed for learned methods, their mean with its
interval), and per compared metric one of "learned minus the best baseline" per target, which says
"better" only where the paired interval lies above 0. Classifiers show accuracy (with its interval) and
agreement; encoders cosine and neighbour recall@10 with their intervals, and where the split has a
retrieval task a second table at the same points: recall@10 and nDCG@10 with their intervals, then both
with unpruned queries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy_prune.core.artifact import json_safe
from policy_prune.evaluation.solve import MATCH, SAME

SECONDARY = {"accuracy": "agreement", "agreement": None, "cosine": "recall@10"}
FLOPS_DETAIL = ("executed", "selection", "block")
"""FLOPs columns besides the total, in the main table only."""
ENCODER_COLUMNS = {
    "main": (("cosine", True), ("recall@10", True)),
    "retrieval": (("ret_recall@10", True), ("ret_ndcg@10", True), ("ret_recall@10:full_queries", False),
                  ("ret_ndcg@10:full_queries", False)),
}
"""Encoders' metric columns (metric, with its interval) of the main and the retrieval table, in order."""
LABELS = {
    "recall@10": "neighbour recall@10", "ret_recall@10": "retrieval recall@10", "ret_ndcg@10": "retrieval nDCG@10",
    "ret_recall@10:full_queries": "recall@10 unpruned queries", "ret_ndcg@10:full_queries": "nDCG@10 unpruned queries",
}
"""Column names: retrieval (queries vs passages, both encoded by the method) apart from neighbour recall
(a passage's nearest passages, pruned vs unpruned); "unpruned queries": the pruned index searched with the
unpruned model's query embeddings."""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(interval: dict[str, float] | None) -> str:
    return "-" if not interval else f"[{interval['lo']:.3f}, {interval['hi']:.3f}]"


def _target_order(target: float | None, rule: str) -> tuple[int, float]:
    """Unpruned first, then targets from the largest down, own operating points last."""
    return (0, 0.0) if rule == "none" else (1, -target) if target is not None else (2, 0.0)


def metric_columns(results: dict[str, Any], part: str = "main") -> list[tuple[str, bool]]:
    """(metric, shown with its interval) per metric column of the ``part`` ("main" or "retrieval") table:
    a classifier's primary with its interval and its companion (no retrieval table); an encoder's
    :data:`ENCODER_COLUMNS` that its rows have."""
    primary = results["primary"]
    if primary != "cosine":
        second = SECONDARY.get(primary)
        return [] if part != "main" else [(primary, True)] + ([(second, False)] if second else [])
    first = results["results"][0] if results["results"] else {}
    return [(k, ci) for k, ci in ENCODER_COLUMNS[part] if k in first]


def _metric_cells(r: dict[str, Any], columns: Sequence[tuple[str, bool]]) -> list[str]:
    """A row's (or summary's) metric cells, each with its interval where the column has one."""
    cells = []
    for key, with_ci in columns:
        cells.append(_fmt(r.get(key)))
        if with_ci:
            cells.append(_ci(r["intervals"].get(key)))
    return cells


def main_table(results: dict[str, Any], part: str = "main") -> tuple[list[str], list[list[str]]]:
    """Header and rows: per target, every method; learned methods a row per seed, then their mean.

    ``part``: "main" (FLOPs columns, the task or fidelity metrics, times) or "retrieval" (total FLOPs and
    the retrieval metrics; no rows without a retrieval task).
    """
    columns = metric_columns(results, part)
    if not columns:
        return [], []
    detail = part == "main"
    parts = not detail and any("flops_queries" in r for r in results["results"])
    header = ["target", "method", "seed", "point", "total"] + (["executed", "selection", "block"] if detail else []) \
        + (["passages", "queries"] if parts else [])
    for metric, with_ci in columns:
        header += [LABELS.get(metric, metric)] + (["95% CI"] if with_ci else [])
    header += ["ms/sample @64", "speed-up @64", "ms/sample @1", "speed-up @1"] if detail else []
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
            flops = [_fmt(r["flops"]["total"]) + flag] + [_fmt(r["flops"][k]) for k in FLOPS_DETAIL if detail] \
                + ([_fmt(r[k]["total"]) for k in ("flops_passages", "flops_queries")] if parts else [])
            times = [_times(r, tag) for tag in ("b64", "b1") for _times in (_ms, _speedup)] if detail else []
            body.append([tgt, label, r["run"] or "-", r["point"], *flops, *_metric_cells(r, columns), *times])
        if len(mine) > 1:
            s = summary[key]
            mean = {k: _fmt(sum(r["flops"][k] for r in mine) / len(mine)) for k in ("total", *FLOPS_DETAIL)}
            flops = [mean["total"]] + [mean[k] for k in FLOPS_DETAIL if detail] + [
                _fmt(sum(r[k]["total"] for r in mine) / len(mine)) for k in ("flops_passages", "flops_queries") if parts]
            times = [_mean(mine, f"{k}_{tag}") for tag in ("b64", "b1") for k in ("ms", "speedup")] if detail else []
            body.append([tgt, label, "mean", "", *flops, *_metric_cells(s, columns), *times])
    return header, body



def glance_table(results: dict[str, Any], metric: str | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per method, one column per target: the mean of ``metric`` (seeds averaged) and its 95%
    interval, the best baseline's cell marked (chosen on val), the unpruned model's value in its own row."""
    metric = metric or results["primary"]
    rows = results["summary"]
    targets = sorted({s["target"] for s in rows if s["target"] is not None}, reverse=True)
    solved = [s for s in rows if s["target"] is not None]
    best = {(c["baseline"], c["target"]) for c in results["comparisons"] if c.get("metric", results["primary"]) == metric}
    header = ["method", "runs", *(f"@ {t:.2f}" for t in targets)]
    body = []
    for method in sorted(dict.fromkeys(s["method"] for s in solved), key=lambda m: _method_rank(results["results"], m)):
        cells = []
        for t in targets:
            s = next((s for s in solved if s["method"] == method and s["target"] == t), None)
            ci = None if s is None else s["intervals"].get(metric)
            mark = " (best baseline)" if (method, t) in best else ""
            cells.append("-" if ci is None else f"{ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]{mark}")
        n = max((s["n_runs"] for s in solved if s["method"] == method), default=1)
        body.append([method, str(n) if any(s["learned"] for s in solved if s["method"] == method) else "-", *cells])
    none = next((s for s in rows if s["method"] == "none"), None)
    if none is not None and metric in none["intervals"]:
        body.append(["none (FLOPs 1.0)", "-", *([f"{none['intervals'][metric]['mean']:.3f}"] * len(targets))])
    return header, body


def glance_title(results: dict[str, Any], metric: str) -> str:
    return f"At a glance: {LABELS.get(metric, metric)}, mean [95% CI] at each total FLOPs target"


def _key(r: dict[str, Any]) -> tuple[str, float | None, str, float | None]:
    """Rows of one method at one point: solved targets, or own points (a budgeted scorer's per budget told)."""
    own = r["target"] is None
    return r["method"], r["target"], r["rule"] if own else "", r.get("told") if own else None


def _method_rank(rows: Sequence[dict[str, Any]], method: str) -> int:
    """Learned methods first (in their order), then baselines in registry order."""
    order = list(dict.fromkeys(r["method"] for r in rows if r["run"] is not None))
    order += list(dict.fromkeys(r["method"] for r in rows if r["run"] is None))
    return order.index(method)


def _ms(row: dict[str, Any], tag: str) -> str:
    return _fmt(row.get(f"ms_{tag}"), 2)


def _speedup(row: dict[str, Any], tag: str) -> str:
    value = row.get(f"speedup_{tag}")
    return "-" if value is None else f"{value:.2f}x"


def _mean(rows: Sequence[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return _fmt(sum(vals) / len(vals), 2) if vals else "-"


def compared(results: dict[str, Any]) -> list[str]:
    """Metrics with a "learned minus the best baseline" comparison: the primary first."""
    return list(results.get("compared") or [results["primary"]])


def comparison_table(results: dict[str, Any], metric: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Per target and learned method: the difference in ``metric`` (default: the primary) to the best
    baseline on that metric (chosen on val) and its verdict."""
    metric = metric or results["primary"]
    header = ["target", "method", "best baseline (val)", f"delta {metric}", "95% CI (paired)", "verdict",
              "verdict per seed"]
    body = [[f"{c['target']:.2f}", c["method"], c["baseline"], f"{c['difference']['mean']:+.3f}",
             _ci(c["difference"]), c["verdict"], " ".join(c.get("per_seed", [])) or "-"]
            for c in results["comparisons"] if c.get("metric", results["primary"]) == metric]
    return header, body


def group_table(results: dict[str, Any], metric: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Named groups of runs (``NAME=RUN_DIR``): per target, the first group's learned method minus the same
    kind of method of each other group, paired over units."""
    metric = metric or results["primary"]
    header = ["target", "method", "minus", f"delta {metric}", "95% CI (paired)", "verdict", "FLOPs: method / minus"]
    body = [[f"{c['target']:.2f}", c["method"], c["other"], f"{c['difference']['mean']:+.3f}", _ci(c["difference"]),
             c["verdict"], f"{c['flops']:.3f} / {c['other_flops']:.3f}"]
            for c in results.get("group_comparisons", []) if c["metric"] == metric]
    return header, body


def group_title(results: dict[str, Any], metric: str) -> str:
    return "Between groups of runs" + ("" if metric == results["primary"] else f": {LABELS.get(metric, metric)}")


def comparison_title(results: dict[str, Any], metric: str) -> str:
    """"Learned minus the best baseline", naming the metric where it is not the primary."""
    return "Learned minus the best baseline" + ("" if metric == results["primary"] else f": {LABELS.get(metric, metric)}")


def describe(results: dict[str, Any]) -> str:
    """The paragraph above the tables: what was scored and how to read the numbers."""
    runs = ", ".join(results["runs"]) or "none (baselines only)"
    return (
        f"{results.get('env', '')}: {results['split']} split, {results['n_samples']} samples from {results['n_groups']} "
        f"units (what the split was drawn by); learned runs: {runs}; eval batch {results['batch_size']}"
        f"{' (text rows batched in order of length)' if results.get('length_sorted') else ''}.\n\n"
        f"{_describe_retrieval(results)}"
        "FLOPs are ratios to the unpruned model on each row's own tokens. total = executed + selection: executed is "
        "what the batched forward computes (every row of a batch runs on its longest row: padding included), "
        "selection what choosing the tokens costs (scorer features and MLP, CLS query, similarities, ToMe keys and "
        "matching); block counts each row's blocks on its own tokens. Every operating point is solved on the val split "
        f"for total <= target; a baseline whose val point spends more than {MATCH} away from its target on the scored "
        "split is solved again on that split's token counts (FLOPs only: no output or label is read; \"FLOPs matched "
        f"on ...\" in its point, and the best baseline is still chosen by its val point) (* : the scored total is still "
        f"more than {MATCH} from the target: out of the method's reach). "
        f"Intervals are 95%: a percentile bootstrap over the units ({results['n_boot']} replicates) for one seed; where "
        "a method has several seeds, mean +- t x sqrt(unit variance + seed variance) at Welch-Satterthwaite degrees of "
        "freedom (the seeds' variance added, so that a verdict holds across seeds, not for these seeds taken as fixed). "
        f"The best baseline at a target is the one with the highest val score there among those whose val point runs "
        f"at most {MATCH} above it (each part, where the queries have a budget of their own); \"better\" only "
        "where the paired interval of learned minus that baseline lies above 0 (across seeds), and \"unequal FLOPs\" "
        f"in place of a verdict that favours the side whose scored total is more than {MATCH} above the other's; the verdict per "
        "seed is each seed's own paired interval. Times are medians of round-robin "
        "runs on this machine (ms per sample): at the eval batch size over a few batches spread over the split, "
        "at batch 1 over the first rows of several such batches, one row per call."
    )


def _describe_retrieval(results: dict[str, Any]) -> str:
    if "n_queries" not in results:
        return ""
    return (
        f"Retrieval: {results['n_queries']} queries from {results['n_query_groups']} units search the "
        f"{results['n_samples']} passages; every method encodes both the queries and the passages "
        "(a user swaps the encoder for both), binary relevance (the passages of the query's item), recall@10 and "
        "nDCG@10 per query. \"Unpruned queries\": the same pruned index searched with the unpruned model's query "
        "embeddings. Retrieval intervals are over the queries' units. "
        f"{_query_budget(results)} Neighbour recall@10: share of a passage's 10 nearest "
        "passages (unpruned) that its pruned embedding finds among the unpruned ones.\n\n"
    )


def _query_budget(results: dict[str, Any]) -> str:
    """How the queries' FLOPs are budgeted: one total with the passages, or a target of their own."""
    if results.get("query_target") is None:
        return ("Queries are inside the budget: every point is solved for one total over the passages and the queries, "
                "and the FLOPs columns are that total (each part: `flops_passages`, `flops_queries` in pareto.json). "
                "A deployed call whose calibration splits the total runs each part through its task's plan "
                "(`prune(..., task=\"document\")` and `task=\"query\"`, split=\"total\"), at most the target in total "
                "where the queries carry at most its query share of the FLOPs (below it where they carry less).")
    own = "the target" if results["query_target"] == SAME else f"{results['query_target']:g} of their FLOPs"
    return (f"Queries have a budget of their own: every method encodes them at its point solved on the val queries "
            f"alone for at most {own}, and the passages at its point solved on "
            "the val passages alone for the target (the deployed call: the scorer's plan for each kind, "
            "`prune(..., task=\"query\", split=\"each\")` and `task=\"document\"`, where it has them); a row is on target where each part is within "
            f"{MATCH} of its own. The FLOPs columns are the total over both (each part: `flops_passages`, "
            "`flops_queries` in pareto.json).")


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def write_markdown(results: dict[str, Any], path: Path) -> None:
    parts = [describe(results), *(f"**Not scored:** {note}" for note in results.get("notes", ()))]
    for metric in compared(results):
        parts += [f"## {glance_title(results, metric)}", markdown(*glance_table(results, metric))]
    parts += ["## Every method at equal total FLOPs", markdown(*main_table(results))]
    if (retrieval := main_table(results, "retrieval"))[1]:
        parts += ["## Retrieval at the same points", markdown(*retrieval)]
    for metric in compared(results):
        header, body = comparison_table(results, metric)
        if body:
            parts += [f"## {comparison_title(results, metric)}", markdown(header, body)]
    for metric in compared(results):
        header, body = group_table(results, metric)
        if body:
            parts += [f"## {group_title(results, metric)}", markdown(header, body)]
    path.write_text("\n\n".join(parts) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Every metric column with an interval (:func:`metric_columns`; a classifier's companion without)
    vs total FLOPs, one curve per method.

    Learned methods: the seeds' mean with per-seed points faint; error bars are the 95% intervals; a
    learned point is ringed where it is better than the best baseline on that metric (interval above 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = metric_columns(results)
    if results["primary"] == "cosine":
        columns = [c for c in columns + metric_columns(results, "retrieval") if c[1]]
    cols = min(len(columns), 2)
    lines = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(6.5 * cols, 4.8 * lines), squeeze=False)
    for ax, (key, with_ci) in zip(axes.flat, columns, strict=True):
        _plot_metric(ax, results, key, with_ci)
    fig.suptitle(f"{results.get('env') or results['signature'].get('architecture', '')}: {results['split']} split, "
                 f"{results['n_samples']} samples, runs: {len(results['runs'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_metric(ax: Any, results: dict[str, Any], key: str, with_ci: bool) -> None:
    rows = results["results"]
    better = {(c["method"], c["target"]) for c in results["comparisons"]
              if c["verdict"] == "better" and c.get("metric", results["primary"]) == key}
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
            ci = s["intervals"][key]
            lo.append(max(ys[-1] - ci["lo"], 0.0) if with_ci else 0.0)  # rounding: a mean summed two ways
            hi.append(max(ci["hi"] - ys[-1], 0.0) if with_ci else 0.0)
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
    ax.set_ylabel(LABELS.get(key, key))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """pareto.json, table.md and pareto.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # json_safe: an idle site's threshold (-inf, see core.budget) is written null, as in scorer.json.
    (out_dir / "pareto.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    write_markdown(results, out_dir / "table.md")
    write_plot(results, out_dir / "pareto.png")


def print_tables(results: dict[str, Any], console: Any) -> None:
    """The tables of table.md on a rich console."""
    from rich.table import Table

    queries = f", {results['n_queries']} queries" if "n_queries" in results else ""
    tables = [(f"{results.get('env', '')} {results['split']}: {results['n_samples']} samples, {results['n_groups']} "
               f"groups{queries}", main_table(results)), ("retrieval at the same points", main_table(results, "retrieval"))]
    tables += [(f"{comparison_title(results, m)} (chosen on val)", comparison_table(results, m))
               for m in compared(results)]
    tables += [(group_title(results, m), group_table(results, m)) for m in compared(results)]
    for title, (header, body) in tables:
        if not body:
            continue
        table = Table(title=title)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 4 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)
    for note in results.get("notes", ()):
        console.print(f"not scored: {note}", markup=False)
