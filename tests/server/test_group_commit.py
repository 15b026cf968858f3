"""Group commit: concurrent transactions share one etcd request, and each keeps its own fate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.group_commit import Footprint
from floxide_server.store.kv import Compare, Delete, Get, Put, Txn

from tests.helpers import TcpProxy


def footprint(*requests: Put | Delete | Get, compares: tuple[Compare, ...] = ()) -> Footprint:
    return Footprint.of(Txn(list(compares), list(requests)))


def test_footprints_conflict_when_one_writes_what_the_other_touches() -> None:
    put_a = footprint(Put(b"/r/1/a", b""))
    assert put_a.conflicts(footprint(Put(b"/r/1/a", b"")))
    assert put_a.conflicts(footprint(compares=(Compare.exists(b"/r/1/a"),)))
    assert put_a.conflicts(footprint(Get(b"/r/1/", prefix=True)))  # a prefix read covers it
    assert put_a.conflicts(footprint(Delete(b"/r/", prefix=True)))
    assert footprint(Delete(b"/r/1/", prefix=True)).conflicts(footprint(Get(b"/r/1/x/", True)))
    assert footprint(Delete(b"/r/1/x/", prefix=True)).conflicts(footprint(Get(b"/r/", True)))
    assert not put_a.conflicts(footprint(Put(b"/r/1/b", b""), Get(b"/r/2/", prefix=True)))
    assert not put_a.conflicts(footprint(Get(b"/r/1/a/", prefix=True)))  # only below the key
    reads = footprint(Get(b"/r/1/a"), compares=(Compare.exists(b"/s/1"),))
    assert not reads.conflicts(footprint(Get(b"/r/1/a"), compares=(Compare.exists(b"/s/1"),)))
    odd = footprint(Get(b"/r/1/a", prefix=True))  # a prefix not ending in "/"
    assert odd.conflicts(footprint(Put(b"/q", b"")))


def test_settling_a_queue_and_a_range_compare_keep_their_txns_apart() -> None:
    """etcd refuses a request in which one Txn empties a prefix another puts under; and a
    range compare sees the state before the whole request: each must go alone."""
    emptied = footprint(Delete(b"/ns/queue/r1/", prefix=True))
    assert emptied.conflicts(footprint(Put(b"/ns/queue/r1/item", b"")))
    assert not emptied.conflicts(footprint(Put(b"/ns/queue/r2/item", b"")))
    last = footprint(compares=(Compare.none_in(b"/ns/run/r1/live/", b"/ns/run/r1/live/a"),))
    assert last.conflicts(footprint(Delete(b"/ns/run/r1/live/b")))
    assert not last.conflicts(footprint(Delete(b"/ns/run/r2/live/b")))


@pytest.fixture
async def kv(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdKV]:
    store = EtcdKV([etcd.endpoint])
    yield store
    await store.close()


async def test_concurrent_transactions_are_batched_and_each_is_guarded_alone(
    kv: EtcdKV, prefix: bytes
) -> None:
    keys = [prefix + f"k{n:02}".encode() for n in range(40)]
    await kv.txn(Txn([], [Put(k, b"taken") for k in keys[::2]]))  # even keys exist already
    before = kv.group_commit.batches
    results = await asyncio.gather(
        *(kv.txn(Txn([Compare.missing(k)], [Put(k, b"mine")], [Get(k)])) for k in keys)
    )
    assert [r.succeeded for r in results] == [n % 2 == 1 for n in range(40)]
    assert len({r.revision for r in results}) < 40  # several shared a request
    assert kv.group_commit.batches - before < 40
    for n, result in enumerate(results):
        if n % 2 == 0:  # the failure branch ran, with its own read
            assert result.responses is not None
            assert [got.value for got in result.responses[0]] == [b"taken"]  # type: ignore[attr-defined]
    found, _ = await kv.range(prefix)
    assert [f.value for f in found] == [b"taken" if n % 2 == 0 else b"mine" for n in range(40)]


async def test_a_transaction_sees_what_an_earlier_one_wrote(kv: EtcdKV, prefix: bytes) -> None:
    """Each step of a chain is guarded by the key the step before writes: submitted at once,
    they still apply in order, never in one request whose compares all read the old state.
    """
    links = [prefix + f"link{n:02}".encode() for n in range(11)]
    await kv.txn(Txn([], [Put(links[0], b"")]))
    steps = [kv.txn(Txn([Compare.exists(links[n])], [Put(links[n + 1], b"")])) for n in range(10)]
    results = await asyncio.gather(*steps)
    assert [r.succeeded for r in results] == [True] * 10
    assert len((await kv.range(prefix))[0]) == 11


async def test_a_bad_transaction_fails_alone_in_its_batch(kv: EtcdKV, prefix: bytes) -> None:
    good = [kv.txn(Txn([], [Put(prefix + f"g{n}".encode(), b"ok")])) for n in range(5)]
    bad = kv.txn(Txn([], [Put(prefix + f"b{n}".encode(), b"") for n in range(129)]))
    *applied, refused = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(refused, ValueError) and "too many operations" in str(refused)
    assert all(not isinstance(r, BaseException) and r.succeeded for r in applied)
    found, _ = await kv.range(prefix)
    assert sorted(f.key for f in found) == sorted(prefix + f"g{n}".encode() for n in range(5))


async def test_a_lost_reply_of_a_batch_reports_each_member_truthfully(
    etcd: EmbeddedEtcd, prefix: bytes
) -> None:
    proxy = await TcpProxy(etcd.client_port).start()
    kv = EtcdKV([f"127.0.0.1:{proxy.port}", etcd.endpoint], timeout=1.0)
    counters = [prefix + f"c{n}".encode() for n in range(6)]
    try:
        await kv.txn(Txn([], [Put(c, b"0") for c in counters[:3]]))  # through the proxy
        proxy.blackhole = True  # the batch is applied; its reply is swallowed
        results = await asyncio.gather(
            *(kv.txn(Txn([Compare.exists(c)], [Put(c, b"1")])) for c in counters)
        )
        proxy.blackhole = False
        assert [r.succeeded for r in results] == [True] * 3 + [False] * 3
        for counter in counters[:3]:
            got = await kv.get(counter)
            assert got is not None and (got.value, got.version) == (b"1", 2)  # once each
        assert [await kv.get(c) for c in counters[3:]] == [None] * 3
    finally:
        await kv.close()
        await proxy.stop()


async def test_transactions_too_big_to_share_a_request_each_go_alone(
    kv: EtcdKV, prefix: bytes
) -> None:
    """Five Txns of 600 KB each (a child run's start copying a large context, say): together
    they would pass etcd's 1.5 MiB request limit, so each is sent alone and each commits."""
    before = kv.group_commit.batches
    results = await asyncio.gather(
        *(kv.txn(Txn([], [Put(prefix + b"%d" % n, b"x" * 600_000)])) for n in range(5))
    )
    assert all(r.succeeded for r in results)
    assert kv.group_commit.batches - before == 5
    assert len({r.revision for r in results}) == 5
