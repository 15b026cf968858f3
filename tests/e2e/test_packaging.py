"""One distribution: its packages, console scripts, public names and import direction."""

from __future__ import annotations

import ast
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import floxide_grpc
from tests.conftest import Runner

# Who may import whom: server -> floxide_grpc <- worker.
FORBIDDEN = {
    "floxide_grpc": {"floxide_server", "floxide_worker"},
    "server": {"floxide_worker"},
    "worker": {"floxide_server"},
}
# Only the server talks to etcd.
ETCD_CLIENTS = {"aetcd", "etcd3aio", "etcd3"}


def test_server_and_worker_install_under_their_package_names(repo_root: Path) -> None:
    import floxide_server  # noqa: PLC0415
    import floxide_worker  # noqa: PLC0415

    assert Path(floxide_server.__file__).parent == repo_root / "server" / "floxide_server"
    assert Path(floxide_worker.__file__).parent == repo_root / "worker" / "floxide_worker"


def test_no_generic_top_level_packages(repo_root: Path) -> None:
    config = tomllib.loads((repo_root / "pyproject.toml").read_text())
    found = config["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["floxide_grpc*", "floxide_server*", "floxide_worker*"]
    assert not (repo_root / "server" / "__init__.py").exists()
    assert not (repo_root / "worker" / "__init__.py").exists()


def test_the_wheel_ships_both_generated_trees(run: Runner, repo_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the code
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("floxide_grpc", "server", "worker"):
        shutil.copytree(repo_root / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo_root / name, source / name)
    result = run(
        sys.executable,
        *("-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"),
        *("--wheel-dir", tmp_path / "dist", source),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for generated in (
        "floxide_grpc/_proto/floxide/v1/work_item_pb2.py",
        "floxide_grpc/_proto/floxide/v1/work_item_pb2.pyi",
        "floxide_server/_proto/floxide/storage/v1/__init__.py",
        "floxide_server/_proto/floxide/storage/v1/storage_pb2.py",
        "floxide_server/_proto/floxide/storage/v1/storage_pb2.pyi",
    ):
        assert generated in names, generated
    assert not [n for n in names if n.startswith("floxide_grpc/_proto/floxide/storage")]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("directory", sorted(FORBIDDEN))
def test_imports_run_one_way(repo_root: Path, directory: str) -> None:
    forbidden = FORBIDDEN[directory] | (ETCD_CLIENTS if directory != "server" else set())
    for path in sorted((repo_root / directory).rglob("*.py")):
        wrong = _imported_modules(path) & forbidden
        assert not wrong, f"{path.relative_to(repo_root)} imports {sorted(wrong)}"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("floxide", ["version"], f"floxide-grpc {floxide_grpc.__version__} (protocol 1)"),
        ("floxide-server", ["--version"], f"floxide-server {floxide_grpc.__version__}"),
        ("floxide-worker", ["--version"], f"floxide-worker {floxide_grpc.__version__}"),
    ],
)
def test_console_scripts_are_installed(
    run: Runner, script: str, args: list[str], expected: str
) -> None:
    result = run(Path(sys.executable).parent / script, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_public_modules_declare_all() -> None:
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    for info in pkgutil.walk_packages(floxide_grpc.__path__, "floxide_grpc."):
        if "._proto" in info.name or info.name.endswith(".cli"):
            continue
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), info.name
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.{name}"
