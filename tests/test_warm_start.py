"""agent.warm_start: the scorer's first site fitted, before RL, to what each token is worth with few tokens left
(occlusion values measured by the frozen model on the env's own train split, no label)."""

from __future__ import annotations

import json
import zipfile
from types import SimpleNamespace

import pytest
import torch
import yaml

from policy_prune.cli import main
from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import TokenScorer, context_width
from policy_prune.training.env import PruneCore
from policy_prune.training.warm_start import occlusion_ranking, occlusion_values, task_value, warm_start
from tests import tiny
from tests.test_train import TINY_AGENT, TINY_ENV, _train_args


def _core(name: str, sites: list[int], task: str, n: int = 24) -> PruneCore:
    torch.manual_seed(0)
    backbone = adapt(tiny.make(name)).eval()
    return PruneCore(backbone, tiny.split(name, n=n), sites, task=task, budget=(0.2, 0.9))


def _policy(core: PruneCore, seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    return SimpleNamespace(scorer=TokenScorer(core.spec.dim, context_width(len(core.sites), True), [16]))


def test_text_values_are_what_adding_or_removing_one_token_does_to_the_embedding() -> None:
    """A padded text batch after block 1: padding gets -inf, [CLS] / [SEP] +inf, and a token's value is the cosine
    to the unpruned embedding with and without it, against the model run on a boolean selection of the slots."""
    core = _core("hf-bert", [1, 2], "cosine", n=4)
    backbone, idx = core.backbone, torch.arange(4)
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(core._inputs(idx)), 0, 1)
        reference = backbone(core._inputs(idx)).float()
        order = torch.randn(state.valid.shape, generator=torch.Generator().manual_seed(1))
        values = occlusion_values(backbone, state, 1, order, task_value(backbone, reference), keep=0.4)
    valid, protected = state.valid, state.protected & state.valid
    assert not valid.all(), "the batch should hold padding"
    assert torch.isneginf(values[~valid]).all() and torch.isposinf(values[protected]).all()
    assert torch.isfinite(values[valid & ~protected]).all()

    def cosine(row: int, keep: torch.Tensor) -> float:
        slots = keep.nonzero().squeeze(1)
        sub = type(state)(state.tokens[row, slots][None], state.protected[row, slots][None],
                          torch.ones(1, len(slots), dtype=torch.bool), state.positions[row, slots][None], state.n_full)
        out = backbone.head(backbone.run_blocks(sub, 1, backbone.depth)).float()
        return float(torch.nn.functional.cosine_similarity(out, reference[row][None])[0])

    with torch.no_grad():
        for row in range(4):
            free = (valid[row] & ~protected[row]).nonzero().squeeze(1)
            k = min(max(1, round(0.4 * len(free))), len(free) - 1)
            chosen = free[order[row, free].argsort(descending=True)[:k]]
            base = protected[row].clone()
            base[chosen] = True
            inside, outside = int(chosen[0]), int(free[~torch.isin(free, chosen)][0])
            without, with_ = base.clone(), base.clone()
            without[inside], with_[outside] = False, True
            assert float(values[row, inside]) == pytest.approx(cosine(row, base) - cosine(row, without), abs=1e-5)
            assert float(values[row, outside]) == pytest.approx(cosine(row, with_) - cosine(row, base), abs=1e-5)


def test_fit_ranks_the_occlusion_top_first_at_the_starting_keep_rate() -> None:
    core = _core("timm-vit-cls", [0, 1], "teacher_kl")
    policy = _policy(core)
    ranking = occlusion_ranking(core, samples=16, keep=0.3, smoothing=0.1, seed=0)
    assert ranking.tokens.shape[0] == 16
    stats = warm_start(policy.scorer, ranking, epochs=40, lr=1e-2)
    # A fresh scorer's ranking is about chance (0.3 of the top by chance); the fit's is far above it.
    assert stats["overlap_before"] < 0.5 and stats["overlap_after"] > stats["overlap_before"] + 0.3, stats
    with torch.no_grad():
        state, feats = core.starts.get(torch.arange(16))
        ctx = torch.zeros(16, context_width(2, True))
        ctx[:, 0], ctx[:, 2], ctx[:, 4] = 1.0, 1.0, 0.5
        logits = policy.scorer(feats.float(), ctx)[~state.protected]
    assert float(logits.mean()) == pytest.approx(3.0, abs=0.5)  # the keep rate PPO starts from (sigmoid(3))
    assert float(logits.std()) > 0.3  # with a ranking: a fresh scorer's logits differ by about 0.01


def test_same_seed_same_fit() -> None:
    def fit(seed: int) -> dict[str, torch.Tensor]:
        core = _core("timm-vit-cls", [0, 1], "teacher_kl")
        policy = _policy(core)
        warm_start(policy.scorer, occlusion_ranking(core, samples=8, keep=0.3, smoothing=0.1, seed=seed), epochs=2, lr=1e-2)
        return policy.scorer.state_dict()

    a, b, c = fit(0), fit(0), fit(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_with_a_warm_start(tmp_path) -> None:
    """`policy-prune train` fits the new agent's scorer first and records it in warm_start.json, and with
    aux_coef PPO's update adds the ranking's loss; a resumed run keeps what its checkpoint holds (no second fit,
    the ranking not in the checkpoint) and goes on adding the loss."""
    env, agent = tmp_path / "env.yaml", tmp_path / "agent.yaml"
    env.write_text(yaml.safe_dump({**TINY_ENV, "sites": [0, 2]}))
    agent.write_text(yaml.safe_dump({**TINY_AGENT, "credit": "token"}))
    runs = tmp_path / "runs"
    args = _train_args((str(env), str(agent)), runs, "--timesteps", "64", "--name", "w",
                       "--set", "agent.warm_start.samples=8", "--set", "agent.warm_start.epochs=2",
                       "--set", "agent.warm_start.aux_coef=0.5")
    assert main(args) == 0
    stats = json.loads((runs / "w" / "warm_start.json").read_text())
    assert stats["samples"] == 8 and 0 <= stats["overlap_after"] <= 1
    written = (runs / "w" / "warm_start.json").stat().st_mtime_ns

    def ranking_losses() -> list[float]:
        rows = [json.loads(line) for line in (runs / "w" / "metrics.jsonl").read_text().splitlines()]
        return [r["train/ranking_loss"] for r in rows if "train/ranking_loss" in r]

    first = len(ranking_losses())
    assert first >= 1 and all(v > 0 for v in ranking_losses())
    with zipfile.ZipFile(runs / "w" / "checkpoints" / "last.zip") as zf:
        assert "ranking" not in json.loads(zf.read("data"))
    assert main(["train", "--resume", str(runs / "w"), "--timesteps", "128"]) == 0
    assert (runs / "w" / "warm_start.json").stat().st_mtime_ns == written
    assert len(ranking_losses()) > first
