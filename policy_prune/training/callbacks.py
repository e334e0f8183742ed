"""SB3 callbacks of a training run: pruning metrics, budget multipliers, validation, checkpoints, progress."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

PRUNE_KEYS = ("task", "flops_ratio", "agreement", "accuracy", "cosine", "tokens_kept")


def _episode_infos(locals_: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in locals_["infos"] if "flops_ratio" in i]


class PruneMetricsCallback(BaseCallback):
    """Averages the episode-end infos of each rollout into ``prune/*`` logger keys."""

    def __init__(self, progress: RunProgress | None = None) -> None:
        super().__init__()
        self.progress = progress
        self.buffer: list[dict[str, Any]] = []

    def _on_step(self) -> bool:
        self.buffer += _episode_infos(self.locals)
        if self.progress is not None:
            self.progress.advance(self.num_timesteps)
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
        if self.progress is not None:
            ret = [i["return"] for i in self.buffer if "return" in i]  # the env's own, before any group baseline
            self.progress.rollout(self.num_timesteps, ret=float(np.mean(ret)) if ret else float("nan"),
                                  flops=float(np.mean([i["flops_ratio"] for i in self.buffer])))
        self.buffer = []


class BudgetCallback(BaseCallback):
    """Dual ascent on the budget multipliers after every rollout (``training.budget``).

    The multipliers live in the env's :class:`~policy_prune.training.budget.BudgetController` and are
    mirrored into the policy's ``budget_lam`` buffer, so checkpoints carry them and ``--resume``
    continues with them.
    """

    def __init__(self, controller: Any) -> None:
        super().__init__()
        self.controller = controller
        self.targets: list[float] = []
        self.flops: list[float] = []

    def _on_training_start(self) -> None:
        policy: Any = self.model.policy
        stored = policy.budget_lam
        if self.model.num_timesteps > 0:  # resumed: the checkpoint's multipliers
            self.controller.lam = stored.detach().cpu().double().numpy().copy()
        else:
            self._mirror()

    def _mirror(self) -> None:
        policy: Any = self.model.policy
        policy.budget_lam.copy_(torch.as_tensor(self.controller.lam, dtype=torch.float64))

    def _on_step(self) -> bool:
        for info in _episode_infos(self.locals):
            self.targets.append(info["target"])
            self.flops.append(info["flops_ratio"])
        return True

    def _on_rollout_end(self) -> None:
        err = self.controller.update(self.targets, self.flops)
        self._mirror()
        self.targets, self.flops = [], []
        for k, (f, lam, e) in enumerate(zip(self.controller.knots, self.controller.lam, err, strict=True)):
            self.logger.record(f"budget/lam_{k}", float(lam))
            self.logger.record(f"budget/flops_gap_{k}", float(e))
            if k == 0:
                self.logger.record("budget/knot_0_target", float(f))


class ValidationCallback(BaseCallback):
    """Every ``every`` timesteps, the deterministic policy on the validation split -> ``eval/*`` keys.

    A budget-conditioned policy is evaluated at each of ``targets`` (keys ``eval/<key>@<target>``) and
    ``eval/<key>`` is their mean.
    """

    def __init__(self, cfg: Any, backbone: Any, split: Any, every: int, targets: Sequence[float | None] = (None,),
                 controller: Any = None, progress: RunProgress | None = None) -> None:
        super().__init__()
        self.cfg, self.backbone, self.split, self.every = cfg, backbone, split, every
        self.targets, self.controller, self.progress = list(targets), controller, progress
        self.next_at = every
        self.vec: Any = None

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps < self.next_at:
            return
        self.next_at = (self.num_timesteps // self.every + 1) * self.every
        from policy_prune.training.rollout import evaluate_policy_split, evaluation_env, model_policy

        n, device = self.cfg.train.eval_samples, self.cfg.train.device
        if self.vec is None:  # one env for every validation: its teacher outputs stay cached
            self.vec = evaluation_env(self.cfg.env, self.backbone, self.split, n, device, controller=self.controller)
        results = [evaluate_policy_split(model_policy(self.model), self.cfg.env, self.backbone, self.split, n,
                                         device=device, target=t, vec=self.vec) for t in self.targets]
        for t, result in zip(self.targets, results, strict=True):
            suffix = "" if t is None else f"@{t:g}"
            for key in ("return", *PRUNE_KEYS):
                if key in result:
                    self.logger.record(f"eval/{key}{suffix}", result[key])
            for site, ratio in enumerate(result["keep_ratio"]):
                self.logger.record(f"eval/keep_ratio_site{site}{suffix}", ratio)
        if len(results) > 1:
            for key in ("return", *PRUNE_KEYS):
                if key in results[0]:
                    self.logger.record(f"eval/{key}", float(np.mean([r[key] for r in results])))
        if self.progress is not None:
            metric = next((k for k in ("accuracy", "cosine", "agreement") if k in results[0]), "return")
            self.progress.validation(metric, [(t, r[metric], r["flops_ratio"]) for t, r in zip(self.targets, results, strict=True)])


def save_checkpoint(model: Any, path: Path) -> None:
    """model.save to a temporary file, then an atomic rename: a kill mid-save keeps the previous one."""
    tmp = path.with_name("last.tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


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
            self.next_at = (self.num_timesteps // self.every + 1) * self.every
            save_checkpoint(self.model, self.path)


class RunProgress:
    """The one progress display of ``policy-prune train``: backbone fitting (when it happens), then the
    environment steps with the latest training return and FLOPs and the latest validation figures."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}[/]"), BarColumn(), TextColumn("{task.completed:>8.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task: Any = None
        self.fields = {"ret": "", "val": ""}

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    # The rich Progress calls a fitting phase makes (pretrain.fit): they drive the same one bar.
    def add_task(self, description: str, total: float | None = None, **fields: Any) -> Any:
        """The run's bar, showing a fitting phase first (e.g. the embedded backbone's steps)."""
        self.task = self.progress.add_task(description, total=total, **{"status": "", **fields})
        return self.task

    def start(self, total: int, done: int = 0) -> None:
        """The steps phase on the same bar: ``total`` is the real number of steps the run will have taken."""
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, completed=done, status="")
        else:
            self.progress.reset(self.task, total=total, completed=done, description="train", status="")

    def advance(self, steps: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=steps)

    def update(self, task: Any, **kwargs: Any) -> None:
        """rich's ``Progress.update`` (what a fitting phase calls)."""
        self.progress.update(task, **kwargs)

    def rollout(self, steps: int, ret: float, flops: float) -> None:
        self.fields["ret"] = f"return {ret:+.3f}  FLOPs {flops:.3f}"
        self._refresh(steps)

    def validation(self, metric: str, rows: Sequence[tuple[float | None, float, float]]) -> None:
        parts = [f"{'' if t is None else f'@{t:g} '}{v:.3f} (FLOPs {f:.2f})" for t, v, f in rows]
        self.fields["val"] = f"val {metric} " + ", ".join(parts)
        self._refresh(None)

    def _refresh(self, steps: int | None) -> None:
        if self.task is None:
            return
        status = "  ".join(v for v in self.fields.values() if v)
        if steps is None:
            self.progress.update(self.task, status=status)
        else:
            self.progress.update(self.task, completed=steps, status=status)


def make_callbacks(cfg: Any, run_dir: Path, backbone: Any, val_split: Any, progress: RunProgress | None,
                   controller: Any = None) -> CallbackList:
    """All callbacks of a run (they update ``progress``)."""
    callbacks: list[BaseCallback] = [PruneMetricsCallback(progress)]
    if controller is not None:
        callbacks.append(BudgetCallback(controller))
    targets = eval_targets(cfg) if controller is not None else [None]
    callbacks += [
        ValidationCallback(cfg, backbone, val_split, cfg.train.eval_every, targets, controller, progress),
        CheckpointCallback(run_dir / "checkpoints" / "last.zip", cfg.train.checkpoint_every),
    ]
    return CallbackList(callbacks)


def eval_targets(cfg: Any) -> list[float | None]:
    """The budgets a budget-conditioned run is validated at (``train.eval_targets`` inside its range)."""
    low, high = cfg.env.reward.budget
    inside = [float(t) for t in cfg.train.eval_targets if low - 1e-9 <= t <= high + 1e-9]
    return list(inside) or [0.5 * (low + high)]
