"""Half-precision backbones (bf16 / fp16) and the CUDA path: prune(), features, env, train, eval, bench.

The CPU tests run everywhere; the CUDA tests skip cleanly without a GPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from policy_prune import prune
from policy_prune.cli import main
from policy_prune.core.backbones import adapt
from policy_prune.core.features import FeatureSpec, make_projection, token_features
from policy_prune.core.scorer import random_scorer
from policy_prune.training.env import PruneVecEnv
from tests import test_train, tiny
from tests.test_train import _train_args

presets = test_train.presets  # the fixture: tiny digits env + PPO presets as YAML files
SITES = [1, 2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _out(out):
    """The tensor of a PrunedModel's output (timm logits, HF classifier logits or sentence embedding)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.sentence_embedding


def _run(model, scorer, x, **rule):
    pruned = prune(model, scorer, **rule)
    with torch.no_grad():
        out = _out(pruned(**x) if isinstance(x, dict) else pruned(x))
        _, state, counts = pruned.run(x)
    return out, state, counts


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert", "hf-vit-classifier"])
def test_prune_of_a_half_model_keeps_its_dtype_and_the_fp32_decisions(name: str) -> None:
    model = tiny.make(name)
    scorer = random_scorer(adapt(model), SITES)
    x = tiny.inputs(name, batch=4, seed=1)  # fp32 images go into the half model (the adapter casts them)
    ref, ref_state, ref_counts = _run(model, scorer, x, keep_ratio=0.5)
    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(model).to(dtype)
        before = {k: v.clone() for k, v in half.state_dict().items()}
        out, state, counts = _run(half, scorer, x, keep_ratio=0.5)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert [c.tolist() for c in counts] == [c.tolist() for c in ref_counts]
        assert all(torch.equal(v, half.state_dict()[k]) for k, v in before.items()), "the model is not modified"
        assert scorer.net.out.weight.dtype == torch.float32, "the scorer stays fp32"
        if dtype == torch.float16:  # 11-bit mantissa: the same tokens win, the outputs agree closely
            assert torch.equal(state.positions.sort(dim=1).values, ref_state.positions.sort(dim=1).values)
            torch.testing.assert_close(out.float(), ref, rtol=0, atol=5e-3 * float(ref.abs().max()))


def test_a_half_scorer_runs_in_its_own_dtype() -> None:
    model = tiny.make("timm-vit-cls")
    scorer = random_scorer(adapt(model), SITES)
    x = tiny.inputs("timm-vit-cls", batch=2)
    pruned = prune(copy.deepcopy(model).half(), scorer, threshold=0.0).half()  # the user casts everything
    with torch.no_grad():
        out = pruned(x.half())
    assert pruned.scorer_net.out.weight.dtype == torch.float16 and torch.isfinite(out).all()


def test_features_of_fp16_tokens_with_large_norms_are_finite_and_match_fp32() -> None:
    """Squared norms of tokens above 256 overflow fp16; the features are computed in fp32."""
    model = tiny.make("timm-vit-cls")
    backbone, half = adapt(model), adapt(copy.deepcopy(model).half())
    spec = FeatureSpec()
    projection = make_projection(backbone, spec)
    with torch.no_grad():
        state = backbone.embed(tiny.inputs("timm-vit-cls", batch=2))
        big = state.with_tokens((state.tokens * 300).half())
        assert float(big.tokens.float().norm(dim=-1).max()) > 256  # their squares exceed fp16 (65504)
        f16 = token_features(half, big, 1, projection, spec)
        f32 = token_features(backbone, big.with_tokens(big.tokens.float()), 1, projection, spec)
    assert f16.dtype == torch.float32 and torch.isfinite(f16).all()
    torch.testing.assert_close(f16, f32, rtol=0, atol=2e-2)


def test_env_on_a_bf16_backbone_gives_fp32_observations_and_rewards_close_to_fp32() -> None:
    model = tiny.make("timm-vit-cls")
    split = tiny.split("timm-vit-cls", n=8)

    def episode(m):
        env = PruneVecEnv(adapt(m), split, 4, SITES, lam=0.3, task="teacher_kl", sequential=True)
        obs, total = env.reset(), np.zeros(4)
        for _ in SITES:
            first = obs
            obs, rewards, _, infos = env.step(np.ones((4, env.core.n_tokens), dtype=np.int8))
            total += rewards
        return first, total, infos

    ref_obs, ref_ret, ref_info = episode(model)
    obs, ret, info = episode(copy.deepcopy(model).to(torch.bfloat16))
    assert obs["tokens"].dtype == np.float32 and np.isfinite(obs["tokens"]).all() and np.isfinite(ret).all()
    np.testing.assert_allclose(obs["context"], ref_obs["context"])
    np.testing.assert_allclose(ret, ref_ret, atol=0.01)  # keep-all: FLOPs identical, KL to its own teacher ~0
    assert [i["flops_ratio"] for i in info] == pytest.approx([i["flops_ratio"] for i in ref_info])


