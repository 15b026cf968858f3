"""The generated code matches proto/, and buf guards the contracts' style and compatibility."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import Runner

WORK_ITEM = Path("proto/floxide/v1/work_item.proto")


def _renumber_run_id(top: Path) -> None:
    """Mutate a copy: move WorkItem.run_id from field 2 to field 20."""
    proto = top / WORK_ITEM
    text = proto.read_text()
    mutated, count = re.subn(
        r"(message WorkItem \{.*?string run_id = )2;", r"\g<1>20;", text, count=1, flags=re.S
    )
    assert count == 1, "the mutation found no WorkItem.run_id to renumber"
    proto.write_text(mutated)


def test_committed_code_is_what_the_protos_generate(run: Runner, python: str) -> None:
    result = run(python, "scripts/gen_protos.py", "--check")
    assert result.returncode == 0, result.stderr


def test_regeneration_check_catches_a_changed_field_number(
    run: Runner, python: str, proto_copy: Path
) -> None:
    _renumber_run_id(proto_copy)
    result = run(python, "scripts/gen_protos.py", "--check", "--proto-root", proto_copy / "proto")
    assert result.returncode == 1
    assert "changed: floxide/v1/work_item_pb2.py" in result.stderr


def test_generated_imports_use_the_package_path(repo_root: Path) -> None:
    generated = sorted((repo_root / "floxide_grpc/_proto").rglob("*.py*"))
    assert generated, "no generated code found"
    for path in generated:
        for line in path.read_text().splitlines():
            assert not re.match(r"\s*(from|import) floxide\.v1\b", line), f"{path}: {line}"


def test_buf_lint_passes(run: Runner, buf: Path) -> None:
    result = run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_an_undocumented_field(run: Runner, buf: Path, proto_copy: Path) -> None:
    proto = proto_copy / WORK_ITEM
    text = proto.read_text()
    proto.write_text(text.replace("  // The run this item belongs to.\n", "", 1))
    result = run(buf, "lint", cwd=proto_copy)
    assert result.returncode != 0
    assert "COMMENT_FIELD" in result.stdout or "comment" in result.stdout.lower(), result.stdout


def test_buf_breaking_passes_against_the_baseline(run: Runner, buf: Path) -> None:
    result = run(buf, "breaking", "--against", "proto/baseline.binpb")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_changed_field_number(
    run: Runner, buf: Path, repo_root: Path, proto_copy: Path
) -> None:
    _renumber_run_id(proto_copy)
    result = run(buf, "breaking", "--against", repo_root / "proto/baseline.binpb", cwd=proto_copy)
    assert result.returncode != 0
    assert 'field "2" with name "run_id" on message "WorkItem" was deleted' in result.stdout, (
        result.stdout
    )


def test_buf_breaking_accepts_a_new_field(
    run: Runner, buf: Path, repo_root: Path, proto_copy: Path
) -> None:
    proto = proto_copy / WORK_ITEM
    text = proto.read_text()
    addition = (
        "  string join_group_id = 12;\n  // A field added later.\n  string added_later = 99;\n"
    )
    proto.write_text(text.replace("  string join_group_id = 12;\n", addition, 1))
    result = run(buf, "breaking", "--against", repo_root / "proto/baseline.binpb", cwd=proto_copy)
    assert result.returncode == 0, result.stdout + result.stderr
