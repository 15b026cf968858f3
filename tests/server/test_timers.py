"""Durable timers and run timeouts: never early, measured on one clock, resumed after a failover.

The firer runs on a clock the test moves (its ``monotonic``), against MemoryKV and real etcd.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from floxide_server._proto.floxide.storage.v1.storage_pb2 import TimerRecord
from floxide_server.firing import CHECKPOINT_EVERY, Firer
from floxide_server.store import Store
from floxide_server.store.kv import KV, Compare, KVUnavailable, Put, Txn, TxnResult
from floxide_server.store.payloads import Limits
from floxide_server.store.workflows import WorkflowStore

from floxide_grpc import Backoff, RetryPolicy, Workflow, node
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_grpc.errors import AlreadyExists, ClaimLost, FailedPrecondition, InvalidArgument
from tests.server.test_store import Stores, abort, fan, gather, js, nxt, split

MAX_OPS = Limits().max_txn_ops
LEADER = b"/test/leader"


@node(
    retry=RetryPolicy(
        max_attempts=3, initial_backoff=timedelta(seconds=5), backoff=Backoff.FIXED, jitter=False
    )
)
def patient(x: int) -> int:
    return x


@node
def hold(x: int) -> int:
    return x


@pytest.fixture
async def stores(kv: KV) -> AsyncIterator[Stores]:
    limits = Limits(max_payload_bytes=4096, max_run_timeout_ms=3_600_000)
    workflows = WorkflowStore(kv, limits)
    yield Stores(kv, f"ns-{uuid.uuid4().hex[:12]}", workflows, Store.open(kv, limits, workflows))


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0  # any origin: only differences count

    def __call__(self) -> float:
        return self.now


async def leading(stores: Stores) -> Compare:
    """A guard that holds while the test says this firer leads."""
    await stores.kv.txn(Txn([], [Put(LEADER + stores.namespace.encode(), b"me")]))
    return Compare.exists(LEADER + stores.namespace.encode())


async def firer(stores: Stores, clock: Clock, *, elected: bool = True) -> Firer:
    guard = await leading(stores) if elected else None
    fires = Firer(stores.kv, stores.namespace, (lambda: guard) if guard else None, MAX_OPS, clock)
    await fires.resume()
    return fires


async def failed_once(stores: Stores) -> str:
    """A run whose first attempt failed: a retry waits 5 s."""
    await stores.register(Workflow("patient", start=patient))
    run = await stores.start("patient", 1)
    await stores.complete_next(await stores.session(), abort("down"))
    return run.run_id


async def test_a_retry_fires_once_its_delay_has_run_on_the_firers_clock(stores: Stores) -> None:
    run_id = await failed_once(stores)
    [timer] = (await stores.kv.range(stores.keys.timer()))[0]
    record = TimerRecord.FromString(timer.value)
    assert (record.delay_ms, record.seen_at, record.item.item_id) == (5000, 0, "start")
    clock = Clock()
    fires = await firer(stores, clock)
    clock.now += 4.999
    assert await fires.fire_due() == 0  # never early
    clock.now += 0.001
    assert await fires.fire_due() == 1
    assert (await stores.state(run_id))["patient"] == (records_pb2.ITEM_STATUS_PENDING, 1)
    retry = await stores.claim_next(await stores.session())
    assert retry.item.attempt == 2


async def test_a_new_leader_resumes_timers_from_the_clock_written_never_early(
    stores: Stores,
) -> None:
    await failed_once(stores)
    first_clock = Clock()
    first = await firer(stores, first_clock)
    first_clock.now += 3.0  # the first leader measured 3 s of the 5, and wrote so
    await first.checkpoint()
    assert (await stores.kv.get(stores.keys.timer_clock)).value == b"3001"  # type: ignore[union-attr]
    [timer] = (await stores.kv.range(stores.keys.timer()))[0]
    assert TimerRecord.FromString(timer.value).seen_at == 1  # the clock starts at 1
    first_clock.now += 1.5  # then led 1.5 s more, unwritten, and died
    second_clock = Clock()
    second = await firer(stores, second_clock)  # resumes at 3000: the 1.5 s are lost, not gained
    second_clock.now += 1.999
    assert await second.fire_due() == 0
    second_clock.now += 0.001
    assert await second.fire_due() == 1


async def test_a_timer_no_leader_wrote_is_measured_whole_from_when_the_next_one_sees_it(
    stores: Stores,
) -> None:
    await failed_once(stores)
    first_clock = Clock()
    await firer(stores, first_clock)
    first_clock.now += 1.0  # saw it, never wrote the clock, died
    second_clock = Clock()
    second = await firer(stores, second_clock)
    second_clock.now += 4.999
    assert await second.fire_due() == 0
    second_clock.now += 0.001
    assert await second.fire_due() == 1


async def test_a_deposed_leader_writes_no_clock(stores: Stores) -> None:
    await failed_once(stores)
    clock = Clock()
    fires = await firer(stores, clock)
    await stores.kv.txn(Txn([], [Put(LEADER + stores.namespace.encode(), b"")]))
    deposed = Compare.value_is(LEADER + stores.namespace.encode(), b"me")
    fires.guard = lambda: deposed
    clock.now += CHECKPOINT_EVERY
    await fires.checkpoint()
    assert await stores.kv.get(stores.keys.timer_clock) is None
    [timer] = (await stores.kv.range(stores.keys.timer()))[0]
    assert TimerRecord.FromString(timer.value).seen_at == 0


async def test_a_timer_that_does_not_parse_is_skipped_not_fatal(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    await failed_once(stores)
    bad = stores.keys.timer("not-a-run", "x")
    await stores.kv.txn(Txn([], [Put(bad, b"\xff")]))
    clock = Clock()
    fires = await firer(stores, clock)  # no exception: one bad key must not stop every leader
    assert bad not in fires.pending and "does not parse" in caplog.text
    clock.now += 5
    assert await fires.fire_due() == 1  # the good one fires


async def test_a_retry_of_a_paused_run_waits_for_its_resume(stores: Stores) -> None:
    run_id = await failed_once(stores)
    clock = Clock()
    fires = await firer(stores, clock)
    await stores.store.lifecycle.pause(stores.namespace, run_id)
    clock.now += 10
    assert await fires.fire_due() == 0
    assert (await stores.state(run_id))["patient"][0] == records_pb2.ITEM_STATUS_WAITING_RETRY
    await stores.store.lifecycle.resume(stores.namespace, run_id)
    clock.now += CHECKPOINT_EVERY  # a waiting timer is looked at again a checkpoint later
    assert await fires.fire_due() == 1


async def test_a_timer_armed_again_on_its_key_is_another_timer(stores: Stores) -> None:
    run_id = await failed_once(stores)
    clock = Clock()
    fires = await firer(stores, clock)
    clock.now += 5
    assert await fires.fire_due() == 1
    await stores.complete_next(await stores.session(), abort("down again"))  # armed anew
    [timer] = (await stores.kv.range(stores.keys.timer()))[0]
    fires._add(timer, fires.pending)  # as its watch event would
    assert await fires.fire_due() == 0  # its 5 s run from now, not from the first one
    clock.now += 5
    assert await fires.fire_due() == 1
    assert (await stores.state(run_id))["patient"] == (records_pb2.ITEM_STATUS_PENDING, 2)


async def test_a_timer_whose_txn_lost_a_race_is_fired_again(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = await failed_once(stores)
    clock = Clock()
    fires = await firer(stores, clock)
    item_key = stores.keys.item(run_id, "start")
    txn = stores.kv.txn

    async def racing(request: Txn) -> TxnResult:
        """Another writer moves the item just before the firing Txn (once)."""
        monkeypatch.undo()
        found = await stores.kv.get(item_key)
        assert found is not None
        await txn(Txn([], [Put(item_key, found.value)]))
        return await txn(request)

    monkeypatch.setattr(stores.kv, "txn", racing)
    clock.now += 5
    assert await fires.fire_due() == 0  # lost the race: not dropped, tried again soon
    assert (await stores.kv.range(stores.keys.timer()))[0] != []
    clock.now += 0.06
    assert await fires.fire_due() == 1
    assert (await stores.state(run_id))["patient"] == (records_pb2.ITEM_STATUS_PENDING, 1)


async def test_a_timer_whose_firing_etcd_did_not_answer_is_fired_later(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = await failed_once(stores)
    clock = Clock()
    fires = await firer(stores, clock)

    async def silent(key: bytes) -> None:
        raise KVUnavailable("etcd unreachable")

    monkeypatch.setattr(stores.kv, "get", silent)
    clock.now += 5
    with pytest.raises(KVUnavailable):
        await fires.fire_due()
    monkeypatch.undo()
    assert await fires.fire_due() == 1  # still due: not lost with the failed attempt
    assert (await stores.state(run_id))["patient"] == (records_pb2.ITEM_STATUS_PENDING, 1)


# -- run timeouts ------------------------------------------------------------------------------


async def start_bounded(stores: Stores, timeout_ms: int, key: str = "") -> str:
    await stores.register(Workflow("fan", start=split).edge(split, hold).edge(hold, gather))
    run, created = await stores.store.lifecycle.start(
        stores.namespace, "fan", "", js(2), key, None, timeout_ms
    )
    assert created and run.run_timeout.ToMilliseconds() == timeout_ms
    return run.run_id


async def test_a_run_past_its_timeout_ends_timed_out_and_settles(stores: Stores) -> None:
    run_id = await start_bounded(stores, 1000)
    lease = await stores.session()
    await stores.complete_next(lease, fan(2))
    held = await stores.claim_next(lease)
    clock = Clock()
    fires = await firer(stores, clock)
    clock.now += 0.999
    assert await fires.fire_due() == 0
    clock.now += 0.001
    assert await fires.fire_due() == 1
    run = await stores.store.reads.get(stores.namespace, run_id)
    assert run.status == records_pb2.RUN_STATUS_TIMED_OUT
    assert run.error.kind == work_item_pb2.ERROR_KIND_TIMEOUT
    assert run.error.message == "the run passed its run timeout of 1s"
    states = await stores.state(run_id)
    assert states["hold"][0] == records_pb2.ITEM_STATUS_CANCELLED  # held, then settled
    with pytest.raises(ClaimLost, match="run timed out"):  # its claim was settled
        await stores.store.completions.complete(stores.namespace, held.token, nxt(1))
    with pytest.raises(FailedPrecondition):
        await stores.store.lifecycle.resume(stores.namespace, run_id)  # final
    assert (await stores.kv.range(stores.keys.timer(run_id)))[0] == []


async def test_a_paused_run_times_out_and_a_cancelled_one_drops_its_timeout(
    stores: Stores,
) -> None:
    paused = await start_bounded(stores, 1000)
    await stores.store.lifecycle.pause(stores.namespace, paused)
    cancelled = await start_bounded(stores, 1000)
    await stores.store.lifecycle.cancel(stores.namespace, cancelled, "")
    assert (await stores.kv.range(stores.keys.timer(cancelled)))[0] == []  # in its ending Txn
    clock = Clock()
    fires = await firer(stores, clock)
    clock.now += 1
    assert await fires.fire_due() == 1
    assert (await stores.store.reads.get(stores.namespace, paused)).status == (
        records_pb2.RUN_STATUS_TIMED_OUT
    )


async def test_a_failed_run_keeps_its_timeout_and_times_out_then_for_good(stores: Stores) -> None:
    run_id = await start_bounded(stores, 1000)
    lease = await stores.session()
    for_good = work_item_pb2.NodeError(
        kind=work_item_pb2.ERROR_KIND_GENERIC, message="bad input", non_retryable=True
    )
    await stores.complete_next(lease, work_item_pb2.Transition(abort=for_good))
    assert (await stores.store.reads.get(stores.namespace, run_id)).status == (
        records_pb2.RUN_STATUS_FAILED
    )
    assert (await stores.kv.range(stores.keys.timer(run_id)))[0] != []  # resumable: it runs on
    clock = Clock()
    fires = await firer(stores, clock)
    clock.now += 1
    assert await fires.fire_due() == 1
    run = await stores.store.reads.get(stores.namespace, run_id)
    assert run.status == records_pb2.RUN_STATUS_TIMED_OUT
    assert run.error.message == "the run passed its run timeout of 1s (it had failed: bad input)"
    with pytest.raises(FailedPrecondition):
        await stores.store.lifecycle.resume(stores.namespace, run_id)


async def test_a_run_that_completes_first_drops_its_timeout(stores: Stores) -> None:
    await stores.register(Workflow("one", start=hold))
    run, _ = await stores.store.lifecycle.start(stores.namespace, "one", "", js(1), "", None, 1000)
    await stores.complete_next(await stores.session(), nxt(1))
    clock = Clock()
    fires = await firer(stores, clock)
    clock.now += 1
    assert await fires.fire_due() == 0
    assert (await stores.store.reads.get(stores.namespace, run.run_id)).status == (
        records_pb2.RUN_STATUS_COMPLETED
    )
    assert (await stores.kv.range(stores.keys.timer()))[0] == []


@pytest.mark.parametrize("timeout_ms", [0, -1, 3_600_001])
async def test_a_run_timeout_out_of_range_is_invalid_and_starts_nothing(
    stores: Stores, timeout_ms: int
) -> None:
    await stores.register(Workflow("one", start=hold))
    with pytest.raises(InvalidArgument, match="run_timeout must be more than 0 and at most 3600s"):
        await stores.store.lifecycle.start(
            stores.namespace, "one", "", js(1), "k", None, timeout_ms
        )
    assert (await stores.kv.range(stores.keys.run_infos))[0] == []


async def test_an_idempotency_key_with_another_run_timeout_already_exists(stores: Stores) -> None:
    run_id = await start_bounded(stores, 1000, key="k")
    again, created = await stores.store.lifecycle.start(
        stores.namespace, "fan", "", js(2), "k", None, 1000
    )
    assert again.run_id == run_id and not created
    for other in (2000, None):
        with pytest.raises(AlreadyExists, match="another workflow, input or run timeout"):
            await stores.store.lifecycle.start(stores.namespace, "fan", "", js(2), "k", None, other)
