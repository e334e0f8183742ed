"""Scorer artifacts: round trip, atomic writes, every broken artifact rejected in one line, no pickle, export."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from policy_prune import export
from policy_prune.core.artifact import (
    META_FILE,
    WEIGHTS_FILE,
    ScorerFileError,
    ScorerMismatchError,
    load_scorer,
    save_scorer,
)
from policy_prune.core.backbones import adapt
from policy_prune.core.inference import prune
from policy_prune.core.scorer import make_keep_fn, random_scorer
from policy_prune.errors import UserError
from policy_prune.export import export_scorer, validation_metrics
from tests import tiny

SITES = [1, 2]


@pytest.fixture(scope="module")
def vit():
    model = tiny.make("timm-vit-cls")
    return model, adapt(model)


@pytest.fixture
def artifact(tmp_path, vit) -> Path:
    _, backbone = vit
    scorer = random_scorer(backbone, SITES, seed=1)
    return save_scorer(scorer, tmp_path / "scorer", backbone.signature(), lam=0.25,
                       metrics={"agreement": torch.tensor(0.875), "flops_ratio": 0.5, "bad": float("nan")})


def test_round_trip(artifact, vit) -> None:
    _, backbone = vit
    scorer = load_scorer(artifact)
    again = load_scorer(artifact / META_FILE)  # a file inside the artifact works too
    original = random_scorer(backbone, SITES, seed=1)
    for k, v in original.net.state_dict().items():
        assert torch.equal(scorer.net.state_dict()[k], v) and torch.equal(again.net.state_dict()[k], v)
    assert scorer.projection is not None and original.projection is not None
    assert torch.equal(scorer.projection, original.projection)
    assert scorer.sites == SITES and scorer.spec == original.spec
    meta = scorer.meta
    assert meta["backbone"] == backbone.signature() and meta["lam"] == 0.25
    assert meta["metrics"] == {"agreement": 0.875, "flops_ratio": 0.5, "bad": None}
    assert meta["default_rule"] == {"rule": "threshold", "values": [0.0, 0.0]}
    written = json.loads((artifact / META_FILE).read_text())
    assert written["format_version"] == 1 and written["layer_sizes"]["hidden"] == [64, 64]
    assert set(written["created"]) == {"time", "policy_prune", "torch"}
    # One line that says what it is, not the projection tensor and the backbone's signature (6 kB).
    arch = backbone.signature()["architecture"]
    assert repr(scorer) == (f"LearnedScorer(sites=[1, 2], features={scorer.spec.dim}, hidden=[64, 64], "
                            f"trained_for={arch!r}, path={str(artifact)!r})")


def test_the_same_scorer_gives_the_same_bytes_in_every_process(tmp_path) -> None:
    """scorer.safetensors is byte-for-byte the same when written again in another process (safetensors orders its
    metadata keys by a per-process hash map: two keys came out in either order)."""
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path; from policy_prune.core.artifact import _write_files; "
            "_write_files(Path(sys.argv[1]), {'a': torch.arange(6.0), 'b': torch.ones(2, 3)}, {'k': 1})")
    written = []
    for i in range(4):
        out = tmp_path / str(i)
        out.mkdir()
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        written.append((out / "scorer.safetensors").read_bytes())
    assert all(w == written[0] for w in written)
    header = json.loads(written[0][8:8 + int.from_bytes(written[0][:8], "little")])
    assert header["__metadata__"] == {"format": "policy-prune-scorer"}


def test_save_is_atomic_and_never_clobbers_foreign_dirs(artifact, vit) -> None:
    _, backbone = vit
    scorer = load_scorer(artifact)
    before = (artifact / WEIGHTS_FILE).read_bytes()

    def crash(tmp: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_scorer(scorer, artifact, backbone.signature(), extra=crash)
    assert (artifact / WEIGHTS_FILE).read_bytes() == before  # the old artifact is untouched
    assert [p.name for p in artifact.parent.iterdir()] == ["scorer"]  # no temp dir left behind
    mask = os.umask(0o022)
    try:
        save_scorer(scorer, artifact, backbone.signature(), default_rule={"rule": "keep_ratio", "values": [0.5, 0.25]})
    finally:
        os.umask(mask)
    assert load_scorer(artifact).meta["default_rule"] == {"rule": "keep_ratio", "values": [0.5, 0.25]}
    # As readable as any new folder and file under the umask (mkdtemp's own folder is 0700).
    assert {oct(p.stat().st_mode & 0o777) for p in (artifact, *artifact.iterdir())} == {"0o755", "0o644"}
    (artifact.parent / "run").mkdir()
    (artifact.parent / "run" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match="refusing to replace"):
        save_scorer(scorer, artifact.parent / "run", backbone.signature())
    with pytest.raises(UserError, match="values must be one number or one per site"):
        save_scorer(scorer, artifact, backbone.signature(), default_rule={"rule": "threshold", "values": [1, 2, 3]})


def _edit_json(path: Path, **changes: object) -> None:
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        node, *rest = key.split("__")
        if rest:
            meta[node][rest[0]] = value
        elif value is None:
            del meta[node]
        else:
            meta[node] = value
    path.write_text(json.dumps(meta))


def _edit_tensor(artifact: Path, name: str, value: float | None) -> None:
    """Set every entry of one tensor of the weights file to ``value`` (None: make it an integer tensor)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(artifact / WEIGHTS_FILE))
    tensors[name] = tensors[name].long() if value is None else torch.full_like(tensors[name], value)
    save_file(tensors, str(artifact / WEIGHTS_FILE))


