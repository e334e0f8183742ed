"""policy-prune sweep: space expansion, trial bookkeeping (resume without redoing), summary, and Ray Tune end to end.

The unmarked tests never start Ray; the end-to-end sweep and the kill-and-resume check do (expensive).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from policy_prune.cli import main
from policy_prune.config import ConfigError
from policy_prune.errors import UserError
from policy_prune.training import sweep
from policy_prune.training.sweep import (
    SweepConfig,
    TrialNamer,
    TrialSetup,
    check_points,
    parse_set,
    resolve_sweep,
    swept_keys,
    trial_count,
    write_summary,
)
from tests import test_train

presets = test_train.presets  # the fixture: tiny digits env + PPO presets as YAML files
QUICK = ["--set", "train.eval_every=32", "--set", "train.eval_samples=16", "--set", "train.final_samples=16",
         "--set", "train.checkpoint_every=32"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return parser.parse_args(list(argv))


# ---- the space ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("item,expected", [
    ("train.seed=0,1,2", ("train.seed", {"grid": [0, 1, 2]})),
    ("env.reward.lam=0.05", ("env.reward.lam", 0.05)),
    ("agent.scorer_hidden=[16]", ("agent.scorer_hidden", [16])),
    ("agent.scorer_hidden=[16],[32, 32]", ("agent.scorer_hidden", {"grid": [[16], [32, 32]]})),
    ("agent.hyperparams.learning_rate={loguniform: [1.0e-4, 1.0e-2]}",
     ("agent.hyperparams.learning_rate", {"loguniform": [1e-4, 1e-2]})),
    ("env.data.dataset=imagefolder:/data/x", ("env.data.dataset", "imagefolder:/data/x")),
])
def test_set_values_and_ranges(item: str, expected: tuple) -> None:
    assert parse_set(item) == expected


def test_sweep_file_and_flags_make_one_space(tmp_path: Path, presets) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"env": presets[0], "agent": presets[1], "num_samples": 2, "seed": 7,
                                    "space": {"env.reward.lam": {"grid": [0.05, 0.3]}, "train.timesteps": 64}}))
    cfg = resolve_sweep(_args(str(path), "--set", "train.seed=0,1", "--timesteps", "96", "--gpus-per-trial", "0.5"))
    assert cfg.num_samples == 2 and cfg.seed == 7 and cfg.gpus_per_trial == 0.5
    assert cfg.space["train.timesteps"] == 96, "a flag overrides the file"
    assert cfg.space["train.device"] == "cuda" and cfg.space["train.threads"] == 1
    assert swept_keys(cfg.space) == ["env.reward.lam", "train.seed"]
    plain = resolve_sweep(_args("--env", presets[0], "--seed", "3"))
    assert plain.space["train.seed"] == 3 and swept_keys(plain.space) == []


@pytest.mark.parametrize("space,match", [
    ({"reward.lam": 0.1}, "start with env., agent. or train."),
    ({"train.name": "x"}, "set by the sweep"),
    ({"train.seed": {"grid": []}}, "non-empty list"),
    ({"train.seed": {"grid": [0], "choice": [1]}}, "one key"),
])
def test_space_mistakes_are_config_errors(tmp_path: Path, space: dict, match: str) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"space": space}))
    with pytest.raises(ConfigError, match=match):
        resolve_sweep(_args(str(path)))


def test_every_grid_point_is_checked_before_any_trial(presets) -> None:
    cfg = resolve_sweep(_args("--env", presets[0], "--agent", presets[1], "--set", "train.seed=0,1",
                              "--set", "env.reward.lam=0.1,0.3"))
    checked = check_points(cfg, presets)
    assert trial_count(cfg) == 4 and sorted((c.train.seed, c.env.reward.lam) for c in checked) == [
        (0, 0.1), (0, 0.3), (1, 0.1), (1, 0.3)]
    bad = resolve_sweep(_args("--env", presets[0], "--agent", presets[1], "--set", "agent.hyperparams.n_steps=4,5"))
    with pytest.raises(ConfigError, match=r"n_steps': 5.*multiple of the number of sites"):
        check_points(bad, presets)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_trials_are_refused_locally_but_not_for_a_cluster(presets) -> None:
    cfg = resolve_sweep(_args("--env", presets[0], "--agent", presets[1], "--gpus-per-trial", "1"))
    with pytest.raises(ConfigError, match="no CUDA device"):
        check_points(cfg, presets)
    assert check_points(cfg, presets, local=False)[0].train.device == "cpu", "checked here as cpu"


def test_an_unreachable_cluster_address_is_one_line() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="no Ray cluster reachable"):
        sweep.check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)


def test_a_bad_key_fails_in_one_line_before_ray_and_leaves_no_folder(presets, tmp_path, capsys) -> None:
    pytest.importorskip("ray")
    runs = tmp_path / "runs"
    argv = ["sweep", "--env", presets[0], "--agent", presets[1], "--runs-dir", str(runs),
            "--set", "env.reward.lamda=0.1,0.3"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'lamda'" in err[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_trial_names_carry_the_index_and_the_swept_values() -> None:
    namer = TrialNamer(["train.seed", "env.reward.lam", "agent.scorer_hidden", "env.a.x", "agent.b.x"])
    trial = SimpleNamespace(trial_id="5e1a9_00012", config={
        "train.seed": 1, "env.reward.lam": 0.123456, "agent.scorer_hidden": [16, 16], "env.a.x": "a/b", "agent.b.x": 2})
    assert namer(trial) == "012__seed=1__lam=0.1235__scorer_hidden=16-16__env.a.x=a-b__agent.b.x=2"


# ---- trial bookkeeping (no Ray: the Tune calls are stand-ins) -------------------------------------------
class FakeTune:
    """Stand-in for ray.tune inside a trial: a fixed trial name, reports collected."""

    def __init__(self, name: str) -> None:
        self.name, self.reports = name, []

    def get_context(self):
        return SimpleNamespace(get_trial_name=lambda: self.name)

    def report(self, metrics: dict) -> None:
        self.reports.append(metrics)


def _fake_train(calls: list):
    def train(cfg, run_dir, console, resume=False, callbacks=()):
        calls.append({"resume": resume, "seed": cfg.train.seed, "callbacks": len(callbacks)})
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "scorer").mkdir(exist_ok=True)
        methods = {"learned": {"return": -0.1, "flops_ratio": 0.5, "accuracy": 0.9, "task": 0.0}}
        (run_dir / "eval" / "summary.json").write_text(json.dumps({"timesteps": 64, "methods": methods}))
        (run_dir / "scorer" / "scorer.json").write_text("{}")
        return {}

    return train


def test_trials_train_once_resume_from_checkpoints_and_restart_when_killed_early(presets, tmp_path, monkeypatch) -> None:
    pytest.importorskip("ray")
    import ray.tune

    from policy_prune.training import train as train_module

    calls: list = []
    monkeypatch.setattr(train_module, "train", _fake_train(calls))
    runs = tmp_path / "sweep" / "runs"
    setup = TrialSetup(presets[0], presets[1], str(runs))
    fake = FakeTune("000__seed=4")
    monkeypatch.setattr(ray.tune, "get_context", fake.get_context)
    monkeypatch.setattr(ray.tune, "report", fake.report)
    run_dir = runs / "000__seed=4"

    sweep.run_trial({"train.seed": 4, "train.timesteps": 64}, setup)  # a fresh trial: an ordinary run folder
    assert calls == [{"resume": False, "seed": 4, "callbacks": 1}]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["name"] == "000__seed=4"
    assert fake.reports[-1]["done"] and fake.reports[-1]["flops_ratio"] == 0.5

    stamp = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    sweep.run_trial({"train.seed": 4}, setup)  # finished: reported again, never retrained
    assert len(calls) == 1 and fake.reports[-1]["kept"]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == stamp

    (run_dir / "eval" / "summary.json").unlink()  # killed after its last checkpoint: continue from it
    (run_dir / "checkpoints" / "last.zip").write_bytes(b"checkpoint")
    sweep.run_trial({"train.seed": 99}, setup)  # the run folder's own config wins over the trial config
    assert calls[-1] == {"resume": True, "seed": 4, "callbacks": 1}

    for p in ("eval/summary.json", "checkpoints/last.zip"):  # killed before its first checkpoint: start over
        (run_dir / p).unlink()
    (run_dir / "stale.txt").write_text("from the killed attempt")
    sweep.run_trial({"train.seed": 4}, setup)
    assert calls[-1]["resume"] is False and not (run_dir / "stale.txt").exists()


def test_summary_table_and_run_list(tmp_path: Path) -> None:
    cfg = SweepConfig(env="tiny", agent="ppo", space={"train.seed": {"grid": [0, 1]}, "train.timesteps": 64})
    rows = [{"trial": "000__seed=0", "config": {"train.seed": 0}, "status": "finished", "run_dir": "/r/000__seed=0",
             "budget": None, "return": -0.12345, "flops_ratio": 0.5, "accuracy": 0.875, "cosine": 0.99},
            {"trial": "001__seed=1", "config": {"train.seed": 1}, "status": "unfinished", "run_dir": "/r/001__seed=1",
             "budget": None}]
    write_summary(cfg, tmp_path, rows, 12.0)
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert "| trial | train.seed | status | return | FLOPs ratio | accuracy | cosine | run folder |" in md
    assert "| 000 | 0 | finished | -0.1235 | 0.500 | 0.875 | 0.990 | runs/000__seed=0 |" in md
    assert "| 001 | 1 | unfinished | - | - | - | - | runs/001__seed=1 |" in md
    assert (tmp_path / "runs.txt").read_text() == "/r/000__seed=0\n"
    assert json.loads((tmp_path / "summary.json").read_text())["trials"] == rows


def test_a_budget_conditioned_run_gives_one_row_per_target(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "000__seed=0"
    (run_dir / "eval").mkdir(parents=True)
    methods = {"learned@0.7": {"return": -0.1, "flops_ratio": 0.69}, "random-same-ratio@0.7": {"return": -0.5},
               "learned@0.5": {"return": -0.2, "flops_ratio": 0.51}, "keep-all": {"return": -0.3}}
    (run_dir / "eval" / "summary.json").write_text(json.dumps({"timesteps": 64, "methods": methods}))
    assert sweep.end_of_run(run_dir) == [(0.7, {"timesteps": 64, "return": -0.1, "flops_ratio": 0.69}),
                                         (0.5, {"timesteps": 64, "return": -0.2, "flops_ratio": 0.51})]
    assert sweep.tune_metrics(run_dir)["flops_ratio@0.5"] == 0.51
    rows = [{"trial": "000__seed=0", "config": {}, "status": "finished", "run_dir": str(run_dir), "budget": b, **m}
            for b, m in sweep.end_of_run(run_dir)]
    write_summary(SweepConfig(), tmp_path, rows, 1.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| 000 | 0.7 | finished | -0.1000 | 0.690 | - | - | runs/000__seed=0 |" in md
    assert "| 000 | 0.5 | finished | -0.2000 | 0.510 | - | - | runs/000__seed=0 |" in md
    assert (tmp_path / "runs.txt").read_text() == f"{run_dir}\n", "one line per run folder"


def test_trials_of_a_sweep_share_a_wandb_group(tmp_path, monkeypatch) -> None:
    import wandb

    from policy_prune.training.tracking import start_wandb

    seen: dict = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or SimpleNamespace(id="x"))
    start_wandb({}, tmp_path, "000__seed=0", console=None, group="sweep__tiny__ppo")
    assert seen["group"] == "sweep__tiny__ppo" and seen["name"] == "000__seed=0"


# ---- Ray Tune end to end (expensive: a local Ray instance and real tiny trials) ------------------------
def _sweep_argv(presets, runs: Path, name: str, *extra: str) -> list[str]:
    return ["sweep", "--env", presets[0], "--agent", presets[1], "--runs-dir", str(runs), "--name", name, *QUICK,
            *extra]


@pytest.mark.expensive
def test_sweep_end_to_end_trials_are_ordinary_runs(presets, tmp_path) -> None:
    pytest.importorskip("ray")
    runs = tmp_path / "runs"
    wandb_dir = Path(os.environ["WANDB_DIR"])
    before = set(wandb_dir.rglob("*.wandb"))
    assert main(_sweep_argv(presets, runs, "s", "--set", "train.seed=0,1", "--timesteps", "64", "--track", "wandb")) == 0
    sweep_dir = runs / "s"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["trial"] for r in summary["trials"]] == ["000__seed=0", "001__seed=1"]
    assert all(r["status"] == "finished" and r["flops_ratio"] > 0 for r in summary["trials"])
    listed = (sweep_dir / "runs.txt").read_text().split()
    assert listed == [str((sweep_dir / "runs" / r["trial"]).resolve()) for r in summary["trials"]]
    for run_dir, seed in zip(map(Path, listed), (0, 1), strict=True):
        train_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
        assert train_cfg["seed"] == seed and train_cfg["wandb_group"] == "s" and train_cfg["track"] == "wandb"
        assert (run_dir / "checkpoints" / "last.zip").is_file() and (run_dir / "scorer" / "scorer.json").is_file()
        tune_rows = [json.loads(line) for line in (sweep_dir / "tune" / run_dir.name / "result.json").read_text().splitlines()]
        assert "prune/flops_ratio" in tune_rows[0] and tune_rows[-1]["done"], "rollouts and the end reach Tune"
    new = set(wandb_dir.rglob("*.wandb")) - before
    assert len(new) == 2, "one offline W&B run per trial"
    # A trial is the training code's own run: the same config through `train` gives the same result.
    assert main(["train", "--env", presets[0], "--agent", presets[1], "--runs-dir", str(tmp_path / "direct"),
                 "--name", "d", "--seed", "1", "--timesteps", "64", "--set", "train.threads=1", *QUICK]) == 0
    direct = json.loads((tmp_path / "direct" / "d" / "eval" / "summary.json").read_text())["methods"]["learned"]
    trial = json.loads((Path(listed[1]) / "eval" / "summary.json").read_text())["methods"]["learned"]
    assert direct == trial


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (Ray puts trial workers in process groups of their own)."""
    for entry in os.listdir("/proc"):
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            if os.getsid(int(entry)) == sid:
                os.kill(int(entry), signal.SIGKILL)


