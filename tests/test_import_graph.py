"""The package's layers, as its imports show them: no import circle anywhere in `workbench/` and `kernels/`
(imports inside functions count too; those under `if TYPE_CHECKING:` do not), and each layer imports only the
layers below it (docs/architecture.md): the engine knows nothing of chat, server, magics or widgets; kernels know
no model."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"workbench": REPO / "workbench", "glm_kernels": REPO / "kernels" / "glm_kernels"}


def module_name(path: Path) -> str:
    for package, root in ROOTS.items():
        if path.is_relative_to(root):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for root in ROOTS.values() for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import submodule` depends on the submodule; `from module import name`, on the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            if _type_checking_only(node, parents):
                continue
            for target in targets:
                # the longest known module the target names (a name imported from a module is that module)
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_each_layer_imports_only_the_layers_below_it():
    below = {  # layer -> what it must not import
        "glm_kernels": ("workbench",),
        "workbench.engine": ("workbench.chat", "workbench.server", "workbench.magics", "workbench.widgets",
                             "workbench.analysis"),
        "workbench.chat": ("glm_kernels", "workbench.server", "workbench.magics", "workbench.widgets"),
        "workbench.tools": ("glm_kernels", "workbench.engine", "workbench.chat", "workbench.server", "workbench.magics",
                            "workbench.widgets"),
    }
    wrong = [(module, target) for module, targets in import_graph().items() for target in targets
             for layer, forbidden in below.items()
             if (module == layer or module.startswith(layer + ".")) and target.startswith(forbidden)]
    assert wrong == []


def test_the_graph_sees_imports():  # the checks above would pass on an empty graph
    graph = import_graph()
    assert "workbench.engine.scheduler" in graph["workbench.engine.engine"]
    assert "glm_kernels.cpu_compiled" in graph["workbench.engine.runner"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