BREAKAGES = {
    "missing dir": (lambda a: a.rename(a.with_name("gone")), "scorer not found"),
    "deleted json": (lambda a: (a / META_FILE).unlink(), "scorer file missing"),
    "deleted weights": (lambda a: (a / WEIGHTS_FILE).unlink(), "scorer file missing"),
    "truncated weights": (lambda a: (a / WEIGHTS_FILE).write_bytes((a / WEIGHTS_FILE).read_bytes()[:200]),
                          "corrupt or truncated safetensors"),
    "garbage weights": (lambda a: (a / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "corrupt or truncated safetensors"),
    "garbage json": (lambda a: (a / META_FILE).write_text("{not json"), "not valid JSON"),
    "json not an object": (lambda a: (a / META_FILE).write_text("[1, 2]"), "expected a JSON object"),
    "format_version 99": (lambda a: _edit_json(a / META_FILE, format_version=99), "unknown format_version 99"),
    "missing key": (lambda a: _edit_json(a / META_FILE, sites=None), "missing key 'sites'"),
    "feature version": (lambda a: _edit_json(a / META_FILE, feature_spec__version=1), "feature spec version 1"),
    "feature names": (lambda a: _edit_json(a / META_FILE, feature_spec__base=["norm"]), "feature names"),
    "hidden size": (lambda a: _edit_json(a / META_FILE, layer_sizes__hidden=[32, 64]), "do not match the weights file"),
    "depth of net": (lambda a: _edit_json(a / META_FILE, layer_sizes__hidden=[64]), "unexpected tensor"),
    "deeper net": (lambda a: _edit_json(a / META_FILE, layer_sizes__hidden=[64, 64, 64]), "weights file's hidden layers [64, 64]"),
    # Checked before anything is allocated: a typo of 10**12 would try to allocate terabytes.
    "huge hidden size": (lambda a: _edit_json(a / META_FILE, layer_sizes__hidden=[10**12, 64]), "do not match the weights"),
    "negative hidden size": (lambda a: _edit_json(a / META_FILE, layer_sizes__hidden=[-64, 64]), "do not match the weights"),
    "names not a list": (lambda a: _edit_json(a / META_FILE, feature_spec__names=5), "malformed scorer file"),
    "infinite projection_dim": (lambda a: _edit_json(a / META_FILE, feature_spec__projection_dim=float("inf")),
                                "bad feature_spec"),
    "width not a number": (lambda a: _edit_json(a / META_FILE, backbone__width="64"), "an integer width"),
    "rule not an object": (lambda a: _edit_json(a / META_FILE, default_rule="keep_ratio"), "expected an object"),
    "a site that is a bool": (lambda a: _edit_json(a / META_FILE, sites=[True, 2]), "sites must be a non-empty"),
    "fractional projection_dim": (lambda a: _edit_json(a / META_FILE, feature_spec__projection_dim=16.7),
                                  "feature_spec.projection_dim must be an integer, got 16.7"),
    # NaN weights give NaN logits: every token dropped or kept without a word.
    "NaN weights": (lambda a: _edit_tensor(a, "net.out.bias", float("nan")), "tensor net.out.bias must hold finite"),
    "integer weights": (lambda a: _edit_tensor(a, "projection", None), "tensor projection must hold finite"),
    "context size": (lambda a: _edit_json(a / META_FILE, sites=[1, 2, 3]), "do not match the feature spec"),
    "projection width": (lambda a: _edit_json(a / META_FILE, backbone__width=48), "projection has shape"),
    "bad rule": (lambda a: _edit_json(a / META_FILE, default_rule={"rule": "topk", "values": [1]}), "bad default_rule"),
    "merge not a bool": (lambda a: _edit_json(a / META_FILE, merge="yes"), "merge must be true or false, got 'yes'"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_artifacts_are_rejected_in_one_line(artifact, breakage: str) -> None:
    breaker, message = BREAKAGES[breakage]
    breaker(artifact)
    with pytest.raises(ScorerFileError) as exc:
        load_scorer(artifact)
    text = str(exc.value)
    assert message in text and "\n" not in text


def test_a_run_folder_given_for_its_scorer_says_where_the_scorer_is(artifact) -> None:
    run = artifact.parent  # the fixture's artifact is <tmp>/scorer, as train writes RUN/scorer
    with pytest.raises(ScorerFileError, match=f"{run} is a run folder, not a scorer: load {artifact}$"):
        load_scorer(run)


def test_wrong_backbone_names_both_architectures(artifact) -> None:
    bert = tiny.make("hf-bert")
    with pytest.raises(ScorerMismatchError) as exc:
        prune(bert, artifact)
    text = str(exc.value)
    differ = text.split("scorer vs model:")[1]
    assert "timm-vit" in text and "bert:BertModel" in text and "width" not in differ \
        and "family 'timm-vit' vs 'hf-encoder'" in differ and "train a scorer for this one" in text


def test_architecture_name_only_mismatch(artifact) -> None:
    _edit_json(artifact / META_FILE, backbone__architecture="vit_renamed")
    model = tiny.make("timm-vit-cls")
    with pytest.raises(ScorerMismatchError) as exc:
        prune(model, artifact)
    text = str(exc.value)
    assert "architecture 'vit_renamed' vs 'VisionTransformer'" in text and "pass strict=False to prune()" in text
    assert prune(model, artifact, strict=False).sites == SITES  # same shapes: allowed when not strict


@pytest.mark.parametrize("family", ["timm-vit-cls", "hf-bert"])
def test_another_checkpoint_of_the_same_architecture_is_refused(tmp_path, family: str) -> None:
    """Same shapes and names, other weights (issue 25): refused unless strict=False. The same checkpoint in
    another dtype is the same model; an artifact from before the fingerprint has nothing to compare."""
    trained_on = adapt(tiny.make(family, seed=0))
    path = save_scorer(random_scorer(trained_on, SITES, seed=1), tmp_path / "s", trained_on.signature())
    other = tiny.make(family, seed=1)
    with pytest.raises(ScorerMismatchError, match="same shapes, different weights") as exc:
        prune(other, path, keep_ratio=0.5)
    assert "strict=False" in str(exc.value) and "\n" not in str(exc.value)
    assert prune(other, path, keep_ratio=0.5, strict=False).sites == SITES
    for dtype in (torch.bfloat16, torch.float16):
        assert prune(tiny.make(family, seed=0).to(dtype), path, keep_ratio=0.5).sites == SITES
    if torch.cuda.is_available():  # a device move changes no weight
        assert prune(tiny.make(family, seed=0).cuda(), path, keep_ratio=0.5).sites == SITES
    half = adapt(tiny.make(family, seed=0).to(torch.bfloat16))  # a scorer trained next to a bf16 copy
    save_scorer(random_scorer(half, SITES, seed=1), tmp_path / "bf16", half.signature())
    assert prune(tiny.make(family, seed=0), tmp_path / "bf16", keep_ratio=0.5).sites == SITES
    meta = json.loads((path / META_FILE).read_text())
    del meta["backbone"]["weights"]
    (path / META_FILE).write_text(json.dumps(meta))
    assert prune(other, path, keep_ratio=0.5).sites == SITES


def test_load_and_prune_never_unpickle(artifact, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on the load path")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, refuse)
    model = tiny.make("timm-vit-cls")
    with torch.no_grad():
        out = prune(model, load_scorer(artifact))(tiny.inputs("timm-vit-cls"))
    assert out.shape == (3, 5)


def test_export_onnx_matches_torch(tmp_path, vit, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, backbone = vit
    scorer = random_scorer(backbone, SITES, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the exporter's warning about the shared batch axis is silenced
        files = export_scorer(scorer, tmp_path / "s", backbone.signature(), onnx=True)
    assert "[torch.onnx]" not in capsys.readouterr().out  # nor its progress lines
    assert [f.name for f in files] == ["scorer.safetensors", "scorer.json", "scorer.onnx"]
    session = ort.InferenceSession(str(files[-1]), providers=["CPUExecutionProvider"])
    loaded = load_scorer(tmp_path / "s")
    seen: list[tuple[torch.Tensor, ...]] = []
    hook = loaded.net.register_forward_hook(lambda module, args, out: seen.append(args))
    with torch.no_grad():
        for batch in (1, 4):  # real features and contexts of two (B, N) shapes
            x = tiny.inputs("timm-vit-cls", batch=batch, seed=batch)
            backbone.forward_pruned(x, SITES, make_keep_fn(backbone, loaded, "threshold", 0.0))
        hook.remove()
        assert len({t.shape[:2] for t, _ in seen}) >= 2
        for tokens, context in seen:
            got = session.run(None, {"tokens": tokens.numpy(), "context": context.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), loaded.net(tokens, context), rtol=1e-4, atol=1e-5)
    # One file (no scorer.onnx.data beside it), and a later export replaces the folder.
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["scorer.json", "scorer.onnx", "scorer.safetensors"]
    assert [f.name for f in export_scorer(scorer, tmp_path / "s", backbone.signature())] == ["scorer.safetensors",
                                                                                           "scorer.json"]


def _fake_run(root: Path, scorer, model_dir: Path, projection: bool = True, env: dict | None = None) -> Path:
    """A run folder as train writes it: config.yaml, metrics.jsonl and an SB3-style checkpoint zip."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    env = env or {"name": "tiny", "backbone": {"spec": str(model_dir)}, "sites": SITES,
                  "reward": {"lam": 0.4, "task": "cosine"}}
    config = {"env": env, "agent": {"algo": "ppo"}, "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": 10, "eval/cosine": 0.5}, {"step": 20, "train/loss": 1.0},
               {"step": 30, "eval/cosine": 0.9, "eval/flops_ratio": 0.6}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{\"step\": 4")
    state = {f"scorer.{k}": v for k, v in scorer.net.state_dict().items()} | {"critic.w": torch.zeros(2)}
    if projection:  # the policy's buffer: the env's feature projection
        state["projection"] = scorer.projection
    buf = io.BytesIO()
    torch.save(state, buf)
    with zipfile.ZipFile(run / "checkpoints" / "last.zip", "w") as zf:
        zf.writestr("policy.pth", buf.getvalue())
        zf.writestr("data", json.dumps({"policy_kwargs": {"scorer_hidden": scorer.net.hidden}}))
    return run


def _export_verb(argv: list[str]) -> int:
    """The verb as ``policy-prune export`` runs it (parser + run), independent of the other verbs."""
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export.run(parser.parse_args(argv))


def test_export_verb_on_a_run_folder(tmp_path) -> None:
    pytest.importorskip("policy_prune.training.policy").load_learned_scorer  # noqa: B018
    model = tiny.make("hf-bert")
    model.save_pretrained(tmp_path / "bert")
    backbone = adapt(model)
    scorer = random_scorer(backbone, SITES, seed=3)
    run = _fake_run(tmp_path, scorer, tmp_path / "bert")
    assert _export_verb([str(run), "--keep-ratio", "0.5"]) == 0
    loaded = load_scorer(run / "scorer")
    assert loaded.meta["lam"] == 0.4 and loaded.meta["backbone"] == backbone.signature()
    assert loaded.meta["metrics"] == {"cosine": 0.9, "flops_ratio": 0.6}
    assert loaded.meta["default_rule"] == {"rule": "keep_ratio", "values": [0.5, 0.5]}
    for k, v in scorer.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v)
    assert torch.equal(loaded.projection, scorer.projection)
    old = _fake_run(tmp_path / "old", scorer, tmp_path / "bert", projection=False)
    with pytest.raises(UserError, match="no feature projection"):
        _export_verb([str(old)])
    with pytest.raises(UserError, match="run folder not found"):
        _export_verb([str(tmp_path / "missing")])
    (run / "checkpoints" / "last.zip").unlink()
    with pytest.raises(UserError, match="checkpoint not found"):
        _export_verb([str(run)])
    assert validation_metrics(tmp_path) == {}
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"methods": {"learned": {"agreement": 0.8, "x": "y"}}}))
    assert validation_metrics(run) == {"agreement": 0.8}
    # A budget-conditioned run's summary names its learned rows by target, as train writes them.
    (run / "eval" / "summary.json").write_text(json.dumps({"methods": {
        "learned@0.7": {"cosine": 0.96, "flops_ratio": 0.75, "keep_ratio": [0.8]}, "random-same-ratio@0.7": {"cosine": 0.8}}}))
    assert validation_metrics(run) == {"cosine": 0.96, "flops_ratio": 0.75}


def test_torch_export_fallback_when_onnx_fails(tmp_path, vit, monkeypatch) -> None:
    _, backbone = vit
    scorer = random_scorer(backbone, SITES, seed=2)

    def broken(*args, **kwargs):
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(export, "export_scorer_onnx", broken)
    said: list[str] = []
    files = export_scorer(scorer, tmp_path / "s", backbone.signature(), onnx=True, log=said.append)
    assert files[-1].name == "scorer.pt2" and "ONNX export failed (exporter unavailable)" in said[0]
    program = torch.export.load(str(files[-1])).module()
    for b, n in ((1, 7), (3, 11)):
        tokens, context = torch.randn(b, n, scorer.net.feature_dim), torch.rand(b, scorer.net.context_dim)
        torch.testing.assert_close(program(tokens, context), scorer.net(tokens, context), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [[], [16]])
def test_any_scorer_depth_round_trips(tmp_path, vit, hidden: list[int]) -> None:
    """Narrow and linear scorers (no hidden layer) save, load and score like the one that was saved."""
    model, backbone = vit
    scorer = random_scorer(backbone, SITES, seed=2, hidden=hidden)
    loaded = load_scorer(save_scorer(scorer, tmp_path / "s", backbone.signature()))
    assert loaded.net.hidden == hidden
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(x), 0, SITES[0])
        context = torch.rand(3, len(SITES) + 2)
        got = loaded.logits(backbone, state, SITES[0], context)
        want = scorer.logits(backbone, state, SITES[0], context)
        if not hidden:  # linear: the logits are one affine map of [features | context]
            from policy_prune.core.features import token_features

            feats = token_features(backbone, state, SITES[0], scorer.projection, scorer.spec)
            full = torch.cat([feats, context.unsqueeze(1).expand(-1, feats.shape[1], -1)], dim=-1)
            torch.testing.assert_close(got, scorer.net.out(full).squeeze(-1))
    assert got.shape == state.tokens.shape[:2] and got.std() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(prune(model, loaded, keep_ratio=0.5)(x), prune(model, scorer, keep_ratio=0.5)(x))


def test_a_budget_network_without_its_budget_input_is_never_written(tmp_path) -> None:
    """The network of a budget-conditioned scorer reads one more context column; saved without its
    BudgetInput it could not be loaded again, so save_scorer refuses before writing anything."""
    import dataclasses

    from policy_prune.core.budget import BudgetInput

    backbone = adapt(tiny.make("timm-vit-cls"))
    budgeted = random_scorer(backbone, [1, 2], seed=0, hidden=(8,), budget=BudgetInput(0.3, 0.9, 0.5))
    with pytest.raises(ValueError, match="needs its BudgetInput"):
        save_scorer(dataclasses.replace(budgeted, budget=None), tmp_path / "s", backbone.signature())
    assert not (tmp_path / "s").exists()
    assert load_scorer(save_scorer(budgeted, tmp_path / "s", backbone.signature())).budget == budgeted.budget
