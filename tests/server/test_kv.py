"""The key-value interface behaves the same in memory and on a real etcd."""

from __future__ import annotations

import asyncio
import subprocess
import time
import typing

import grpc
import pytest
from floxide_server.embedded import EmbeddedEtcd, etcd_binary
from floxide_server.etcd import TOKEN_PREFIX, EtcdKV, crash_safe
from floxide_server.store.kv import KV, Compare, Delete, Get, KeyValue, KVUnavailable, Put, Txn

from tests.helpers import TcpProxy, eventually, free_port


async def put(kv: KV, key: bytes, value: bytes, lease: int = 0) -> int:
    return (await kv.txn(Txn([], [Put(key, value, lease)]))).revision


async def test_put_get_and_versions(kv: KV, prefix: bytes) -> None:
    key = prefix + b"a"
    assert await kv.get(key) is None
    first = await put(kv, key, b"1")
    second = await put(kv, key, b"2")
    got = await kv.get(key)
    assert got is not None
    assert (got.value, got.version, got.create_revision, got.mod_revision) == (
        b"2",
        2,
        first,
        second,
    )


async def test_compare_and_swap_runs_one_branch(kv: KV, prefix: bytes) -> None:
    key = prefix + b"counter"
    created = await kv.txn(Txn([Compare.missing(key)], [Put(key, b"0")], [Get(key)]))
    assert created.succeeded and created.responses == [None]
    again = await kv.txn(Txn([Compare.missing(key)], [Put(key, b"0")], [Get(key)]))
    assert not again.succeeded
    assert again.responses is not None
    [kvs] = again.responses
    assert [kv.value for kv in kvs] == [b"0"]  # type: ignore[attr-defined]
    got = await kv.get(key)
    assert got is not None
    swapped = await kv.txn(Txn([Compare.modified_at(key, got.mod_revision)], [Put(key, b"1")]))
    stale = await kv.txn(Txn([Compare.modified_at(key, got.mod_revision)], [Put(key, b"2")]))
    assert swapped.succeeded and not stale.succeeded
    assert (await kv.get(key)).value == b"1"  # type: ignore[union-attr]


async def test_nested_transactions_guard_each_part(kv: KV, prefix: bytes) -> None:
    a, b, c = prefix + b"a", prefix + b"b", prefix + b"c"
    await put(kv, a, b"x")
    result = await kv.txn(
        Txn(
            [],
            [
                Txn([Compare.exists(a)], [Put(b, b"ok")]),
                Txn([Compare.missing(a)], [Put(c, b"never")], [Get(a)]),
            ],
        )
    )
    assert result.succeeded and result.responses is not None
    first, second = result.responses
    assert first.succeeded and not second.succeeded  # type: ignore[attr-defined]
    assert (await kv.get(b)) is not None and await kv.get(c) is None


async def test_reads_in_a_transaction_see_its_own_writes(kv: KV, prefix: bytes) -> None:
    """Sticky completions rely on it: the claim's reads see the context written just before."""
    a, b = prefix + b"ops/a", prefix + b"ops/b"
    await put(kv, a, b"old")
    result = await kv.txn(
        Txn([], [Put(a, b"new"), Put(b, b"added"), Get(prefix + b"ops/", prefix=True)])
    )
    assert result.responses is not None
    read = typing.cast(list[KeyValue], result.responses[2])
    assert [(k.key, k.value) for k in read] == [(a, b"new"), (b, b"added")]


async def test_one_key_written_twice_in_a_branch_is_refused(kv: KV, prefix: bytes) -> None:
    key = prefix + b"dup"
    with pytest.raises(ValueError, match="duplicate key"):
        await kv.txn(Txn([], [Put(key, b"1"), Txn([], [Put(key, b"2")])]))
    assert await kv.get(key) is None


