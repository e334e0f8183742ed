"""Run records: an SB3 logger output format for metrics.jsonl, and opt-in Weights & Biases tracking.

Metrics reach W&B through an SB3 ``KVWriter`` so SB3's own metrics and the pruning metrics share one
path (WandbCallback alone would miss values recorded by our callbacks). Nothing here touches W&B
unless ``--track wandb`` was given.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger


def folderless_logger(verbose: int = 0) -> Logger:
    """An SB3 logger with no folder: stdout when ``verbose``, else nothing. SB3's default logger (learn()
    without set_logger) makes an empty ``<tempdir>/SB3-<time>`` folder on every call, writing nothing there."""
    return Logger(folder=None, output_formats=[HumanOutputFormat(sys.stdout)] if verbose >= 1 else [])


class JsonlFormat(KVWriter):
    """One JSON object per SB3 dump, appended to ``metrics.jsonl`` and flushed (a kill loses nothing written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a")

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        row = {"timesteps": step}
        row.update({k: _plain(v) for k, v in key_values.items() if _plain(v) is not None})
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class WandbFormat(KVWriter):
    """Forward every SB3 dump (SB3 metrics + prune/ + eval/ keys) to a W&B run."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        data = {k: _plain(v) for k, v in key_values.items() if _plain(v) is not None}
        self.run.log(data, step=step)

    def close(self) -> None:
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, skipping a torn last line left by a kill."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: Path, max_timesteps: int) -> None:
    """Drop rows written after the checkpoint a resumed run continues from (atomic rewrite)."""
    rows = [r for r in read_metrics(path) if r.get("timesteps", 0) <= max_timesteps]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def start_wandb(config: dict[str, Any], run_dir: Path, name: str, console: Any, resume_id: str | None = None,
                group: str | None = None) -> Any:
    """A W&B run that never hangs: offline with one clear line when there is no login or no network.

    WANDB_PROJECT / WANDB_ENTITY / WANDB_MODE are honoured; the run's files go under the run folder
    unless WANDB_DIR says otherwise.
    """
    import wandb

    mode: Any = os.environ.get("WANDB_MODE")
    if mode is None and not _has_wandb_login():
        console.print("[yellow]W&B: no login found; logging offline (sync later with `wandb sync`).[/]")
        mode = "offline"
    kwargs: dict[str, Any] = dict(
        project=os.environ.get("WANDB_PROJECT", "policy-prune"),
        entity=os.environ.get("WANDB_ENTITY"),
        name=name,
        group=group,
        config=config,
        dir=os.environ.get("WANDB_DIR", str(run_dir)),
        id=resume_id,
        resume="allow" if resume_id else None,
        settings=wandb.Settings(init_timeout=30, silent=True),
    )
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as exc:  # network down or service unreachable: never block training on tracking
        console.print(f"[yellow]W&B: cannot reach the server ({type(exc).__name__}); logging offline.[/]")
        run = wandb.init(mode="offline", **kwargs)
    if getattr(run, "offline", False):  # silent=True: say where the records go (the run folder holds only its id)
        console.print(f"W&B: offline run in {Path(run.dir).parent} (`wandb sync {Path(run.dir).parent}` uploads it)",
                      markup=False)
    return run


def _has_wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def log_summary(run: Any, run_dir: Path, summary: dict[str, Any]) -> None:
    """Held-out comparison as a W&B table + Pareto scatter, headline numbers in the run summary, and
    the exported scorer as a model artifact."""
    import wandb

    # The split the summary was measured on (train's final evaluation: val), not "test" as it was labelled.
    split = summary.get("split", "val")
    columns: list[Any] = ["policy", "return", "task", "flops_ratio", "agreement", "accuracy"]
    table = wandb.Table(columns=columns)
    for name, m in summary["methods"].items():
        table.add_data(name, *(m.get(c) for c in columns[1:]))
    run.log({f"{split}/table": table,
             f"{split}/pareto": wandb.plot.scatter(table, "flops_ratio", "task", title=f"task vs FLOPs ratio ({split})")})
    # One learned row ("learned") at one lambda, one per target ("learned@0.5") for a budget-conditioned run: the
    # single-lambda key alone crashed every budget run at its end (minilm-text's preset among them).
    learned = {name: m for name, m in summary["methods"].items() if name == "learned" or name.startswith("learned@")}
    prefix = {name: f"{split}/" if name == "learned" else f"{split}/{name}/" for name in learned}
    headline = {f"{prefix[name]}{k}": v for name, m in learned.items() for k, v in m.items() if isinstance(v, int | float)}
    run.summary.update(headline)
    scorer_dir = run_dir / "scorer"
    if scorer_dir.is_dir():
        artifact = wandb.Artifact(f"scorer-{run.id}", type="model", metadata={"lam": summary["lam"], **headline})
        artifact.add_dir(str(scorer_dir))
        run.log_artifact(artifact)
