"""Hub ids where the Hub cannot be reached: a cached model loads, a missing one fails in one line, and
neither waits through huggingface_hub's retries (each child process below fails if it ever sleeps)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from policy_prune.core import hub
from policy_prune.errors import UserError
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
# Nothing listens on port 9 of loopback: the connection is refused at once, as without a network.
NO_HUB = "http://127.0.0.1:9"
PROXIES = ("https_proxy", "http_proxy", "all_proxy")
CHILD = """
import sys, time
def no_retry(seconds):
    raise SystemExit(f"slept {seconds} s: a retry")
time.sleep = no_retry
from policy_prune.core.backbones import load_backbone
from policy_prune.errors import UserError
try:
    backbone = load_backbone(sys.argv[1])
except UserError as exc:
    print("USER ERROR", exc)
else:
    print("LOADED", type(backbone.model).__name__, backbone.depth)
from huggingface_hub import constants
print("OFFLINE AFTER", constants.HF_HUB_OFFLINE)
"""


def _child(spec: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": NO_HUB, "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home")}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXIES, *(p.upper() for p in PROXIES)):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def _cache_repo(cache: Path, repo: str) -> None:
    """A model in the hub cache's own layout (refs/main -> snapshots/<commit>/), as a download leaves it."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    tiny.make("hf-bert").save_pretrained(folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_missing_hub_model_fails_in_one_line_without_retries(tmp_path: Path) -> None:
    done = _child("hf:nobody/no-such-model", tmp_path / "hub")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "USER ERROR cannot load model 'nobody/no-such-model': not in the local Hugging Face cache, and " \
           f"{NO_HUB} cannot be reached" in done.stdout
    assert "OFFLINE AFTER False" in done.stdout  # the library's own flag is left as it was


def test_a_cached_hub_model_loads_without_the_hub(tmp_path: Path) -> None:
    _cache_repo(tmp_path / "hub", "someone/tiny-bert")
    done = _child("hf:someone/tiny-bert", tmp_path / "hub")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED BertModel 4" in done.stdout, done.stdout + done.stderr[-2000:]


def test_local_folders_never_probe_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(endpoint: str) -> bool:
        raise AssertionError("a local folder probed the Hub")

    monkeypatch.setattr(hub, "reachable", probe)
    tiny.make("hf-bert").save_pretrained(tmp_path / "model")
    from policy_prune.core.backbones import load_backbone

    backbone = load_backbone(str(tmp_path / "model"))
    assert backbone.depth == 4
    with hub.fetching(str(tmp_path / "model"), "model"):
        pass
    monkeypatch.setenv("HOME", str(tmp_path))  # a folder in your home, written with "~": loaded, not looked up
    assert load_backbone("hf:~/model").depth == 4 and load_backbone("~/model").depth == 4
    for typo in (str(tmp_path / "modle"), "./models/my-bert", "~/no-such-folder"):  # a path, not a hub id
        with pytest.raises(UserError, match="model folder not found: "):
            load_backbone(f"hf:{typo}")


def test_a_name_lookup_that_never_answers_is_no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that does not answer (the lookup ignores the connection's timeout) reads as no Hub once
    PROBE_TIMEOUT_S has passed: the probe does not wait for the lookup to come back."""
    for name in (*PROXIES, *(p.upper() for p in PROXIES)):
        monkeypatch.delenv(name, raising=False)
    release, returned = threading.Event(), threading.Event()

    def stuck_lookup(*args: object, **kwargs: object) -> None:
        release.wait(60)  # a lookup that hangs until the test lets it go
        returned.set()
        raise OSError("name lookup timed out")

    monkeypatch.setattr(hub.socket, "create_connection", stuck_lookup)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
    hub.forget_probes()
    try:
        assert hub.reachable("https://hub.example") is False
        assert not returned.is_set()  # answered while the lookup was still hanging
    finally:
        release.set()
        hub.forget_probes()


def test_the_probe_reports_a_closed_port_trusts_a_proxy_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*PROXIES, *(p.upper() for p in PROXIES)):
        monkeypatch.delenv(name, raising=False)
    hub.forget_probes()
    assert hub.reachable(NO_HUB) is False
    assert hub.reachable("not a url") is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the libraries go through it: no direct probe
    assert hub.reachable(NO_HUB) is False  # a failed probe is believed for a while
    monkeypatch.setattr(hub, "RETRY_AFTER_S", 0.0)  # then probed again (a network may have come)
    assert hub.reachable(NO_HUB) is True
    hub.forget_probes()