async def test_range_orders_limits_and_pages(kv: KV, prefix: bytes) -> None:
    for name in (b"b", b"a", b"d", b"c"):
        await put(kv, prefix + name, name)
    await put(kv, prefix[:-1] + b"x/outside", b"no")
    keys, _ = await kv.range(prefix)
    assert [k.value for k in keys] == [b"a", b"b", b"c", b"d"]
    page, _ = await kv.range(prefix, start=prefix + b"b", limit=2)
    assert [k.value for k in page] == [b"b", b"c"]
    newest, _ = await kv.range(prefix, reverse=True, limit=3)
    assert [k.value for k in newest] == [b"d", b"c", b"b"]
    older, _ = await kv.range(prefix, reverse=True, start=prefix + b"b")
    assert [k.value for k in older] == [b"b", b"a"]
    deleted = await kv.txn(Txn([], [Delete(prefix, prefix=True)]))
    assert deleted.responses == [4]
    assert (await kv.range(prefix))[0] == []


async def test_watch_replays_from_a_revision_then_follows(kv: KV, prefix: bytes) -> None:
    start = await put(kv, prefix + b"1", b"one")
    await kv.txn(Txn([], [Delete(prefix + b"1")]))
    seen: list[tuple[bool, bytes]] = []
    stream = kv.watch(prefix, start)

    async def collect() -> None:
        async for event in stream:
            seen.append((event.deleted, event.kv.key))
            if len(seen) == 3:
                return

    task = asyncio.create_task(collect())
    await put(kv, prefix + b"2", b"two")
    await asyncio.wait_for(task, 10)
    assert seen == [(False, prefix + b"1"), (True, prefix + b"1"), (False, prefix + b"2")]


async def test_an_expired_lease_deletes_its_keys(kv: KV, prefix: bytes) -> None:
    lease = await kv.grant(2)
    key = prefix + b"session"
    revision = await put(kv, key, b"alive", lease)
    assert await kv.keep_alive(lease) == 2
    deleted = asyncio.Event()

    async def watch() -> None:
        async for event in kv.watch(prefix, revision + 1):
            if event.deleted and event.kv.key == key:
                deleted.set()
                return

    task = asyncio.create_task(watch())
    await asyncio.wait_for(deleted.wait(), 15)  # etcd may renew a lease on leader change
    await task
    assert await kv.get(key) is None
    assert await kv.keep_alive(lease) == 0
    await kv.revoke(lease)  # idempotent


async def test_a_revoked_lease_deletes_its_keys_at_once(kv: KV, prefix: bytes) -> None:
    lease = await kv.grant(60)
    await put(kv, prefix + b"k", b"v", lease)
    await kv.revoke(lease)
    assert await kv.get(prefix + b"k") is None
    with pytest.raises(ValueError, match="lease not found"):
        await put(kv, prefix + b"k", b"v", lease)


async def test_a_lost_reply_is_applied_once_and_reported_truthfully(
    etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    """A Txn applied by etcd whose reply never arrives: no double effect, no false failure."""
    proxy = await TcpProxy(etcd.client_port).start()
    kv = EtcdKV([f"127.0.0.1:{proxy.port}", etcd.endpoint], timeout=1.0)
    key = prefix + b"counter"
    try:
        await put(kv, key, b"0")  # connects through the proxy
        got = await kv.get(key)
        assert got is not None
        proxy.blackhole = True  # etcd applies what follows; its reply is swallowed
        result = await kv.txn(Txn([Compare.modified_at(key, got.mod_revision)], [Put(key, b"1")]))
        assert result.succeeded  # not a false "compare failed" from the retry
        assert result.responses is None  # recovered from the token
        now = await kv.get(key)
        assert now is not None and (now.value, now.version) == (b"1", 2)  # applied exactly once
    finally:
        await kv.close()
        await proxy.stop()


async def test_an_unreachable_etcd_raises_unavailable() -> None:
    kv = EtcdKV([f"127.0.0.1:{free_port()}"], timeout=0.3, retry_for=1.0)
    try:
        with pytest.raises(KVUnavailable):
            await kv.ping()
    finally:
        await kv.close()


async def test_eventually_helper_fails_at_its_deadline() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match="not met within"):
        await eventually(never, within=0.1)


async def test_a_transaction_over_the_operation_limit_is_refused(kv: KV, prefix: bytes) -> None:
    with pytest.raises(ValueError, match="too many operations"):
        await kv.txn(Txn([], [Put(prefix + str(n).encode(), b"") for n in range(129)]))
    assert (await kv.range(prefix))[0] == []


