"""The standard library's own docstrings: every public module, class, function, method and attribute
that ships with this Python, as ``{"unit", "name", "kind", "doc"}`` records.

Run as a script in a child interpreter (``python -S -P stdlib_docs.py OUT.json`` with an empty
environment, see :func:`policy_prune.data.text.stdlib_records`) so that importing some 600 modules touches neither the
caller's process (state, memory, stray output) nor depends on what the caller imported first: the
walk sees the same modules in the same order on every run of the same Python build. This file
imports only the standard library for that reason.

Nothing is executed beyond imports. Modules with import-time side effects (windows, browsers,
printing, files written next to the source) and test suites are never imported (``SKIP``).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

FORMAT = 1
"""Version of the records and of the walk rules; part of the cache key."""
SKIP = frozenset({
    "antigravity", "this",  # open a browser / print on import
    "idlelib", "tkinter", "turtle", "turtledemo",  # GUI (windows)
    "lib2to3",  # writes grammar pickles beside its source on import
    "readline", "rlcompleter",  # change the terminal's line editing
    "pydoc_data",  # the help topics: a corpus source of their own
    "encodings",  # ~120 generated codec modules with near-identical docstrings
    "test",
})
"""Top-level modules never imported (the first dotted part of a module name)."""
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
"""Submodule name parts never imported: test suites and ``__main__`` (runs the module as a program)."""
ALIASES = {"posix": "os", "posixpath": "os.path", "genericpath": "os.path"}
"""Where users meet these modules' objects: ``os.stat`` (defined in posix), ``os.path.join``."""


def module_names() -> list[str]:
    """Public stdlib modules and their public submodules, sorted; importing them is what finds submodules."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP:
            continue
        names.append(top)
        module = _import(top)
        if module is not None and hasattr(module, "__path__"):
            names += _submodules(top, module.__path__)
    return names


def _submodules(package: str, path: Any) -> list[str]:
    out = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in SKIP_PARTS or info.name.startswith("test_"):
            continue
        name = f"{package}.{info.name}"
        out.append(name)
        module = _import(name)
        if info.ispkg and module is not None and hasattr(module, "__path__"):
            out += _submodules(name, module.__path__)
    return out


def _import(name: str) -> Any:
    """The module, or None when it does not import here (platform-specific, missing C extension)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # SystemExit and friends from odd modules count as "not importable"
        return None


def _public(namespace: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, namespace[k]) for k in sorted(namespace) if not k.startswith("_")]


def _members(cls: type) -> list[tuple[str, Any]]:
    """A class's own public members, plus special methods written in Python (``__init__`` often
    documents the constructor; C slot wrappers only say "Return self+value.")."""
    own = dict(vars(cls))
    dunder = [(k, v) for k, v in sorted(own.items()) if k.startswith("__") and inspect.isfunction(v)]
    return _public(own) + dunder


def _owned(obj: Any, module: str) -> bool:
    """Documented under ``module``: defined there, or in a private module (C accelerators such as
    ``_json``) and re-exported here."""
    home = getattr(obj, "__module__", None)
    return home == module or (isinstance(home, str) and any(p.startswith("_") for p in home.split(".")))


def records(module_list: list[str]) -> list[dict[str, str]]:
    """One record per documented object, in walk order; an object is recorded once (where first owned)."""
    seen: set[int] = set()
    out: list[dict[str, str]] = []

    def add(unit: str, name: str, kind: str, obj: Any) -> None:
        doc = obj.__doc__ if kind == "module" else _own_doc(obj)
        if id(obj) in seen or not isinstance(doc, str) or not doc.strip():
            return
        seen.add(id(obj))
        out.append({"unit": unit, "name": name, "kind": kind, "doc": inspect.cleandoc(doc)})

    for modname in module_list:
        module = _import(modname)
        if module is None:
            continue
        shown = ALIASES.get(modname, modname)
        unit = shown.split(".")[0]
        prefix = "" if modname == "builtins" else f"{shown}."
        add(unit, shown, "module", module)
        for name, obj in _public(vars(module)):
            if not _owned(obj, modname):
                continue
            if inspect.isclass(obj):
                add(unit, prefix + name, "class", obj)
                for mname, member in _members(obj):
                    kind = _member_kind(member)
                    if kind:
                        add(unit, f"{prefix}{name}.{mname}", kind, member)
            elif inspect.isroutine(obj):
                add(unit, prefix + name, "function", obj)
    return out


def _own_doc(obj: Any) -> Any:
    """The object's own docstring (a class's, not inherited: ``inspect.getdoc`` would fall back to a base)."""
    if inspect.isclass(obj):
        return vars(obj).get("__doc__")
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return getattr(obj, "__doc__", None)


def _member_kind(member: Any) -> str | None:
    if isinstance(member, (staticmethod, classmethod)) or inspect.isroutine(member):
        return "method"
    if isinstance(member, property) or inspect.isdatadescriptor(member):
        return "attribute"
    return None


def main(path: str) -> None:
    # Imports may print or warn: nothing reaches the caller's terminal.
    sink = io.StringIO()
    with redirect_stdout(sink), redirect_stderr(sink):
        out = records(module_names())
    payload = {"format": FORMAT, "python": sys.version, "platform": sys.platform, "items": out}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1])
