"""The command line: verbs run, user errors give one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from policy_prune.cli import main
from tests import tiny


def test_info_self_check(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "digits-vit" in out and "timm-vit" in out and "FLOPs ratio" in out


def test_no_verb_and_bad_verb() -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_bench_writes_json(tmp_path) -> None:
    tiny.make("hf-bert").save_pretrained(tmp_path / "bert")
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tmp_path / "bert"), "--batch", "2", "--keep", "0.5", "--site", "1",
                 "--warmup", "1", "--repeats", "2", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["pruned_execution"]
    assert rows[0]["batch"] == 2 and 0 < rows[0]["flops_ratio"] < 1
    assert rows[0]["tokens_kept"] < rows[0]["tokens_full"]
    assert rows[0]["ms_pruned"] > 0 and rows[0]["speedup_pruned"] > 0


def test_console_script_user_error_is_one_line(tmp_path) -> None:
    """A user mistake prints one error line (no traceback) and exits with 2."""
    proc = subprocess.run([sys.executable, "-m", "policy_prune.cli", "bench", "--model", "no_such_model_xyz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown backbone" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [
    ["eval", "--env", "digits-vit", "--targets", "0.5", "1.5"],  # a FLOPs ratio above 1
    ["eval", "--env", "digits-vit", "--targets", "nan"],  # was a StopIteration after the whole eval
    ["eval", "--env", "digits-vit", "--targets", "0"],
    ["eval", "--env", "digits-vit", "--batch-size", "0"],  # was torch's "split_size can only be 0" traceback
    ["eval", "--env", "digits-vit", "--bootstrap", "0"],  # was "quantile() input tensor must be non-empty"
    ["eval", "--env", "digits-vit", "--max-samples", "0"],  # was a ZeroDivisionError
    ["eval", "--env", "digits-vit", "--repeats", "-2"],  # silently skipped the timing
    ["eval", "--env", "digits-vit", "--vis-target", "3"],
    ["eval", "--env", "digits-vit", "--tome-inflect", "2"],
    ["bench", "--what", "model", "--model", "digits-vit", "--flops", "1.5"],  # ran unpruned, no word said
    ["bench", "--what", "model", "--model", "digits-vit", "--batch", "0"],  # was an IndexError
    ["bench", "--what", "model", "--model", "digits-vit", "--repeats", "0"],  # was "no median for empty data"
    ["bench", "--keep", "-0.1"],
    ["export", "runs/x", "--flops", "inf"],
    ["export", "runs/x", "--keep-ratio", "0.5", "1.2"],
    ["sweep", "--cpus-per-trial", "0"],
])
def test_numbers_out_of_their_domain_are_one_usage_error(argv, capsys) -> None:
    """An out-of-range or non-finite number is refused while parsing (exit 2, argparse's one error line
    naming the option), before any model or data loads."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (last,) = err.strip().splitlines()  # one line: argparse's usage block is not printed before it
    assert last.startswith(f"policy-prune {argv[0]}: error: argument ") and "Traceback" not in err
    assert last.endswith(f"(see policy-prune {argv[0]} --help)")
    assert any(word in last for word in ("(0, 1]", "[0, 1]", "at least", "above 0", "finite", "[-1, 1]"))


def test_numbers_at_the_edge_of_their_domain_are_taken() -> None:
    """A threshold of -inf (keep every token at that site) is a valid export rule; 1 is a FLOPs ratio; 0 repeats
    skip eval's timing."""
    from policy_prune.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "run", "--threshold=-inf"]).threshold == [float("-inf")]
    assert parser.parse_args(["export", "run", "--threshold", "-1.5", "2"]).threshold == [-1.5, 2.0]
    # One per site with -inf among them, as the help writes it: argparse took the bare -inf for an option.
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "run", "--threshold", "0.3", "-inf"])
    args = parser.parse_args(["eval", "--env", "digits-vit", "--targets", "1", "0.05", "--repeats", "0"])
    assert args.targets == [1.0, 0.05] and args.repeats == 0


def test_a_per_site_threshold_of_minus_inf_reaches_the_verb(tmp_path, capsys) -> None:
    assert main(["export", str(tmp_path / "no-run"), "--threshold", "0.3", "-inf", "0.1"]) == 2
    assert capsys.readouterr().err.strip() == f"policy-prune export: error: run folder not found: {tmp_path / 'no-run'}"


