"""No import loops inside policy_prune (issue 25): every `import` and `from ... import` of our own modules,
function-level, TYPE_CHECKING-guarded and relative ones included, read with `ast`, makes one graph edge.
A function-level import that dodges a loop at run time is still a loop of the design (STYLE.md, habit 12)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "policy_prune"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``policy_prune/core/ops.py`` -> ``policy_prune.core.ops``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the policy_prune modules it imports anywhere in its text. ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg``. Importing ``a.b.c`` also runs the ``__init__`` of
    ``a`` and ``a.b``; those implicit edges are left out (a package's ``__init__`` re-exporting its
    submodules would otherwise close a loop with each of them)."""
    modules = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [s if s in modules else base for s in subs]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Loops as closed paths ``a -> b -> a``: per strongly connected component (Tarjan), a shortest loop
    through each module not yet on a printed one, so that every module in a loop shows up."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles: list[list[str]] = []
    for component in components:
        covered: set[str] = set()
        for start in component:
            if start not in covered:
                cycles.append(_closed_path(graph, set(component), start))
                covered.update(cycles[-1])
    return cycles


def _closed_path(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest loop through ``start`` (breadth-first inside its component)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop in {component}")


def test_the_graph_sees_function_level_and_relative_imports(tmp_path) -> None:
    """The walker finds what a loop hides behind: an import inside a function, a relative one, a package's
    submodule imported by name; and find_cycles prints the loop it finds."""
    pkg = tmp_path / "policy_prune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from policy_prune.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import policy_prune.sub.a\n")
    graph = import_graph(pkg)
    assert graph["policy_prune.sub.a"] == {"policy_prune.sub.b"}
    assert graph["policy_prune.sub.b"] == {"policy_prune.sub.c"}
    assert find_cycles(graph) == [["policy_prune.sub.a", "policy_prune.sub.b", "policy_prune.sub.c",
                                   "policy_prune.sub.a"]]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


if __name__ == "__main__":
    for cycle in find_cycles(import_graph()):
        print(" -> ".join(cycle))
