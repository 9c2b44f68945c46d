"""The import graph shows the architecture: the command line on top, no circle, torch-free foundations.

Read from the source with ``ast`` (every ``import`` counts, module-level or inside a function):

- nothing under ``ml`` imports :mod:`ml.cli` but the console script's first module, :mod:`ml.entry`;
- no two modules import each other, directly or through others;
- the run folder's owner (:mod:`ml.run`), the errors and the config diff load without torch, so the
  commands for living with runs and bad-input errors answer quickly.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ml"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_real_package() -> None:
    graph = _import_graph()
    assert "ml.trainers.sl" in graph and "ml.trainers.base" in graph["ml.trainers.sl"]
    assert "ml.run.checkpoints" in graph["ml.trainers.base"]


def test_nothing_below_the_command_line_imports_it() -> None:
    importers = sorted(name for name, imported in _import_graph().items() if "ml.cli" in imported)
    assert importers == ["ml.entry"]


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_run_folder_errors_and_diff_load_without_torch() -> None:
    code = (
        "import sys\n"
        "import ml.errors, ml.run.layout, ml.run.claim, ml.run.locks, ml.run.checkpoints, ml.run.status\n"
        "import ml.core.diff, ml.tools.experiments\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