def test_bench_exec_and_flops_take_the_embedded_model_names(tmp_path) -> None:
    """--what exec / flops load --model as every other verb does (they said "unknown backbone 'minilm'")."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "flops", "exec", "--model", "minilm", "--batch", "1", "--warmup", "0", "--repeats", "1",
                 "--site", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["flops"][0]["rel_error"] < 0.05 and payload["pruned_execution"][0]["batch"] == 1


def test_bench_encode_times_the_sentence_transformer_users_call(tmp_path, monkeypatch) -> None:
    """--what encode: SentenceTransformer.encode of all-MiniLM-L6-v2, unpruned and through prune(model, scorer,
    flops=f), ms per text at each batch size; the pruned model it times is the public call's."""
    pytest.importorskip("sentence_transformers")
    from policy_prune.core import inference
    from policy_prune.core.artifact import save_scorer
    from policy_prune.core.backbones import adapt
    from policy_prune.core.scorer import random_scorer
    from policy_prune.embedded import load_model

    backbone = adapt(load_model("minilm")[0])
    save_scorer(random_scorer(backbone, [1, 3], seed=3), tmp_path / "scorer", backbone.signature())
    built = []
    original = inference.PrunedModel

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, backbone, scorer, rule, values) -> None:
            built.append((rule, values))
            super().__init__(backbone, scorer, rule, values)

    monkeypatch.setattr(inference, "PrunedModel", Spy)
    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "encode", "--scorer", str(tmp_path / "scorer"), "--targets", "0.5", "0.3",
                 "--batch", "2", "1", "--samples", "3", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["encode"]
    assert [(r["batch"], r["target"]) for r in rows] == [(2, 0.5), (2, 0.3), (1, 0.5), (1, 0.3)]
    assert all(r["texts"] == 3 and r["ms_unpruned"] > 0 and r["ms_pruned"] > 0 for r in rows)
    assert [rule for rule, _ in built] == ["keep_ratio", "keep_ratio"]  # prune(model, scorer, flops=f), once each
    assert main(["bench", "--what", "encode"]) == 2  # no scorer: one line


def test_bench_compile_options_are_parsed_and_checked(capsys) -> None:
    from policy_prune.evaluation.bench import compile_options

    assert compile_options("") == {}
    assert compile_options("freezing, cpp_wrapper=false,max_autotune_gemm_backends=CPP") == {
        "freezing": True, "cpp_wrapper": False, "max_autotune_gemm_backends": "CPP"}
    assert main(["bench", "--what", "model", "--model", "digits-vit", "--compile", "freezing,no_such_knob"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'no_such_knob' is not an inductor option" in err[0]
    assert main(["bench", "--what", "model", "--model", "digits-vit", "--compile", "max_autotune=banana"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_autotune is a switch (true or false), got 'banana'" in err[0]


def test_bench_flops_agreement(tmp_path) -> None:
    tiny.make("hf-bert").save_pretrained(tmp_path / "bert")
    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "flops", "--model", str(tmp_path / "bert"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["flops"]
    assert len(rows) == 4 and rows[0]["tokens"] > rows[-1]["tokens"]
    assert all(r["rel_error"] <= 0.02 for r in rows)


def test_bench_pruned_model_with_saved_and_random_scorer(tmp_path, capsys) -> None:
    from policy_prune.core.artifact import save_scorer
    from policy_prune.core.backbones import load_backbone
    from policy_prune.core.scorer import random_scorer

    tiny.make("hf-bert").save_pretrained(tmp_path / "bert")
    backbone = load_backbone(str(tmp_path / "bert"))
    save_scorer(random_scorer(backbone, [1], seed=3), tmp_path / "scorer", backbone.signature())
    for extra in ([], ["--scorer", str(tmp_path / "scorer")]):
        out = tmp_path / "bench.json"
        assert main(["bench", "--what", "model", "--model", str(tmp_path / "bert"), "--batch", "4", "1", "--sites", "1",
                     "--flops", "0.6", "--warmup", "0", "--repeats", "2", "--out", str(out), *extra]) == 0
        rows = json.loads(out.read_text())["pruned_model"]
        assert [r["batch"] for r in rows] == [4, 1] and all(r["sites"] == [1] for r in rows)
        for r in rows:  # the keep_ratio schedule is solved for the FLOPs target (coarse on a tiny sequence)
            assert abs(r["flops_ratio"] - 0.6) < 0.15 and r["tokens_kept"][0] < r["tokens_full"]
            assert 0 < r["scorer_share"] < 1 and r["speedup"] > 0
    # --sites is the random scorer's: a saved scorer at other sites is refused, not run at its own silently.
    assert main(["bench", "--what", "model", "--model", str(tmp_path / "bert"), "--sites", "2",
                 "--scorer", str(tmp_path / "scorer")]) == 2
    assert "--sites sets the random scorer's sites" in capsys.readouterr().err
