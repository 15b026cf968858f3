"""The storage-format version in etcd, and the storage messages of format 1.

The format key is the whole cluster's, so these tests run on an etcd of their own (emptied before
each test), never on the session's shared one.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from floxide_server._proto.floxide.storage.v1 import storage_pb2
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import TOKEN_PREFIX, EtcdKV
from floxide_server.store.format import STORAGE_FORMAT, StorageFormatMismatch, ensure_format
from floxide_server.store.keys import NAMESPACES, STORAGE_FORMAT_KEY, Keys
from floxide_server.store.kv import KV, Delete, KeyValue, MemoryKV, Put, Txn
from floxide_server.store.records import now_ms

from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, work_item_pb2, worker_service_pb2
from floxide_grpc.errors import FailedPrecondition
from tests.helpers import free_port

OTHER = b"1"  # the format before live markers


@pytest.fixture(scope="module")
def format_etcd() -> Iterator[EmbeddedEtcd]:
    """An etcd for this module alone: the format key is global."""
    server = EmbeddedEtcd(client_port=free_port(), peer_port=free_port(), name="format")
    try:
        yield server.start()
    finally:
        server.stop()


async def contents(kv: KV) -> list[KeyValue]:
    """Every key but the etcd client's transaction tokens."""
    found, _ = await kv.range(b"/")
    return [k for k in found if not k.key.startswith(TOKEN_PREFIX)]


async def _empty(endpoint: str) -> None:
    kv = EtcdKV([endpoint])
    try:
        for found in await contents(kv):  # (a Txn may not delete its own token's range)
            await kv.txn(Txn([], [Delete(found.key)]))
    finally:
        await kv.close()


@pytest.fixture
async def empty_etcd(format_etcd: EmbeddedEtcd) -> EmbeddedEtcd:
    """The module's etcd, emptied."""
    await _empty(format_etcd.endpoint)
    return format_etcd


@pytest.fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[KV]:
    """An empty store: in memory, or the module's etcd."""
    kv: KV
    if request.param == "memory":
        kv = MemoryKV()
    else:
        endpoint = request.getfixturevalue("format_etcd").endpoint
        await _empty(endpoint)
        kv = EtcdKV([endpoint])
    try:
        yield kv
    finally:
        await kv.close()


async def test_ensure_format_writes_it_once_and_accepts_it_after(store: KV) -> None:
    await asyncio.gather(ensure_format(store), ensure_format(store))  # replicas starting together
    written = await store.get(STORAGE_FORMAT_KEY)
    assert written is not None and written.value == str(STORAGE_FORMAT).encode() == b"4"
    await ensure_format(store)
    assert await store.get(STORAGE_FORMAT_KEY) == written  # not rewritten


async def test_ensure_format_refuses_another_one_and_changes_nothing(store: KV) -> None:
    await store.txn(Txn([], [Put(STORAGE_FORMAT_KEY, OTHER)]))
    before = await contents(store)
    with pytest.raises(StorageFormatMismatch) as raised:
        await ensure_format(store)
    assert isinstance(raised.value, FailedPrecondition)
    assert "etcd holds storage format 1" in str(raised.value)
    assert "this server reads and writes storage format 4" in str(raised.value)
    assert await contents(store) == before


async def test_format_2_timers_are_migrated_to_delays_once(store: KV) -> None:
    keys = Keys("migrating")
    item = work_item_pb2.WorkItem(run_id="r", item_id="i", node="n", attempt=2)
    due = now_ms() + 60_000
    old = keys.timer() + f"{due:013d}/r/i".encode()
    await store.txn(
        Txn(
            [],
            [
                Put(STORAGE_FORMAT_KEY, b"2"),
                Put(NAMESPACES + b"migrating", b""),
                Put(old, item.SerializeToString()),
            ],
        )
    )
    await asyncio.gather(ensure_format(store), ensure_format(store))  # replicas starting together
    assert (await store.get(STORAGE_FORMAT_KEY)).value == b"4"  # type: ignore[union-attr]
    assert await store.get(old) is None
    [timer] = (await store.range(keys.timer()))[0]
    assert timer.key == keys.timer("r", "i")
    record = storage_pb2.TimerRecord.FromString(timer.value)
    assert record.item == item and record.run_id == "r" and not record.seen_at
    assert 55_000 <= record.delay_ms <= 60_000  # what was left of it


