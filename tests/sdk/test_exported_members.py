"""The public surface is pinned: each public package's ``__all__`` is exactly what it defines or
re-exports under a public name (submodules excluded), as httpx's ``test_exported_members.py``
checks, so nothing becomes API by accident and nothing exported goes missing."""

from __future__ import annotations

import importlib
import pkgutil
import types

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
