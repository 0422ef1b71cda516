"""The import graph of src/apertus: no cycle, no private name taken from another module, and imports that only go
down the layers: util / embedded → config → model → checkpoint / tokenizer / chat → data → compliance → infer →
eval / train → speedrun → cli. The engine sits below training because QRPO samples its rollouts with it; the run
manifests (compliance) sit below training because every training run writes one.

Every import counts, at module level or inside a function (a deferred import still ties the two modules together).
Importing a submodule does not count as importing its package's __init__ (Python runs it, but that is the package
machinery, not a dependency the code chose).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The layers, lowest first: a module may import from its own layer or lower ones, never from a higher one.
LAYERS = [
    ["apertus.util", "apertus.embedded"],
    ["apertus.config"],
    ["apertus.model"],
    ["apertus", "apertus.checkpoint", "apertus.tokenizer", "apertus.chat", "apertus.chat_sft", "apertus.chat_template",
     "apertus.tokenizer_eval", "apertus.export_gguf"],
    ["apertus.data"],
    ["apertus.compliance"],
    ["apertus.infer"],
    ["apertus.eval", "apertus.train"],
    ["apertus.speedrun", "apertus.speedrun_report"],
    ["apertus.cli", "apertus.cli_args"],
]


def module_files() -> dict[str, Path]:
    out = {}
    for file in sorted((SRC / "apertus").rglob("*.py")):
        parts = file.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


MODULES = module_files()


def imports(name: str, file: Path):
    """(imported module, names taken from it, line) for every import of an apertus module in the file."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "apertus":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "apertus":
                continue
            names = []
            for alias in node.names:  # `from pkg import submodule` imports the submodule itself
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield target, names, node.lineno


def graph() -> dict[str, dict[str, int]]:
    """importer -> {imported: first line}, both apertus modules."""
    edges: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for name, file in MODULES.items():
        for target, _, line in imports(name, file):
            assert target in MODULES, f"{file}:{line}: imports {target}, which is not a module of src/apertus"
            if target != name:
                edges[name].setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + ".") and prefix != "apertus":
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_imports.py")
    return best[0]


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    detail = [" -> ".join(c) + ": " + ", ".join(f"{a} imports {b} (line {edges[a][b]})" for a in c for b in edges[a]
                                                  if b in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_no_private_names_across_modules():
    found = []
    for name, file in MODULES.items():
        for target, names, line in imports(name, file):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != name:
                    found.append(f"{file.relative_to(SRC)}:{line}: {n} from {target}")
    assert not found, "private names imported from another module (make them public helpers):\n" + "\n".join(found)


def test_imports_go_down_the_layers():
    found = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}), line {line}"
             for a, bs in graph().items() for b, line in bs.items()
             if layer(b) > layer(a)]
    assert not found, "imports going up the layers:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, [["a", "b", "c"]]),
    ({"a": {"b": 1}, "b": {}, "c": {"b": 1}}, []),
    ({"a": {"b": 1}, "b": {"a": 1}, "c": {"d": 1}, "d": {"c": 1}}, [["a", "b"], ["c", "d"]]),
])
def test_the_cycle_finder_finds_cycles(source, expected):
    assert sorted(cycles(source)) == expected


def test_imports_inside_functions_and_relative_ones_are_seen(tmp_path):
    file = tmp_path / "mod.py"
    file.write_text("from .engine import Delta\n\ndef f():\n    from ..model import _private\n"
                    "    from . import routes_chat\n")
    found = sorted((t, n) for t, n, _ in imports("apertus.infer.mod", file))
    assert found == [("apertus.infer.engine", ["Delta"]), ("apertus.infer.routes_chat", []),
                     ("apertus.model", ["_private"])]
