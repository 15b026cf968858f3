"""The replica that fires timers is killed with retries pending: the next leader fires them.

Two ``floxide-server`` processes on one etcd; the first leads (it fires every timer). Once it
has written when it saw each pending retry, and has measured KILLED_AFTER of their backoff, it is
killed (SIGKILL); the second is elected and resumes the timers from the clock the first wrote.
Each retry runs once, never before its backoff, measured on this process's monotonic clock
around the node's own attempts; and no later than the backoff plus what a failover may lose (a
checkpoint interval and an election), which a leader that measured each timer again from when it
saw it would pass by KILLED_AFTER.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

from floxide_server._proto.floxide.storage.v1.storage_pb2 import TimerRecord
from floxide_server.election import MAINTENANCE
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.firing import CHECKPOINT_EVERY
from floxide_server.store.keys import Keys, election
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Backoff, NodeContext, RetryPolicy, Workflow, node
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, start_server, stop_all, stop_server

BACKOFF = 8.0
KILLED_AFTER = 5.0
"""Seconds of the backoff the first leader measures before it is killed."""
LOST_AT_MOST = CHECKPOINT_EVERY + 2.0 + 1.5
"""What a failover may add to a timer: a checkpoint, an election (the lease TTL), a margin."""
RUNS = 4
attempts: dict[str, list[tuple[int, float, float]]] = {}
"""Each run's attempts: (attempt, started, ended) on time.monotonic()."""


@node(
    retry=RetryPolicy(
        max_attempts=2,
        initial_backoff=timedelta(seconds=BACKOFF),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
def once_down(ctx: NodeContext, x: int) -> int:
    started = time.monotonic()
    attempts.setdefault(ctx.run_id, []).append((ctx.attempt, started, time.monotonic()))
    if ctx.attempt == 1:
        raise RuntimeError("down the first time")
    return x


ONCE_DOWN = Workflow("once_down", start=once_down)


def replica(etcd: EmbeddedEtcd, tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    return start_server(
        "--etcd", etcd.endpoint, "--lease-ttl", "2", "--heartbeat", "0.5", "--server-id", name,
        ready_file=str(tmp / f"ready-{name}"),
    )  # fmt: skip


async def test_timers_pending_when_their_firer_is_killed_fire_once_never_early(
    own_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    """On an etcd of its own: no replica of an earlier test is a candidate."""
    etcd = own_etcd
    kv = EtcdKV([etcd.endpoint])
    namespace = f"failover-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    first, _ = replica(etcd, tmp_path, "first")
    processes = [first]
    try:

        async def leader() -> bytes | None:
            found, _ = await kv.range(election(MAINTENANCE))
            return min(found, key=lambda k: k.create_revision).value if found else None

        assert await eventually(leader, within=20) == b"first"
        second, second_address = replica(etcd, tmp_path, "second")
        processes.append(second)
        config = WorkerConfig(server=second_address, namespace=namespace, slots=RUNS)
        async with (
            OrchestratorClient(second_address, namespace=namespace) as client,
            Worker([ONCE_DOWN], config),
        ):
            await client.register_workflow(ONCE_DOWN)
            runs = [(await client.start_run("once_down", n))[0].run_id for n in range(RUNS)]

            async def seen_by_the_leader() -> bool:
                timers, _ = await kv.range(keys.timer())
                records = [TimerRecord.FromString(t.value) for t in timers]
                return len(records) == RUNS and all(r.seen_at for r in records)

            await eventually(seen_by_the_leader, within=KILLED_AFTER)  # before any is due
            failed = min(times[0][2] for times in attempts.values())
            await asyncio.sleep(max(failed + KILLED_AFTER - time.monotonic(), 0))
            stop_server(first, signal.SIGKILL)
            finals = [await client.wait_for_completion(run, 30) for run in runs]
        assert [f.status for f in finals] == [RunStatus.COMPLETED] * RUNS
        assert await leader() == b"second"
        for run in runs:
            [(_, _, failed), (second_attempt, retried, _)] = attempts[run]
            assert second_attempt == 2
            assert retried - failed >= BACKOFF  # never early, through the failover
            assert retried - failed <= BACKOFF + LOST_AT_MOST  # resumed, not measured again
    finally:
        stop_all(processes)
        await kv.close()
