"""The import graph of train/ and env/: no circles, and env/ never imports train/ (the design card's direction).

Every import counts: module-level, inside functions, and under `if TYPE_CHECKING:` (a circle a type
annotation hides is still two modules that need each other). Relative imports and `from pkg import mod`
resolve to the module they load; an import of a package's name (`from train.models import build`) is an
edge to that package's __init__, which is where the name lives.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from tests.helpers.paths import ROOT

PACKAGES = ("env", "train")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted name -> file, for every .py under the given top-level packages."""
    return {module_name(path, root): path for top in packages for path in sorted((root / top).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that importing `name` loads: itself, or the nearest enclosing package or module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _base_of_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """`from ..x import y` inside `module`: the absolute name of `..x`."""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _base_of_relative(module, path.name == "__init__.py", node.level, node.module)
            # `from pkg import mod` loads pkg.mod when it is a module; otherwise the name lives in pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for name in names if (target := _resolve(name, modules)) is not None)
    found.discard(module)
    return found


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component of more than one module: a path back to its start, and all its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graphs here are far shallower than the recursion limit
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(_path_round(component, graph), sorted(component)) for component in components]


def _path_round(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest way from the component's first module back to itself, through the component."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _describe(found: list[tuple[list[str], list[str]]]) -> str:
    return "import circles: " + "; ".join(
        " -> ".join(path) + (f" (the circle joins {', '.join(members)})" if len(members) > len(path) - 1 else "")
        for path, members in found
    )


def test_env_has_no_import_circle() -> None:
    graph = import_graph(ROOT, ["env"])
    found = circles(graph)
    assert not found, _describe(found)


def test_env_never_imports_train() -> None:
    graph = import_graph(ROOT, PACKAGES)
    wrong = sorted(
        f"{a} imports {b}"
        for a, targets in graph.items()
        if a.startswith("env")
        for b in targets
        if b.split(".")[0] == "train"
    )
    assert not wrong, "env/ must not import train/: " + "; ".join(wrong)


def test_train_has_no_import_circle() -> None:
    found = circles(import_graph(ROOT, PACKAGES))
    assert not found, _describe(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_walk_finds_circles_through_every_kind_of_import(tmp_path: Path) -> None:
    """A circle made of a relative import, a function-level `from pkg import mod` and a TYPE_CHECKING import."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from .sub.b import thing\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "def thing():\n    from pkg.sub import c\n    return c\n",
            "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n",
            "pkg/d.py": "import os\nimport pkg.a\n",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.d"] == {"pkg.a"}  # the standard library is no edge
    path = ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
    assert circles(graph) == [(path, sorted(path[:-1]))]


def test_the_walk_resolves_names_to_the_module_that_holds_them(tmp_path: Path) -> None:
    """`from pkg import name` is an edge to pkg's __init__; `import pkg.mod` to pkg.mod; no circle here."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.core import VALUE\n",
            "pkg/core.py": "VALUE = 1\n",
            "pkg/user.py": "from pkg import VALUE\nimport pkg.core\n",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {"pkg": {"pkg.core"}, "pkg.core": set(), "pkg.user": {"pkg", "pkg.core"}}
    assert circles(graph) == []
