"""Leader election through etcd: one leader at a time, a dead one followed within a TTL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import timedelta
from pathlib import Path

import pytest
from floxide_server.election import MAINTENANCE, Election, NotLeading
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.keys import election
from floxide_server.store.kv import KV, MemoryKV, Put, Txn

from tests.helpers import TcpProxy, eventually, start_server, stop_all

pytestmark = pytest.mark.timeout(60)

TTL = timedelta(seconds=2)
WITHIN = 10.0  # generous: a successor is due within a TTL (2 s)


class Candidates:
    """Elections campaigning in tasks of the test's, each cancelled (so resigned) at its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs: dict[Election, asyncio.Task[None]] = {}

    async def start(self, kv: KV, identity: str) -> Election:
        candidate = Election(kv, self.name, identity, TTL)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.runs[candidate] = asyncio.create_task(candidate.run(ready))
        await ready
        return candidate

    async def stop(self, candidate: Election) -> None:
        """Cancel a candidate's run (it resigns on the way out); raise what ended it otherwise."""
        task = self.runs.pop(candidate)
        task.cancel()
        await asyncio.wait([task], timeout=WITHIN)
        assert task.done(), f"{candidate.identity} went on campaigning after it was cancelled"
        if not task.cancelled():
            task.result()

    async def stop_all(self) -> None:
        for candidate in list(self.runs):
            await self.stop(candidate)


