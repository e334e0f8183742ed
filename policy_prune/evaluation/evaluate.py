"""``policy-prune eval``: a learned scorer vs every baseline at equal FLOPs, on the test split.

Each method is swept over FLOPs targets. At a target every method uses the keep_ratio rule with one
constant ratio r at each of its sites, r solved by bisection on the analytic FLOPs (so all methods
at a target run (almost) the same FLOPs); the learned scorer is also evaluated at its own operating
point (threshold 0 on its logits). FLOPs count the blocks that actually run, from the measured
per-site token counts; scorer overheads (attention rows, similarities, merge matching) are not in
the FLOPs of any method but are in the measured throughput.

Writes ``eval/pareto.json``, ``eval/table.md`` and ``eval/pareto.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policy_prune.core.backbones.base import TokenBackbone
from policy_prune.core.schedule import TokenCounts, flops_per_row, flops_ratio, keep_ratio_for
from policy_prune.errors import UserError
from policy_prune.evaluation.baselines import BASELINES, BaselineOptions, Method, ScorerMethod, make_baseline
from policy_prune.evaluation.metrics import cosine_fidelity, recall_at_k

DEFAULT_TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35)
METRICS = ("accuracy", "agreement", "cosine", "recall@10")
"""Task metrics in display order; classifiers have the first two, encoders the last two."""
TARGET_TOLERANCE = 0.02
"""A row whose measured FLOPs ratio is further than this from its target is flagged (unreachable budget)."""


# ---- budgets: keep_ratio schedules (core.schedule) and logit thresholds solved for a FLOPs target ----
def solve_threshold(fn: Callable[[float], float], target: float, iters: int = 16, tol: float = 0.002) -> float:
    """The threshold t whose FLOPs ratio fn(t) (non-increasing in t) is nearest ``target``.

    Brackets by doubling from [-1, 1] (logits are unbounded), then bisects; stops early within ``tol``.
    Each fn value is computed once (a call runs the pruned model over the split).
    """
    seen: dict[float, float] = {}

    def gap(t: float) -> float:
        if t not in seen:
            seen[t] = fn(t)
        return seen[t] - target

    lo, hi = -1.0, 1.0
    while gap(lo) < 0 and lo > -64:
        lo *= 2
    while gap(hi) > 0 and hi < 64:
        hi *= 2
    if gap(lo) < 0 or gap(hi) > 0:  # the target is out of reach: the nearest end
        return lo if abs(gap(lo)) <= abs(gap(hi)) else hi
    for _ in range(iters):  # invariant: gap(lo) >= 0 >= gap(hi)
        mid = 0.5 * (lo + hi)
        if abs(gap(mid)) <= tol:
            break
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return min(seen, key=lambda t: abs(seen[t] - target))


# ---- metrics -----------------------------------------------------------------------------------------
def task_metrics(kind: str, out: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """Classifiers: accuracy vs labels and agreement with the unpruned model; encoders: cosine, recall@10."""
    if kind == "logits":
        res = {"agreement": float((out.argmax(-1) == teacher.argmax(-1)).float().mean())}
        if labels is not None:
            res = {"accuracy": float((out.argmax(-1) == labels).float().mean()), **res}
        return res
    return {"cosine": float(cosine_fidelity(out, teacher).mean()), "recall@10": float(recall_at_k(out, teacher, k=10))}


# ---- evaluation --------------------------------------------------------------------------------------
@dataclass
class Budget:
    """One operating point of one method."""

    method: str
    rule: str
    value: float
    target: float | None
    """FLOPs target the value was solved for (None: the method's own point or no pruning)."""


def _to(x: Any, device: str) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _rows(x: Any) -> int:
    """Batch size of adapter inputs (a tensor or a tokenizer-style dict of tensors)."""
    return len(next(iter(x.values())) if isinstance(x, dict) else x)


def _batches(split: Any, batch_size: int, device: str) -> list[tuple[Any, torch.Tensor | None]]:
    idx = torch.arange(len(split))
    parts = [split.select(i) for i in idx.split(batch_size)]
    return [(_to(p.inputs, device), None if p.labels is None else p.labels.to(device)) for p in parts]


def token_counts(backbone: TokenBackbone, batches: Sequence[tuple[Any, Any]]) -> TokenCounts:
    """Counts at embedding for every row of the batches."""
    states = [backbone.embed(x) for x, _ in batches]
    n0 = torch.cat([s.alive_counts.cpu() for s in states])
    prot = torch.cat([(s.protected & s.valid).sum(dim=1).cpu() for s in states])
    return TokenCounts(n0, prot, states[0].n_full)


def run_budget(backbone: TokenBackbone, method: Method, sites: Sequence[int], budget: Budget,
               batches: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Outputs [M, C] and per-site alive counts [M] of ``method`` at ``budget`` over all batches."""
    outs, counts = [], []
    for x, _ in batches:
        out, c = method.forward(backbone, x, method.sites or sites, budget.rule, budget.value)
        outs.append(out.float().cpu())
        counts.append([k.cpu() for k in c])
    return torch.cat(outs), [torch.cat(col) for col in zip(*counts, strict=True)]


def evaluate_methods(
    backbone: TokenBackbone,
    split: Any,
    sites: Sequence[int],
    methods: Mapping[str, Method],
    targets: Sequence[float] = DEFAULT_TARGETS,
    batch_size: int = 64,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Every method at every FLOPs target (and at its own operating point) on ``split``.

    Returns the pareto.json payload: {"results": [row, ...], "sites", "targets", "n_samples", ...};
    a row has method, rule, value, target, flops_ratio, gflops, keep counts per site, the task
    metrics and samples_per_s (timed round-robin per target on one batch; repeats=0 skips timing).
    """
    with torch.inference_mode():
        batches = _batches(split, batch_size, device)
        tc = token_counts(backbone, batches)
        teacher = torch.cat([backbone(x).float().cpu() for x, _ in batches])
        labels = None if split.labels is None else split.labels.cpu()
        plan = budgets(backbone, sites, methods, targets, tc, batches)
        rows = []
        for budget in plan:
            m = methods[budget.method]
            out, counts = run_budget(backbone, m, sites, budget, batches)
            rows.append(result_row(backbone, m.sites or sites, budget, out, counts, teacher, labels, tc))
        if repeats > 0:
            add_throughput(backbone, sites, methods, plan, rows, batches[0][0], warmup, repeats, device)
    return {"split": getattr(split, "name", "test"), "n_samples": len(split), "sites": list(sites),
            "targets": list(targets), "signature": backbone.signature(), "output_kind": backbone.output_kind,
            "results": rows}


SOLVE_SAMPLES = 512
"""Samples on which a threshold is solved (label-free: only token counts); the row is then measured on all."""


def threshold_for(backbone: TokenBackbone, method: Method, sites: Sequence[int], tc: TokenCounts,
                  batches: Sequence[tuple[Any, Any]], target: float) -> float:
    """Logit threshold at which ``method`` runs ``target`` FLOPs ratio, solved on the first SOLVE_SAMPLES
    samples of the batches (each bisection step runs the pruned model on them)."""
    head, rows = [], 0
    for x, y in batches:
        if rows >= SOLVE_SAMPLES:
            break
        head.append((x, y))
        rows += _rows(x)
    head_tc = TokenCounts(tc.n0[:rows], tc.protected[:rows], tc.n_full)

    def measured(value: float) -> float:
        _, counts = run_budget(backbone, method, sites, Budget(method.name, "threshold", value, target), head)
        return flops_ratio(backbone, sites, counts, head_tc)

    return solve_threshold(measured, target)


def budgets(backbone: TokenBackbone, sites: Sequence[int], methods: Mapping[str, Method],
            targets: Sequence[float], tc: TokenCounts, batches: Sequence[tuple[Any, Any]] = ()) -> list[Budget]:
    """The operating points: unswept methods once, the others at each target plus their own point.

    keep_ratio sweeps are solved analytically from the token counts; threshold sweeps (learned scorers)
    by bisection on the FLOPs measured over ``batches`` (label-free: only token counts are used).
    """
    plan = []
    for name, m in methods.items():
        if not m.sweeps:
            plan.append(Budget(name, "none", 1.0, None))
            continue
        msites = m.sites or sites
        for t in targets:
            if getattr(m, "sweep_rule", "keep_ratio") == "threshold":
                plan.append(Budget(name, "threshold", threshold_for(backbone, m, msites, tc, batches, t), t))
            else:
                plan.append(Budget(name, "keep_ratio", keep_ratio_for(backbone, msites, tc, t), t))
        point = getattr(m, "operating_point", None)
        if point is not None:
            plan.append(Budget(name, point[0], point[1], None))
    return plan


def result_row(backbone: TokenBackbone, sites: Sequence[int], budget: Budget, out: torch.Tensor,
               counts: Sequence[torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor | None,
               tc: TokenCounts) -> dict[str, Any]:
    """One table row: the budget, its measured FLOPs and the task metrics."""
    per_row = flops_per_row(backbone, sites, counts, tc)
    ratio = flops_ratio(backbone, sites, counts, tc)
    on_target = budget.target is None or abs(ratio - budget.target) <= TARGET_TOLERANCE
    return {
        "method": budget.method, "rule": budget.rule, "value": budget.value, "target": budget.target,
        "on_target": on_target, "sites": list(sites), "flops_ratio": ratio,
        "gflops": float(per_row.mean()) / 1e9, "tokens": [float(c.float().mean()) for c in counts],
        **task_metrics(backbone.output_kind, out, teacher, labels),
    }


def add_throughput(backbone: TokenBackbone, sites: Sequence[int], methods: Mapping[str, Method],
                   plan: Sequence[Budget], rows: list[dict[str, Any]], x: Any, warmup: int, repeats: int,
                   device: str) -> None:
    """samples/s of every row, timed round-robin with the unpruned model per target group (one batch)."""
    from policy_prune.evaluation.bench import time_round_robin

    batch = _rows(x)
    groups: dict[Any, list[int]] = {}
    for i, b in enumerate(plan):
        groups.setdefault(b.target, []).append(i)
    for ids in groups.values():
        fns: dict[str, Callable[[], Any]] = {"full": lambda: backbone(x)}
        for i in ids:
            fns[str(i)] = _budget_call(backbone, methods[plan[i].method], sites, plan[i], x)
        t = time_round_robin(fns, warmup, repeats, device)
        for i in ids:
            rows[i]["samples_per_s"] = batch / t[str(i)]
            rows[i]["speedup"] = t["full"] / t[str(i)]


def _budget_call(backbone: TokenBackbone, method: Method, sites: Sequence[int], budget: Budget, x: Any) -> Callable[[], Any]:
    return lambda: method.forward(backbone, x, method.sites or sites, budget.rule, budget.value)


# ---- outputs -----------------------------------------------------------------------------------------
def metric_columns(results: dict[str, Any]) -> list[str]:
    """The task metrics present in the results, in display order."""
    first = results["results"][0]
    return [k for k in METRICS if k in first]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _row_order(r: dict[str, Any]) -> tuple[int, float, str]:
    """Unpruned first, then swept budgets from the largest target down, own operating points last."""
    if r["target"] is not None:
        return 1, -r["target"], r["method"]
    return (0 if r["rule"] == "none" else 2), 0.0, r["method"]


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (method x budget), sorted by target (own points last) then method."""
    metrics = metric_columns(results)
    header = ["method", "target", "rule", "FLOPs ratio", "GFLOPs/sample", *metrics, "samples/s", "speed-up"]
    order = sorted(results["results"], key=_row_order)
    body = []
    for r in order:
        rule = "-" if r["rule"] == "none" else f"{r['rule']} {r['value']:.3g}"
        target = _fmt(r["target"]) + ("" if r.get("on_target", True) else "*")
        body.append([r["method"], target, rule, f"{r['flops_ratio']:.3f}", f"{r['gflops']:.4f}",
                     *[_fmt(r.get(k)) for k in metrics], _fmt(r.get("samples_per_s")), _fmt(r.get("speedup"))])
    return header, body


def write_markdown(results: dict[str, Any], path: Path) -> None:
    header, body = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    note = (f"{results['split']} split, {results['n_samples']} samples, sites {results['sites']}. "
            "FLOPs count the blocks that run; target = FLOPs ratio the keep ratio was solved for "
            f"(* = not reachable within {TARGET_TOLERANCE} at the method's sites).")
    path.write_text(note + "\n\n" + "\n".join(lines) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Each task metric (at most two panels) vs FLOPs ratio, one curve per method.

    Own operating points are stars; the unpruned model is a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metric_columns(results)[:2]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _plot_metric(ax, results["results"], key)
    fig.suptitle(f"{results.get('env') or results['signature'].get('architecture', '')}: "
                 f"{results['split']} split, {results['n_samples']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_metric(ax: Any, rows: Sequence[dict[str, Any]], key: str) -> None:
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        if mine[0]["rule"] == "none":
            ax.axhline(mine[0][key], color="black", ls="--", lw=1, label=f"{name} (FLOPs 1.0)")
            continue
        swept = sorted((r for r in mine if r["target"] is not None), key=lambda r: r["flops_ratio"])
        (line,) = ax.plot([r["flops_ratio"] for r in swept], [r[key] for r in swept], marker="o", ms=3, label=name)
        for r in mine:
            if r["target"] is None:
                ax.plot([r["flops_ratio"]], [r[key]], marker="*", ms=12, ls="", color=line.get_color(),
                        label=f"{name} ({r['rule']} {r['value']:g})")
    ax.set_xlabel("FLOPs ratio (pruned / full)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """pareto.json, table.md and pareto.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pareto.json").write_text(json.dumps(results, indent=2, default=_json_default))
    write_markdown(results, out_dir / "table.md")
    write_plot(results, out_dir / "pareto.png")


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    header, body = table_rows(results)
    table = Table(title=f"{results.get('env', '')} {results['split']}: {results['n_samples']} samples")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 3 else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)


# ---- CLI ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", type=Path, default=None, help="a training run folder (its scorer/ is evaluated)")
    p.add_argument("--env", default=None, help="env preset (name or YAML); required without RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/eval or runs/eval__<env>__<time>/eval)")
    p.add_argument("--methods", nargs="+", default=list(BASELINES), help=f"baselines to compare ({', '.join(BASELINES)})")
    p.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS), help="FLOPs ratio targets")
    p.add_argument("--diversity", type=float, default=0.0, help="spatial-diversity weight of the similarity baselines")
    p.add_argument("--no-prop-attn", action="store_true", help="ToMe without proportional attention")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help="cap on test samples (seeded subset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per throughput measurement (0: skip)")
    p.add_argument("--device", default="cpu")


