"""policy-prune eval: FLOPs-matched budgets, the Pareto payload and its three files."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from policy_prune.core.backbones import adapt
from policy_prune.core.schedule import TokenCounts, flops_ratio, keep_ratio_for, ratio_counts
from policy_prune.core.scorer import LearnedScorer, random_scorer
from policy_prune.data import Split
from policy_prune.errors import UserError
from policy_prune.evaluation import evaluate
from policy_prune.evaluation.baselines import BASELINES, BaselineOptions
from policy_prune.evaluation.evaluate import build_methods, evaluate_methods, write_outputs
from tests import tiny

SITES = [1, 2]


@pytest.fixture(scope="module")
def vit():
    return adapt(tiny.make("timm-vit-cls"))


@pytest.mark.parametrize("sites", [[0], [1, 2], [1, 2, 3]])
@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.35])
def test_solver_hits_target_flops(vit, sites, target) -> None:
    # ViT-B/16-like sequence (196 patches + CLS) on the tiny blocks: fine enough steps for a 1% tolerance.
    tc = TokenCounts(torch.full((4,), 197), torch.ones(4, dtype=torch.long), 197)
    r = keep_ratio_for(vit, sites, tc, target)
    assert 0.0 <= r <= 1.0
    assert abs(flops_ratio(vit, sites, ratio_counts(sites, tc, r), tc) - target) < 0.01


def test_threshold_solver_brackets_and_bisects() -> None:
    calls: list[float] = []

    def fn(t: float) -> float:  # a step function falling from 1 to 0 around t = 5.3
        calls.append(t)
        return 1.0 if t < 5.3 else (0.5 if t < 5.31 else 0.0)

    assert 5.3 <= evaluate.solve_threshold(fn, 0.5) < 5.31
    assert len(calls) == len(set(calls))  # every value measured once
    calls.clear()
    flat = evaluate.solve_threshold(lambda t: calls.append(t) or 0.2, 0.5)  # unreachable target: terminates
    assert flat in (-64.0, 1.0) and len(calls) == 8  # -1 .. -64, then 1: no bisection


def _learned(backbone, sites) -> LearnedScorer:
    # A small scorer with random weights: logits spread around 0, so threshold 0 prunes some.
    return random_scorer(backbone, sites, seed=0, hidden=(16,))


@pytest.fixture(scope="module")
def results(vit):
    methods = build_methods(list(BASELINES), BaselineOptions(diversity=0.5), _learned(vit, SITES))
    return evaluate_methods(vit, tiny.split("timm-vit-cls", 10), SITES, methods, [0.7, 0.5], batch_size=4,
                            repeats=1, warmup=0)


def test_every_method_at_every_target_with_measured_flops(vit, results) -> None:
    rows = results["results"]
    by = {(r["method"], r["target"], r["rule"]): r for r in rows}
    assert by[("none", None, "none")]["flops_ratio"] == pytest.approx(1.0)
    assert by[("none", None, "none")]["agreement"] == 1.0
    for target in (0.7, 0.5):
        at = [r for r in rows if r["target"] == target]
        assert {r["method"] for r in at} == set(BASELINES) - {"none"} | {"learned", "learned-topk"}
        # Constant-ratio methods at the same sites keep the same counts, so their FLOPs are identical
        # (ToMe included); the learned threshold sweep allocates per sample and only lands near them.
        same_sites = {r["flops_ratio"] for r in at if r["sites"] == SITES and r["rule"] == "keep_ratio"}
        assert len(same_sites) == 1
        for r in at:  # 16 patches: one token at a site is a coarse step, hence the tolerance
            assert abs(r["flops_ratio"] - target) < 0.08
            assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1 and r["samples_per_s"] > 0
    own = by[("learned", None, "threshold")]
    assert own["value"] == 0.0 and 0 < own["flops_ratio"] < 1


def test_measured_flops_equal_the_analytic_schedule(vit, results) -> None:
    tc = TokenCounts(torch.full((10,), 17), torch.ones(10, dtype=torch.long), 17)
    for r in results["results"]:
        if r["target"] is not None and r["rule"] == "keep_ratio":
            expected = flops_ratio(vit, r["sites"], ratio_counts(r["sites"], tc, r["value"]), tc)
            assert r["flops_ratio"] == pytest.approx(expected)


def test_text_embedding_model_reports_cosine() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    methods = build_methods(["none", "similarity", "tome"], BaselineOptions())
    res = evaluate_methods(backbone, tiny.split("hf-bert", 6, labels=False), SITES, methods, [0.6],
                           batch_size=3, repeats=0)
    for r in res["results"]:
        assert -1 <= r["cosine"] <= 1.0 + 1e-6 and 0 <= r["recall@10"] <= 1
        assert "accuracy" not in r and "samples_per_s" not in r
    assert res["results"][0]["cosine"] == pytest.approx(1.0) and res["results"][0]["recall@10"] == 1.0


def test_writes_the_three_files(results, tmp_path) -> None:
    write_outputs(results, tmp_path / "eval")
    payload = json.loads((tmp_path / "eval" / "pareto.json").read_text())
    assert len(payload["results"]) == len(results["results"])
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| method |" in table and "tome" in table and "similarity-pre" in table
    assert (tmp_path / "eval" / "pareto.png").stat().st_size > 1000


def _cli(argv: list[str]) -> int:
    # The verb's own parser and run(): independent of the other verbs cli.main imports.
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run(parser.parse_args(argv))


def test_eval_needs_a_run_or_an_env() -> None:
    with pytest.raises(UserError, match="RUN_DIR or --env"):
        _cli([])


def _fake_resolve(name: str):
    backbone = adapt(tiny.make(name))

    def resolve(env_cfg, seed=0, device="cpu", console=None):
        split = tiny.split(name, 8)
        return backbone, {"test": Split("test", split.inputs, split.labels)}

    return backbone, resolve


def test_eval_run_dir_evaluates_the_saved_scorer(tmp_path, monkeypatch) -> None:
    from policy_prune import embedded
    from policy_prune.core.artifact import save_scorer

    backbone, resolve = _fake_resolve("timm-vit-cls")
    monkeypatch.setattr(embedded, "resolve", resolve)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("env:\n  name: tiny\n  sites: [1, 2]\nagent_name: ppo\n")
    save_scorer(_learned(backbone, SITES), run_dir / "scorer", backbone.signature())
    assert _cli([str(run_dir), "--methods", "none", "tome", "--targets", "0.6", "--repeats", "0"]) == 0
    payload = json.loads((run_dir / "eval" / "pareto.json").read_text())
    assert {(r["method"], r["rule"]) for r in payload["results"]} == {
        ("none", "none"), ("tome", "keep_ratio"), ("learned-topk", "keep_ratio"), ("learned", "threshold")}
    assert {p.name for p in (run_dir / "eval").iterdir()} == {"pareto.json", "table.md", "pareto.png"}


@pytest.mark.skipif(importlib.util.find_spec("policy_prune.embedded") is None, reason="embedded backbones not built yet")
def test_eval_env_cli_writes_files(tmp_path) -> None:
    preset = tmp_path / "tiny-digits.yaml"
    preset.write_text(
        "backbone:\n  spec: vit_tiny_patch16_224\n"
        "  model_kwargs: {img_size: 32, patch_size: 8, depth: 4, num_classes: 10, embed_dim: 32, num_heads: 2, in_chans: 1}\n"
        "data:\n  dataset: digits-cluttered\n  max_samples: 12\n"
        "  options: {canvas: 32, digit_size: 16, canvases_train: 1, canvases_val: 1, canvases_test: 1}\n"
        "sites: [1, 2]\n"
    )
    out = tmp_path / "eval"
    code = _cli(["--env", str(preset), "--out", str(out), "--methods", "none", "random", "tome",
                 "--targets", "0.6", "--batch-size", "6", "--repeats", "1"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"pareto.json", "table.md", "pareto.png"}
