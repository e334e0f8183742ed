"""prune(model, scorer): the user's call signature, the env's decisions, keep-all == original, no mutation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from policy_prune import PrunedModel, load_scorer, prune
from policy_prune.core.artifact import save_scorer
from policy_prune.core.backbones import adapt
from policy_prune.core.schedule import TokenCounts, keep_ratio_for
from policy_prune.core.scorer import keep_count, make_keep_fn, random_scorer
from policy_prune.errors import UserError
from policy_prune.training.env import PruneCore
from tests import tiny

FAMILIES = ["timm-vit-cls", "hf-bert", "hf-vit-classifier"]
SITES = [1, 2]
ROOT = Path(__file__).resolve().parents[1]


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _main_output(name: str, out):
    """The tensor the adapter's head gives, from the pruned model's user-facing output."""
    if name.startswith("timm"):
        return out
    return out.logits if name == "hf-vit-classifier" else out.sentence_embedding


def _scorer(name: str, seed: int = 0):
    model = tiny.make(name)
    return model, random_scorer(adapt(model), SITES, seed=seed)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rule,value", [("threshold", 0.0), ("keep_ratio", 0.5)])
def test_pruned_model_equals_keep_fn_on_the_adapter(name: str, rule: str, value: float) -> None:
    model, scorer = _scorer(name)
    pruned = prune(model, scorer, **{rule: value})
    backbone = adapt(model)
    x = tiny.inputs(name, batch=4, seed=1)
    with torch.no_grad():
        out = _call(pruned, x)
        ref, state, counts = backbone.forward_pruned(x, SITES, make_keep_fn(backbone, scorer, rule, value))
    torch.testing.assert_close(_main_output(name, out), ref, rtol=0, atol=0)
    assert int(counts[-1].min()) > 0 and int(counts[-1].min()) < state.n_full  # something was pruned
    if rule == "threshold" and name == "hf-bert":
        assert len(set(counts[-1].tolist())) > 1, "per-sample counts: rows packed with a padding mask"
    if rule == "keep_ratio" and name != "hf-bert":
        assert len(set(counts[-1].tolist())) == 1, "fixed counts per site: static shapes"
    if not name.startswith("timm"):
        kept = torch.zeros(4, state.n_full, dtype=torch.bool)
        for row in range(4):
            kept[row, state.positions[row][state.valid[row]]] = True
        assert torch.equal(out.kept_mask, kept)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("keep_all", [{"threshold": float("-inf")}, {"keep_ratio": 1.0}])
def test_keep_all_reproduces_original_output(name: str, keep_all: dict) -> None:
    model, scorer = _scorer(name)
    x = tiny.inputs(name, batch=3)
    with torch.no_grad():
        out = _call(prune(model, scorer, **keep_all), x)
        torch.testing.assert_close(_main_output(name, out), tiny.original_output(name, model, x))
        if name == "hf-bert":  # the encoder output fields match where tokens exist
            original = model(**x)
            mask = x["attention_mask"].bool()
            torch.testing.assert_close(out.last_hidden_state[mask], original.last_hidden_state[mask])
            assert torch.equal(out.kept_mask, mask) and not out.last_hidden_state[~mask].any()
            torch.testing.assert_close(out.pooler_output, original.pooler_output)


def test_model_is_never_mutated() -> None:
    model, scorer = _scorer("hf-bert")
    x = tiny.inputs("hf-bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with torch.no_grad():
        reference = model(**x).last_hidden_state
        _call(prune(model, scorer, keep_ratio=0.3), x)
        after = model(**x).last_hidden_state
    assert torch.equal(reference, after) and [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_call_conventions() -> None:
    model, scorer = _scorer("hf-bert")
    pruned = prune(model, scorer)
    x = tiny.inputs("hf-bert")
    with torch.no_grad():
        by_name = pruned(**x)
        positional = pruned(x["input_ids"], x["attention_mask"])
        as_tuple = pruned(**x, return_dict=False)
    assert torch.equal(by_name.sentence_embedding, positional.sentence_embedding)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], by_name.last_hidden_state)
    assert by_name.last_hidden_state.shape == (3, 12, 32)
    with pytest.raises(TypeError, match="position_ids"):
        pruned(**x, position_ids=x["input_ids"])
    with pytest.raises(TypeError, match="output_hidden_states"):
        pruned(**x, output_hidden_states=True)
    vit, vit_scorer = _scorer("hf-vit-classifier")
    images = tiny.inputs("hf-vit-classifier")
    with torch.no_grad():
        assert torch.equal(prune(vit, vit_scorer)(pixel_values=images).logits, prune(vit, vit_scorer)(images).logits)
    assert isinstance(pruned, PrunedModel) and "rule='threshold'" in repr(pruned)


def test_rules_resolve_from_arguments_and_scorer_json(tmp_path) -> None:
    model, scorer = _scorer("timm-vit-cls")
    sig = adapt(model).signature()
    path = save_scorer(scorer, tmp_path / "s", sig, default_rule={"rule": "keep_ratio", "values": [0.5, 0.25]})
    assert (prune(model, path).rule, prune(model, path).values) == ("keep_ratio", [0.5, 0.25])
    assert prune(model, path, rule="threshold").values == [0.0, 0.0]
    assert prune(model, path, threshold=[1.0, 2.0]).values == [1.0, 2.0]
    with pytest.raises(UserError, match="not both"):
        prune(model, path, threshold=0.0, keep_ratio=0.5)
    with pytest.raises(UserError, match="one per site"):
        prune(model, path, keep_ratio=[0.5, 0.5, 0.5])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        prune(model, path, keep_ratio=1.5)
    with pytest.raises(UserError, match="needs keep_ratio"):
        prune(model, scorer, rule="keep_ratio")
    with pytest.raises(UserError, match="unknown decision rule"):
        prune(model, scorer, rule="top-k")


@pytest.mark.parametrize("name,task", [("timm-vit-cls", "teacher_kl"), ("hf-bert", "cosine")])
def test_threshold_zero_takes_the_env_policy_decisions(name: str, task: str) -> None:
    """The deterministic policy in the env (keep where logit > 0) drops exactly what prune() drops."""
    model, scorer = _scorer(name, seed=4)
    split = tiny.split(name, n=4, seed=2, labels=False)
    core = PruneCore(adapt(model), split, SITES, task=task, feature_spec=scorer.spec)
    obs = core.begin(np.arange(4))
    with torch.no_grad():
        for _ in SITES:
            logits = scorer.net(torch.from_numpy(obs["tokens"]), torch.from_numpy(obs["context"]))
            obs, _, done, _ = core.advance(((logits > 0) & torch.from_numpy(obs["alive"]).bool()).numpy())
        _, state, _ = prune(model, scorer).run(split.inputs)
    env_kept = [sorted(core.state.positions[r][core.state.valid[r]].tolist()) for r in range(4)]
    assert done and env_kept == [sorted(state.positions[r][state.valid[r]].tolist()) for r in range(4)]


SUBPROCESS = """
import sys, torch
from safetensors.torch import save_file
from policy_prune import load_scorer, prune
from tests import tiny
out = {}
for name, rule, value in [(n, r, v) for n in sys.argv[2].split(",") for r, v in (("threshold", 0.0), ("keep_ratio", 0.5))]:
    model, x = tiny.make(name), tiny.inputs(name, batch=4, seed=1)
    pruned = prune(model, load_scorer(f"{sys.argv[1]}/{name}"), **{rule: value})
    with torch.no_grad():
        main, state, _ = pruned.run(x)
    out[f"{name}/{rule}/out"] = main
    out[f"{name}/{rule}/positions"] = torch.where(state.valid, state.positions, -1)
