"""The local runner: floxide's run semantics, and bad input refused without changing anything."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import pytest

from floxide_grpc import (
    Abort,
    AlreadyCompleted,
    FileCheckpointStore,
    Hold,
    InMemoryCheckpointStore,
    InvalidArgument,
    InvalidPayload,
    LocalRunner,
    Merge,
    Next,
    NextAll,
    Node,
    NodeContext,
    NodeNotFound,
    NotStarted,
    RetryPolicy,
    RunFailed,
    RunStuck,
    Workflow,
    batch,
    node,
    split,
    subworkflow,
)
from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_grpc.stores.checkpoint import checkpoint_of


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@node
def inc(x: int) -> int:
    return x + 1


@node
def to_text(x: int) -> str:
    return f"#{x}"


def test_first_terminal_output_wins_and_the_rest_is_dropped() -> None:
    ran: list[str] = []

    @node
    def fast(x: int) -> str:
        ran.append("fast")
        return "fast"

    @node
    def slow(x: int) -> int:
        ran.append("slow")
        return x

    @node
    def after_slow(x: int) -> str:
        ran.append("after_slow")
        return "slow"

    flow = Workflow("race", start=inc).edge(inc, [fast, slow]).edge(slow, after_slow)
    assert run(flow.run(1)) == "fast"
    assert ran == ["fast"]  # queue order: fast completes the run before slow runs


def test_nested_fan_outs_join_exactly() -> None:
    @node
    def rows(n: int) -> NextAll[int]:
        return NextAll(list(range(n)))

    @node
    def cells(row: int) -> NextAll[int]:
        return NextAll([row * 10 + c for c in range(3)])

    @node(join=True)
    def row_sum(values: list[int]) -> int:
        return sum(values)

    @node(join=True)
    def table(sums: list[int]) -> list[int]:
        return sums

    flow = Workflow("grid", start=rows).edge(rows, cells).edge(cells, inc)
    flow.edge(inc, row_sum).edge(row_sum, table)
    assert run(flow.run(3)) == [0 + 1 + 1 + 2 + 1 + 1, 10 * 3 + 3 + 3, 20 * 3 + 3 + 3]


def test_hold_in_a_branch_arrives_without_a_value() -> None:
    @node
    def fan(n: int) -> NextAll[int]:
        return NextAll(list(range(n)))

    @node
    def evens(x: int) -> int | Hold:
        return x if x % 2 == 0 else Hold()

    @node(join=True)
    def collect(xs: list[int]) -> list[int]:
        return xs

    flow = Workflow("filter", start=fan).edge(fan, evens).edge(evens, collect)
    assert run(flow.run(7)) == [0, 2, 4, 6]


def test_context_operations_apply_once_per_step() -> None:
    @dataclass
    class Tally:
        seen: Annotated[int, Merge.ADD] = 0

    @node
    def count(ctx: NodeContext, x: int) -> int:
        ctx.add("seen", 1)
        seen: int = ctx.state.seen
        return x + seen

    flow = Workflow("tally", start=count, context=Tally)
    runner = LocalRunner(flow)
    assert run(runner.run(10)) == 11
    assert runner.context == {"seen": 1}


def test_split_and_batch_helpers() -> None:
    chunks = split(lambda text: text.split(","), name="chunks")

    @node
    def shout(word: str) -> str:
        return word.upper()

    @node(join=True)
    def gather(words: list[str]) -> list[str]:
        return words

    flow = Workflow("split", start=chunks).edge(chunks, shout).edge(shout, gather)
    assert run(flow.run("a,b,c")) == ["A", "B", "C"]

    @node
    def halve(x: int) -> int | Hold:
        return x // 2 if x % 2 == 0 else Hold()

    batched = batch(halve, 2)
    assert run(Workflow("batch", start=batched).run([2, 3, 4, 8])) == [1, 2, 4]

    @node
    def refuse(x: int) -> Abort:
        return Abort("no")

    with pytest.raises(RunFailed, match="batch element aborted: no"):
        run(Workflow("batch_abort", start=batch(refuse, 2)).run([1]))


# -- bad input -------------------------------------------------------------------------------


def test_input_not_matching_the_start_node_is_refused_before_anything_runs() -> None:
    store = InMemoryCheckpointStore()
    flow = Workflow("typed", start=inc)
    with pytest.raises(InvalidPayload, match="workflow 'typed' input: Expected `int`, got `str`"):
        run(flow.run_with_checkpoint("one", store, "r1"))
    assert run(store.load("r1")) is None


def test_an_output_with_nan_fails_the_attempt_as_invalid_output() -> None:
    @node
    def ratio(x: int) -> float:
        return float("nan")

    runner = LocalRunner(Workflow("nan", start=ratio))
    with pytest.raises(
        RunFailed, match="node 'ratio' output: NaN and Infinity are not valid JSON"
    ) as caught:
        run(runner.run(1))
    assert caught.value.kind == "INVALID_OUTPUT"
    assert runner.errors[0].kind == "INVALID_OUTPUT"


def test_an_output_not_matching_its_type_fails_the_attempt() -> None:
    @node
    def liar(x: int) -> int:
        return "not a number"  # type: ignore[return-value]

    with pytest.raises(RunFailed, match="node 'liar' output: Expected `int`, got `str`"):
        run(Workflow("liar", start=liar).run(1))


def test_a_node_writing_a_context_field_with_another_strategy_fails_its_attempt() -> None:
    @dataclass
    class Tally:
        seen: Annotated[int, Merge.ADD] = 0

    @node
    def wrong(ctx: NodeContext, x: int) -> int:
        ctx.set("seen", 5)
        return x

    runner = LocalRunner(Workflow("wrong", start=wrong, context=Tally))
    with pytest.raises(RunFailed, match="context field 'seen' is declared ADD, not REPLACE"):
        run(runner.run(1))
    assert runner.context == {"seen": 0}


def test_an_undeclared_route_fails_the_attempt() -> None:
    @node
    def pick(x: int) -> Next[int]:
        return Next(x, route="sideways")

    flow = Workflow("routes", start=pick).route(pick, {"up": inc})
    with pytest.raises(RunFailed, match="returned route 'sideways', which has no edge"):
        run(flow.run(1))


def test_a_payload_that_is_not_json_fails_its_item() -> None:
    store = InMemoryCheckpointStore()
    flow = Workflow("bytes", start=inc).edge(inc, to_text)
    checkpoint = LocalRunner(flow)._new("r1", 1, None)
    checkpoint.pending[0].input.data = b"{broken"
    run(store.save("r1", checkpoint.SerializeToString()))
    with pytest.raises(RunFailed, match="node 'inc' input: not valid JSON"):
        run(flow.resume(store, "r1"))


def test_a_checkpoint_naming_an_unknown_node_is_refused() -> None:
    store = InMemoryCheckpointStore()
    flow = Workflow("known", start=inc)
    checkpoint = LocalRunner(flow)._new("r1", 1, None)
    checkpoint.pending[0].node = "ghost"
    run(store.save("r1", checkpoint.SerializeToString()))
    with pytest.raises(NodeNotFound, match="workflow 'known' has no node 'ghost'"):
        run(flow.resume(store, "r1"))
    assert run(store.load("r1")) == checkpoint.SerializeToString()


def test_resume_semantics_follow_floxide() -> None:
    store = InMemoryCheckpointStore()
    flow = Workflow("resume", start=inc).edge(inc, to_text)
    with pytest.raises(NotStarted):
        run(flow.resume(store, "never"))
    assert run(flow.run_with_checkpoint(1, store, "r1")) == "#2"
    with pytest.raises(AlreadyCompleted):
        run(flow.resume(store, "r1"))
    with pytest.raises(AlreadyCompleted):
        run(flow.run_with_checkpoint(1, store, "r1"))


def test_a_failed_run_resumes_with_its_attempt_count_kept() -> None:
    calls: list[int] = []

    @node
    def flaky(ctx: NodeContext, x: int) -> int:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            raise RuntimeError("down")
        return x

    store = InMemoryCheckpointStore()
    flow = Workflow("flaky", start=flaky)
    with pytest.raises(RunFailed):
        run(flow.run_with_checkpoint(5, store, "r1"))
    saved = checkpoint_of(run(store.load("r1")))
    assert saved.status == records_pb2.RUN_STATUS_FAILED and saved.pending[0].attempt == 1
    assert run(flow.resume(store, "r1")) == 5
    assert calls == [1, 2]


def test_a_run_that_never_reaches_a_terminal_is_stuck() -> None:
    @node
    def drop(x: int) -> Hold:
        return Hold()

    with pytest.raises(RunStuck, match="ran out of work"):
        run(Workflow("stuck", start=drop).edge(drop, inc).run(1))


def test_run_ids_are_checked() -> None:
    with pytest.raises(InvalidArgument, match=r"run id '\.\./escape'"):
        run(
            Workflow("ids", start=inc).run_with_checkpoint(
                1, InMemoryCheckpointStore(), "../escape"
            )
        )


def test_a_declared_cycle_loops_until_a_routed_terminal_arm() -> None:
    @node
    def step(x: int) -> Next[int]:
        return Next(x * 2, route="done" if x * 2 >= 20 else "again")

    flow = Workflow("loop", start=step, allow_cycles=True).route(
        step, {"again": step, "done": None}
    )
    assert run(flow.run(3)) == 24


def test_class_nodes_carry_their_config() -> None:
    @dataclass
    class Scale(Node[int, int]):
        factor: int

        async def process(self, ctx: NodeContext, x: int) -> int:
            return x * self.factor

    flow = Workflow("scale", start=Scale(4))
    assert run(flow.run(5)) == 20


def test_file_store_replaces_checkpoints_atomically(tmp_path: Path) -> None:
    store = FileCheckpointStore(tmp_path / "checkpoints")
    flow = Workflow("files", start=inc).edge(inc, to_text)
    assert run(flow.run_with_checkpoint(1, store, "r1")) == "#2"
    saved = checkpoint_of(run(store.load("r1")))
    assert saved.status == records_pb2.RUN_STATUS_COMPLETED and saved.sequence == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["r1.checkpoint"]
    assert run(store.load("other")) is None


# -- nested workflows: child runs, as on the server -------------------------------------------


@dataclass
class Notes:
    seen: Annotated[list[str], Merge.APPEND] = None  # type: ignore[assignment]


def test_a_child_run_starts_from_a_copy_of_the_parents_context_and_keeps_its_own() -> None:
    @node
    def note_parent(ctx: NodeContext, x: int) -> int:
        ctx.append("seen", "parent")
        return x

    @node
    def note_child(ctx: NodeContext, x: int) -> int:
        ctx.append("seen", f"child saw {ctx.state.seen}")
        return x + 1

    inner = Workflow("inner_notes", start=note_child, context=Notes)
    nested = subworkflow(inner, name="nested")
    flow = Workflow("outer_notes", start=note_parent, context=Notes).edge(note_parent, nested)
    runner = LocalRunner(flow)
    assert run(runner.run(1)) == 2
    assert runner.context == {"seen": ["parent"]}  # the child's operation stayed its own


def test_a_failed_child_is_a_failed_attempt_retried_by_a_new_child_then_the_fallback() -> None:
    runs: list[str] = []

    @node
    def sometimes(ctx: NodeContext, x: int) -> int:
        runs.append(ctx.run_id)
        if x < 0 or len(runs) == 1:
            raise ValueError("inner failure")
        return x

    @node
    def fallback(x: int) -> str:
        return "rescued"

    inner = Workflow("inner_sometimes", start=sometimes)
    nested = subworkflow(inner, name="nested").with_settings(
        retry=RetryPolicy(max_attempts=2, initial_backoff=timedelta(milliseconds=1))
    )
    flow = Workflow("outer_sometimes", start=nested).on_failure(nested, fallback)
    runner = LocalRunner(flow)
    assert run(runner.run(5)) == 5
    assert len(set(runs)) == 2, "each attempt is a child run of its own"
    [failed] = runner.errors
    assert failed.node == "nested" and "inner failure" in failed.message
    assert runs[0] in failed.message
    runs.clear()
    assert run(runner.run(-1)) == "rescued"
    assert [e.attempt for e in runner.errors] == [1, 2]
