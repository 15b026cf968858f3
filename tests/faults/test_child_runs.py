"""Nested workflows as child runs: real server and worker processes, a real etcd.

The workflows are tests/faults/endings.py's ``nested_outer`` (begin -> pair, a nested
``inner_pair`` under a retry policy of two attempts with a fallback to ``rescue`` -> after) and
``nested_wide`` (a fan-out of nested ``inner_pair`` runs, joined). ``inner_pair`` fans out to
two steps, held at a gate when asked, and joins them. Every execution of an inner step is
written to the side channel (``ran {tag} {node} {index} {run} {attempt}``), so a test sees
which child ran what, and that nothing ran twice that should not have.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import pytest

from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_grpc.records import RunInfo, RunStatus
from tests.faults.test_run_endings import Endings, endings
from tests.helpers import eventually

__all__ = ["endings"]  # the fixture, shared with the run-ending tests

pytestmark = pytest.mark.timeout(120)


def spec(tag: str, mode: str = "ok", *, hold: bool = False) -> dict[str, Any]:
    return {"tag": tag, "mode": mode, "hold": hold}


async def children_of(endings: Endings, run_id: str) -> list[RunInfo]:
    async with endings.client() as client:
        found, _ = await client.list_runs(parent_run_id=run_id, page_size=1000)
    return sorted(found, key=lambda r: r.created_at or 0)


def ran(endings: Endings, tag: str) -> list[list[str]]:
    """The inner steps executed for ``tag``: [node, index, run, attempt]."""
    return [line[2:] for line in endings.side("ran", tag)]


async def the_child(endings: Endings, run_id: str) -> RunInfo:
    async def found() -> list[RunInfo]:
        return await children_of(endings, run_id)

    [child] = await eventually(found, within=30)
    return child


async def test_a_nested_workflows_steps_run_on_two_workers_and_its_end_completes_the_item(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    pids = await endings.start(first=1, second=1)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", spec("two", hold=True))
        held = await endings.held("two", 2)
        assert sorted(pid for _, _, pid in held) == sorted(pids), "one inner step on each"
        child = await the_child(endings, run.run_id)
        assert (child.workflow, child.status) == ("inner_pair", RunStatus.RUNNING)
        assert child.parent_run_id == run.run_id
        endings.release("two")
        final = await client.wait_for_completion(run.run_id, timeout=30)
        assert final.status is RunStatus.COMPLETED and final.output == 1 + 2
        items = {i.node: i for i in await client.work_items(run.run_id)}
        assert (items["pair"].status, items["pair"].attempts) == ("completed", 1)
        assert items["pair"].child_run_id == child.run_id
        assert (await client.get_run(child.run_id)).status is RunStatus.COMPLETED
        # The child started from a copy of the parent's context; its own changes stayed its.
        assert endings.side("inner-context", child.run_id) == [
            ["inner-context", child.run_id, "parent-two,child-of-two"]
        ]
        assert (await client.run_context(run.run_id))["seen"] == ["parent-two"]
        listed, _ = await client.list_runs()
        assert [r.run_id for r in listed] == [run.run_id], "children are hidden unless asked"
    await eventually(lambda: endings.settled(child.run_id), within=10)


async def test_the_worker_running_an_inner_step_killed_mid_child_costs_that_step_only(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    first, second = await endings.start(first=1, second=1)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", spec("kill", hold=True))
        held = await endings.held("kill", 2)
        [(_, victim_index, _)] = [h for h in held if h[2] == first]
        os.kill(first, signal.SIGKILL)
        endings.release("kill")
        final = await client.wait_for_completion(run.run_id, timeout=60)
        assert final.status is RunStatus.COMPLETED and final.output == 1 + 2
        [child] = await children_of(endings, run.run_id)
        items = {i.node: i for i in await client.work_items(run.run_id)}
        assert items["pair"].attempts == 1, "the child survived its worker"
        errors = await client.run_errors(child.run_id)
        assert [(e.node, e.kind) for e in errors] == [("inner_step", "WORKER_LOST")]
        reran = [r for r in ran(endings, "kill") if r[1] == str(victim_index)]
        assert [r[3] for r in reran] == ["2"], "only the lost step ran again, on the survivor"
    assert second


async def test_a_child_failing_once_under_the_nodes_retry_policy_is_followed_by_a_second_child(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    await endings.start(only=2)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", spec("once", "once"))
        final = await client.wait_for_completion(run.run_id, timeout=30)
        assert final.status is RunStatus.COMPLETED and final.output == 1 + 2
        first, second = await children_of(endings, run.run_id)
        assert (first.status, second.status) == (RunStatus.FAILED, RunStatus.COMPLETED)
        assert "fails (once)" in (first.error or "")
        items = {i.node: i for i in await client.work_items(run.run_id)}
        assert (items["pair"].attempts, items["pair"].child_run_id) == (2, second.run_id)
        errors = await client.run_errors(run.run_id)
        assert [(e.node, e.attempt) for e in errors] == [("pair", 1)]
        assert first.run_id in errors[0].message
        # Each child ran its own steps: two per child, the failed one's first step once.
        per_run = Counter(r[2] for r in ran(endings, "once"))
        assert per_run == {first.run_id: 2, second.run_id: 2}


async def test_a_child_failing_for_good_takes_the_fallback_edge(endings: Endings) -> None:
    endings.faults.start_server()
    await endings.start(only=2)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", spec("always", "always"))
        final = await client.wait_for_completion(run.run_id, timeout=30)
        assert final.status is RunStatus.COMPLETED and final.output == -1
        children = await children_of(endings, run.run_id)
        assert [c.status for c in children] == [RunStatus.FAILED, RunStatus.FAILED]
        items = {i.node: i for i in await client.work_items(run.run_id)}
        assert (items["pair"].status, items["pair"].attempts) == ("permanently_failed", 2)
        assert items["rescue"].status == "completed" and "after" not in items


async def test_cancelling_the_parent_mid_child_cancels_the_child_and_settles_its_items(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    await endings.start(first=1, second=1)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", spec("stop", hold=True))
        await endings.held("stop", 2)
        child = await the_child(endings, run.run_id)
        await client.cancel_run(run.run_id, "operator")
        ended = await client.wait_for_completion(child.run_id, timeout=10)
        assert ended.status is RunStatus.CANCELLED and run.run_id in (ended.error or "")
        await eventually(lambda: endings.settled(child.run_id), within=10)
        await eventually(lambda: endings.settled(run.run_id), within=10)
        states = Counter((i.node, i.status) for i in await client.work_items(child.run_id))
        assert states == {("fork_in", "completed"): 1, ("inner_step", "cancelled"): 2}
        # Both workers were told to stop what they held of the child.
        await eventually(lambda: told(endings, "stop", 2), within=10)


async def test_cancelling_the_child_cancels_its_parent(endings: Endings) -> None:
    endings.faults.start_server()
    await endings.start(first=1, second=1)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", spec("up", hold=True))
        await endings.held("up", 2)
        child = await the_child(endings, run.run_id)
        await client.cancel_run(child.run_id, "from below")
        ended = await client.wait_for_completion(run.run_id, timeout=10)
        assert ended.status is RunStatus.CANCELLED
        assert child.run_id in (ended.error or "") and "from below" in (ended.error or "")
        await eventually(lambda: endings.settled(run.run_id), within=10)
        await eventually(lambda: endings.settled(child.run_id), within=10)
        items = {i.node: i.status for i in await client.work_items(run.run_id)}
        assert items == {"begin": "completed", "pair": "cancelled"}


async def test_a_fan_out_of_60_nested_workflows_joins_every_childs_output(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    await endings.start(first=4, second=4)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_wide", {**spec("wide"), "n": 60})
        final = await client.wait_for_completion(run.run_id, timeout=90)
        assert final.status is RunStatus.COMPLETED, final.error
        # Child i joins 10i + (10i + 1); the parent sums them.
        assert final.output == sum(20 * i + 1 for i in range(60))
        children = await children_of(endings, run.run_id)
        assert len(children) == 60 and {c.status for c in children} == {RunStatus.COMPLETED}
        assert Counter(r[2] for r in ran(endings, "wide")) == {c.run_id: 2 for c in children}


async def test_the_server_killed_between_the_parents_txn_and_the_childs_first_step(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    await endings.start(only=2)
    async with endings.client() as client:
        run, _ = await client.start_run("nested_outer", {**spec("crash"), "hold_first": True})
        # The parent's Txn started the child; its first step is held.
        [(node, _, _)] = await endings.held("crash", 1)
        assert node == "fork_in"
        child = await the_child(endings, run.run_id)
    assert endings.faults.server is not None
    endings.faults.server.send_signal(signal.SIGKILL)
    endings.faults.server.wait(timeout=10)
    endings.faults.restart_server()
    endings.release("crash")
    async with endings.client() as client:
        final = await client.wait_for_completion(run.run_id, timeout=60)
        assert final.status is RunStatus.COMPLETED and final.output == 1 + 2
        assert [c.run_id for c in await children_of(endings, run.run_id)] == [child.run_id]
        items = {i.node: i for i in await client.work_items(run.run_id)}
        assert items["pair"].attempts == 1
    record = await endings.run_record(child.run_id)
    assert record.status == records_pb2.RUN_STATUS_COMPLETED


async def told(endings: Endings, tag: str, count: int) -> bool:
    """Whether ``count`` held nodes of ``tag`` were cancelled by their workers."""
    return len(endings.side("cancelled", tag)) >= count
