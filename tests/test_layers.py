"""How the package's modules depend on one another: the layers of DESIGN.md section 2, and no
cycles, counting the imports inside functions (a cycle dodged by a late import is a cycle)."""

import ast
from pathlib import Path

import promptserve

SRC = Path(promptserve.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from a.b import c`` counts
    ``a.b.c`` when that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        found |= {n for n in names if n.startswith("promptserve") and n in MODULES}
    if module_name(path) in found:
        found.remove(module_name(path))
    return found


MODULES = {module_name(p) for p in SRC.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    edges = {module_name(p): project_imports(p) for p in SRC.rglob("*.py")}
    # ``from promptserve.x import y`` of a name (not a module) reaches x's __init__ only
    return {
        m: {d for d in deps if not (m.startswith(d + ".") and d != m)} for m, deps in edges.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    assert cycles(graph()) == []


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_server_imports_nothing_from_the_simulator():
    for module, deps in graph().items():
        if module.startswith("promptserve.server"):
            assert not [d for d in deps if d.startswith("promptserve.sim")], module


def test_the_edge_knows_nothing_of_serving():
    """What guards the connection and the caller's key sits below the app: it imports no
    runtime, policy or simulator module, so a change to serving cannot open the edge."""
    below = ("promptserve.server", "promptserve.policy", "promptserve.sim", "promptserve.engine")
    for module, deps in graph().items():
        if module.startswith("promptserve.edge"):
            assert not [d for d in deps if d.startswith(below)], module
    assert any(m.startswith("promptserve.edge.") for m in graph())
