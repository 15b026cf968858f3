"""The workflow DSL: what it builds, how it is drawn, and every malformed definition refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

import pytest

from floxide_grpc import (
    InvalidDefinition,
    NextAll,
    Node,
    NodeContext,
    RetryPolicy,
    Workflow,
    node,
)
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import workflow_pb2


@node
def parse(text: str) -> int:
    return int(text)


@node
def double(x: int) -> int:
    return x * 2


@node
def show(x: int) -> str:
    return str(x)


@node
def shout(text: str) -> str:
    return text.upper()


@dataclass
class Big:
    value: int


@dataclass
class Small:
    value: int


@node
def size(x: int) -> Big | Small:
    return Big(x) if x > 9 else Small(x)


@node
def on_big(b: Big) -> str:
    return f"big {b.value}"


@node
def on_small(s: Small) -> str:
    return f"small {s.value}"


def chain() -> Workflow:
    flow = Workflow("chain", start=parse, description="parse, double, show")
    return flow.edge(parse, double).edge(double, show)


def test_definition_holds_nodes_edges_and_schemas() -> None:
    definition = chain().definition()
    assert definition.name == "chain"
    assert definition.start == "parse"
    assert [n.name for n in definition.nodes] == ["parse", "double", "show"]
    assert [(e.source, list(e.targets)) for e in definition.edges] == [
        ("parse", ["double"]),
        ("double", ["show"]),
    ]
    parse_def = definition.nodes[0]
    assert json.loads(parse_def.input_schema) == {"type": "string"}
    assert json.loads(parse_def.output_schema) == {"type": "integer"}
    assert parse_def.kind == workflow_pb2.NODE_KIND_TASK


def test_definition_records_retry_timeout_config_and_context() -> None:
    @dataclass
    class Scale(Node[int, int]):
        """Multiply by a factor."""

        factor: int

        async def process(self, ctx: NodeContext, x: int) -> int:
            return x * self.factor

    policy = RetryPolicy(max_attempts=4, initial_backoff=timedelta(milliseconds=100))
    flow = Workflow("scaled", start=parse)
    flow.add(Scale(3), retry=policy, timeout=timedelta(seconds=2))
    flow.edge(parse, "scale")
    definition = flow.definition()
    scale = definition.nodes[1]
    assert scale.name == "scale"
    assert scale.description == "Multiply by a factor."
    assert json.loads(scale.config.data) == {"factor": 3}
    assert scale.retry_policy.max_attempts == 4
    assert scale.timeout.ToTimedelta() == timedelta(seconds=2)
    assert RetryPolicy.from_proto(scale.retry_policy) == policy


def test_routes_are_declared_on_the_routing_node() -> None:
    flow = Workflow("sizes", start=size).route(size, {Big: on_big, Small: on_small})
    definition = flow.definition()
    assert list(definition.nodes[0].routes) == ["Big", "Small"]
    assert {(e.route, tuple(e.targets)) for e in definition.edges} == {
        ("Big", ("on_big",)),
        ("Small", ("on_small",)),
    }


def test_to_dot_draws_edges_fallbacks_and_terminals() -> None:
    flow = chain().on_failure(parse, shout)
    assert flow.to_dot() == (
        'digraph "chain" {\n'
        "  rankdir=LR;\n"
        "  node [shape=box];\n"
        '  "show" [peripheries=2];\n'
        '  "shout" [peripheries=2];\n'
        '  "parse" -> "double";\n'
        '  "double" -> "show";\n'
        '  "parse" -> "shout" [style="dotted" color="red" label="fallback"];\n'
        "}\n"
    )


def test_to_mermaid_draws_routes() -> None:
    flow = Workflow("sizes", start=size).route(size, {Big: on_big, Small: on_small})
    assert flow.to_mermaid() == (
        "flowchart LR\n"
        '  n0["size"]\n'
        '  n1(["on_big"])\n'
        '  n2(["on_small"])\n'
        '  n0 -->|"Big"| n1\n'
        '  n0 -->|"Small"| n2\n'
    )


def test_the_same_definition_has_the_same_hash() -> None:
    first, second = Graph(chain().definition()), Graph(chain().definition())
    assert first.definition_hash == second.definition_hash
    assert first.definition_hash.startswith("sha256:")
    changed = Graph(chain().on_failure(parse, shout).definition())
    assert changed.definition_hash != first.definition_hash


# -- malformed definitions -------------------------------------------------------------------


def refused(flow: Workflow, message: str) -> None:
    with pytest.raises(InvalidDefinition) as caught:
        flow.definition()
    assert message in str(caught.value)


def test_no_start_is_refused() -> None:
    flow = Workflow("nostart")
    flow.add(parse)
    refused(flow, "workflow 'nostart' has no start node")


def test_edge_to_an_unknown_node_is_refused() -> None:
    refused(chain().edge(show, "nowhere"), "edge from 'show' to unknown node 'nowhere'")


def test_duplicate_node_name_is_refused() -> None:
    @node(name="parse")
    def other(text: str) -> int:
        return len(text)

    flow = chain()
    with pytest.raises(InvalidDefinition, match="duplicate node name 'parse'"):
        flow.add(other)
    assert [n.name for n in flow.definition().nodes] == ["parse", "double", "show"]


def test_duplicate_name_in_a_foreign_definition_is_refused() -> None:
    definition = chain().definition()
    definition.nodes.add().CopyFrom(definition.nodes[0])
    with pytest.raises(InvalidDefinition, match="duplicate node name 'parse'"):
        Graph(definition).validate()


def test_route_label_with_no_edge_is_refused() -> None:
    definition = (
        Workflow("sizes", start=size).route(size, {Big: on_big, Small: on_small}).definition()
    )
    definition.nodes[0].routes.append("Medium")
    with pytest.raises(InvalidDefinition, match="node 'size' declares route 'Medium' with no edge"):
        Graph(definition).validate()


def test_variant_without_a_route_is_refused() -> None:
    refused(
        Workflow("sizes", start=size).route(size, {Big: on_big}),
        "node 'size' can return variant 'Small' but has no route for it",
    )


def test_unreachable_node_is_refused() -> None:
    flow = chain()
    flow.add(shout)
    refused(flow, "node 'shout' is unreachable from start 'parse'")


def test_graph_with_no_terminal_is_refused() -> None:
    @node
    def again(x: int) -> int:
        return x

    flow = Workflow("loop", start=again, allow_cycles=True).edge(again, again)
    refused(flow, "workflow 'loop' has no terminal node")


def test_undeclared_cycle_is_refused_and_a_declared_one_accepted() -> None:
    @node
    def step(x: int) -> int:
        return x

    @node
    def check(x: int) -> int:
        return x

    def build(allow: bool) -> Workflow:
        flow = Workflow("cycle", start=step, allow_cycles=allow)
        flow.edge(step, check).route(check, {"again": step, "done": None})
        return flow

    refused(build(False), "has a cycle step -> check -> step")
    assert build(True).definition().allow_cycles


def test_types_that_do_not_match_along_an_edge_are_refused() -> None:
    refused(
        Workflow("mismatch", start=parse).edge(parse, shout),
        "edge 'parse' -> 'shout': 'parse' sends its output of type int but 'shout' takes str",
    )


def test_fallback_target_must_take_the_failed_node_input() -> None:
    refused(
        chain().on_failure(double, shout),
        "edge 'double' -> 'shout': 'double' sends its input of type int but 'shout' takes str",
    )


def test_join_must_take_a_list_of_what_arrives() -> None:
    @node
    def fan(n: int) -> NextAll[int]:
        return NextAll(list(range(n)))

    @node(join=True)
    def bad_join(values: list[str]) -> int:
        return len(values)

    refused(
        Workflow("join", start=fan).edge(fan, double).edge(double, bad_join),
        "'double' sends its output of type int but 'bad_join' takes str",
    )


def test_bad_node_names_are_refused() -> None:
    with pytest.raises(InvalidDefinition, match="node name 'has space'"):
        Workflow("w").add(parse, name="has space")


def test_a_node_must_be_a_node() -> None:
    with pytest.raises(InvalidDefinition, match="is not a node"):
        Workflow("w", start=42)
