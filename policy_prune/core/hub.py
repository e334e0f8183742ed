"""Loads from the Hugging Face Hub that fail in seconds, not minutes, where there is no network.

huggingface_hub retries a request that cannot connect five times with backoff (about 25 s for one file)
before it looks in its local cache, and a model's config, weights and tokenizer are several such
requests: a hub id that is not cached took 25-55 s to fail on a machine without a network, and one that
is cached as long to load. :func:`hub_access` probes the Hub (a name lookup and a TCP connection that together
wait at most PROBE_TIMEOUT_S; a yes is kept for the process, a no for RETRY_AFTER_S);
when it cannot be reached, the load inside runs in the libraries' own offline mode, so what is cached loads at
once and what is not fails at once, in one line. ``HF_HUB_OFFLINE=1`` is respected as it is (no probe).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from policy_prune.errors import UserError

_SWITCHING = threading.RLock()
PROBE_TIMEOUT_S = 3.0
"""Seconds the probe waits for a TCP connection to the Hub's host."""
RETRY_AFTER_S = 60.0
"""Seconds a failed probe is believed before the Hub is probed again."""
_PROBES: dict[str, tuple[bool, float]] = {}


def reachable(endpoint: str) -> bool:
    """Whether the Hub at ``endpoint`` can be reached (:func:`_probe`): a yes is kept for the process, a no for
    RETRY_AFTER_S (a notebook that gets a network later probes again)."""
    hit = _PROBES.get(endpoint)
    if hit is not None and (hit[0] or time.monotonic() - hit[1] < RETRY_AFTER_S):
        return hit[0]
    result = _probe(endpoint)
    _PROBES[endpoint] = (result, time.monotonic())
    return result


def forget_probes() -> None:
    """Drop every kept probe result (the next load probes again)."""
    _PROBES.clear()


def _probe(endpoint: str) -> bool:
    """Whether a TCP connection to ``endpoint``'s host, its name lookup included, opens within PROBE_TIMEOUT_S.

    Behind a proxy (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY set) the libraries go through it and a direct
    connection tells nothing: the Hub is taken as reachable.
    """
    url = urlparse(endpoint)
    if not url.hostname:
        return False
    proxies = ("https_proxy", "http_proxy", "all_proxy")
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in proxies):
        return True
    port, host, opened = url.port or (443 if url.scheme == "https" else 80), url.hostname, threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                opened.set()
        except OSError:
            pass

    # The name lookup inside create_connection obeys no timeout (a resolver that does not answer can hold it
    # for tens of seconds): the probe runs in a daemon thread, and whatever has not answered in time is a no.
    threading.Thread(target=connect, name="policy-prune-hub-probe", daemon=True).start()
    return opened.wait(PROBE_TIMEOUT_S)


def model_ref(spec: str) -> str:
    """What the loaders take for a spec: without its "hf:" prefix, and a leading "~" expanded (transformers
    and datasets read "~/my-encoder" as a hub id, not as the folder in your home)."""
    name = spec.removeprefix("hf:")
    return str(Path(name).expanduser()) if name.startswith("~") else name


def is_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names something on this machine (then nothing is fetched)."""
    return Path(name_or_path).expanduser().exists()


def _offline_switches() -> list[tuple[Any, str]]:
    """The offline flags the hub libraries read at call time: huggingface_hub's (transformers and timm
    go through it) and datasets' own copy, where datasets is installed."""
    from huggingface_hub import constants

    switches: list[tuple[Any, str]] = [(constants, "HF_HUB_OFFLINE")]
    try:
        import datasets.config
    except ImportError:
        pass
    else:
        switches.append((datasets.config, "HF_HUB_OFFLINE"))
    return switches


@contextmanager
def _offline(what: str) -> Iterator[None]:
    """The libraries' offline flags set for the block (restored after); a miss in the cache is one UserError."""
    from huggingface_hub import constants

    switches = _offline_switches()
    saved = [getattr(module, name) for module, name in switches]
    for module, name in switches:
        setattr(module, name, True)
    try:
        yield
    except (OSError, ValueError) as exc:  # transformers: OSError; timm: LocalEntryNotFoundError; datasets: ConnectionError
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot load {what}: not in the local Hugging Face cache, and {constants.ENDPOINT} cannot be "
                        f"reached (no network?); fetch it once where there is one, or give a local folder or checkpoint "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        for (module, name), value in zip(switches, saved, strict=True):
            setattr(module, name, value)


@contextmanager
def hub_access(what: str) -> Iterator[None]:
    """Around a load that may fetch ``what`` (e.g. "model 'org/name'") from the Hub.

    With the Hub reachable, or offline mode already asked for, the load runs as it is. Otherwise it runs in
    offline mode (the flags are restored after), and a miss in the cache raises one UserError.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or reachable(constants.ENDPOINT):
        yield
        return
    with _SWITCHING, _offline(what):  # process-wide flags: one offline load at a time, each restoring what it found
        yield


def fetching(name_or_path: str, kind: str) -> AbstractContextManager[None]:
    """:func:`hub_access` for a hub id, nothing for a local path. ``kind``: "model", "tokenizer", "dataset", ...

    A name written as a path ("/...", "./...", "../...", "~...") that does not exist is a folder not found,
    not a hub id to look for (in the cache or on the Hub)."""
    if is_local(name_or_path):
        return nullcontext()
    if name_or_path.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        raise UserError(f"{kind} folder not found: {name_or_path}")
    return hub_access(f"{kind} {name_or_path!r}")
