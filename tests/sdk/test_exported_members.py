"""The public surface is pinned: each public package's ``__all__`` is exactly what it defines or
re-exports under a public name (submodules excluded), as httpx's ``test_exported_members.py``
checks, so nothing becomes API by accident and nothing exported goes missing."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import floxide_server
import floxide_worker
import pytest

import floxide_grpc

PACKAGES = [floxide_grpc, floxide_worker, floxide_server]
EXPORTED_PRIVATE = {"__version__"}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_every_public_name_and_only_those(package: types.ModuleType) -> None:
    public = sorted(
        name
        for name, value in vars(package).items()
        if (not name.startswith("_") or name in EXPORTED_PRIVATE)
        and not isinstance(value, types.ModuleType)
    )
    assert sorted(package.__all__) == public


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_module_declares_all_and_has_each_name(package: types.ModuleType) -> None:
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), info.name
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.{name}"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that a module imports when loaded (not for type checking).

    ``from floxide_grpc import Workflow`` needs the package's ``__init__``; ``from floxide_grpc
    import _codec`` needs only that submodule.
    """
    found: set[str] = set()
    for statement in ast.parse(path.read_text()).body:  # top level: what runs at import
        if isinstance(statement, ast.ImportFrom) and statement.module in modules:
            for alias in statement.names:
                submodule = f"{statement.module}.{alias.name}"
                found.add(submodule if submodule in modules else statement.module)
        elif isinstance(statement, ast.Import):
            found |= {alias.name for alias in statement.names}
    return found & modules


def test_the_sdk_has_no_import_cycle() -> None:
    """Each module can be imported first: none needs another that needs it back (imports for
    type checking aside, which never run)."""
    root = Path(floxide_grpc.__file__).parent
    paths = {
        ".".join(("floxide_grpc", *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        ): path
        for path in root.rglob("*.py")
        if "_proto" not in path.parts
    }
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join((*trail[trail.index(name) :], name))
        for imported in sorted(graph[name]):
            visit(imported, (*trail, name))

    for name in sorted(graph):
        visit(name, ())
