"""The layering rule and the absence of import cycles, read from the source with `ast`.

Layering (docs/architecture.md):
- the libraries models/, losses/, teachers/, cache/, data/ (their own command modules
  included) never import training/, another command module (alambic.cli, */cli.py,
  *_cli.py), the demos or reward distillation;
- training/ never imports a command module or the demos.
Cycles: no two files of src/alambic import each other, directly or through others
(imports inside functions count: a lazy import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LIBRARIES = ("alambic.models", "alambic.losses", "alambic.teachers", "alambic.cache", "alambic.data")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / "alambic").rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The file a dotted name lands in: the module itself, or the module that defines the name."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """{module: modules of src/alambic it imports}, from every import statement anywhere in the file."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.startswith("alambic"):
                    resolved = _resolve(target, modules)
                    if resolved is not None and resolved != name:
                        edges.add(resolved)
        graph[name] = edges
    return graph


def _is_command(module: str) -> bool:
    last = module.rpartition(".")[2]
    return module == "alambic.cli" or last == "cli" or last.endswith("_cli")


def _inside(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        for target in sorted(targets):
            if _inside(module, LIBRARIES) and (
                _inside(target, ("alambic.training", "alambic.demos", "alambic.reward"))
                or _is_command(target)
            ):
                problems.append(f"{module} imports {target}")
            if _inside(module, ("alambic.training",)) and not _is_command(module) and (
                _is_command(target) or _inside(target, ("alambic.demos",))
            ):
                problems.append(f"{module} imports {target}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "alambic.training.loop" in graph and "alambic.training.step_loss" in graph["alambic.training.loop"]
    assert "alambic.durable" in graph["alambic.training.checkpoint"]


def test_libraries_never_import_training_or_commands():
    assert layering_violations(import_graph()) == []


def test_no_import_cycles_between_files():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_are_for():
    bad = {"alambic.models.x": {"alambic.training.loop"}, "alambic.training.loop": {"alambic.training.cli"},
           "alambic.a": {"alambic.b"}, "alambic.b": {"alambic.c"}, "alambic.c": {"alambic.a"}}
    assert layering_violations(bad) == ["alambic.models.x imports alambic.training.loop",
                                        "alambic.training.loop imports alambic.training.cli"]
    assert cycles(bad) == [["alambic.a", "alambic.b", "alambic.c"]]