def _train(presets, runs: Path, *extra: str) -> list[str]:
    return _train_args(presets, runs, "--timesteps", "32", *extra)


def test_train_with_a_bf16_backbone(presets, tmp_path) -> None:
    assert main(_train(presets, tmp_path / "runs", "--dtype", "bf16", "--name", "bf16")) == 0
    run_dir = tmp_path / "runs" / "bf16"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["dtype"] == "bf16"
    learned = json.loads((run_dir / "eval" / "summary.json").read_text())["methods"]["learned"]
    assert np.isfinite(learned["return"]) and 0 < learned["flops_ratio"] <= 1


def test_eval_of_a_run_at_another_seed_and_dtype(presets, tmp_path) -> None:
    """A preset's random-weights backbone is one model whatever the --seed: a run trained with --seed 3 on a
    bf16 backbone is evaluated (eval's default --seed 0) on an fp16 one, not refused as another checkpoint."""
    from policy_prune.config import load_env_config
    from policy_prune.embedded import resolve_backbone

    assert main(_train(presets, tmp_path / "runs", "--dtype", "bf16", "--name", "bf16")) == 0
    assert main(["eval", str(tmp_path / "runs" / "bf16"), "--dtype", "fp16", "--targets", "0.5", "--repeats", "0",
                 "--methods", "random"]) == 0
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    first = resolve_backbone(load_env_config(presets[0]))[0].weights_fingerprint()
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    torch.manual_seed(6)
    assert resolve_backbone(load_env_config(presets[0]))[0].weights_fingerprint() == first


# An unavailable device or an unknown dtype: tests/test_train.py::test_user_errors_exit_2_and_leave_no_run.


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_prune_on_cuda_fp16_matches_cpu_fp32(name: str) -> None:
    model = tiny.make(name)
    scorer = random_scorer(adapt(model), SITES)  # its MLP lives on the CPU: it follows the model
    x = tiny.inputs(name, batch=4, seed=1)
    ref, ref_state, _ = _run(model, scorer, x, keep_ratio=0.5)
    cuda = copy.deepcopy(model).cuda().half()
    xc = {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda().half()
    out, state, _ = _run(cuda, scorer, xc, keep_ratio=0.5)
    assert out.is_cuda and out.dtype == torch.float16
    assert torch.equal(state.positions.sort(dim=1).values.cpu(), ref_state.positions.sort(dim=1).values)
    torch.testing.assert_close(out.float().cpu(), ref, rtol=0, atol=5e-3 * float(ref.abs().max()))


@CUDA
def test_env_on_cuda_matches_cpu() -> None:
    model, split = tiny.make("timm-vit-cls"), tiny.split("timm-vit-cls", n=8)
    obs = [PruneVecEnv(adapt(copy.deepcopy(model)), split, 4, SITES, sequential=True, device=d).reset()
           for d in ("cpu", "cuda")]
    np.testing.assert_allclose(obs[1]["tokens"], obs[0]["tokens"], atol=1e-4)


@CUDA
def test_train_eval_and_bench_on_cuda(presets, tmp_path) -> None:
    from policy_prune.evaluation.bench import bench_pruned_model

    assert main(_train(presets, tmp_path / "runs", "--device", "cuda", "--dtype", "bf16", "--name", "gpu")) == 0
    run_dir = tmp_path / "runs" / "gpu"
    assert (run_dir / "scorer" / "scorer.safetensors").is_file()
    assert main(["eval", str(run_dir), "--device", "cuda", "--dtype", "fp16", "--targets", "0.5", "--repeats", "1",
                 "--methods", "random", "cls-attention"]) == 0
    rows = bench_pruned_model(tiny.make("timm-vit-cls"), None, (2,), SITES, 0.5, 1, 2, device="cuda", dtype="fp16")
    assert rows[0]["device"] == "cuda" and rows[0]["dtype"] == "float16" and rows[0]["ms_pruned"] > 0
