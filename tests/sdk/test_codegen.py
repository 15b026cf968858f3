"""The generated code matches proto/, and buf guards the contracts' style and compatibility."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from floxide_grpc._proto.floxide.v1 import work_item_pb2
from tests.conftest import Runner

WORK_ITEM = Path("proto/floxide/v1/work_item.proto")
STORAGE = Path("proto/floxide/storage/v1/storage.proto")
PUBLIC_TREE = Path("floxide_grpc/_proto")
SERVER_TREE = Path("server/floxide_server/_proto")


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


def test_regeneration_check_catches_a_changed_storage_field(
    run: Runner, python: str, proto_copy: Path
) -> None:
    proto = proto_copy / STORAGE
    text = proto.read_text()
    mutated = text.replace(
        "repeated floxide.v1.WorkItem items = 6;", "repeated floxide.v1.WorkItem items = 7;"
    )
    assert mutated != text, "the mutation found no ExpansionRecord.items to renumber"
    proto.write_text(mutated)
    result = run(python, "scripts/gen_protos.py", "--check", "--proto-root", proto_copy / "proto")
    assert result.returncode == 1
    assert result.stderr.splitlines()[:-1] == [
        "server/floxide_server/_proto changed: floxide/storage/v1/storage_pb2.py"
    ], result.stderr


@pytest.mark.parametrize("tree", [PUBLIC_TREE, SERVER_TREE])
def test_generated_imports_use_the_package_path(repo_root: Path, tree: Path) -> None:
    generated = sorted((repo_root / tree).rglob("*.py*"))
    assert generated, "no generated code found"
    for path in generated:
        for line in path.read_text().splitlines():
            assert not re.match(r"\s*(from|import) floxide\.", line), f"{path}: {line}"


def test_storage_code_is_the_servers_alone(repo_root: Path) -> None:
    from floxide_server._proto.floxide.storage.v1 import storage_pb2  # noqa: PLC0415

    assert not (repo_root / PUBLIC_TREE / "floxide" / "storage").exists()
    for path in (repo_root / PUBLIC_TREE).rglob("*.py*"):
        assert "floxide_server" not in path.read_text(), path
    assert storage_pb2.ExpansionRecord.DESCRIPTOR.full_name == "floxide.storage.v1.ExpansionRecord"
    # The contracts it uses are the public tree's, one descriptor for both.
    items = storage_pb2.ExpansionRecord.DESCRIPTOR.fields_by_name["items"].message_type
    assert items is work_item_pb2.WorkItem.DESCRIPTOR


def test_a_contract_may_not_import_a_storage_proto(
    run: Runner, python: str, proto_copy: Path
) -> None:
    proto = proto_copy / "proto/floxide/v1/workflow.proto"
    text = proto.read_text()
    text = text.replace(
        'import "floxide/v1/work_item.proto";',
        'import "floxide/storage/v1/storage.proto";\nimport "floxide/v1/work_item.proto";',
        1,
    )
    text += "message Leak {\n  floxide.storage.v1.ExpansionRecord record = 1;\n}\n"
    proto.write_text(text)
    result = run(python, "scripts/gen_protos.py", "--check", "--proto-root", proto_copy / "proto")
    assert result.returncode != 0
    assert "floxide.v1 must not import floxide.storage.v1" in result.stderr, result.stderr


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
