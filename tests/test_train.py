"""End-to-end training on a tiny setup: run folder contents, resume after SIGKILL, W&B offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from policy_prune.cli import main

TINY_ENV = {
    "backbone": {"spec": "vit_tiny_patch16_224",
                 "model_kwargs": {"img_size": 48, "patch_size": 8, "in_chans": 1, "num_classes": 10,
                                  "embed_dim": 32, "depth": 4, "num_heads": 2}},
    "data": {"dataset": "digits-cluttered", "max_samples": 48,
             "options": {"canvases_train": 1, "canvases_val": 1, "canvases_test": 1}},
    "sites": [1, 2],
    "reward": {"task": "teacher_kl", "lam": 0.3},
}
TINY_AGENT = {"algo": "ppo", "n_envs": 8, "hyperparams": {"n_steps": 4, "batch_size": 16, "n_epochs": 1},
              "scorer_hidden": [16], "critic_hidden": [16]}


@pytest.fixture()
def presets(tmp_path: Path) -> tuple[str, str]:
    env, agent = tmp_path / "tiny-digits.yaml", tmp_path / "tiny-ppo.yaml"
    env.write_text(yaml.safe_dump(TINY_ENV))
    agent.write_text(yaml.safe_dump(TINY_AGENT))
    return str(env), str(agent)


def _train_args(presets, runs: Path, *extra: str) -> list[str]:
    env, agent = presets
    return ["train", "--env", env, "--agent", agent, "--runs-dir", str(runs), "--seed", "3",
            "--set", "train.eval_every=32", "--set", "train.eval_samples=16", "--set", "train.final_samples=16",
            "--set", "train.checkpoint_every=32", *extra]


def test_tiny_train_writes_complete_run_folder(presets, tmp_path) -> None:
    runs = tmp_path / "runs"
    assert main(_train_args(presets, runs, "--timesteps", "96", "--lam", "0.2")) == 0
    (run_dir,) = runs.iterdir()
    assert run_dir.name.startswith("tiny-digits__tiny-ppo__3__")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["env"]["reward"]["lam"] == 0.2 and config["train"]["timesteps"] == 96 and config["train"]["seed"] == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"prune/flops_ratio", "prune/task", "prune/keep_ratio_site0", "eval/return", "eval/flops_ratio",
            "train/loss", "time/total_timesteps"} <= keys
    assert (run_dir / "checkpoints" / "last.zip").is_file()
    assert (run_dir / "scorer" / "scorer.json").is_file() and (run_dir / "scorer" / "scorer.safetensors").is_file()
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"learned", "keep-all", "random-same-ratio"}
    keep_all = summary["methods"]["keep-all"]
    assert keep_all["flops_ratio"] == pytest.approx(1.0) and keep_all["return"] == pytest.approx(-0.2, abs=1e-4)
    assert not list(run_dir.rglob("*.tmp*")), "no temporary files left behind"


def test_linear_schedules_decay_to_zero_over_the_run_and_its_resumed_steps(presets, tmp_path) -> None:
    """``lin_<value>`` (rl-baselines3-zoo's spelling) for the learning rate and the clip range: value at the first
    update, falling linearly with the run's steps to 0 at its last, and a resumed run goes on down from where it
    stopped to 0 at its new length."""
    runs = tmp_path / "runs"
    sched = ["--set", "agent.hyperparams.learning_rate=lin_0.002", "--set", "agent.hyperparams.clip_range=lin_0.2"]
    assert main(_train_args(presets, runs, "--timesteps", "128", "--name", "lin", *sched)) == 0
    run_dir = runs / "lin"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["agent"]["hyperparams"]["learning_rate"] == "lin_0.002"

    def trained() -> list[tuple[int, float, float]]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["time/total_timesteps"], r["train/learning_rate"], r["train/clip_range"])
                for r in rows if "train/learning_rate" in r]

    # 4 rollouts of 32 steps, each followed by an update at the steps done (t - 32 of the row that logs it, SB3 logs
    # an update with the next rollout): 0.0015 after the first rollout, 0 after the last
    def expected(ts: tuple[int, ...], total: int) -> list[tuple[int, Any, Any]]:
        return [(t, pytest.approx(0.002 * (1 - (t - 32) / total)), pytest.approx(0.2 * (1 - (t - 32) / total)))
                for t in ts]

    assert trained() == expected((64, 96, 128), 128)
    assert main(["train", "--resume", str(run_dir), "--timesteps", "192"]) == 0
    assert trained()[3:] == expected((192,), 192)


def test_same_seed_same_result(presets, tmp_path) -> None:
    def one(name: str) -> dict:
        assert main(_train_args(presets, tmp_path / "runs", "--timesteps", "64", "--name", name)) == 0
        return json.loads((tmp_path / "runs" / name / "eval" / "summary.json").read_text())["methods"]["learned"]

    assert one("a") == one("b")


def test_resume_after_sigkill(presets, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    args = _train_args(presets, runs, "--timesteps", "4000", "--name", "killed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "policy_prune.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = runs / "killed" / "checkpoints" / "last.zip"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    config_before = (runs / "killed" / "config.yaml").read_text()
    assert main(["train", "--resume", str(runs / "killed"), "--timesteps", "160"]) == 0
    assert (runs / "killed" / "config.yaml").read_text().replace("timesteps: 4000", "timesteps: 160") == \
        config_before.replace("timesteps: 4000", "timesteps: 160")
    rows = [json.loads(line) for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["timesteps"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), "resume must not duplicate metrics rows"
    assert steps[-1] >= 160
    assert (runs / "killed" / "scorer" / "scorer.json").is_file()
    # Finished: resuming again is refused in one line, and nothing in the folder is rewritten.
    scorer_json = runs / "killed" / "scorer" / "scorer.json"
    steps = json.loads(scorer_json.read_text())["meta"]["timesteps"]
    assert steps >= 160  # the checkpoint's steps, recorded by the export at the end of train
    before = {p: p.read_bytes() for p in (runs / "killed").rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(runs / "killed"), "--timesteps", "160"]) == 2
    assert "is finished" in capsys.readouterr().err
    # Fewer steps than one rollout: still "finished" (the reason), not "below one rollout".
    assert main(["train", "--resume", str(runs / "killed"), "--timesteps", "1"]) == 2
    assert "is finished" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (runs / "killed").rglob("*") if p.is_file()} == before
    # A scorer from an earlier checkpoint (a run killed in its final eval after training further): it resumes.
    meta = json.loads(scorer_json.read_text())
    meta["meta"]["timesteps"] = steps - 1
    scorer_json.write_text(json.dumps(meta))
    assert main(["train", "--resume", str(runs / "killed"), "--timesteps", "160"]) == 0
    assert json.loads(scorer_json.read_text())["meta"]["timesteps"] == steps


def test_wandb_offline_run_has_pruning_metrics(presets, tmp_path, capsys) -> None:
    wandb_dir = Path(os.environ["WANDB_DIR"])
    before = set(wandb_dir.rglob("*.wandb"))
    assert main(_train_args(presets, tmp_path / "runs", "--timesteps", "64", "--track", "wandb")) == 0
    new = set(wandb_dir.rglob("*.wandb")) - before
    assert len(new) == 1
    assert f"W&B: offline run in {next(iter(new)).parent}" in capsys.readouterr().out  # where the records are
    keys = (b"prune/flops_ratio", b"prune/task", b"eval/return", b"train/value_loss")
    # wandb's service process writes the offline file; on a loaded machine the records can land a moment after
    # finish() returns (a CI run read only the file's header once), so wait for them up to 30 s.
    deadline = time.monotonic() + 30
    while not all(key in (content := next(iter(new)).read_bytes()) for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    for key in keys:
        assert key in content


def test_no_track_never_touches_wandb(presets, tmp_path) -> None:
    """timm imports the wandb module itself, so the check is on what W&B would leave: a run, files."""
    wandb_dir = tmp_path / "wandb-home"
    wandb_dir.mkdir()
    env = {**os.environ, "WANDB_DIR": str(wandb_dir)}
    env.pop("WANDB_MODE")
    code = ("import sys; from policy_prune.cli import main; "
            f"rc = main({_train_args(presets, tmp_path / 'runs', '--timesteps', '32')!r}); "
            "w = sys.modules.get('wandb'); print('RUN' if w is not None and w.run is not None else 'NORUN', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.stdout.strip().splitlines()[-1] == "NORUN 0", out.stderr[-2000:]
    assert not any(wandb_dir.iterdir())
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not list(run_dir.rglob("*wandb*"))


@pytest.mark.parametrize("extra,match", [
    (["--set", "reward.lam=0.1"], "env., agent. or train."),
    (["--set", "env.reward.lamda=0.1"], "--set env.reward.lamda: unknown key 'lamda'"),
    (["--set", "env.reward.lam=abc"], "--set env.reward.lam: expected float, got 'abc'"),  # not the preset file's
    (["--set", "train.threads=abc"], "--set train.threads: 'abc' is not a valid"),
    (["--set", "agent.hyperparams.n_steps=5"], "multiple of the number of sites"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")),
    (["--set", "train.dtype=fp8"], "train.dtype must be one of"),
])
def test_user_errors_exit_2_and_leave_no_run(presets, tmp_path, capsys, extra, match) -> None:
    runs = tmp_path / "runs"
    assert main(_train_args(presets, runs, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_resume_of_non_run_is_user_error(tmp_path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_wandb_summary_of_a_budget_run_names_each_target_and_its_split(tmp_path) -> None:
    """A budget-conditioned run's summary has one learned row per target ("learned@0.5"): log_summary read
    methods["learned"] and every such run (minilm-text's preset among them) ended in a KeyError under --track wandb;
    and it labelled train's val numbers "test"."""
    from policy_prune.training.tracking import log_summary

    class Run:
        id = "abc"

        def __init__(self) -> None:
            self.logged: dict = {}
            self.summary: dict = {}
            self.artifacts: list = []

        def log(self, data: dict) -> None:
            self.logged.update(data)

        def log_artifact(self, artifact) -> None:
            self.artifacts.append(artifact)

    m = {"return": 0.1, "task": 0.9, "flops_ratio": 0.5, "keep_ratio": [0.5, 1.0]}
    budget = {"split": "val", "lam": {"per": "budget"}, "methods": {"learned@0.5": m, "learned@0.7": {**m, "task": 0.95},
                                                                      "random-same-ratio@0.5": m}}
    (tmp_path / "scorer").mkdir()
    (tmp_path / "scorer" / "scorer.json").write_text("{}")
    run = Run()
    log_summary(run, tmp_path, budget)
    assert set(run.logged) == {"val/table", "val/pareto"}
    assert run.summary == {"val/learned@0.5/return": 0.1, "val/learned@0.5/task": 0.9, "val/learned@0.5/flops_ratio": 0.5,
                           "val/learned@0.7/return": 0.1, "val/learned@0.7/task": 0.95, "val/learned@0.7/flops_ratio": 0.5}
    assert len(run.artifacts) == 1
    one = Run()
    log_summary(one, tmp_path, {"split": "val", "lam": 0.3, "methods": {"learned": m}})
    assert one.summary == {"val/return": 0.1, "val/task": 0.9, "val/flops_ratio": 0.5}


def test_local_paths_of_a_new_run_are_made_absolute_and_names_stay(tmp_path, monkeypatch) -> None:
    from policy_prune.config import load_env_config
    from policy_prune.training.train import absolute_paths

    monkeypatch.chdir(tmp_path)
    for folder in ("corpus", "imgs", "minilm", "enc"):
        (tmp_path / folder).mkdir()
    (tmp_path / "w.safetensors").write_text("x")
    env = load_env_config("minilm-text", ["data.dataset=hf:corpus:default:train", "backbone.checkpoint=w.safetensors",
                                          "backbone.spec=hf:enc"])
    absolute_paths(env)
    assert env.data.dataset == f"hf:{tmp_path / 'corpus'}:default:train" and env.backbone.spec == f"hf:{tmp_path / 'enc'}"
    assert env.backbone.checkpoint == str(tmp_path / "w.safetensors")
    # Hub ids, embedded and registry names stay as written, even where a folder of that name happens to exist.
    for spec, dataset in (("minilm", "python-docs"), ("hf:org/no-such-model", "hf:org/no-such-corpus"),
                          ("vit_tiny_patch16_224", "imagefolder:no-such-folder")):
        env = load_env_config("minilm-text", [f"backbone.spec={spec}", f"data.dataset={dataset}"])
        absolute_paths(env)
        assert (env.backbone.spec, env.data.dataset) == (spec, dataset)
