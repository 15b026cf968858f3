"""Context fields merged by their declared strategies, as operations applied once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from floxide_grpc import ContextError, InvalidDefinition, Merge, NodeContext
from floxide_grpc.context import ContextSchema, Operation, apply


@dataclass
class Ctx:
    name: str = ""
    log: Annotated[list[str], Merge.APPEND] = field(default_factory=list)
    total: Annotated[int, Merge.ADD] = 0
    high: Annotated[int | None, Merge.MAX] = None
    low: Annotated[float | None, Merge.MIN] = None
    tags: Annotated[list[str], Merge.UNION] = field(default_factory=list)
    settings: Annotated[dict[str, Any], Merge.DEEP_MERGE] = field(default_factory=dict)
    first: Annotated[str | None, Merge.FIXED] = None
    events: Annotated[list[dict[str, Any]], Merge.EVENT_LOG] = field(default_factory=list)


SCHEMA = ContextSchema.from_type(Ctx)


def node_ctx(context: dict[str, Any] | None = None) -> NodeContext:
    return NodeContext(
        SCHEMA, context or SCHEMA.initial(), run_id="r", item_id="i", node="n", attempt=1
    )


def test_schema_reads_strategies_and_initial_values() -> None:
    assert SCHEMA.names == [
        "name",
        "log",
        "total",
        "high",
        "low",
        "tags",
        "settings",
        "first",
        "events",
    ]
    assert SCHEMA.strategy("name") is Merge.REPLACE
    assert SCHEMA.strategy("events") is Merge.EVENT_LOG
    assert SCHEMA.initial()["total"] == 0
    assert ContextSchema.from_proto(SCHEMA.to_proto()).initial() == SCHEMA.initial()


def test_every_strategy_merges_as_declared() -> None:
    ctx = node_ctx()
    ctx.set("name", "a")
    ctx.set("name", "b")
    ctx.append("log", "x", "y")
    ctx.append("log", "z")
    ctx.add("total", 3)
    ctx.add("total", 4)
    ctx.max("high", 5)
    ctx.max("high", 2)
    ctx.min("low", 1.5)
    ctx.min("low", 2.5)
    ctx.union("tags", "a", "b")
    ctx.union("tags", "b", "c")
    ctx.deep_merge("settings", {"db": {"host": "h", "port": 1}})
    ctx.deep_merge("settings", {"db": {"port": 2}, "debug": True})
    ctx.fix("first", "one")
    ctx.fix("first", "two")
    ctx.log_event("events", {"kind": "start"}, event_id="e1")
    ctx.log_event("events", {"kind": "again"}, event_id="e1")
    state = ctx.state
    assert state == Ctx(
        name="b",
        log=["x", "y", "z"],
        total=7,
        high=5,
        low=1.5,
        tags=["a", "b", "c"],
        settings={"db": {"host": "h", "port": 2}, "debug": True},
        first="one",
        events=[{"id": "e1", "event": {"kind": "start"}}],
    )
    # Operations are recorded for the store, and replay to the same state.
    replayed = SCHEMA.initial()
    apply(replayed, ctx.operations, SCHEMA)
    assert SCHEMA.view(replayed) == state


def test_another_strategy_than_the_declared_one_is_refused_and_changes_nothing() -> None:
    ctx = node_ctx()
    with pytest.raises(ContextError, match="context field 'total' is declared ADD, not APPEND"):
        ctx.append("total", 1)
    assert ctx.operations == [] and ctx.state.total == 0


def test_undeclared_field_is_refused() -> None:
    with pytest.raises(ContextError, match="context field 'missing' is not declared"):
        node_ctx().set("missing", 1)


def test_a_value_that_does_not_fit_the_strategy_is_refused() -> None:
    with pytest.raises(ContextError, match="'total' \\(ADD\\): expected a number, got str"):
        node_ctx().add("total", "three")  # type: ignore[arg-type]


def test_a_refused_batch_changes_nothing() -> None:
    context = SCHEMA.initial()
    operations = [Operation("total", Merge.ADD, 1), Operation("log", Merge.ADD, 1)]
    with pytest.raises(ContextError):
        apply(context, operations, SCHEMA)
    assert context == SCHEMA.initial()


def test_nan_in_a_context_value_is_refused() -> None:
    with pytest.raises(ContextError, match="NaN and Infinity are not valid JSON"):
        node_ctx().max("high", float("nan"))


def test_operations_round_trip_through_protos() -> None:
    operation = Operation("events", Merge.EVENT_LOG, {"a": [1, 2]}, "id-1")
    assert Operation.from_proto(operation.to_proto()) == operation


def test_a_context_type_needs_defaults() -> None:
    @dataclass
    class NoDefaults:
        count: int

    with pytest.raises(InvalidDefinition, match="every field needs a default"):
        ContextSchema.from_type(NoDefaults)


@given(st.lists(st.integers(-1000, 1000), max_size=20))
def test_add_operations_commute(amounts: list[int]) -> None:
    forward, backward = SCHEMA.initial(), SCHEMA.initial()
    apply(forward, [Operation("total", Merge.ADD, a) for a in amounts], SCHEMA)
    apply(backward, [Operation("total", Merge.ADD, a) for a in reversed(amounts)], SCHEMA)
    assert forward["total"] == backward["total"] == sum(amounts)


@given(st.lists(st.sampled_from("abcdef"), max_size=20))
def test_union_keeps_first_appearance_order_without_duplicates(tags: list[str]) -> None:
    context = SCHEMA.initial()
    apply(context, [Operation("tags", Merge.UNION, [t]) for t in tags], SCHEMA)
    assert context["tags"] == list(dict.fromkeys(tags))
