"""Routing over the protos: successors, groups, arrivals, joins, derived ids."""

from __future__ import annotations

import json

import pytest

from floxide_grpc import InvalidTransition, NextAll, Workflow, node
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_grpc._routing import arrive, join_input, route, route_failure, start_item

Payload = work_item_pb2.Payload
Transition = work_item_pb2.Transition


def js(value: object) -> Payload:
    return Payload(encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode())


def nxt(value: object, label: str = "") -> Transition:
    return Transition(next=Transition.Next(output=js(value), route=label))


def fan(*values: object) -> Transition:
    return Transition(next_all=Transition.NextAll(outputs=[js(v) for v in values]))


@node
def split(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
def inc(x: int) -> int:
    return x + 1


@node
def other(x: int) -> int:
    return x


@node(join=True)
def gather(xs: list[int]) -> int:
    return sum(xs)


@node
def done(x: int) -> int:
    return x


def graph_of(flow: Workflow) -> Graph:
    return Graph(flow.definition())


def first_item(graph: Graph) -> work_item_pb2.WorkItem:
    return start_item(
        graph.definition, namespace="default", run_id="r", definition_hash="h", input=js(3)
    )


def test_next_on_a_direct_edge_makes_one_successor_without_a_group() -> None:
    graph = graph_of(Workflow("w", start=inc).edge(inc, done))
    step = route(graph, first_item(graph), nxt(4))
    assert [i.node for i in step.items] == ["done"]
    assert step.items[0].group_stack == []
    assert step.items[0].parent_item_id == "start"
    assert step.items[0].attempt == 1
    assert step.output is None


def test_next_on_a_terminal_node_is_the_output() -> None:
    graph = graph_of(Workflow("w", start=inc))
    step = route(graph, first_item(graph), nxt(4))
    assert step.items == [] and step.output == js(4)


def test_next_to_several_targets_opens_a_group_joined_by_the_join() -> None:
    flow = Workflow("w", start=inc).edge(inc, [other, done]).edge(other, gather)
    flow.edge(done, gather)
    graph = graph_of(flow)
    step = route(graph, first_item(graph), nxt(4))
    frames = [item.group_stack[-1] for item in step.items]
    assert [(f.index, f.size, f.join_node) for f in frames] == [(0, 2, "gather"), (1, 2, "gather")]
    arrivals = [route(graph, item, nxt(n)).arrivals[0] for n, item in enumerate(step.items)]
    group, join = arrive(None, arrivals[1], step.items[1])
    group, join = arrive(group, arrivals[0], step.items[0])
    assert join is not None and json.loads(join.input.data) == [0, 1]
    assert len({f.group_id for f in frames}) == 1


def test_fan_out_arrives_at_the_join_in_index_order() -> None:
    graph = graph_of(
        Workflow("w", start=split).edge(split, inc).edge(inc, gather).edge(gather, done)
    )
    step = route(graph, first_item(graph), fan(10, 20, 30))
    assert len({i.item_id for i in step.items}) == 3
    arrivals = []
    for branch, value in zip(step.items, (11, 21, 31), strict=True):
        arrivals += route(graph, branch, nxt(value)).arrivals
    assert [a.frame.index for a in arrivals] == [0, 1, 2]
    group, join = None, None
    for arrival in reversed(arrivals):  # arrive out of order
        group, join = arrive(group, arrival, step.items[0])
    assert join is not None and join.node == "gather"
    assert json.loads(join.input.data) == [11, 21, 31]
    assert group is not None and join.join_group_id == group.group_id
    assert join.group_stack == []


def test_an_arrival_counted_twice_does_not_fire_the_join_early() -> None:
    graph = graph_of(Workflow("w", start=split).edge(split, inc).edge(inc, gather))
    items = route(graph, first_item(graph), fan(1, 2)).items
    first = route(graph, items[0], nxt(2)).arrivals[0]
    group, join = arrive(None, first, items[0])
    group, join = arrive(group, first, items[0])
    assert join is None and len(group.arrivals) == 1


def test_hold_arrives_with_no_value_and_the_join_skips_it() -> None:
    graph = graph_of(Workflow("w", start=split).edge(split, inc).edge(inc, gather))
    items = route(graph, first_item(graph), fan(1, 2, 3)).items
    arrivals = [
        route(graph, items[0], nxt(5)).arrivals[0],
        route(graph, items[1], Transition(hold=Transition.Hold())).arrivals[0],
        route(graph, items[2], nxt(7)).arrivals[0],
    ]
    group = None
    for arrival in arrivals:
        group, join = arrive(group, arrival, items[0])
    assert join is not None and json.loads(join.input.data) == [5, 7]


def test_empty_fan_out_fires_the_join_with_an_empty_list() -> None:
    graph = graph_of(Workflow("w", start=split).edge(split, inc).edge(inc, gather))
    step = route(graph, first_item(graph), fan())
    assert [(i.node, json.loads(i.input.data)) for i in step.items] == [("gather", [])]


def test_nested_fan_outs_join_innermost_first() -> None:
    @node
    def split_again(x: int) -> NextAll[int]:
        return NextAll([x, x])

    @node(join=True)
    def inner(xs: list[int]) -> int:
        return sum(xs)

    flow = Workflow("w", start=split).edge(split, split_again).edge(split_again, inc)
    flow.edge(inc, inner).edge(inner, gather)
    graph = graph_of(flow)
    outer = route(graph, first_item(graph), fan(1, 2)).items
    assert [len(i.group_stack) for i in outer] == [1, 1]
    inner_items = route(graph, outer[0], fan(1, 1)).items
    assert [len(i.group_stack) for i in inner_items] == [2, 2]
    assert inner_items[0].group_stack[-1].join_node == "inner"
    group = None
    for item in inner_items:
        group, join = arrive(group, route(graph, item, nxt(1)).arrivals[0], item)
    assert join is not None and join.node == "inner"
    assert [f.group_id for f in join.group_stack] == [outer[0].group_stack[0].group_id]
    # The inner join's output arrives in the outer group, at the outer join.
    arrival = route(graph, join, nxt(2)).arrivals[0]
    assert arrival.join_node == "gather"
    assert arrival.frame == outer[0].group_stack[0]


def test_routed_edges_follow_the_label_and_an_empty_arm_completes_the_run() -> None:
    graph = graph_of(Workflow("w", start=inc).route(inc, {"more": other, "stop": None}))
    item = first_item(graph)
    assert [i.node for i in route(graph, item, nxt(1, "more")).items] == ["other"]
    assert route(graph, item, nxt(9, "stop")).output == js(9)
    with pytest.raises(InvalidTransition, match="returned route 'maybe', which has no edge"):
        route(graph, item, nxt(1, "maybe"))
    with pytest.raises(InvalidTransition, match="returned no route but has only routed edges"):
        route(graph, item, nxt(1))


def test_fallback_gets_the_original_input() -> None:
    graph = graph_of(Workflow("w", start=inc).edge(inc, done).on_failure(inc, other))
    step = route_failure(graph, first_item(graph))
    assert step is not None and [(i.node, i.input) for i in step.items] == [("other", js(3))]
    assert route_failure(graph_of(Workflow("v", start=inc)), first_item(graph)) is None


def test_ids_are_derived_so_routing_twice_makes_the_same_items() -> None:
    graph = graph_of(Workflow("w", start=split).edge(split, inc).edge(inc, gather))
    once = route(graph, first_item(graph), fan(1, 2, 3)).items
    twice = route(graph, first_item(graph), fan(1, 2, 3)).items
    assert once == twice
    assert len({i.item_id for i in once}) == 3


def test_join_input_joins_bytes_without_decoding() -> None:
    raw = [Payload(encoding=work_item_pb2.ENCODING_JSON, data=b'{"b": 1, "a": 2.50}'), js(None)]
    assert join_input(raw).data == b'[{"b": 1, "a": 2.50},null]'