save_file(out, f"{sys.argv[1]}/result.safetensors")
"""


def test_exported_scorer_in_a_fresh_process(tmp_path) -> None:
    """Export here, load + prune in a new interpreter: the same decisions and outputs as in-process."""
    expected = {}
    for name in FAMILIES:
        model, scorer = _scorer(name, seed=5)
        save_scorer(scorer, tmp_path / name, adapt(model).signature())
        x = tiny.inputs(name, batch=4, seed=1)
        for rule, value in (("threshold", 0.0), ("keep_ratio", 0.5)):
            with torch.no_grad():
                main, state, _ = prune(model, scorer, **{rule: value}).run(x)
            expected[f"{name}/{rule}/out"] = main
            expected[f"{name}/{rule}/positions"] = torch.where(state.valid, state.positions, -1)
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path), ",".join(FAMILIES)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(tmp_path / "result.safetensors"))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_keep_ratio_for_flops_hits_the_target() -> None:
    backbone = adapt(tiny.make("timm-vit-cls"))
    ratio = keep_ratio_for(backbone, [0], TokenCounts.dense(17, 1), 0.5)
    kept = 1 + round(ratio * 16)
    assert abs(float(backbone.schedule_flops([0], [kept], 17)) / backbone.full_flops(17) - 0.5) < 0.05


def test_load_scorer_is_the_public_loader(tmp_path) -> None:
    model, scorer = _scorer("timm-vit-cls")
    save_scorer(scorer, tmp_path / "s", adapt(model).signature())
    assert load_scorer(tmp_path / "s").sites == SITES


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-vit-classifier"])
def test_keep_ratio_pruned_model_compiles_as_one_graph(name: str) -> None:
    """keep_ratio on images is the static path: torch.compile captures it whole (fullgraph, no sync)."""
    model, scorer = _scorer(name)
    pruned = prune(model, scorer, keep_ratio=0.5)
    x = tiny.inputs(name, batch=2, seed=3)
    torch.compiler.reset()
    compiled = torch.compile(pruned, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        got = _main_output(name, _call(compiled, x))  # compiled first: the plan is made at prune(), not traced
        expected = _main_output(name, _call(pruned, x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_speed_benchmark_runs_and_reports_the_free_schedule() -> None:
    """``bench --what model --compile``: original and pruned compiled (inductor), share from the free schedule."""
    from policy_prune.evaluation.bench import bench_pruned_model

    model = tiny.make("timm-vit-cls")
    rows = bench_pruned_model(model, None, batch_sizes=(2,), sites=(1,), flops_target=0.6, warmup=1, repeats=2,
                              compile=True, compile_options={"freezing": True})
    (row,) = rows
    assert row["compiled"] and row["share_method"].startswith("1 - free") and row["compile_options"] == {"freezing": True}
    assert row["tokens_kept"][0] < row["tokens_full"] and row["ms_free"] > 0 and row["ms_pruned"] > 0
    assert row["scorer_share"] == pytest.approx(1 - row["ms_free"] / row["ms_pruned"])


def test_scorer_tanh_is_exact_eager_and_the_sigmoid_form_compiled() -> None:
    """Tanh: torch.tanh as called; under torch.compile 2 sigmoid(2x) - 1 (inductor's CPU tanh is slow)."""
    from policy_prune.core.scorer import Tanh

    x = torch.linspace(-20, 20, 4001)
    assert torch.equal(Tanh()(x), torch.tanh(x))
    torch.compiler.reset()
    got = torch.compile(Tanh(), backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, torch.tanh(x), rtol=0, atol=3e-7)
    assert not torch.equal(got, torch.tanh(x))  # the compiled branch ran


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert"])
def test_to_moves_every_tensor_including_the_projection(name: str) -> None:
    """.to(dtype) / .half() / .to(device) reach the model, the scorer MLP and the projection buffer; the
    scorer passed to prune() keeps its own projection."""
    model, scorer = _scorer(name)
    original = scorer.projection
    pruned = prune(model, scorer, keep_ratio=0.5)
    x = tiny.inputs(name, batch=2)
    with torch.no_grad():
        reference = _main_output(name, _call(pruned, x))
        pruned.to(torch.float64)
        assert {t.dtype for t in pruned.state_dict().values() if t.is_floating_point()} == {torch.float64}
        assert "projection" in pruned.state_dict() and pruned.scorer.projection is pruned.projection
        assert scorer.projection is original and original.dtype == torch.float32
        got = _main_output(name, _call(pruned, x if isinstance(x, dict) else x.double()))
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.float(), reference, rtol=1e-4, atol=1e-5)
        pruned.half()
        assert pruned.projection.dtype == torch.float16 and pruned.scorer.projection is pruned.projection
        pruned.to("meta")  # a device move, without a GPU
    assert pruned.projection.device.type == "meta" and pruned.scorer.projection.device.type == "meta"
    assert all(t.device.type == "meta" for t in pruned.state_dict().values())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rule,value", [("threshold", 0.0), ("keep_ratio", 0.5)])
