"""SB3 callbacks of a training run: pruning metrics, validation, atomic checkpoints, rich progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

PRUNE_KEYS = ("task", "flops_ratio", "agreement", "accuracy", "cosine", "tokens_kept")


class PruneMetricsCallback(BaseCallback):
    """Averages the episode-end infos of each rollout into ``prune/*`` logger keys."""

    def __init__(self, progress: Any = None, task_id: Any = None) -> None:
        super().__init__()
        self.progress, self.task_id = progress, task_id
        self.buffer: list[dict[str, Any]] = []
        self.last: dict[str, float] = {}

    def _on_step(self) -> bool:
        self.buffer += [i for i in self.locals["infos"] if "flops_ratio" in i]
        if self.progress is not None:
            self.progress.update(self.task_id, completed=self.num_timesteps, **self.last)
        return True

    def _on_rollout_end(self) -> None:
        if not self.buffer:
            return
        for key in PRUNE_KEYS:
            values = [i[key] for i in self.buffer if key in i]
            if values:
                self.logger.record(f"prune/{key}", float(np.mean(values)))
        keep = np.mean([i["keep_ratio"] for i in self.buffer], axis=0)
        for site, ratio in enumerate(keep):
            self.logger.record(f"prune/keep_ratio_site{site}", float(ratio))
        ret = [i["return"] for i in self.buffer if "return" in i]  # the env's own, before any group baseline
        self.last = {"ret": float(np.mean(ret)) if ret else float("nan"),
                     "task": float(np.mean([i["task"] for i in self.buffer])),
                     "flops": float(np.mean([i["flops_ratio"] for i in self.buffer]))}
        self.buffer = []


class ValidationCallback(BaseCallback):
    """Every ``every`` timesteps, the deterministic policy on the validation split -> ``eval/*`` keys."""

    def __init__(self, cfg: Any, backbone: Any, split: Any, every: int) -> None:
        super().__init__()
        self.cfg, self.backbone, self.split, self.every = cfg, backbone, split, every
        self.next_at = every

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps < self.next_at:
            return
        self.next_at = (self.num_timesteps // self.every + 1) * self.every
        from policy_prune.training.rollout import evaluate_policy_split, model_policy

        result = evaluate_policy_split(model_policy(self.model), self.cfg.env, self.backbone, self.split,
                                       self.cfg.train.eval_samples, device=self.cfg.train.device)
        for key in ("return", *PRUNE_KEYS):
            if key in result:
                self.logger.record(f"eval/{key}", result[key])
        for site, ratio in enumerate(result["keep_ratio"]):
            self.logger.record(f"eval/keep_ratio_site{site}", ratio)


class CheckpointCallback(BaseCallback):
    """Atomic ``checkpoints/last.zip`` every ``every`` timesteps (a kill loses at most one interval)."""

    def __init__(self, path: Path, every: int) -> None:
        super().__init__()
        self.path, self.every = path, every
        self.next_at = every

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps >= self.next_at:
            from policy_prune.training.train import save_checkpoint

            self.next_at = (self.num_timesteps // self.every + 1) * self.every
            save_checkpoint(self.model, self.path)


def make_callbacks(cfg: Any, run_dir: Path, backbone: Any, val_split: Any, console: Any) -> tuple[CallbackList, Any]:
    """All callbacks of a run and the rich progress display they update."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed:>8.0f}/{task.total:.0f}"),
        TextColumn("return {task.fields[ret]:+.3f}  task {task.fields[task]:+.3f}  FLOPs {task.fields[flops]:.3f}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    task_id = progress.add_task("train", total=cfg.train.timesteps, ret=float("nan"), task=float("nan"), flops=float("nan"))
    callbacks = CallbackList([
        PruneMetricsCallback(progress, task_id),
        ValidationCallback(cfg, backbone, val_split, cfg.train.eval_every),
        CheckpointCallback(run_dir / "checkpoints" / "last.zip", cfg.train.checkpoint_every),
    ])
    return callbacks, progress
