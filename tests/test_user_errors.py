"""User mistakes: one line and exit code 2 from the CLI, a ValueError / TypeError from the library, and all of
them before any backbone is fitted or loaded (the loaders are replaced by traps here)."""

from __future__ import annotations

import pytest
import torch

import policy_prune
from policy_prune.cli import main
from policy_prune.errors import PolicyPruneError

TRAIN_MISTAKES = {
    "unknown hyperparameter": (["--set", "agent.hyperparams.n_stepz=3"],
                               "unknown key 'n_stepz' for TokenCreditPPO (did you mean 'n_steps'?)"),
    "negative lambda": (["--lam", "-1"], "lambda) must be a finite number >= 0"),
    "site past the last block": (["--set", "env.sites=[1,3,9]"], "digits-vit has 6 blocks"),
    "site past a timm model's blocks": (["--env", "custom-timm-imagefolder", "--set", "env.sites=[3,6,12]"],
                                        "deit_tiny_patch16_224 has 12 blocks"),
    "missing image folder": (["--env", "custom-timm-imagefolder"], "image folder not found: /path/to/your/images"),
    "sites not increasing": (["--set", "env.sites=[3,1]"], "strictly increasing"),
    "timesteps below one rollout": (["--timesteps", "1000"], "below one rollout (n_envs 64 x n_steps 48 = 3072)"),
    "cosine task on a classifier": (["--set", "env.reward.task=cosine"], "'cosine' is for embedding models"),
    "retrieval task on a classifier": (["--set", "env.reward.task=retrieval"], "'retrieval' is for embedding models"),
    "retrieval task without query rows": (["--env", "minilm-text", "--set", "env.reward.task=retrieval"],
                                          "set env.data.options.train_queries: true"),
    "logit task on an encoder": (["--env", "minilm-text", "--set", "env.reward.task=label_prob"], "needs a classifier"),
    "unknown reward task": (["--set", "env.reward.task=teacher_kll"], "(did you mean 'teacher_kl'?)"),
    "group size not dividing n_envs": (["--set", "agent.group_size=3"], "must be a positive divisor of agent.n_envs 64"),
    "gamma out of range": (["--set", "agent.hyperparams.gamma=1.5"], "gamma must lie in [0, 1]"),
    "hyperparameter train sets": (["--set", "agent.hyperparams.seed=3"], "is set by policy-prune (use --seed)"),
    "unknown algorithm": (["--set", "agent.algo=dqn"], "agent.algo must be one of ppo, a2c"),
    "unknown env preset": (["--env", "no-such-env"], "unknown env preset 'no-such-env'"),
    "unknown dataset": (["--set", "env.data.dataset=mnist"], "unknown dataset 'mnist'"),
    "unknown pretrain key": (["--set", "env.backbone.pretrain.epoch=2"], "unknown key 'epoch' in backbone.pretrain"),
    "n_steps not a multiple of sites": (["--set", "agent.hyperparams.n_steps=50"], "multiple of the number of sites (4)"),
    "budget range upside down": (["--set", "env.reward.budget=[0.9,0.3]"], "env.reward.budget must be [low, high]"),
    "budget outside (0, 1]": (["--set", "env.reward.budget=[0.3,1.5]"], "0 < low <= high <= 1"),
    "validation budget out of range": (["--set", "train.eval_targets=[0.5,2]"], "train.eval_targets must be FLOPs ratios"),
    "learning rate not a number": (["--set", "agent.hyperparams.learning_rate=abc"],
                                   "agent.hyperparams.learning_rate must be a positive number, or lin_<positive number>"),
    "clip range schedule misspelt": (["--set", "agent.hyperparams.clip_range=linear_0.2"],
                                     "for a linear decay to 0 over the run, got 'linear_0.2'"),
    "learning rate schedule from 0": (["--set", "agent.hyperparams.learning_rate=lin_0"], "got 'lin_0'"),
    "entropy coefficient as a schedule": (["--set", "agent.hyperparams.ent_coef=lin_0.01"],
                                          "agent.hyperparams.ent_coef must be a number, got 'lin_0.01'"),
    "negative split loss": (["--set", "train.split_loss=-0.1"], "train.split_loss must be a number of at least 0"),
    "no torch threads": (["--set", "train.threads=0"], "train.threads must be a positive integer or null"),
    "unknown tracker": (["--set", "train.track=mlflow"], "train.track must be null or wandb, got 'mlflow'"),
    "warm start past every token": (["--set", "agent.warm_start.keep=1.5"], "agent.warm_start.keep must be in (0, 1), got 1.5"),
    "ranking loss without per-token credit": (["--agent", "a2c", "--set", "agent.warm_start.aux_coef=1"],
                                              "agent.warm_start.aux_coef needs agent.credit: token"),
    "critic without layers": (["--set", "agent.critic_hidden=[]"], "agent.critic_hidden needs at least one layer"),
    "unknown pooling": (["--env", "minilm-text", "--set", "env.backbone.pooling=max"], "pooling must be null or one of mean, cls"),
    "no room for a word": (["--env", "minilm-text", "--set", "env.data.max_length=0"], "max_length must be at least 3"),
    "negative image size": (["--set", "env.data.image_size=-3"], "image_size must be a positive number"),
    "run name with a path": (["--name", "../elsewhere"], "must be one folder name (no path separators)"),
    "missing timm checkpoint": (["--set", "env.backbone.spec=vit_small_patch16_224", "--set",
                                 "env.backbone.checkpoint=/nowhere/w.safetensors"], "checkpoint not found"),
}
if not torch.cuda.is_available():
    TRAIN_MISTAKES["cuda without a GPU"] = (["--device", "cuda"], "no CUDA device is available here")