@pytest.fixture
async def candidates() -> AsyncIterator[Candidates]:
    made = Candidates(f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield made
    finally:
        await made.stop_all()


@contextlib.asynccontextmanager
async def at_most_one_leads(elections: Iterable[Election]) -> AsyncIterator[list[set[str]]]:
    """Check, all along the block, that never two of ``elections`` lead at once.

    Yields the sets of leaders seen (each sample's), for the block to look at.
    """
    watched = list(elections)
    seen: list[set[str]] = []

    async def sample() -> None:
        while True:
            leaders = {e.identity for e in watched if e.leading}
            assert len(leaders) <= 1, f"two leaders at once: {leaders}"
            seen.append(leaders)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        sampler.cancel()
        await asyncio.wait([sampler])
    if not sampler.cancelled():
        sampler.result()  # raises the sample that saw two leaders


async def holds_steady(seen: list[set[str]], leader: Election, samples: int = 20) -> None:
    """The next ``samples`` samples of ``at_most_one_leads`` see ``leader`` alone leading."""
    start = len(seen)

    async def sampled() -> bool:
        return len(seen) >= start + samples

    await eventually(sampled, within=WITHIN)
    assert seen[start : start + samples] == [{leader.identity}] * samples


async def one_leader(elections: Iterable[Election]) -> Election:
    """The one election that leads, once exactly one does (failing after ``WITHIN`` s)."""
    watched = list(elections)

    async def probe() -> list[Election]:
        leading = [e for e in watched if e.leading]
        return leading if len(leading) == 1 else []

    [leader] = await eventually(probe, within=WITHIN)
    return leader


async def test_one_candidate_leads_and_resigns_on_the_way_out(
    kv: KV, candidates: Candidates
) -> None:
    assert await Election(kv, candidates.name, "nobody", TTL).leader() is None
    alone = await candidates.start(kv, "a")
    await asyncio.wait_for(alone.wait_leading(), WITHIN)
    assert alone.leading
    assert await alone.leader() == "a"
    await candidates.stop(alone)
    assert not alone.leading
    assert await alone.leader() is None  # its lease was revoked: no key left behind


async def test_one_leader_among_three_and_the_next_in_line_follows(
    kv: KV, candidates: Candidates
) -> None:
    """Three candidates on one store: one leads; it resigns, then another one stops: each time
    another leads at once; never two at once."""
    trio = [await candidates.start(kv, identity) for identity in "abc"]
    async with at_most_one_leads(trio) as seen:
        first = await one_leader(trio)  # on one EtcdKV, their keys may share a revision
        assert await first.leader() == first.identity
        await holds_steady(seen, first)

        await first.resign()  # it campaigns again, behind the others
        second = await one_leader(trio)
        assert second is not first
        assert await second.leader() == second.identity
        await holds_steady(seen, second)

        await candidates.stop(second)  # shuts down: resigns on the way out
        third = await one_leader(trio)
        assert third is not second
        assert await third.leader() == third.identity
        await holds_steady(seen, third)


async def test_a_leader_whose_lease_is_revoked_behind_its_back_steps_down(
    etcd: EmbeddedEtcd, candidates: Candidates
) -> None:
    """Its lease is revoked by someone else: the next one leads, and it campaigns again."""
    a_kv, b_kv, other = (EtcdKV([etcd.endpoint]) for _ in range(3))
    try:
        a = await candidates.start(a_kv, "a")
        await asyncio.wait_for(a.wait_leading(), WITHIN)
        b = await candidates.start(b_kv, "b")
        found, _ = await other.range(election(candidates.name))
        [key_a] = [kv.key for kv in found if kv.value == b"a"]
        await other.revoke(int(key_a.rsplit(b"/", 1)[1], 16))

        async def b_leads_alone() -> bool:  # a may lead on until it hears of its lost key
            return b.leading and not a.leading

        await eventually(b_leads_alone, within=WITHIN)
        assert await b.leader() == "b"

        async def campaigns_again() -> bool:
            found, _ = await other.range(election(candidates.name))
            found.sort(key=lambda kv: kv.create_revision)
            return [kv.value for kv in found] == [b"b", b"a"]

        await eventually(campaigns_again, within=WITHIN)
        assert not a.leading
    finally:
        await candidates.stop_all()
        for kv in (a_kv, b_kv, other):
            await kv.close()


async def test_a_leader_cut_off_from_etcd_steps_down_before_another_leads(
    etcd: EmbeddedEtcd, candidates: Candidates
) -> None:
    """A leader that cannot renew its lease stops leading a margin before the lease can end;
    the next candidate leads once etcd ended it, within a TTL or so."""
    proxy = await TcpProxy(int(etcd.endpoint.rsplit(":", 1)[1])).start()
    a_kv = EtcdKV([f"127.0.0.1:{proxy.port}"], timeout=1.0, retry_for=1.0)
    b_kv = EtcdKV([etcd.endpoint])
    try:
        a = await candidates.start(a_kv, "a")
        await asyncio.wait_for(a.wait_leading(), WITHIN)
        b = await candidates.start(b_kv, "b")
        async with at_most_one_leads([a, b]):
            await proxy.stop()  # etcd unreachable from a

            async def b_leads() -> bool:
                return b.leading

            await eventually(b_leads, within=WITHIN)
        assert not a.leading
        assert await b.leader() == "b"
    finally:
        await candidates.stop_all()
        await proxy.stop()
        for kv in (a_kv, b_kv):
            await kv.close()


async def test_a_duty_runs_on_the_leader_alone_and_moves_with_leadership(
    etcd: EmbeddedEtcd, candidates: Candidates
) -> None:
    kvs = [EtcdKV([etcd.endpoint]) for _ in range(2)]
    running: set[str] = set()
    started: list[str] = []

    def duty_of(identity: str) -> Callable[[], Awaitable[None]]:
        async def duty() -> None:
            running.add(identity)
            started.append(identity)
            try:
                await asyncio.Future()  # a duty runs until cancelled
            finally:
                running.discard(identity)

        return duty

    async def runs_on(identity: str) -> bool:
        return running == {identity}

    duties: list[asyncio.Task[None]] = []
    try:
        a = await candidates.start(kvs[0], "a")
        await asyncio.wait_for(a.wait_leading(), WITHIN)
        b = await candidates.start(kvs[1], "b")
        duties = [asyncio.create_task(e.lead(duty_of(e.identity))) for e in (a, b)]
        async with at_most_one_leads([a, b]):
            await eventually(lambda: runs_on("a"), within=WITHIN)
            await a.resign()  # leadership moves to b; a campaigns again
            await eventually(lambda: runs_on("b"), within=WITHIN)
            await candidates.stop(b)  # b shuts down: a leads again, and runs its duty again
            await eventually(lambda: runs_on("a"), within=WITHIN)
        assert started == ["a", "b", "a"]
        assert not any(d.done() for d in duties)
    finally:
        for task in duties:
            task.cancel()
        await asyncio.gather(*duties, return_exceptions=True)
        await candidates.stop_all()
        for kv in kvs:
            await kv.close()


async def test_a_duty_that_ends_or_fails_ends_lead_and_guard_fences_writes(
    candidates: Candidates,
) -> None:
    kv = MemoryKV()
    alone = await candidates.start(kv, "a")
    with pytest.raises(NotLeading):
        alone.guard()
    await asyncio.wait_for(alone.wait_leading(), WITHIN)

    async def done() -> None:
        pass

    async def fails() -> None:
        raise RuntimeError("the duty failed")

    await asyncio.wait_for(alone.lead(done), WITHIN)
    with pytest.raises(RuntimeError, match="the duty failed"):
        await asyncio.wait_for(alone.lead(fails), WITHIN)

    fenced = Txn([alone.guard()], [Put(b"/t/fenced", b"1")])
    assert (await kv.txn(fenced)).succeeded
    await alone.resign()
    with pytest.raises(NotLeading):
        alone.guard()
    assert not (await kv.txn(fenced)).succeeded  # a write fenced by a past leadership fails
    await candidates.stop_all()
    await kv.close()


async def test_when_the_leading_server_process_is_killed_another_leads(
    own_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    args = ("--etcd", own_etcd.endpoint, "--lease-ttl", "2", "--heartbeat", "0.5")
    processes = {}
    observer_kv = EtcdKV([own_etcd.endpoint])
    observer = Election(observer_kv, MAINTENANCE, "observer", TTL)
    try:
        for identity in ("a", "b"):
            processes[identity], _ = start_server(
                *args, "--server-id", identity, ready_file=str(tmp_path / identity)
            )
        leader = await eventually(observer.leader, within=WITHIN)
        assert leader in processes
        follower = "b" if leader == "a" else "a"
        processes[leader].send_signal(signal.SIGKILL)

        async def follower_leads() -> bool:
            return await observer.leader() == follower

        await eventually(follower_leads, within=WITHIN)

        async def logged() -> bool:
            log = (tmp_path / f"{follower}.log").read_text()
            return f"leading {MAINTENANCE} as {follower}" in log

        await eventually(logged, within=WITHIN)
    finally:
        stop_all(processes.values())
        await observer_kv.close()