def test_return_kept_gives_the_kept_tokens_for_every_family(name: str, rule: str, value: float) -> None:
    model, scorer = _scorer(name)
    pruned = prune(model, scorer, **{rule: value})
    x = tiny.inputs(name, batch=3, seed=2)
    with torch.no_grad():
        plain = _call(pruned, x)
        out, kept = pruned(**x, return_kept=True) if isinstance(x, dict) else pruned(x, return_kept=True)
        _, state, _ = pruned.run(x)
    torch.testing.assert_close(_main_output(name, out), _main_output(name, plain), rtol=0, atol=0)
    assert kept.dtype == torch.bool and kept.shape == (3, state.n_full)
    for row in range(3):
        assert sorted(kept[row].nonzero().squeeze(1).tolist()) == sorted(state.positions[row][state.valid[row]].tolist())
    if not name.startswith("timm"):
        assert torch.equal(out.kept_mask, kept)


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-deit-distilled"])
@pytest.mark.parametrize("rule,value", [("threshold", 0.0), ("keep_ratio", 0.5)])
def test_an_empty_batch_gets_what_the_model_gives(name: str, rule: str, value: float) -> None:
    """A batch of 0 rows (the tail of a filtered data set) is the wrapped model's own answer: timm's ViTs
    return [0, classes] there, and the scorer's features would fail on it."""
    model, scorer = _scorer(name)
    pruned = prune(model, scorer, **{rule: value})
    empty = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        out, kept = pruned(empty, return_kept=True)
        assert torch.equal(out, model(empty)) and out.shape[0] == 0
    assert kept.dtype == torch.bool and kept.shape == (0, pruned.run(tiny.inputs(name, batch=1))[1].n_full)


