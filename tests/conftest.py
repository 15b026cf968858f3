"""Shared fixtures: the repository's paths and its build tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top directory."""
    return ROOT


@pytest.fixture(scope="session")
def buf() -> Path:
    """buf, as installed by ``npm ci`` from package-lock.json. A missing buf fails, never skips."""
    path = ROOT / "node_modules" / ".bin" / "buf"
    if not path.exists():
        pytest.fail("buf is not installed: run `npm ci` in the repository (scripts/test does)")
    return path


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of proto/ and buf.yaml in a temporary directory, to mutate; returns the copy's top."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def run() -> Runner:
    """Run a command to completion, capturing its output as text."""

    def _run(
        *args: str | Path, cwd: Path = ROOT, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return _run


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (the project's virtual environment)."""
    return sys.executable
