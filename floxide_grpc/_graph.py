"""A workflow definition as a graph: indexed, validated and drawn.

Works on the ``floxide.v1.WorkflowDefinition`` proto alone, so the server checks definitions
registered from any language with the same rules as the Python DSL, and ``to_dot`` /
``to_mermaid`` draw any registered workflow.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator

from floxide_grpc._names import check_name
from floxide_grpc._proto.floxide.v1 import workflow_pb2
from floxide_grpc.errors import InvalidDefinition, NodeNotFound

__all__ = ["Graph"]

_DIRECT = workflow_pb2.EDGE_KIND_DIRECT
_ROUTED = workflow_pb2.EDGE_KIND_ROUTED
_FALLBACK = workflow_pb2.EDGE_KIND_FALLBACK


class Graph:
    """The nodes and edges of one workflow definition, indexed for routing.

    Building a graph indexes the definition without judging it; :meth:`validate` judges it.
    """

    def __init__(self, definition: workflow_pb2.WorkflowDefinition) -> None:
        self.definition = definition
        self.name = definition.name
        self.nodes: dict[str, workflow_pb2.NodeDefinition] = {}
        self.direct: dict[str, list[str]] = {}
        self.routed: dict[str, dict[str, list[str]]] = {}
        self.fallback: dict[str, list[str]] = {}
        for node in definition.nodes:
            self.nodes.setdefault(node.name, node)
        for edge in definition.edges:
            targets = list(edge.targets)
            if edge.kind == _DIRECT:
                self.direct.setdefault(edge.source, []).extend(targets)
            elif edge.kind == _ROUTED:
                self.routed.setdefault(edge.source, {}).setdefault(edge.route, []).extend(targets)
            elif edge.kind == _FALLBACK:
                self.fallback.setdefault(edge.source, []).extend(targets)
        self.subworkflows = {w.name: w for w in definition.subworkflows}
        self._child_hashes: dict[str, str] = {}
        # The content hash: SHA-256 of the deterministic encoding. Only the server's value is
        # authoritative (protobuf promises no byte-identical encoding across languages).
        digest = hashlib.sha256(definition.SerializeToString(deterministic=True)).hexdigest()
        self.definition_hash = f"sha256:{digest}"

    def node(self, name: str) -> workflow_pb2.NodeDefinition:
        """The definition of a node.

        Raises:
            NodeNotFound: the workflow has no such node.
        """
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(f"workflow {self.name!r} has no node {name!r}") from None

    def is_terminal(self, name: str) -> bool:
        """Whether a node's ``Next`` output completes the run: marked terminal, or no successors."""
        return self.node(name).terminal or (name not in self.direct and name not in self.routed)

    def successors(self, name: str) -> Iterator[str]:
        """Every node an edge leads to from ``name`` (direct, routed and fallback)."""
        yield from self.direct.get(name, ())
        for targets in self.routed.get(name, {}).values():
            yield from targets
        yield from self.fallback.get(name, ())

    def join_after(self, targets: Iterable[str]) -> str | None:
        """The first join node reachable from ``targets`` (breadth first), where a group joins."""
        seen: set[str] = set()
        queue = deque(targets)
        while queue:
            name = queue.popleft()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            if self.nodes[name].kind == workflow_pb2.NODE_KIND_JOIN:
                return name
            queue.extend(self.successors(name))
        return None

    def validate(self) -> None:
        """Judge the definition; the first problem found is raised, naming the node at fault.

        Raises:
            InvalidDefinition: no start, a bad or duplicate name, an edge to or from an unknown
                node, a route label with no edge, a node the start cannot reach, no terminal
                node, a cycle not allowed by ``allow_cycles``, a malformed node.
        """
        wf = f"workflow {self.name!r}"
        check_name("workflow name", self.name, InvalidDefinition)
        self._check_nodes(wf)
        if not self.definition.start:
            raise InvalidDefinition(f"{wf} has no start node")
        if self.definition.start not in self.nodes:
            raise InvalidDefinition(f"{wf}: start node {self.definition.start!r} does not exist")
        self._check_edges(wf)
        reachable = self._reachable(self.definition.start)
        for name in self.nodes:
            if name not in reachable:
                raise InvalidDefinition(
                    f"{wf}: node {name!r} is unreachable from start {self.definition.start!r}"
                )
        if not any(self.is_terminal(n) for n in self.nodes) and not any(
            not targets for routes in self.routed.values() for targets in routes.values()
        ):
            raise InvalidDefinition(f"{wf} has no terminal node: no run could ever complete")
        if not self.definition.allow_cycles:
            cycle = self._cycle()
            if cycle:
                raise InvalidDefinition(
                    f"{wf} has a cycle {' -> '.join(cycle)}; declare it with allow_cycles"
                )
        for child in self.definition.subworkflows:
            Graph(child).validate()
            self._check_inherited(wf, child)

    def _check_inherited(self, wf: str, child: workflow_pb2.WorkflowDefinition) -> None:
        """A child run starts from a copy of its parent's context: shared fields must agree."""
        mine = {field.name: field for field in self.definition.context_fields}
        for field in child.context_fields:
            ours = mine.get(field.name)
            if ours is not None and (ours.strategy, ours.schema) != (field.strategy, field.schema):
                raise InvalidDefinition(
                    f"{wf}: context field {field.name!r} is declared with another strategy or "
                    f"schema by subworkflow {child.name!r}; a child run starts from a copy of "
                    "its parent's context, so a field both declare must agree"
                )

    def child_hash(self, name: str) -> str:
        """The content hash of the subworkflow ``name`` (its child runs are pinned to it)."""
        found = self._child_hashes.get(name)
        if found is None:
            found = self._child_hashes[name] = Graph(self.subworkflows[name]).definition_hash
        return found

    def _check_nodes(self, wf: str) -> None:
        seen: set[str] = set()
        for node in self.definition.nodes:
            check_name(f"{wf}: node name", node.name, InvalidDefinition)
            if node.name in seen:
                raise InvalidDefinition(f"{wf}: duplicate node name {node.name!r}")
            seen.add(node.name)
            if node.kind == workflow_pb2.NODE_KIND_UNSPECIFIED or node.kind not in (
                workflow_pb2.NodeKind.values()
            ):
                raise InvalidDefinition(f"{wf}: node {node.name!r} has no valid kind")
            if node.kind == workflow_pb2.NODE_KIND_SUBWORKFLOW and (
                node.subworkflow not in self.subworkflows
            ):
                raise InvalidDefinition(
                    f"{wf}: node {node.name!r} runs subworkflow {node.subworkflow!r}, "
                    "which the definition does not include"
                )
            if node.terminal and node.name in self.direct:
                raise InvalidDefinition(f"{wf}: terminal node {node.name!r} has direct edges")
            for label in node.routes:
                check_name(f"{wf}: node {node.name!r} route", label, InvalidDefinition)
                if label not in self.routed.get(node.name, {}):
                    raise InvalidDefinition(
                        f"{wf}: node {node.name!r} declares route {label!r} with no edge"
                    )

    def _check_edges(self, wf: str) -> None:
        for edge in self.definition.edges:
            if edge.kind not in (_DIRECT, _ROUTED, _FALLBACK):
                raise InvalidDefinition(f"{wf}: edge from {edge.source!r} has no valid kind")
            if edge.source not in self.nodes:
                raise InvalidDefinition(f"{wf}: edge from unknown node {edge.source!r}")
            for target in edge.targets:
                if target not in self.nodes:
                    raise InvalidDefinition(
                        f"{wf}: edge from {edge.source!r} to unknown node {target!r}"
                    )
            if edge.kind == _ROUTED and not edge.route:
                raise InvalidDefinition(f"{wf}: routed edge from {edge.source!r} has no route")
            if edge.route:
                check_name(f"{wf}: edge from {edge.source!r} route", edge.route, InvalidDefinition)
            if edge.kind != _ROUTED and edge.route:
                raise InvalidDefinition(
                    f"{wf}: edge from {edge.source!r} has route {edge.route!r} but is not routed"
                )
            if edge.kind != _ROUTED and not edge.targets:
                raise InvalidDefinition(f"{wf}: edge from {edge.source!r} has no targets")
        for source, routes in self.routed.items():
            declared = set(self.nodes[source].routes)
            for label in routes:
                if declared and label not in declared:
                    raise InvalidDefinition(
                        f"{wf}: node {source!r} has an edge for route {label!r} it never returns"
                    )

    def _reachable(self, start: str) -> set[str]:
        seen = {start}
        queue = deque([start])
        while queue:
            for target in self.successors(queue.popleft()):
                if target not in seen:
                    seen.add(target)
                    queue.append(target)
        return seen

    def _cycle(self) -> list[str]:
        """A cycle as a path of names (first node repeated at the end), or ``[]``."""
        state: dict[str, int] = {}  # 1 on the path, 2 done
        path: list[str] = []

        def visit(name: str) -> list[str]:
            state[name] = 1
            path.append(name)
            for target in self.successors(name):
                if state.get(target) == 1:
                    return [*path[path.index(target) :], target]
                if target not in state:
                    found = visit(target)
                    if found:
                        return found
            path.pop()
            state[name] = 2
            return []

        for name in self.nodes:
            if name not in state:
                found = visit(name)
                if found:
                    return found
        return []

    def to_dot(self) -> str:
        """The graph in Graphviz DOT, drawn as floxide draws it (fallbacks dotted red)."""
        lines = [f'digraph "{self.name}" {{', "  rankdir=LR;", "  node [shape=box];"]
        for name, node in self.nodes.items():
            shape = {
                workflow_pb2.NODE_KIND_JOIN: "invhouse",
                workflow_pb2.NODE_KIND_SUBWORKFLOW: "box3d",
            }.get(node.kind)
            attrs = [f"shape={shape}"] if shape else []
            if self.is_terminal(name):
                attrs.append("peripheries=2")
            if attrs:
                lines.append(f'  "{name}" [{", ".join(attrs)}];')
        for source, targets in self.direct.items():
            lines += [f'  "{source}" -> "{t}";' for t in targets]
        for source, routes in self.routed.items():
            for label, targets in routes.items():
                lines += [f'  "{source}" -> "{t}" [label="{label}"];' for t in targets]
        for source, targets in self.fallback.items():
            lines += [
                f'  "{source}" -> "{t}" [style="dotted" color="red" label="fallback"];'
                for t in targets
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (fallbacks dotted, terminals rounded)."""
        ids = {name: f"n{i}" for i, name in enumerate(self.nodes)}
        lines = ["flowchart LR"]
        for name, node in self.nodes.items():
            if node.kind == workflow_pb2.NODE_KIND_JOIN:
                lines.append(f'  {ids[name]}[/"{name}"\\]')
            elif self.is_terminal(name):
                lines.append(f'  {ids[name]}(["{name}"])')
            else:
                lines.append(f'  {ids[name]}["{name}"]')
        for source, targets in self.direct.items():
            lines += [f"  {ids[source]} --> {ids[t]}" for t in targets]
        for source, routes in self.routed.items():
            for label, targets in routes.items():
                lines += [f'  {ids[source]} -->|"{label}"| {ids[t]}' for t in targets]
        for source, targets in self.fallback.items():
            lines += [f'  {ids[source]} -.->|"fallback"| {ids[t]}' for t in targets]
        return "\n".join(lines) + "\n"