def test_torch_export_keeps_the_batch_dynamic() -> None:
    """The empty-batch check never branches on a traced batch size (it would pin the batch to the example's),
    and tracing leaves no fake tensor in a cache that a later eager call reads (it returned a FakeTensor)."""
    model, scorer = _scorer("timm-vit-cls")
    fast = prune(model, scorer, keep_ratio=0.5)
    program = torch.export.export(fast, (torch.randn(3, 3, 32, 32),), dynamic_shapes=(({0: torch.export.Dim("batch")},),))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got, want = program.module()(x), fast(x)
    assert type(want) is torch.Tensor and got.shape == (5, 5) and float((got - want).abs().max()) < 1e-5


def test_the_pruned_model_reports_the_wrapped_models_mode() -> None:
    model, scorer = _scorer("timm-vit-cls")
    assert model.training is False and prune(model, scorer, keep_ratio=0.5).training is False  # was True
    assert prune(model.train(), scorer, keep_ratio=0.5).training is True


def test_library_errors_are_value_and_type_errors() -> None:
    """What prune / load_scorer raise for a caller's mistake is a ValueError or TypeError (and a PolicyPruneError)."""
    from policy_prune.errors import PolicyPruneError

    model, scorer = _scorer("timm-vit-cls")
    with pytest.raises(ValueError, match=r"\[0, 1\]") as bad_value:
        prune(model, scorer, keep_ratio=1.5)
    with pytest.raises(TypeError, match="no token-pruning adapter for Linear") as bad_model:
        prune(torch.nn.Linear(3, 3), scorer)
    with pytest.raises(TypeError, match="already a PrunedModel") as wrapped:
        prune(prune(model, scorer), scorer)
    with pytest.raises(ValueError, match="scorer not found") as missing:
        load_scorer("/nonexistent/scorer")
    for exc in (bad_value, bad_model, wrapped, missing):
        assert isinstance(exc.value, PolicyPruneError)