def build_methods(names: Sequence[str], options: BaselineOptions, scorer: Any = None) -> dict[str, Method]:
    """Baselines by name, plus the learned scorer when given, twice: "learned" sweeps its logit threshold
    (its own per-sample, per-site allocation) to each FLOPs target and also runs its trained operating
    point (threshold 0); "learned-topk" ranks tokens by the same logits with the baselines' constant
    keep ratio per site (static shapes)."""
    methods: dict[str, Method] = {}
    if scorer is not None:
        methods["learned"] = ScorerMethod("learned", scorer, sites=list(scorer.sites), operating_point=("threshold", 0.0),
                                          sweep_rule="threshold")
        methods["learned-topk"] = ScorerMethod("learned-topk", scorer, sites=list(scorer.sites))
    for name in names:
        methods[name] = make_baseline(name, options)
    return methods


def resolve_target(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """(env config, learned scorer or None, output folder) from RUN_DIR and/or --env."""
    from policy_prune.config import load_env_config, run_env_config

    if args.run_dir is None and args.env is None:
        raise UserError("give a RUN_DIR or --env ENV")
    scorer = None
    if args.run_dir is not None:
        from policy_prune.core.artifact import load_scorer

        scorer = load_scorer(args.run_dir / "scorer")
    env_cfg = load_env_config(args.env) if args.env else run_env_config(args.run_dir)
    default = args.run_dir / "eval" if args.run_dir else Path("runs") / f"eval__{env_cfg.name}__{int(time.time())}" / "eval"
    return env_cfg, scorer, args.out or default


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from policy_prune.data import cap
    from policy_prune.embedded import resolve

    console = Console()
    env_cfg, scorer, out_dir = resolve_target(args)
    options = BaselineOptions(seed=args.seed, diversity=args.diversity, prop_attn=not args.no_prop_attn)
    methods = build_methods(args.methods, options, scorer)
    torch.manual_seed(args.seed)
    backbone, splits = resolve(env_cfg, seed=args.seed, device=args.device, console=console)
    if scorer is not None:
        from policy_prune.core.artifact import check_signature

        check_signature(scorer, backbone.signature(), strict=False)
    test = splits["test"] if args.max_samples is None else cap(splits["test"], args.max_samples, args.seed)
    with console.status(f"evaluating {len(methods)} methods x {len(args.targets)} targets on {len(test)} samples"):
        results = evaluate_methods(backbone, test, env_cfg.sites, methods, args.targets, args.batch_size,
                                   args.device, repeats=args.repeats)
    results["env"] = env_cfg.name
    write_outputs(results, out_dir)
    print_table(results, console)
    console.print(f"wrote {out_dir}/pareto.json, table.md, pareto.png")
    return 0