async def test_time_to_live_counts_down_and_ends_with_the_lease(kv: KV, prefix: bytes) -> None:
    lease = await kv.grant(5)
    left = await kv.time_to_live(lease)
    assert left is not None and 3 <= left <= 5  # whole seconds, rounded down
    assert await kv.keep_alive(lease) == 5
    renewed = await kv.time_to_live(lease)
    assert renewed is not None and 3 <= renewed <= 5
    await kv.revoke(lease)
    assert await kv.time_to_live(lease) is None
    assert await kv.time_to_live(0x7FFF_0000_0001) is None  # never granted


async def test_time_to_live_falls_below_a_second_before_the_lease_ends(kv: KV) -> None:
    lease = await kv.grant(2)

    async def under_a_second() -> bool:
        return await kv.time_to_live(lease) == 0

    await eventually(under_a_second, within=5)

    async def ended() -> bool:
        return await kv.time_to_live(lease) is None

    await eventually(ended, within=15)  # etcd may renew a lease on leader change


async def test_a_txn_whose_replies_are_lost_for_longer_than_any_retry_stays_unknown_then_known(
    etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    """etcd applies the Txn but stays silent past the retry window: the outcome is neither
    reported as applied nor as not applied until etcd answers; then it is read back, once."""
    proxy = await TcpProxy(etcd.client_port).start()
    kv = EtcdKV([f"127.0.0.1:{proxy.port}"], timeout=0.3, retry_for=0.5)
    key = prefix + b"counter"
    try:
        await put(kv, key, b"0")
        got = await kv.get(key)
        assert got is not None
        proxy.blackhole = True
        txn = asyncio.ensure_future(
            kv.txn(Txn([Compare.modified_at(key, got.mod_revision)], [Put(key, b"1")]))
        )
        done, _ = await asyncio.wait([txn], timeout=3.0)  # six retry windows
        assert not done, "an unknown outcome was reported as known"
        proxy.blackhole = False
        result = await asyncio.wait_for(txn, 30)
        assert result.succeeded and result.responses is None  # read back through its token
        now = await kv.get(key)
        assert now is not None and (now.value, now.version) == (b"1", 2)  # applied once
    finally:
        await kv.close()
        await proxy.stop()


async def test_tokens_are_on_no_lease_and_deleted_once_their_outcome_is_read(
    etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    kv = EtcdKV([etcd.endpoint])
    try:
        before, _ = await kv.range(TOKEN_PREFIX)
        for n in range(5):
            await put(kv, prefix + b"k", str(n).encode())
        tokens, _ = await kv.range(TOKEN_PREFIX)
        mine = [t for t in tokens if t not in before]
        assert len(mine) == 1 and mine[0].lease == 0  # the last one's, until the next request
    finally:
        await kv.close()


async def test_tokens_a_day_old_are_swept_and_newer_ones_kept(
    own_etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    kv = EtcdKV([own_etcd.endpoint])
    day_old = TOKEN_PREFIX + f"{int((time.time() - 86_401) * 1000):013d}-dead".encode()
    recent = TOKEN_PREFIX + f"{int((time.time() - 3_600) * 1000):013d}-slow".encode()
    starting = EtcdKV([own_etcd.endpoint])  # a process that starts: it sweeps first
    try:
        await kv.txn(Txn([], [Put(day_old, b"1"), Put(recent, b"1")]))
        await starting.txn(Txn([], [Put(prefix + b"k", b"v")]))
        await eventually(lambda: _missing(kv, day_old), within=10)
        assert await kv.get(recent) is not None
    finally:
        await kv.close()
        await starting.close()


async def _missing(kv: KV, key: bytes) -> bool:
    return await kv.get(key) is None


async def test_a_keep_alive_whose_connection_is_cut_is_retried(
    etcd: EmbeddedEtcd,
) -> None:
    proxy = await TcpProxy(etcd.client_port).start()
    kv = EtcdKV([f"127.0.0.1:{proxy.port}"], timeout=1.0, retry_for=5.0)
    try:
        lease = await kv.grant(10)
        for _ in range(20):  # links cut while keep-alives are in flight
            renewing = asyncio.ensure_future(kv.keep_alive(lease))
            await asyncio.sleep(0.001)
            proxy.cut()
            assert await asyncio.wait_for(renewing, 30) == 10  # retried, not failed
    finally:
        await kv.close()
        await proxy.stop()


async def test_a_txn_as_wide_as_etcd_allows_is_not_crowded_out_by_spent_tokens(
    etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    """Spent tokens are deleted with the next request only where etcd's --max-txn-ops (128,
    which nested Txns share with their parents) leaves room."""
    kv = EtcdKV([etcd.endpoint])
    try:
        before = {t.key for t in (await kv.range(TOKEN_PREFIX))[0]}
        await put(kv, prefix + b"first", b"1")  # its token is spent: deleted with the next
        wide = Txn([], [Put(prefix + b"%03d" % n, b"v") for n in range(126)])
        assert (await kv.txn(wide)).succeeded  # 126 writes and its token's: the most there is
        await put(kv, prefix + b"after", b"1")  # and the spent tokens go then
        tokens, _ = await kv.range(TOKEN_PREFIX)
        assert len([t for t in tokens if t.key not in before]) == 1  # the last one's
    finally:
        await kv.close()


async def test_calls_on_a_dropped_wedged_connection_fail_over_not_cancel(
    etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    """A call past its deadline drops its connection; a watch on that connection is moved to
    another, not ended by grpc's CancelledError."""
    proxy = await TcpProxy(etcd.client_port).start()
    kv = EtcdKV([f"127.0.0.1:{proxy.port}", etcd.endpoint], timeout=0.5, retry_for=5.0)
    key = prefix + b"watched"
    seen: list[bytes] = []
    try:
        _, revision = await kv.range(prefix)  # connects through the proxy

        async def follow() -> None:
            async for event in kv.watch(prefix, revision + 1):
                seen.append(event.kv.value)

        async with asyncio.TaskGroup() as tasks:
            watching = tasks.create_task(follow())
            proxy.blackhole = True
            assert await kv.get(key) is None  # past its deadline there: dropped, then etcd
            await asyncio.sleep(1.0)  # the dropped connection's grace: its watch is closed
            await put(kv, key, b"after")
            await eventually(lambda: _seen(seen, b"after"), within=10)
            assert not watching.done()
            watching.cancel()
    finally:
        proxy.blackhole = False
        await kv.close()
        await proxy.stop()


async def _seen(seen: list[bytes], value: bytes) -> bool:
    return value in seen


async def test_a_refusal_after_an_unknown_outcome_is_not_taken_for_not_applied(
    etcd: EmbeddedEtcd, prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once an attempt's outcome is unknown, only a reply ends the wait: a retry refused for
    load (etcd's RESOURCE_EXHAUSTED "too many requests") is tried again, not reported."""
    kv = EtcdKV([etcd.endpoint])
    attempts: list[str] = []
    real = kv._call

    async def overloaded(make: typing.Any) -> typing.Any:
        if not attempts:
            attempts.append("unknown")
            raise KVUnavailable("etcd unreachable: Deadline Exceeded")
        if len(attempts) == 1:
            attempts.append("refused")
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "etcdserver: too many requests",
            )
        attempts.append("answered")
        return await real(make)

    try:
        monkeypatch.setattr(kv, "_call", overloaded)
        result = await kv.txn(Txn([], [Put(prefix + b"k", b"v")]))
        assert result.succeeded  # read back through its token, after the refusal
        assert attempts[:3] == ["unknown", "refused", "answered"]  # (then the token sweep's)
    finally:
        await kv.close()


@pytest.mark.parametrize(
    ("version", "safe"),
    [("3.5.0", False), ("3.5.1", False), ("3.5.2", False), ("3.5.3", True), ("3.5.17", True),
     ("3.4.23", True), ("3.6.0", True), ("3.6.0-rc.1", True), ("unknown", True)],
)  # fmt: skip
def test_crash_safe_names_the_versions_that_can_lose_applied_writes(
    version: str, safe: bool
) -> None:
    assert crash_safe(version) is safe


async def test_version_is_the_answering_members(etcd: EmbeddedEtcd) -> None:
    kv = EtcdKV([etcd.endpoint])
    try:
        version = await kv.version()
    finally:
        await kv.close()
    binary = str(etcd.binary or etcd_binary())
    said = (
        await asyncio.to_thread(
            subprocess.run, [binary, "--version"], capture_output=True, text=True, check=True
        )
    ).stdout
    assert f"etcd Version: {version}\n" in said
