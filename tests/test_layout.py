"""House rules for the whole package: no import circle anywhere (top-level or function-level imports),
no inference backend importing another, no export module importing the merge command, and a .gitignore
that hides no tracked file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import zhtune

SRC = Path(zhtune.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the zhtune modules it imports}, every import statement counted, wherever it is."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zhtune"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()  # from zhtune.x import y
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("zhtune")}
        graph[name] = (deps & modules.keys()) - {name, "zhtune"}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_anywhere():
    graph = import_graph()
    assert len(graph) > 50 and "zhtune.cli" in graph, "the graph covers the whole package"
    assert import_circles(graph) == []


def test_the_circle_finder_finds_one():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_backends_import_only_the_engine_contract():
    graph = import_graph()
    backends = {"zhtune.infer.hf", "zhtune.infer.llamacpp", "zhtune.infer.vllm"}
    for backend in backends:
        assert not graph[backend] & (backends | {"zhtune.infer.resolve", "zhtune.infer.options"}), backend
        assert "zhtune.infer.engine" in graph[backend]
    for helper in ("zhtune.infer.hf_load", "zhtune.infer.hf_decode", "zhtune.infer.hf_score",
                   "zhtune.infer.llamacpp_decode"):   # parts of one backend import no other
        assert not graph[helper] & (backends | {"zhtune.infer.resolve", "zhtune.infer.options"}), helper
    assert not graph["zhtune.infer.engine"] & {m for m in graph if m.startswith("zhtune.infer.")}


def test_export_modules_never_import_the_merge_command():
    graph = import_graph()
    for name in ("zhtune.export.meta", "zhtune.export.gguf", "zhtune.export.parity", "zhtune.export.weights",
                 "zhtune.export.adapters", "zhtune.model.load"):
        assert "zhtune.export.merge" not in graph[name], name
    assert "zhtune.export.weights" in graph["zhtune.export.adapters"]


def test_gitignore_ignores_no_tracked_file():
    """A pattern like *.png must not hide a tracked docs/ figure from `git add` (the next edit would be lost)."""
    import shutil
    import subprocess

    root = SRC.parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == [], out.stdout