def test_mask_path_context_is_the_env_context_at_every_site() -> None:
    """The compute-spent context the scorer sees at a later site counts what the earlier sites really kept
    (the env's number), not a keep-all assumption."""
    from policy_prune.core.scorer import LearnedScorer

    assert not hasattr(LearnedScorer, "scores")  # the keep-all context it computed is gone
    model, scorer = _scorer("timm-vit-cls", seed=4)
    split = tiny.split("timm-vit-cls", n=4, seed=2, labels=False)
    seen: list[torch.Tensor] = []
    hook = scorer.net.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    with torch.no_grad():
        _, _, counts = prune(model, scorer, threshold=0.0).run(split.inputs)
    hook.remove()
    core = PruneCore(adapt(model), split, SITES, feature_spec=scorer.spec)
    obs = core.begin(np.arange(4))
    with torch.no_grad():
        for site_index in range(len(SITES)):
            torch.testing.assert_close(seen[site_index], torch.from_numpy(obs["context"]))
            logits = scorer.net(torch.from_numpy(obs["tokens"]), torch.from_numpy(obs["context"]))
            obs, *_ = core.advance(((logits > 0) & torch.from_numpy(obs["alive"]).bool()).numpy())
    assert int(counts[0].max()) < 17  # site 0 pruned, so keep-all would have overstated the spent compute


def _padded_wider(name: str, x: dict, extra: int) -> dict:
    """``x`` padded with ``extra`` more pad columns (as a fixed max_length would pad it)."""
    pad = 1 if name == "hf-roberta" else 0
    return {"input_ids": torch.nn.functional.pad(x["input_ids"], (0, extra), value=pad),
            "attention_mask": torch.nn.functional.pad(x["attention_mask"], (0, extra))}


@pytest.mark.parametrize("name", tiny.TEXT)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, [0.7, 0.4]])
@pytest.mark.parametrize("extra", [0, 5])
def test_static_text_path_takes_the_keep_mask_decisions(name: str, ratio, extra: int) -> None:
    """keep_ratio on padded text: per-row counts and contexts of the mask path, packed to a fixed width per
    site (no sync); the same kept tokens and the same output (exact when padded to the longest row)."""
    model, scorer = _scorer(name, seed=2)
    pruned = prune(model, scorer, keep_ratio=ratio)
    x = _padded_wider(name, tiny.inputs(name, batch=6, seed=1), extra)
    assert pruned.static_text(x)
    with torch.no_grad():
        out, state, counts = pruned.run(x)
        ref, ref_state, ref_counts = pruned.run(x, keep_fn=pruned.keep_fn())
    assert state.static and not ref_state.static
    assert [c.tolist() for c in counts] == [c.tolist() for c in ref_counts]
    assert ratio == 0.0 or len(set(counts[0].tolist())) > 1, "counts follow each row's length"
    widths = pruned.text_widths(x["input_ids"].shape[1])
    assert list(state.tokens.shape[:2]) == [6, widths[-1]] and all(int(c.max()) <= w for c, w in zip(counts, widths, strict=True))
    if extra == 0:  # padded to the longest row: the widths are the largest counts, every op is the same
        assert list(ref_state.tokens.shape) == list(state.tokens.shape)
    torch.testing.assert_close(out, ref, rtol=0, atol=0 if extra == 0 else 1e-6)
    kept = [sorted(state.positions[r][state.valid[r]].tolist()) for r in range(6)]
    assert kept == [sorted(ref_state.positions[r][ref_state.valid[r]].tolist()) for r in range(6)]


@pytest.mark.parametrize("flops", [0.4, 0.8])
def test_static_text_path_tells_a_budgeted_scorer_its_budget(flops: float) -> None:
    """A budget-conditioned scorer at prune(flops=f, rule="keep_ratio"): the context's budget column reaches
    the static text path exactly as the keep-mask path builds it (same decisions, same output)."""
    from policy_prune.core.budget import BudgetInput

    model = tiny.make("hf-bert")
    scorer = random_scorer(adapt(model), SITES, seed=6, budget=BudgetInput(0.3, 0.9, 0.5))
    pruned = prune(model, scorer, rule="keep_ratio", flops=flops)
    x = tiny.inputs("hf-bert", batch=6, seed=2)
    contexts: list[torch.Tensor] = []
    hook = pruned.scorer_net.register_forward_hook(lambda module, args, out: contexts.append(args[1]))
    with torch.no_grad():
        out, state, counts = pruned.run(x)
        ref, _, ref_counts = pruned.run(x, keep_fn=pruned.keep_fn())
    hook.remove()
    assert state.static and len(contexts) == 2 * len(SITES)
    n0 = x["attention_mask"].sum(dim=1)
    for i, (static, mask) in enumerate(zip(contexts[: len(SITES)], contexts[len(SITES):], strict=True)):
        assert static.shape == (6, len(SITES) + 3) and torch.equal(static, mask)
        assert bool((static[:, -1] == flops).all())
        # The alive column: each row's alive tokens over its own length, not over the padded width.
        alive = (n0 if i == 0 else counts[i - 1]).float() / n0.float()
        torch.testing.assert_close(static[:, len(SITES)], alive)
    assert [c.tolist() for c in counts] == [c.tolist() for c in ref_counts]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", tiny.TEXT)
