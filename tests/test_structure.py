"""The package's structure, read from its source: imports go one way, underscore names stay in
their module, and no module outgrows one reader's head. No SSH host needed."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dask_lazycluster"
MAX_LINES = 500
# The harness is a separate tool (it must import without the package): its modules may use
# each other's helpers, and the remote modules run as a separate package on the hosts.
SEPARATE = ("testing",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """Every package module ``name`` imports anywhere (functions and TYPE_CHECKING included),
    with the names it takes from it."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else \
        name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dask_lazycluster"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("dask_lazycluster"):
                names = [a.name for a in node.names]
                # "from pkg import module" imports the module
                sub = [f"{target}.{n}" for n in names if f"{target}.{n}" in ALL]
                yield target, [n for n in names if f"{target}.{n}" not in ALL]
                for s in sub:
                    yield s, []


ALL = modules()
pytestmark = pytest.mark.parametrize("tree_modules", [ALL], ids=["package"])


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in ALL}
    for name, tree in ALL.items():
        for target, _ in imported(name, tree):
            if target in ALL and target != name:
                edges[name].add(target)
    return edges


def test_imports_form_no_cycle(tree_modules: dict[str, ast.Module]) -> None:
    edges = graph()
    assert edges["dask_lazycluster.cluster.dask_cluster"], "the walk must see imports"
    # A package's __init__ importing its own submodules is how re-exports work, not a layer
    # going upward; any other edge must keep the graph acyclic.
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append([*path[path.index(node):], node])
            return
        if node in done:
            return
        for nxt in sorted(edges[node]):
            if node.endswith(("dask_lazycluster", "cluster", "testing", "remote")) and \
                    nxt.startswith(node + "."):
                continue
            visit(nxt, [*path, node])
        done.add(node)

    for name in sorted(edges):
        visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def defined_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: functions, classes, attributes set on self."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_uses_another_modules_underscore_names(
        tree_modules: dict[str, ast.Module]) -> None:
    own = {name: defined_names(tree) for name, tree in ALL.items()}
    ours = set().union(*own.values())
    found = []
    for name, tree in ALL.items():
        if name.split(".")[1:2] and name.split(".")[1] in SEPARATE:
            continue
        for target, names in imported(name, tree):
            found += [f"{name} imports {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") \
                    or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super":
                continue  # super()._x(): the class's own method, from a base
            if node.attr in ours and node.attr not in own[name]:
                found.append(f"{name}:{node.lineno} uses .{node.attr}")
    assert len(own["dask_lazycluster._core"]) > 0  # the walk must see definitions
    assert not found, "underscore names used outside their module:\n" + "\n".join(found)


def test_no_module_is_over_500_lines(tree_modules: dict[str, ast.Module]) -> None:
    sizes = {p.relative_to(PACKAGE.parent): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) > 100  # the walk must see the modules
    over = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_the_architecture_page_maps_every_module(tree_modules: dict[str, ast.Module]) -> None:
    """docs/architecture.md's module map names every module of the package (the harness and the
    remote package are listed as directories or one by one)."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    tree = page.split("```text\ndask_lazycluster/\n", 1)[1].split("```", 1)[0]
    listed = set(re.findall(r"^\s+([\w/]+(?:\.py)?)", tree, re.M))
    missing = []
    for name in tree_modules:
        parts = name.split(".")[1:]
        if not parts or parts[0] in SEPARATE or parts[-1] == "__main__":
            continue
        relative = Path(*parts).with_suffix(".py")
        if relative.name not in listed and f"{relative.name[:-3]}/" not in listed:
            missing.append(str(relative))
    assert "testing/" in listed
    assert not missing, f"modules missing from the architecture page's map: {missing}"


def test_remote_code_imports_only_the_standard_library_at_module_level(
        tree_modules: dict[str, ast.Module]) -> None:
    """The hosts need no dask-lazycluster and may lack distributed: remote/ runs as its own
    package, so its modules import each other relatively and nothing else at import time."""
    remote = {name: tree for name, tree in tree_modules.items()
              if name.startswith("dask_lazycluster.remote")}
    assert len(remote) >= 4
    bad = []
    for name, tree in remote.items():
        for node in tree.body:
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                tops = [] if node.level else [(node.module or "").split(".")[0]]
            else:
                continue
            bad += [f"{name}: {top}" for top in tops
                    if top not in sys.stdlib_module_names and top != "__future__"]
    assert not bad, f"remote modules importing outside the standard library: {bad}"
