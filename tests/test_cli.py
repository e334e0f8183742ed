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


def test_bench_flops_agreement(tmp_path) -> None:
    tiny.make("hf-bert").save_pretrained(tmp_path / "bert")
    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "flops", "--model", str(tmp_path / "bert"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["flops"]
    assert len(rows) == 4 and rows[0]["tokens"] > rows[-1]["tokens"]
    assert all(r["rel_error"] <= 0.02 for r in rows)