@pytest.mark.parametrize("ratio", [0.3, [0.7, 0.4], [0.5, 1.0], [1.0, 0.4]])
def test_unpadded_text_takes_the_planned_top_k_path_with_the_keep_mask_decisions(name: str, ratio) -> None:
    """Text rows of one length (batch 1, or a batch of equal lengths) on the CPU run keep_ratio as images do:
    one planned count and context per site and a top-k, no mask, no per-site counting; the kept tokens, the
    contexts the scorer sees and the output are those of the keep-mask path."""
    model, scorer = _scorer(name, seed=3)
    pruned = prune(model, scorer, keep_ratio=ratio)
    full = tiny.inputs(name, batch=4, seed=5)  # rows 0 and 3 are unpadded (12 tokens)
    contexts: list[torch.Tensor] = []
    hook = pruned.scorer_net.register_forward_hook(lambda module, args, out: contexts.append(args[1]))
    for rows in ([0], [2], [0, 3]):
        x = {k: v[rows] for k, v in full.items()}
        n = int(x["attention_mask"].sum(dim=1).max())
        x = {k: v[:, :n] for k, v in x.items()}  # cut to the rows' length, as a tokenizer pads one text
        contexts.clear()
        with torch.no_grad():
            out, state, counts = pruned.run(x)
            planned = len(contexts)
            ref, ref_state, ref_counts = pruned.run(x, keep_fn=pruned.keep_fn())
        assert state.dense and state.static and not ref_state.dense
        assert [c.tolist() for c in counts] == [c.tolist() for c in ref_counts]
        assert planned == len(contexts) - planned == sum(v < 1.0 for v in pruned.values + [pruned.values[-1]] * (len(SITES) - len(pruned.values)))
        for static, mask in zip(contexts[:planned], contexts[planned:], strict=True):
            torch.testing.assert_close(static.expand_as(mask), mask)
        kept = [state.positions[r][state.valid[r]].tolist() for r in range(len(rows))]
        assert kept == [ref_state.positions[r][ref_state.valid[r]].tolist() for r in range(len(rows))]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    hook.remove()


def test_planned_text_contexts_are_normal_tensors_and_survive_dtype_round_trips() -> None:
    """A text plan is made on first use: one made under inference_mode must not break a later call with
    gradients on, and .half().float() must not leave rounded contexts behind (they are made again; the
    device-free text widths are kept)."""
    model, scorer = _scorer("hf-bert", seed=3)
    pruned = prune(model, scorer, keep_ratio=[0.6, 0.45])
    x = {k: v[:1] for k, v in tiny.inputs("hf-bert", batch=1, seed=5).items()}
    with torch.inference_mode():
        first = pruned(**x).sentence_embedding
    again = pruned(**x).sentence_embedding  # gradients on: the cached contexts are read by F.linear
    torch.testing.assert_close(again.detach(), first, rtol=0, atol=0)
    # The text widths are device-free ints, planned once: a .to() / .half() re-plans only the contexts.
    widths, replanned = dict(pruned._widths), []
    plan_text = pruned._plan_text
    pruned._plan_text = lambda n: (replanned.append(n), plan_text(n))[1]  # type: ignore[method-assign]
    pruned.half().float()
    assert replanned == [] and pruned._widths == widths
    contexts: list[torch.Tensor] = []
    hook = pruned.scorer_net.register_forward_hook(lambda module, args, out: contexts.append(args[1]))
    with torch.no_grad():
        pruned.run(x)
        pruned.run(x, keep_fn=pruned.keep_fn())
    hook.remove()
    half = len(contexts) // 2
    assert half == 2 and all(torch.equal(a, b) for a, b in zip(contexts[:half], contexts[half:], strict=True))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_keep_top_keeps_a_last_protected_token_against_non_finite_scores(bad: float) -> None:
    """Text's [SEP] is the last slot: a prunable token scored +inf or NaN must not win the tie against it."""
    from policy_prune.core.backbones.base import TokenState
    from policy_prune.core.scorer import decide

    n = 6
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[0, 0] = protected[0, -1] = True
    state = TokenState(torch.randn(1, n, 4), protected, torch.ones(1, n, dtype=torch.bool), torch.arange(n)[None], n,
                       dense=True, static=True)
    scores = torch.tensor([[0.0, 1.0, bad, bad, 0.2, 0.0]])
    ref = state.prune(decide(scores, state, "keep_ratio", 0.5), width=n)
    top = state.keep_top(scores, int(ref.valid.sum()))
    assert top.positions[0].tolist() == ref.positions[ref.valid].tolist() and 5 in top.positions[0].tolist()