OTHER_MISTAKES = {
    "eval of a missing run": (["eval", "/nonexistent/run"], "run folder not found"),
    "export of a missing run": (["export", "/nonexistent/run"], "run folder not found"),
    "bench told to write its JSON over a folder": (["bench", "--out", "/"], "--out / is a folder"),
    "an ONNX model option without --onnx-model": (["export", ".", "--model", "digits-vit", "--check-split", "test"],
                                                  "--model, --check-split apply to --onnx-model only"),
    "bench with an unknown inductor option": (["bench", "--what", "model", "--model", "digits-vit", "--compile", "frezing"],
                                              "'frezing' is not an inductor option"),
}
if not torch.cuda.is_available():
    OTHER_MISTAKES["bench of a model on cuda without a GPU"] = (
        ["bench", "--what", "model", "--model", "digits-vit", "--device", "cuda"], "no CUDA device is available here")


@pytest.fixture
def no_backbone_work(monkeypatch):
    """Fitting or loading any backbone fails the test."""
    from policy_prune import embedded
    from policy_prune.core import backbones, embedded_models
    from policy_prune.training import pretrain

    def trap(*args, **kwargs):
        raise AssertionError("a backbone was fitted or loaded")

    for module, name in [(embedded, "resolve"), (embedded, "resolve_backbone"), (embedded, "digits_vit"),
                         (pretrain, "pretrain"), (pretrain, "fit"), (backbones, "load_backbone"),
                         (embedded_models, "load_digits_vit"), (embedded_models, "load_minilm")]:
        monkeypatch.setattr(module, name, trap)


