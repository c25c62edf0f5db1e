"""The package's shape: data flows one way, so nothing imports in a circle, and the lower layers (model/,
data/) never import the ones built on them (train/, tasks/, interop/, infer/, the CLI)."""

import ast
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parent
UPPER = ("lmforge.train", "lmforge.tasks", "lmforge.interop", "lmforge.infer", "lmforge.cli", "lmforge.run",
         "lmforge.report")


def _imports() -> dict[str, set[str]]:
    """Module -> the lmforge modules it imports (at module level or inside functions)."""
    modules = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lmforge"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_model_and_data_import_nothing_above_them():
    graph = _imports()
    wrong = {name: sorted(m for m in deps if m.startswith(UPPER)) for name, deps in graph.items()
             if name.startswith(("lmforge.model", "lmforge.data"))}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_no_module_imports_itself_through_others():
    graph = _imports()
    cycles = []

    def visit(name, path, done):
        for dep in graph[name]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                done.add(dep)
                visit(dep, path + [dep], done)

    for start in graph:
        visit(start, [start], {start})
    # a package's __init__ re-exporting its own modules is not a cycle of ideas
    real = [c for c in cycles if not any(a == b.rsplit(".", 1)[0] or b == a.rsplit(".", 1)[0]
                                         for a, b in zip(c, c[1:]))]
    assert real == []
