"""The import graph runs one way. `actors` is the bottom of the house: it imports the standard
library, trio and itself, never `dispatcher`, which implements the actors' ports and wires them.
No two modules of `actors` and `dispatcher` import each other, directly or around a circle.

The graph is read from the source: every `import` statement, at module level or inside a
function (an import deferred to call time is still a dependency), and under `if TYPE_CHECKING:`
(an import for annotations only is never executed, but two modules whose types name each other
still depend on each other). A submodule's import of its own parent packages is implicit in Python
and not counted; an explicit `from dispatcher import X` is."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "dispatcher")


def run_fresh(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` imports (absolute, dotted; `from m import x` gives `m` and
    `m.x`, since `x` may be a submodule)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        targets = {name for name in imported_names(path, module) if name in modules}
        graph[module] = targets - parents - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_is_read() -> None:
    # Guards the reader itself: a graph with no edges has no cycles either.
    graph = import_graph()
    assert {"actors.supervisor", "actors.ports", "dispatcher.core", "dispatcher.fanout"} <= set(graph)
    assert "actors.collector" in graph["actors.supervisor"]
    assert "dispatcher.context" in graph["dispatcher.fanout"]


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_actors_import_only_the_standard_library_trio_and_themselves() -> None:
    allowed = set(sys.stdlib_module_names) | {"trio", "actors"}
    for module, path in module_files().items():
        if module.split(".")[0] != "actors":
            continue
        outside = {name for name in imported_names(path, module) if name.split(".")[0] not in allowed}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_import_actors_loads_nothing_of_dispatcher() -> None:
    run_fresh(
        "import sys, actors\n"
        "assert callable(actors.run_pipeline)\n"
        "loaded = [m for m in sys.modules if m.startswith('dispatcher')]\n"
        "assert not loaded, loaded\n"
    )


def test_package_exports_are_plain_imports() -> None:
    source = (ROOT / "dispatcher" / "__init__.py").read_text()
    assert "def __getattr__" not in source  # no PEP 562 lazy exports
    run_fresh(
        "import dispatcher\n"
        "assert dispatcher.Dispatcher.__name__ == 'Dispatcher'\n"
        "assert callable(dispatcher.open_dispatcher)\n"
        "missing = [n for n in dispatcher.__all__ if getattr(dispatcher, n, None) is None]\n"
        "assert not missing, missing\n"
    )