@pytest.mark.parametrize("case", list(TRAIN_MISTAKES))
def test_train_mistakes_fail_in_one_line_before_any_work(case, tmp_path, capsys, no_backbone_work) -> None:
    argv, message = TRAIN_MISTAKES[case]
    runs = tmp_path / "runs"
    assert main(["train", *argv, "--runs-dir", str(runs)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not runs.exists()  # no run folder, not even an empty one


@pytest.mark.parametrize("case", list(OTHER_MISTAKES))
def test_other_verbs_mistakes_fail_in_one_line(case, capsys, no_backbone_work) -> None:
    argv, message = OTHER_MISTAKES[case]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_library_mistakes_are_value_or_type_errors(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    from policy_prune.core.backbones import adapt
    from policy_prune.core.scorer import random_scorer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    scorer = random_scorer(adapt(model), [1, 2])
    cases = [
        (ValueError, "keep_ratio values must lie in [0, 1]", lambda: policy_prune.prune(model, scorer, keep_ratio=1.5)),
        (ValueError, "give keep_ratio or threshold, not both",
         lambda: policy_prune.prune(model, scorer, keep_ratio=0.5, threshold=0.0)),
        (TypeError, "no token-pruning adapter for Linear", lambda: policy_prune.prune(torch.nn.Linear(2, 2), scorer)),
        (ValueError, "scorer not found", lambda: policy_prune.load_scorer(tmp_path / "nothing")),
        (ValueError, "unknown decision rule 'top-k'", lambda: policy_prune.prune(model, scorer, rule="top-k")),
        (ValueError, "unknown backbone 'no_such_model'", lambda: policy_prune.load_backbone("no_such_model")),
        (ValueError, "flops must be a FLOPs ratio in (0, 1]", lambda: policy_prune.prune(model, scorer, flops=1.5)),
        (ValueError, "no budget input", lambda: policy_prune.prune(model, scorer, flops=0.5, rule="threshold")),
        (TypeError, "flops must be a number", lambda: policy_prune.prune(model, scorer, flops="0.5")),
        (TypeError, "flops must be a number", lambda: policy_prune.prune(model, scorer, flops=[0.5])),
        (TypeError, "scorer must be a LearnedScorer", lambda: policy_prune.prune(model, 5)),
        (TypeError, "load_scorer takes the path of a scorer folder (str or Path), got NoneType",
         lambda: policy_prune.load_scorer(None)),
    ]
    for kind, message, call in cases:
        with pytest.raises(kind) as exc:
            call()
        assert isinstance(exc.value, PolicyPruneError) and message in str(exc.value)
    # Numbers of any kind are FLOPs targets: numpy and 0-d torch scalars give the same model as a float.
    import numpy as np

    values = {policy_prune.prune(model, scorer, flops=f).values[0] for f in (0.5, np.float32(0.5), torch.tensor(0.5))}
    assert len(values) == 1


def _train_parser():
    import argparse

    from policy_prune.training.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_yaml_numbers_are_read_as_numbers_wherever_a_config_is() -> None:
    """YAML 1.1 (PyYAML) reads "3e-4" as a string: a learning rate written so reached SB3 as text and crashed
    the run after its folder was made. Configs read it as the number; a string that looks like one is quoted
    when written, so a run's config.yaml reads back as it was."""
    from policy_prune.config import dump_yaml, load_yaml
    from policy_prune.training.train import resolve_config

    assert load_yaml("[3e-4, 1E5, -2.5e-3, .5, 1.0, 10, abc]") == [3e-4, 1e5, -2.5e-3, 0.5, 1.0, 10, "abc"]
    data = {"name": "1e5", "lr": 3e-4, "tag": "2e-3x"}
    assert load_yaml(dump_yaml(data)) == data
    cfg = resolve_config(_train_parser().parse_args(["--set", "agent.hyperparams.learning_rate=3e-4"]))
    assert cfg.agent.hyperparams["learning_rate"] == 3e-4


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch) -> None:
    """Any failure of a new run before it saved a checkpoint (a late mistake, a crash, Ctrl-C) removes its
    folder: it could not be resumed, and it blocked its name ("run folder already exists")."""
    from policy_prune.training import train

    runs = tmp_path / "runs"

    def crash(*args, **kwargs):
        assert (runs / "x" / "config.yaml").is_file()  # the folder existed while it ran
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "train", crash)
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", "--name", "x", "--runs-dir", str(runs)])
    assert not (runs / "x").exists()

    # A crash after training logged metrics keeps them (the evidence), and the folder then says why it blocks
    # the name.
    def crash_later(cfg, run_dir, *args, **kwargs):
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "train", crash_later)
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", "--name", "x", "--runs-dir", str(runs)])
    assert (runs / "x" / "metrics.jsonl").is_file()
    with pytest.raises(PolicyPruneError, match="no checkpoint to resume .* delete it or give another --name"):
        train.new_run_dir(train.resolve_config(_train_parser().parse_args(["--name", "x", "--runs-dir", str(runs)])))