@pytest.mark.expensive
def test_killed_sweep_resumes_without_redoing_finished_trials(presets, tmp_path) -> None:
    pytest.importorskip("ray")
    runs = tmp_path / "runs"
    argv = _sweep_argv(presets, runs, "k", "--set", "train.timesteps=64,6000")  # one quick trial, one long
    proc = subprocess.Popen([sys.executable, "-m", "policy_prune.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    quick, slow = runs / "k" / "runs" / "000__timesteps=64", runs / "k" / "runs" / "001__timesteps=6000"
    try:
        deadline = time.time() + 300
        while not sweep.is_finished(quick) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        while not (slow / "checkpoints" / "last.zip").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        _kill_session(proc.pid)  # the sweep, its Ray processes and its trial workers
        proc.wait()
    assert sweep.is_finished(quick) and not sweep.is_finished(slow), "killed between the two trials' ends"
    stamp = {p: p.stat().st_mtime_ns for p in quick.rglob("*")}
    assert main(["sweep", "--resume", str(runs / "k")]) == 0
    assert {p: p.stat().st_mtime_ns for p in quick.rglob("*")} == stamp, "the finished trial is untouched"
    log = (slow / "train.log").read_text()
    resumed_at = int(log.split("resuming 001__timesteps=6000 at ")[1].split(" ")[0])
    assert resumed_at > 0, "the unfinished trial continued from its checkpoint"
    steps = [json.loads(line)["timesteps"] for line in (slow / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] >= 6000
    assert len((runs / "k" / "runs.txt").read_text().split()) == 2