async def test_a_format_3_keyspace_is_taken_as_format_4(store: KV) -> None:
    """Format 4 changes what a claim key holds (its whole token): format-3 claims are those of
    sessions of stopped replicas, released as their leases end; nothing is rewritten."""
    claim = Keys("migrating").claim(0x1F, "r", "i")
    await store.txn(Txn([], [Put(STORAGE_FORMAT_KEY, b"3"), Put(claim, b"1")]))
    await ensure_format(store)
    assert (await store.get(STORAGE_FORMAT_KEY)).value == b"4"  # type: ignore[union-attr]
    assert (await store.get(claim)).value == b"1"  # type: ignore[union-attr]


async def test_a_server_records_the_format_and_a_second_start_accepts_it(
    empty_etcd: EmbeddedEtcd,
) -> None:
    kv = EtcdKV([empty_etcd.endpoint])
    try:
        seen = []
        for _ in range(2):
            server = Server(kv, ServerConfig(port=0))
            try:
                assert await server.start()
                seen.append(await kv.get(STORAGE_FORMAT_KEY))
            finally:
                await server.stop()
        first, second = seen
        assert first is not None and first.value == b"4"
        assert second == first  # the second start read it and wrote nothing
    finally:
        await kv.close()


async def test_a_server_on_another_format_does_not_start(empty_etcd: EmbeddedEtcd) -> None:
    kv = EtcdKV([empty_etcd.endpoint])
    try:
        await kv.txn(Txn([], [Put(STORAGE_FORMAT_KEY, OTHER)]))
        before = await contents(kv)
        server = Server(kv, ServerConfig(port=0))
        with pytest.raises(StorageFormatMismatch, match=r"storage format 1 .* storage format 4"):
            await server.start()
        assert server.port == 0  # refused before binding
        await server.stop()
        assert await contents(kv) == before
    finally:
        await kv.close()


async def test_floxide_server_on_another_format_exits_with_one_line(
    empty_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    kv = EtcdKV([empty_etcd.endpoint])
    try:
        await kv.txn(Txn([], [Put(STORAGE_FORMAT_KEY, OTHER)]))
    finally:
        await kv.close()
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "floxide-server"),
        *("--etcd", empty_etcd.endpoint, "--port", "0", "--ready-file", str(tmp_path / "ready")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    stderr = err.decode()
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if "storage format" in line]
    assert line == (
        "error: etcd holds storage format 1 at /floxide/v1/storage-format, but this server reads "
        "and writes storage format 4: run a server of format 1, or migrate the data"
    )
    assert not (tmp_path / "ready").exists()


# -- the storage messages read what format 1 stored before them ---------------------------------


def _operation() -> work_item_pb2.ContextOperation:
    return work_item_pb2.ContextOperation(
        field="seen",
        strategy=work_item_pb2.MERGE_STRATEGY_EVENT_LOG,
        value=work_item_pb2.Payload(encoding=work_item_pb2.ENCODING_JSON, data=b"1"),
        event_id="e1",
    )


def test_context_operations_records_read_as_step_results_stored_them() -> None:
    for before, now in [
        (  # a step's operations
            worker_service_pb2.StepResult(
                run_id="r", item_id="i", attempt=3, context_operations=[_operation()]
            ),
            storage_pb2.ContextOperationsRecord(
                run_id="r", item_id="i", attempt=3, operations=[_operation()]
            ),
        ),
        (  # operations applied through the store services
            worker_service_pb2.StepResult(run_id="r", context_operations=[_operation()]),
            storage_pb2.ContextOperationsRecord(run_id="r", operations=[_operation()]),
        ),
    ]:
        assert before.SerializeToString() == now.SerializeToString()
        assert storage_pb2.ContextOperationsRecord.FromString(before.SerializeToString()) == now


def test_expansion_records_read_as_checkpoints_stored_them() -> None:
    items = [
        work_item_pb2.WorkItem(namespace="default", run_id="r", item_id=f"i{n}", node="branch")
        for n in range(3)
    ]
    before = checkpoint_pb2.Checkpoint(namespace="default", run_id="r", pending=items)
    now = storage_pb2.ExpansionRecord(namespace="default", run_id="r", items=items)
    assert before.SerializeToString() == now.SerializeToString()
    assert storage_pb2.ExpansionRecord.FromString(before.SerializeToString()) == now