def test_resume_keeps_the_run_config_and_refuses_a_broken_checkpoint(tmp_path, capsys, no_backbone_work) -> None:
    """--resume takes only --timesteps (validated like a new run's); other flags would be ignored silently, so
    they are refused; a checkpoint that is not an SB3 zip is one line, not SB3's traceback."""
    from policy_prune.config import dump_yaml, to_dict
    from policy_prune.training import train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(to_dict(train.resolve_config(_train_parser().parse_args([])))))
    for argv, message in ((["--set", "train.threads=1"], "--set cannot change it"),
                          (["--env", "minilm-text", "--seed", "3"], "--env, --seed cannot change it"),
                          (["--timesteps", "100"], "is below one rollout"),
                          ([], "no checkpoint to resume from")):
        assert main(["train", "--resume", str(run), *argv]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and message in err[0], err
    (run / "checkpoints" / "last.zip").write_bytes(b"not a zip")
    cfg = train.load_run_config(run)
    with pytest.raises(PolicyPruneError, match="cannot resume from .*last.zip"):
        train.load_agent(cfg, None, run / "checkpoints" / "last.zip")


def test_file_system_refusals_are_one_line(tmp_path, capsys, no_backbone_work) -> None:
    """A runs folder that is a file: said in one line (the OS's reason, no errno), exit 2; eval's --out a file: said before
    the eval runs."""
    (tmp_path / "afile").write_text("x")
    for argv in (["train", "--runs-dir", str(tmp_path / "afile")], ["eval", "--env", "digits-vit", "--out", str(tmp_path / "afile")]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"policy-prune {argv[0]}: error: ") and "afile" in err[0], err
        if argv[0] == "train":
            assert "cannot make the run folder" in err[0] and "Not a directory" in err[0] and "[Errno" not in err[0]


@pytest.mark.parametrize("verb", [["eval"], ["train", "--resume"]])
def test_a_bad_value_in_a_run_config_is_named_by_its_file_and_section(verb, tmp_path, capsys, no_backbone_work) -> None:
    """The run's config.yaml holds the env under ``env:``: the error names that key path, not the preset's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("env:\n  reward: {lam: high}\ntrain: {seed: 0}\nagent: {}\n")
    before = sorted(p.name for p in run.iterdir())
    assert main([*verb, str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{run}/config.yaml: env.reward.lam: expected float, got 'high'" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_text_model_with_a_task_head_is_refused_not_run_without_it() -> None:
    """An HF text model with a head (sequence classification, masked LM) was pruned as its encoder: the call
    returned hidden states where the caller expected the head's logits, without a word. Image classifiers keep
    their head (the adapter runs it)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from policy_prune.core.backbones import adapt
    from tests.tiny import BERT, make

    for head in (BertForSequenceClassification(BertConfig(**BERT, num_labels=3)), BertForMaskedLM(BertConfig(**BERT))):
        with pytest.raises(TypeError) as exc:
            adapt(head)
        assert isinstance(exc.value, PolicyPruneError)
        assert f"{type(head).__name__} has a task head" in str(exc.value) and "model.base_model, a BertModel" in str(exc.value)
        assert adapt(head.base_model).output_kind == "embedding"
    assert adapt(make("hf-vit-classifier")).output_kind == "logits"


def test_load_scorer_expands_the_home_folder(tmp_path, monkeypatch) -> None:
    from timm.models.vision_transformer import VisionTransformer

    from policy_prune.core.artifact import save_scorer
    from policy_prune.core.backbones import adapt
    from policy_prune.core.scorer import random_scorer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    backbone = adapt(model)
    save_scorer(random_scorer(backbone, [1]), tmp_path / "scorer", backbone.signature())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert policy_prune.load_scorer("~/scorer").sites == [1]
