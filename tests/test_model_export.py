"""The whole PrunedModel as one ONNX graph + torch.export program: onnxruntime equals PyTorch, any batch size."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from policy_prune import export, prune
from policy_prune.core.artifact import ScorerMismatchError
from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import random_scorer
from policy_prune.errors import UserError
from policy_prune.model_export import (
    ExportError,
    GraphModel,
    compare_on_split,
    export_onnx,
    graph_args,
    onnx_session,
    run_onnx,
)
from tests import tiny

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
SITES = [1, 2]


def _text(batch: int, seed: int, length: int = 16) -> dict[str, torch.Tensor]:
    """Right-padded rows of different real lengths at a fixed length (as the graph takes them)."""
    x = tiny.inputs("hf-bert", batch=batch, seed=seed)
    extra = length - x["input_ids"].shape[1]
    mask = torch.nn.functional.pad(x["attention_mask"], (0, extra))
    mask[:, 3:] *= (torch.arange(batch) % 4 != 3).long().unsqueeze(1)  # some rows of 3 tokens
    return {"input_ids": torch.nn.functional.pad(x["input_ids"], (0, extra)) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    model = tiny.make("hf-bert")
    fast = prune(model, random_scorer(adapt(model), SITES, seed=1), keep_ratio=[0.7, 0.6])
    folder = tmp_path_factory.mktemp("text")
    diff = export_onnx(fast, _text(3, seed=0), folder / "model.onnx", folder / "model.pt2")
    return fast, folder, diff


def test_text_graph_equals_pytorch_at_any_batch_size(text_export) -> None:
    """Per-row keep counts from each row's real length, computed inside the graph; batch is dynamic."""
    fast, folder, diff = text_export
    assert diff <= 1e-4
    session = onnx_session(folder / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    module = GraphModel(fast)
    program = torch.export.load(str(folder / "model.pt2")).module()
    for batch, seed in ((1, 5), (9, 6)):
        args = graph_args(module, _text(batch, seed))
        embedding, kept = run_onnx(session, args)
        with torch.no_grad():
            want_embedding, want_kept = module(*args)
            from_program = program(*args)
        torch.testing.assert_close(torch.from_numpy(embedding), want_embedding, rtol=0, atol=1e-4)
        assert torch.equal(torch.from_numpy(kept), want_kept)
        torch.testing.assert_close(from_program[0], want_embedding, rtol=1e-5, atol=1e-5)
        counts = want_kept.sum(dim=1)
        lengths = args[1].sum(dim=1)
        assert len(set(counts.tolist())) > 1 or batch == 1, "counts follow each row's length"
        assert bool((counts <= lengths).all()) and bool((counts < lengths).any())
        torch.testing.assert_close(want_embedding, fast(**dict(zip(module.input_names, args, strict=True))).sentence_embedding)


@pytest.fixture(scope="module")
def image_export(tmp_path_factory):
    """timm ViT whose scorer gives every token the same logit: every choice is a tie."""
    model = tiny.make("timm-vit-cls")
    scorer = random_scorer(adapt(model), SITES, seed=2)
    torch.nn.init.zeros_(scorer.net.out.weight)
    fast = prune(model, scorer, keep_ratio=0.5)
    folder = tmp_path_factory.mktemp("image")
    diff = export_onnx(fast, tiny.inputs("timm-vit-cls", batch=1, seed=0), folder / "model.onnx")
    return fast, folder, diff


def test_image_graph_breaks_ties_like_pytorch(image_export) -> None:
    """Exported from one image (traced at batch 2); ONNX TopK's lower-index-first ties = the stable sort."""
    fast, folder, diff = image_export
    assert diff <= 1e-4
    session = onnx_session(folder / "model.onnx")
    x = tiny.inputs("timm-vit-cls", batch=6, seed=4)
    with torch.no_grad():
        want = fast(x)
    torch.testing.assert_close(torch.from_numpy(run_onnx(session, (x,))[0]), want, rtol=0, atol=1e-4)
    labels = want.argmax(dim=1)
    labels[:2] = (labels[:2] + 1) % want.shape[1]
    check = compare_on_split(session, GraphModel(fast), x, labels, batch_size=4)
    assert check["onnx_accuracy"] == check["torch_accuracy"] == pytest.approx(4 / 6)
    assert check["agreement"] == 1.0 and check["max_abs_diff"] <= 1e-4 and check["rows_over_atol"] == 0


@pytest.mark.parametrize("family", ["hf-bert", "timm-vit-cls"])
def test_a_merging_scorer_exports_with_its_merge_in_the_graph(tmp_path, family) -> None:
    """A scorer trained with ``env.merge`` (minilm-text's preset): the graph averages each dropped token into
    its most similar kept one as ``prune`` does, at batch sizes other than the traced one."""
    model = tiny.make(family)
    scorer = dataclasses.replace(random_scorer(adapt(model), SITES, seed=3), merge=True)
    fast = prune(model, scorer, keep_ratio=[0.6, 0.5])
    text = family == "hf-bert"
    x = _text(3, seed=0) if text else tiny.inputs(family, batch=1, seed=0)
    assert export_onnx(fast, x, tmp_path / "model.onnx") <= 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx")).graph  # the dynamic batch axis is named, not the exporter's s77
    assert {v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output]} == {"batch"}
    session, module = onnx_session(tmp_path / "model.onnx"), GraphModel(fast)
    unmerged = GraphModel(prune(model, dataclasses.replace(scorer, merge=False), keep_ratio=[0.6, 0.5]))
    for batch, seed in ((1, 5), (6, 6)):
        args = graph_args(module, _text(batch, seed) if text else tiny.inputs(family, batch=batch, seed=seed))
        got = torch.from_numpy(run_onnx(session, args)[0])
        with torch.no_grad():
            want, plain = module(*args)[0] if text else module(*args), unmerged(*args)[0] if text else unmerged(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert (want - plain).abs().max() > 1e-3, "the merge changes the output"


def test_example_inputs_may_be_a_tuple_as_torch_onnx_takes_them(text_export, image_export) -> None:
    text = GraphModel(text_export[0])
    x = _text(2, seed=5)
    got, want = graph_args(text, (x["input_ids"], x["attention_mask"])), graph_args(text, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(graph_args(text, (x["input_ids"],))[1], torch.ones_like(x["input_ids"]))  # no mask: all real
    image = GraphModel(image_export[0])
    pixels = tiny.inputs("timm-vit-cls", batch=2, seed=1)
    assert torch.equal(graph_args(image, (pixels,))[0], pixels)
    with pytest.raises(ExportError, match="one tensor"):
        graph_args(image, (pixels, pixels))


def test_what_cannot_be_one_graph_is_refused_in_one_line(tmp_path) -> None:
    model = tiny.make("hf-bert")
    scorer = random_scorer(adapt(model), SITES)
    x = _text(2, seed=0)
    with pytest.raises(ExportError, match="threshold rule keeps a data-dependent number.*keep_ratio"):
        export_onnx(prune(model, scorer, threshold=0.0), x, tmp_path / "m.onnx")
    fast = prune(model, scorer, keep_ratio=0.5)
    left = {k: v.flip(1) for k, v in x.items()}
    with pytest.raises(ExportError, match="right-padded"):
        export_onnx(fast, left, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="input_ids and attention_mask only"):
        export_onnx(fast, {**x, "token_type_ids": x["attention_mask"]}, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="PrunedModel"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _fake_text_run(tmp_path):
    """A run folder over a tiny BERT saved locally (config.yaml, metrics, SB3-style checkpoint)."""
    from tests.test_artifact import _fake_run

    model = tiny.make("hf-bert")
    model.save_pretrained(tmp_path / "bert")
    scorer = random_scorer(adapt(model), SITES, seed=3)
    return _fake_run(tmp_path, scorer, tmp_path / "bert")


def _export_verb(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export.run(parser.parse_args(argv))


def test_export_verb_writes_the_whole_model(tmp_path, monkeypatch) -> None:
    from policy_prune import embedded

    run = _fake_text_run(tmp_path)
    with pytest.raises(UserError, match="keep_ratio schedule"):
        _export_verb([str(run), "--onnx-model"])
    with pytest.raises(UserError, match="--flops sets the schedule of --onnx-model"):
        _export_verb([str(run), "--flops", "0.5"])
    # The tiny BERT's own tokenizer is not saved: feed it token ids of the python-docs passages' shape.
    monkeypatch.setattr(embedded, "text_inputs", lambda tok, batch, seed, length: _text(batch, seed, length))
    monkeypatch.setattr(embedded, "_tokenizer_for", lambda backbone, spec: object())
    assert _export_verb([str(run), "--onnx-model", "--flops", "0.6", "--batch", "3", "--length", "14"]) == 0
    record = json.loads((run / "onnx" / "export.json").read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["inputs"] == ["input_ids", "attention_mask"]
    # prune(flops=0.6) solves the ratios on 128 tokens; on a 14-token graph rounding moves the FLOPs a little.
    assert record["length"] == 14 and record["rule"] == "keep_ratio" and 0.5 < record["flops_ratio"] < 0.8
    assert sorted(p.name for p in (run / "onnx").iterdir()) == ["export.json", "model.onnx", "model.pt2"]
    assert json.loads((run / "scorer" / "scorer.json").read_text())["default_rule"]["rule"] == "threshold"
    session = onnx_session(run / "onnx" / "model.onnx")
    assert run_onnx(session, tuple(_text(5, 9, 14).values()))[0].shape == (5, 32)
    (run / "onnx" / "notes.txt").write_text("mine")
    scorer_files = {p.name: p.read_bytes() for p in (run / "scorer").iterdir()}
    with pytest.raises(UserError, match="refusing to replace"):
        _export_verb([str(run), "--onnx-model", "--keep-ratio", "0.5"])
    with pytest.raises(UserError, match="vision model|labelled images"):  # a text run has no labelled images
        _export_verb([str(run), "--onnx-model", "--keep-ratio", "0.5", "--model-out", str(tmp_path / "o"),
                      "--check-split", "test"])
    with pytest.raises(UserError, match="unknown backbone 'no-such-model'"):
        _export_verb([str(run), "--onnx-model", "--keep-ratio", "0.5", "--model-out", str(tmp_path / "o"),
                      "--model", "no-such-model"])
    tiny.make("hf-bert", seed=1).save_pretrained(tmp_path / "other-bert")  # same architecture, other weights
    with pytest.raises(ScorerMismatchError):
        _export_verb([str(run), "--onnx-model", "--keep-ratio", "0.5", "--model-out", str(tmp_path / "o"),
                      "--model", str(tmp_path / "other-bert")])
    # Every refusal came before the run's scorer folder was written.
    assert {p.name: p.read_bytes() for p in (run / "scorer").iterdir()} == scorer_files
    # --keep-ratio is the graph's schedule there, not the scorer's default rule (it stays the threshold).
    assert _export_verb([str(run), "--onnx-model", "--keep-ratio", "0.5", "--model-out", str(tmp_path / "o"),
                         "--batch", "2", "--length", "14"]) == 0
    assert json.loads((tmp_path / "o" / "export.json").read_text())["rule"] == "keep_ratio"
    assert json.loads((run / "scorer" / "scorer.json").read_text())["default_rule"]["rule"] == "threshold"
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    _export_verb([str(run), "--keep-ratio", "0.5", "--threads", "1"])  # without --onnx-model: the default rule
    assert threads == [1, torch.get_num_threads()]  # set for the export, then given back
    rule = json.loads((run / "scorer" / "scorer.json").read_text())["default_rule"]
    assert rule["rule"] == "keep_ratio" and set(rule["values"]) == {0.5}


def test_bench_onnx_times_both_graphs_on_the_same_inputs(monkeypatch) -> None:
    """``bench --what onnx``: unpruned and pruned graphs (here an HF ViT classifier) in onnxruntime."""
    from policy_prune.evaluation import bench

    monkeypatch.setattr(bench, "load_model", lambda spec, seed: (tiny.make("hf-vit-classifier"), None))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--what", "onnx", "--model", "tiny", "--sites", "1", "2", "--batch", "1", "3",
                              "--flops", "0.6", "--warmup", "1", "--repeats", "2", "--threads", "1"])
    rows = bench.bench_onnx(args)
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["max_abs_diff_pruned"] <= 1e-4 and r["max_abs_diff_unpruned"] <= 1e-4
        assert r["tokens_kept"][-1] <= r["tokens_kept"][0] < r["tokens_full"] == 17
        # prune(flops=0.6) meets 0.6 with the scorer's own cost (large next to a 17-token toy model) counted
        assert abs(r["flops_ratio"] + r["selection_flops_ratio"] - 0.6) < 0.1 and r["ms_pruned"] > 0 and r["ms_unpruned"] > 0
        assert r["speedup"] == pytest.approx(r["ms_unpruned"] / r["ms_pruned"])


def test_bench_counts_the_padded_widths_that_run() -> None:
    """One row of 12 real tokens padded to 20: the static path runs the widths planned from 20."""
    from policy_prune.core.executed import executed_schedule
    from tests.test_inference import _padded_wider

    model = tiny.make("hf-bert")
    pruned = prune(model, random_scorer(adapt(model), SITES), keep_ratio=0.5)
    x = _padded_wider("hf-bert", tiny.inputs("hf-bert", batch=1), 8)
    kept, flops, n = executed_schedule(pruned, x)
    backbone = pruned.backbone
    assert n == 20 and kept == pruned.text_widths(20) and kept[0] == round(0.5 * 20)  # [CLS] and [SEP] among the 20
    assert flops == pytest.approx(float(backbone.schedule_flops(SITES, kept, 20)) / backbone.full_flops(20))


def test_length_is_refused_for_an_image_model(tmp_path) -> None:
    """--length sets a text graph's token length; on an image run it was ignored without a word."""
    from tests.test_artifact import _fake_run

    model = tiny.make("hf-vit-classifier")
    model.save_pretrained(tmp_path / "vit")
    run = _fake_run(tmp_path, random_scorer(adapt(model), SITES, seed=0), tmp_path / "vit")
    with pytest.raises(UserError, match="--length is a text graph's token length; .* takes images"):
        _export_verb([str(run), "--onnx-model", "--flops", "0.6", "--length", "14"])
    assert not (run / "onnx").exists()


@pytest.mark.expensive
def test_digits_vit_graph_keeps_the_pytorch_accuracy_on_the_test_split(tmp_path) -> None:
    """export RUN --model digits-vit --onnx-model --check-split test, on a random scorer: the path the
    trained scorer's check takes (fits and caches the digits-vit backbone first if it is missing)."""
    from policy_prune.config import load_env_config, to_dict
    from policy_prune.embedded import resolve_backbone
    from tests.test_artifact import _fake_run

    env = load_env_config("digits-vit")
    backbone, _ = resolve_backbone(env)
    run = _fake_run(tmp_path, random_scorer(backbone, env.sites, seed=0), tmp_path, env=to_dict(env))
    assert _export_verb([str(run), "--model", "digits-vit", "--onnx-model", "--flops", "0.5", "--check-split",
                         "test"]) == 0
    check = json.loads((run / "onnx" / "export.json").read_text())["check"]
    # A near-tie of two tokens' scores may flip under float rounding: at most a few rows differ.
    assert check["split"] == "test" and check["samples"] > 1000 and check["rows_over_atol"] <= 0.002 * check["samples"]
    assert check["onnx_accuracy"] == check["torch_accuracy"] and check["agreement"] == 1.0
