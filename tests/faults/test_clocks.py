"""Clock skew (issue 15): timers, deadlines and liveness never compare wall clocks across
processes (docs: DESIGN.md section 8, "Time").

Real server and worker processes on a real etcd, the processes' wall clocks skewed or stepped
by libfaketime (tests/faults/clocks.py; each checked to be in effect), monotonic clocks left
alone, etcd never faked. Each test is bounded in time and waits on conditions, not sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from floxide_server.embedded import EmbeddedEtcd

from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.faults.clocks import Clock, Clocks, Replica, assert_offset, assert_on_clock
from tests.faults.timed import BACKOFF
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

MINUTES = 60
HEARTBEAT = 1.0
"""The listing test's ``--heartbeat``."""


@pytest.fixture
async def clocks(tmp_path: Path, own_etcd: EmbeddedEtcd) -> AsyncIterator[Clocks]:
    """The harness on an etcd of the test's own: no earlier test's replica is elected."""
    harness = Clocks(tmp_path, own_etcd)
    harness.gate.mkdir()
    try:
        yield harness
    finally:
        harness.stop_all()


def client(clocks: Clocks, replica: Replica) -> OrchestratorClient:
    return OrchestratorClient(replica.target, namespace=clocks.namespace, retries=10)


async def test_the_harness_fails_a_process_the_skew_did_not_reach(clocks: Clocks) -> None:
    """A test can never pass because the skew silently did not apply."""
    started = time.time()
    replica = await clocks.start_replica("exact")
    with pytest.raises(AssertionError, match="stamped"):
        await assert_on_clock(Clock.skewed(-5 * MINUTES), replica.process, replica.log, started)
    with pytest.raises(AssertionError, match="libfaketime is not in effect"):
        assert_offset(Clock(offset=-5 * MINUTES, file=clocks.tmp / "no-such-clock"))


async def test_node_timeouts_are_measured_from_receipt_whatever_the_clocks(
    clocks: Clocks,
) -> None:
    """A replica 5 minutes behind, a worker 3 minutes ahead: a node within its timeout
    completes, one past it fails its attempt as TIMEOUT, naming the configured value."""
    replica = await clocks.start_replica("behind", Clock.skewed(-5 * MINUTES))
    await clocks.start_worker_on("ahead", replica, Clock.skewed(3 * MINUTES))
    async with client(clocks, replica) as orchestrator:
        quick, _ = await orchestrator.start_run("quick_enough", 1)
        done = await orchestrator.wait_for_completion(quick.run_id, timeout=20)
        assert done.status is RunStatus.COMPLETED, done.error
        assert done.output == 1
        slow, _ = await orchestrator.start_run("too_slow", 1)
        failed = await orchestrator.wait_for_completion(slow.run_id, timeout=20)
        assert failed.status is RunStatus.FAILED
        [error] = await orchestrator.run_errors(slow.run_id)
    assert (error.node, error.attempt, error.kind) == ("slow", 1, "TIMEOUT")
    assert error.message.endswith("timed out after 0.5s"), error.message


async def retry_gap(
    clocks: Clocks, recorder: Replica, after_failure: Callable[[], None] = lambda: None
) -> float:
    """Run ``retried`` with its worker on ``recorder`` (which records the failed attempt and
    arms its timer); ``after_failure`` runs once the failure is recorded. The time (s, by
    CLOCK_MONOTONIC) from the first attempt's end to the second's start."""
    await clocks.start_worker_on("worker", recorder)
    async with client(clocks, recorder) as orchestrator:
        run, _ = await orchestrator.start_run("retried", 1)

        async def recorded() -> bool:
            return bool(await orchestrator.run_errors(run.run_id))

        await eventually(recorded, within=20)
        after_failure()
        try:
            final = await orchestrator.wait_for_completion(run.run_id, timeout=BACKOFF + 10)
        except TimeoutError:
            pytest.fail(f"no second attempt within {BACKOFF + 10} s of a {BACKOFF} s backoff")
    assert final.status is RunStatus.COMPLETED, final.error
    side = (clocks.tmp / "side.log").read_text().split("\n")
    times = {tuple(line.split()[:2]): float(line.split()[2]) for line in side if line}
    assert set(times) == {("start", "1"), ("end", "1"), ("start", "2"), ("end", "2")}, times
    return times["start", "2"] - times["end", "1"]


@pytest.mark.parametrize(
    ("recording", "firing"),
    [(-5 * MINUTES, 5 * MINUTES), (5 * MINUTES, -5 * MINUTES)],
    ids=["recorder-behind-elected-ahead", "recorder-ahead-elected-behind"],
)
async def test_a_retry_never_starts_early_under_skew(
    clocks: Clocks, recording: int, firing: int
) -> None:
    """The replica that records the failure and the elected one (which fires timers) 10
    minutes apart, either way: the retry waits its whole backoff."""
    elected = await clocks.start_replica("elected", Clock.skewed(firing))
    await eventually(lambda: clocks.leading(elected), within=20)
    recorder = await clocks.start_replica("recorder", Clock.skewed(recording))
    gap = await retry_gap(clocks, recorder)
    assert gap >= BACKOFF, f"the retry started {gap:.3f} s after the failed attempt"


async def test_a_clock_stepped_forward_fires_no_timer_early(clocks: Clocks, tmp_path: Path) -> None:
    """The elected replica's clock steps an hour forward once a failure is recorded (by
    another replica): the retry still waits its whole backoff."""
    clock = Clock.stepping(tmp_path / "clock")
    elected = await clocks.start_replica("elected", clock)
    await eventually(lambda: clocks.leading(elected), within=20)
    recorder = await clocks.start_replica("recorder")

    def step() -> None:
        clock.step(60 * MINUTES)
        assert_offset(clock)

    gap = await retry_gap(clocks, recorder, step)
    assert gap >= BACKOFF, f"the retry started {gap:.3f} s after the failed attempt"


@pytest.mark.parametrize(
    ("listing", "serving"),
    [(-5 * MINUTES, 5 * MINUTES), (-5 * MINUTES, 0), (5 * MINUTES, -5 * MINUTES)],
    ids=["lister-behind-peer-ahead", "lister-behind-peer-exact", "lister-ahead-peer-behind"],
)
async def test_a_live_worker_is_alive_on_every_replica_whatever_the_clocks(
    clocks: Clocks, listing: int, serving: int
) -> None:
    """ListWorkers on one replica shows a worker connected to another, skewed differently,
    ALIVE in every sample over six heartbeat intervals."""
    # A TTL over four heartbeats: ALIVE survives a stall of up to a heartbeat.
    sessions = {"lease_ttl": 6 * HEARTBEAT, "heartbeat": HEARTBEAT}
    lister = await clocks.start_replica("lister", Clock.skewed(listing), **sessions)
    peer = await clocks.start_replica(
        "peer", Clock.skewed(serving) if serving else None, **sessions
    )
    await clocks.start_worker_on("worker", peer)
    samples = []
    async with client(clocks, lister) as orchestrator:
        until = time.monotonic() + 6 * HEARTBEAT
        while time.monotonic() < until:
            samples.append([(w.worker_id, w.liveness) for w in await orchestrator.workers()])
            await asyncio.sleep(HEARTBEAT / 5)
    assert len(samples) >= 10
    assert all(sample == [("worker", "alive")] for sample in samples), samples