def test_static_text_widths_hold_every_row() -> None:
    """A row of any length keeps at most the planned width (the longest row's count) at every site."""
    model, scorer = _scorer("hf-bert")
    pruned = prune(model, scorer, keep_ratio=[0.55, 0.35])
    n = 40
    lengths = torch.arange(1, n + 1)
    alive = lengths
    for value, width in zip(pruned._site_values(), pruned.text_widths(n), strict=True):
        protected = alive.clamp_max(2)
        alive = keep_count(value, alive - protected, protected) + protected
        assert int(alive.max()) == width


def test_special_tokens_mask_takes_the_keep_mask_path() -> None:
    model, scorer = _scorer("hf-bert")
    pruned = prune(model, scorer, keep_ratio=0.5)
    x = tiny.inputs("hf-bert", batch=3)
    special = torch.zeros_like(x["attention_mask"])
    special[:, :2] = 1  # three protected tokens per row (with the last one): more than the widths plan
    assert not pruned.static_text({**x, "special_tokens_mask": special})
    assert not prune(model, scorer, threshold=0.0).static_text(x) and not pruned.static_text(x, pruned.keep_fn())
    with torch.no_grad():
        _, state, _ = pruned.run({**x, "special_tokens_mask": special})
    assert not state.static and bool(state.protected[:, 1].all())


def test_static_text_path_compiles_as_one_graph() -> None:
    """keep_ratio on padded text: torch.compile captures the PrunedModel whole (fullgraph, no sync)."""
    model, scorer = _scorer("hf-bert")
    pruned = prune(model, scorer, keep_ratio=0.5)
    x = tiny.inputs("hf-bert", batch=4, seed=3)
    torch.compiler.reset()
    compiled = torch.compile(pruned, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        got = compiled(**x)  # compiled first: nothing of the plan is computed while tracing
        expected = pruned(**x)
    torch.testing.assert_close(got.sentence_embedding, expected.sentence_embedding, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.kept_mask, expected.kept_mask)


@pytest.mark.parametrize("name", ["timm-vit-cls", "hf-bert", "hf-vit-classifier"])
@pytest.mark.parametrize("rule,value", [("threshold", 0.0), ("keep_ratio", 0.5)])
def test_a_merging_scorer_merges_on_every_path_of_the_pruned_model(name: str, rule: str, value: float, tmp_path) -> None:
    """scorer.merge (saved in scorer.json) makes prune() average dropped tokens into kept ones on its static,
    top-k and keep-mask paths alike: the adapter's forward_pruned with merge=True, and not the plain output."""
    model, scorer = _scorer(name)
    backbone = adapt(model)
    scorer.merge = True
    loaded = load_scorer(save_scorer(scorer, tmp_path / "s", backbone.signature()))
    assert loaded.merge
    pruned = prune(model, loaded, **{rule: value})
    x = tiny.inputs(name, batch=4, seed=1)
    with torch.no_grad():
        out = _main_output(name, _call(pruned, x))
        keep_fn = make_keep_fn(backbone, scorer, rule, value)
        ref, _, _ = backbone.forward_pruned(x, SITES, keep_fn, merge=True)
        plain, _, _ = backbone.forward_pruned(x, SITES, make_keep_fn(backbone, scorer, rule, value))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)
