"""Load workflows from user code: ``path/to/file.py[:NAME]`` or ``package.module[:NAME]``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from floxide_grpc.errors import InvalidArgument, WorkflowNotFound
from floxide_grpc.workflow import Workflow

__all__ = ["load_module", "load_workflows"]


def load_module(where: str) -> ModuleType:
    """Import a module by dotted name, or a Python file by path.

    Raises:
        InvalidArgument: it cannot be found or imported.
    """
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.exists():
                raise InvalidArgument(f"no Python file at {where}")
            name = f"floxide_user_{path.stem}"
            if name in sys.modules:
                return sys.modules[name]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise InvalidArgument(f"cannot load {where}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses resolve their annotations through it
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(where)
    except ImportError as exc:
        raise InvalidArgument(f"cannot import {where}: {exc}") from exc


def load_workflows(target: str) -> list[Workflow]:
    """The workflow ``NAME`` of a module or file, or, without ``:NAME``, every one it defines.

    Raises:
        InvalidArgument: the module cannot be imported.
        WorkflowNotFound: it has no such workflow (or none at all).
    """
    where, _, attribute = target.partition(":")
    module = load_module(where)
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, Workflow):
            raise WorkflowNotFound(f"{where} has no Workflow named {attribute!r}")
        return [found]
    workflows = [v for v in vars(module).values() if isinstance(v, Workflow)]
    if not workflows:
        raise WorkflowNotFound(f"{where} defines no Workflow")
    return list({id(w): w for w in workflows}.values())
