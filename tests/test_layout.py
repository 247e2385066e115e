"""The stages stay apart and the imports run one way: ft/ (recipe, training) is the core, quantize/ builds on it,
eval/ on both, and chat/ (`ft chat` and the export's generation check) on all three; only ft's CLI chains the stages (it imports quantize and eval); and no package has an import circle.

Every import counts: at module level, under `if TYPE_CHECKING:` and inside functions, absolute and relative."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("ft", "quantize", "eval", "chat")  # each may import only the ones before it
CHAINS_STAGES = {"ft.cli"}

Graph = dict[str, set[str]]


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name -> file, for every module of the packages under root (a package's own is its `__init__.py`)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path) -> set[str]:
    """Every module name an import in module `name` (file `path`) names: `from a import b` gives `a` and `a.b`,
    relative imports made absolute, wherever in the file the import is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph(modules: dict[str, Path]) -> Graph:
    """Module -> the modules among `modules` it imports (an imported name that is not a module, such as a function,
    counts as its module)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in imported(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import circle of the graph, as the modules along it with the first repeated at the end, or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    True
    """
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if (cycle := visit(start)) is not None:
            return cycle
    return None


GRAPH = import_graph(find_modules(ROOT, PACKAGES))


def package_of(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_sees_every_kind_of_import() -> None:
    assert {"ft.recipe", "ft.resolve"} <= GRAPH["ft.backends"]  # under TYPE_CHECKING
    assert {"quantize.pipeline", "eval.pipeline"} <= GRAPH["ft.cli"]  # inside functions
    assert "ft.rundir" in GRAPH["ft.preflight"]  # `from ft import rundir`: the module, not the package
    assert GRAPH["ft.__main__"] == {"ft.cli"}


def test_the_cycle_finder_finds_a_circle_through_a_type_only_import(tmp_path: Path) -> None:
    """A synthetic package whose circle closes only through a relative import under TYPE_CHECKING."""
    (tmp_path / "pkg").mkdir()
    files = {"__init__.py": "", "schema.py": "from pkg.seam import LIMIT\n",
             "seam.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .plan import Plan\nLIMIT = 1\n",
             "plan.py": "def f():\n    from . import schema\n"}
    for name, text in files.items():
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(find_modules(tmp_path, ("pkg",)))
    assert find_cycle(graph) == ["pkg.plan", "pkg.schema", "pkg.seam", "pkg.plan"]
    del graph["pkg.seam"]
    assert find_cycle(graph) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package: str) -> None:
    inside = {name: {t for t in targets if package_of(t) == package}
              for name, targets in GRAPH.items() if package_of(name) == package}
    cycle = find_cycle(inside)
    assert cycle is None, f"import circle in {package}/: {' -> '.join(cycle or [])}"


def test_packages_import_only_downwards() -> None:
    """ft imports neither quantize, eval nor chat (its CLI excepted: it chains the stages); quantize does not import
    eval, and only chat imports chat."""
    upward = {f"{name} -> {target}" for name, targets in GRAPH.items() if name not in CHAINS_STAGES
              for target in targets if PACKAGES.index(package_of(target)) > PACKAGES.index(package_of(name))}
    assert upward == set()
