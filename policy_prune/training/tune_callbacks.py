"""Callbacks between a sweep and Ray Tune (imported only when a sweep runs: ``ray`` is an extra).

Module-level classes on purpose: Tune pickles its callbacks into the experiment state, and a class
reachable by name is pickled by reference, so a resumed sweep runs this code, not a frozen copy.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from stable_baselines3.common.callbacks import BaseCallback


class TrialLog(tune.Callback):
    """One plain line per trial start, end and error, in the sweep's own console (Tune's tables are off)."""

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"started  {trial}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        m = trial.last_result or {}
        shown = "  ".join(f"{k} {m[k]:.3f}" for k in ("return", "flops_ratio", "accuracy") if k in m)
        when = "kept: finished before the interruption" if m.get("kept") else f"{m.get('time_total_s', 0.0):.0f} s"
        print(f"finished {trial}: {shown}  ({when})", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"failed   {trial} (see {trial.path}/error.txt and its run folder's train.log)", flush=True)


class TuneReport(BaseCallback):
    """Reports each rollout's prune/ and eval/ metrics of a trial's run to Tune.

    Placed after the run's own callbacks: at rollout end their values are recorded, not yet dumped.
    """

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        values = {k: float(v) for k, v in self.logger.name_to_value.items() if k.startswith(("prune/", "eval/"))}
        tune.report({"timesteps": int(self.num_timesteps), **values})
