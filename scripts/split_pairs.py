"""How one total is split between queries and passages, at each allowed loss of the passages' fidelity.

A retrieval run's calibration splits one FLOPs total between queries (asked q) and passages (asked d): at each
target f, queries q = f, f + 0.05, ... and passages the rest of f at the bound on the queries' share, the pair that
retrieves best on val among those whose passages stay within the run's ``train.split_loss`` (default ``SPLIT_LOSS``)
of the fidelity they have with each kind at f (``policy_prune.core.calibration.solve_splits``). This scores every pair of each target once, on the
run's val split as calibration does (its scorer, its calibrated plans, the fp32 backbone), and prints the split
each loss would choose with its val recall@10 and passages' cosine, per run and averaged over the runs: how
``SPLIT_LOSS`` and minilm-retrieval's ``train.split_loss`` were chosen.

    python scripts/split_pairs.py runs/minilm-s0 runs/minilm-s1 runs/minilm-s2 --targets 0.7 0.5 0.35 0.25

Nothing is written; the runs' scorers are read as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Pairs = dict[tuple[float, float], tuple[float, float]]


def _at_targets(budget: Any, targets: Sequence[float]) -> Any:
    """``budget`` with only its calibration points at ``targets``."""
    return dataclasses.replace(budget, calibration=[p for p in budget.calibration
                                                    if any(math.isclose(p.flops, t) for t in targets)])


def scored_pairs(budget: Any, score: Callable[[float, float], tuple[float, float]], share: float,
                 targets: Sequence[float]) -> Pairs:
    """{(q, d): (recall, fidelity)} of every pair ``solve_splits`` could try at ``targets`` (no loss bound)."""
    from policy_prune.core.calibration import solve_splits

    pairs: Pairs = {}

    def logged(q: float, d: float) -> tuple[float, float]:
        pairs[(q, d)] = score(q, d)
        return pairs[(q, d)]

    solve_splits(_at_targets(budget, targets), logged, share, loss=math.inf)
    return pairs


def splits_at(budget: Any, pairs: Pairs, share: float, targets: Sequence[float], loss: float) -> dict[float, tuple]:
    """{target: (q, d, recall, fidelity)}: the split ``solve_splits`` chooses at ``loss`` from the scored pairs."""
    from policy_prune.core.calibration import solve_splits
    from policy_prune.errors import UserError

    def lookup(q: float, d: float) -> tuple[float, float]:
        if (q, d) not in pairs:  # a pair whose plans cannot run: skipped, as in calibration
            raise UserError(f"no plan for ({q}, {d})")
        return pairs[(q, d)]

    solved = solve_splits(_at_targets(budget, targets), lookup, share, loss=loss)
    out = {}
    for p in solved.calibration:
        q, d = p.split["query"], p.split["document"]
        out[p.flops] = (q, d, *pairs.get((q, d), (math.nan, math.nan)))
    return out


def run_pairs(run_dir: Path, targets: Sequence[float]) -> tuple[Any, Pairs, float]:
    """(the run's budget, its scored pairs, its bound on the queries' share), on its val split as calibrated (the
    backbone built and checked as ``export --calibrate`` builds it, in fp32)."""
    from policy_prune.config import read_run_config
    from policy_prune.core.artifact import load_scorer
    from policy_prune.export import run_backbone, run_signature
    from policy_prune.training.train import deployed_backbone, load_run_config, split_score

    cfg = load_run_config(run_dir)
    scorer = load_scorer(run_dir / "scorer")
    backbone, splits = run_backbone(cfg, scorer, run_signature(run_dir, read_run_config(run_dir), scorer))
    backbone = deployed_backbone(cfg, backbone)
    if scorer.budget is None or not scorer.budget.tasks or splits["val"].queries is None:
        raise SystemExit(f"error: {run_dir}'s scorer has no calibrated plans per task (a retrieval run's): no split")
    share = cfg.train.query_share
    score = split_score(scorer, backbone, splits["val"], cfg.train.device)
    return scorer.budget, scored_pairs(scorer.budget, score, share, targets), share


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="retrieval run folders (calibrated, with a scorer)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.35, 0.25])
    p.add_argument("--losses", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2])
    p.add_argument("--seed", type=int, default=0, help="torch's seed (the scoring itself draws nothing)")
    args = p.parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    for run in args.runs:
        if not (run / "scorer").is_dir():
            print(f"error: {run} has no scorer folder", file=sys.stderr)
            return 2
    scored = [run_pairs(run, args.targets) for run in args.runs]
    for loss in args.losses:
        chosen = [splits_at(budget, pairs, share, args.targets, loss) for budget, pairs, share in scored]
        print(f"loss {loss:g}")
        for f in sorted(chosen[0], reverse=True):
            rows = [c[f] for c in chosen]
            qs = " ".join(f"{r[0]:g}/{r[1]:.3f}" for r in rows)
            print(f"  {f:g}: q/d {qs}  recall@10 {np.mean([r[2] for r in rows]):.3f}  "
                  f"passages' cosine {np.mean([r[3] for r in rows]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
