"""Routing: given a definition, an item and its transition, what happens next.

Pure functions over the contract's protos, shared by the local runner and the server, so both
route identically. Payload bytes pass through untouched: a join's input is assembled by joining
its arrivals' JSON texts, never by decoding them.

Fan-out and join. A transition that makes several items (``NextAll``, or ``Next`` to several
targets) opens a *group*: each new item carries a :class:`GroupFrame` ``(group, index, size)``
pushed on its group stack. An item whose successor is a join node does not make an item: it
*arrives* in its top group. ``Hold`` arrives with no value, at the frame's ``join_node`` (the
first join reachable from the fan-out, the only place a held branch can be counted). When all
``size`` branches have arrived, :func:`arrive` makes the join item, whose input is the list of the
outputs in index order and whose stack is the group's parent stack: nested fan-outs join
innermost first.

Ids are derived, not drawn: a successor's id is a hash of its parent's id and its position, a
group's id a hash of the item that opened it. A step routed twice (a worker that ran a node
again) therefore makes the same ids, which is what lets the server apply it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, work_item_pb2, workflow_pb2
from floxide_grpc.errors import InvalidTransition

__all__ = ["Arrival", "Step", "arrive", "join_input", "route", "route_failure", "start_item"]

WorkItem = work_item_pb2.WorkItem
Payload = work_item_pb2.Payload
GroupFrame = work_item_pb2.GroupFrame

START_ITEM_ID = "start"
"""The id of every run's first item."""


@dataclasses.dataclass(frozen=True)
class Arrival:
    """A branch reaching its group's join.

    Attributes:
        frame: The group frame the branch carried (group, index, size).
        output: The branch's output; ``None`` when it held.
        parent_stack: The group stack the join item will carry.
        join_node: The join reached; for a held branch, the frame's guess.
    """

    frame: GroupFrame
    output: Payload | None
    parent_stack: tuple[GroupFrame, ...]
    join_node: str


@dataclasses.dataclass
class Step:
    """What one transition causes.

    Attributes:
        items: New items to enqueue, in order.
        arrivals: Arrivals to record in their groups (see :func:`arrive`).
        output: Set when the transition completes the run with this output.
    """

    items: list[WorkItem] = dataclasses.field(default_factory=list)
    arrivals: list[Arrival] = dataclasses.field(default_factory=list)
    output: Payload | None = None


def derive_id(*parts: str) -> str:
    """A short id derived from its parts (16 hex digits of BLAKE2b)."""
    return hashlib.blake2b("/".join(parts).encode(), digest_size=8).hexdigest()


def start_item(
    definition: workflow_pb2.WorkflowDefinition,
    *,
    namespace: str,
    run_id: str,
    definition_hash: str,
    input: Payload,
) -> WorkItem:
    """A run's first item: the start node on the run's input."""
    return WorkItem(
        namespace=namespace,
        run_id=run_id,
        item_id=START_ITEM_ID,
        node=definition.start,
        input=input,
        attempt=1,
        definition_hash=definition_hash,
        workflow=definition.name,
    )


def route(graph: Graph, item: WorkItem, transition: work_item_pb2.Transition) -> Step:
    """Route a successful transition (``next``, ``next_all`` or ``hold``) of ``item``.

    Raises:
        InvalidTransition: the transition has no edge to follow (an undeclared route, a fan-out
            from a node without direct edges), or is an abort (use :func:`route_failure`).
    """
    outcome = transition.WhichOneof("outcome")
    if outcome == "next":
        return _route_next(graph, item, transition.next)
    if outcome == "next_all":
        return _route_next_all(graph, item, list(transition.next_all.outputs))
    if outcome == "hold":
        stack = tuple(item.group_stack)
        if stack and stack[-1].join_node:
            return Step(arrivals=[Arrival(stack[-1], None, stack[:-1], stack[-1].join_node)])
        return Step()
    raise InvalidTransition(f"node {item.node!r}: transition {outcome or 'unset'} is not a success")


def _route_next(graph: Graph, item: WorkItem, next_: work_item_pb2.Transition.Next) -> Step:
    name, label = item.node, next_.route
    if label:
        routes = graph.routed.get(name, {})
        if label not in routes:
            raise InvalidTransition(f"node {name!r} returned route {label!r}, which has no edge")
        targets = routes[label]
    elif graph.is_terminal(name):
        targets = []
    else:
        targets = graph.direct.get(name, [])
        if not targets:
            raise InvalidTransition(f"node {name!r} returned no route but has only routed edges")
    if not targets:
        return Step(output=next_.output)
    return _fan(graph, item, targets, [next_.output], group=len(targets) > 1)


def _route_next_all(graph: Graph, item: WorkItem, outputs: list[Payload]) -> Step:
    name = item.node
    if graph.is_terminal(name) and name not in graph.direct:
        return Step(output=join_input(outputs))  # a terminal fan-out: the list is the output
    targets = graph.direct.get(name, [])
    if not targets:
        raise InvalidTransition(f"node {name!r} fanned out but has no direct edges")
    if not outputs:
        return _empty_group(graph, item, targets)
    return _fan(graph, item, targets, outputs, group=True)


def route_failure(graph: Graph, item: WorkItem) -> Step | None:
    """Route an item that failed for good to its fallback edge, with its original input.

    Returns:
        The step, or ``None`` when the node has no fallback (the run fails).
    """
    targets = graph.fallback.get(item.node, [])
    if not targets:
        return None
    return _fan(graph, item, targets, [item.input], group=len(targets) > 1, tag="fallback")


def _fan(
    graph: Graph,
    item: WorkItem,
    targets: Sequence[str],
    outputs: Sequence[Payload],
    *,
    group: bool,
    tag: str = "next",
) -> Step:
    step = Step()
    stack = tuple(item.group_stack)
    size = len(outputs) * len(targets)
    join = graph.join_after(targets) if group else None
    group_id = derive_id(item.run_id, item.item_id, tag, "group")
    for i, output in enumerate(outputs):
        for t, target in enumerate(targets):
            index = i * len(targets) + t
            frames = stack
            if group:
                frame = GroupFrame(group_id=group_id, index=index, size=size, join_node=join or "")
                frames = (*stack, frame)
            _deliver(
                graph, item, target, output, frames, derive_id(item.item_id, tag, str(index)), step
            )
    return step


def _deliver(
    graph: Graph,
    parent: WorkItem,
    target: str,
    value: Payload,
    stack: tuple[GroupFrame, ...],
    item_id: str,
    step: Step,
) -> None:
    """Make ``target``'s item, or an arrival in the top group when ``target`` is a join."""
    if graph.node(target).kind == workflow_pb2.NODE_KIND_JOIN:
        if stack:
            step.arrivals.append(Arrival(stack[-1], value, stack[:-1], target))
            return
        value = join_input([value])  # a join outside any fan-out: a group of one
    step.items.append(_item(parent, target, value, stack, item_id))


def _empty_group(graph: Graph, item: WorkItem, targets: Sequence[str]) -> Step:
    """``NextAll([])``: the join after the targets fires at once with ``[]``."""
    join = graph.join_after(targets)
    if join is None:
        return Step()
    join_id = derive_id(item.item_id, "next", "empty")
    return Step(items=[_item(item, join, join_input([]), tuple(item.group_stack), join_id)])


def _item(
    parent: WorkItem, node: str, value: Payload, stack: Sequence[GroupFrame], item_id: str
) -> WorkItem:
    return WorkItem(
        namespace=parent.namespace,
        run_id=parent.run_id,
        item_id=item_id,
        node=node,
        input=value,
        attempt=1,
        group_stack=stack,
        definition_hash=parent.definition_hash,
        workflow=parent.workflow,
        parent_item_id=parent.item_id,
    )


def join_input(outputs: Sequence[Payload]) -> Payload:
    """A JSON array of JSON payloads, made by joining their bytes (no decode)."""
    data = b"[" + b",".join(p.data for p in outputs) + b"]"
    return Payload(encoding=work_item_pb2.ENCODING_JSON, data=data)


def arrive(
    group: checkpoint_pb2.JoinGroup | None,
    arrival: Arrival,
    parent: WorkItem,
    *,
    inline: bool = True,
) -> tuple[checkpoint_pb2.JoinGroup, WorkItem | None]:
    """Record an arrival in its group; make the join item when it is the last.

    Args:
        group: The group's record so far, or ``None`` for its first arrival.
        arrival: The branch arriving.
        parent: The item whose transition caused the arrival (for the run's ids).
        inline: Keep outputs in the group and give the join item its input (the local runner).
            Without it, outputs are stored apart and the join item only names its group: its
            input is assembled when it is dispatched (the server, where 100 outputs can pass
            etcd's request size).

    Returns:
        The updated group record, and the join item when every branch has arrived. An index that
        already arrived is not counted again.
    """
    frame = arrival.frame
    updated = checkpoint_pb2.JoinGroup()
    if group is not None:
        updated.CopyFrom(group)
    else:
        updated.group_id = frame.group_id
        updated.size = frame.size
        updated.parent_stack.extend(arrival.parent_stack)
    if any(a.index == frame.index for a in updated.arrivals):
        return updated, None
    if arrival.output is not None and all(a.held for a in updated.arrivals):
        updated.join_node = arrival.join_node  # the first branch to reach a join names it
    elif not updated.join_node:
        updated.join_node = arrival.join_node
    entry = updated.arrivals.add(index=frame.index, held=arrival.output is None)
    if arrival.output is not None and inline:
        entry.output.CopyFrom(arrival.output)
    if len(updated.arrivals) < updated.size:
        return updated, None
    outputs = [a.output for a in sorted(updated.arrivals, key=lambda a: a.index) if not a.held]
    join = _item(
        parent,
        updated.join_node,
        join_input(outputs) if inline else Payload(),
        list(updated.parent_stack),
        derive_id(updated.group_id, "join"),
    )
    if not inline:
        join.ClearField("input")
    join.join_group_id = updated.group_id
    return updated, join
