"""The workflow DSL: nodes wired by edges, built into a ``floxide.v1.WorkflowDefinition``.

floxide's ``workflow!`` macro, as Python calls::

    flow = Workflow("orders", start=validate, context=Totals)
    flow.edge(validate, charge)                        # direct
    flow.edge(charge, [pack, notify])                  # fan out to two
    flow.route(review, {Approved: ship, Rejected: refund, Done: None})  # by variant or label
    flow.on_failure(charge, refund)                    # fallback: receives charge's input
    flow.edge(split, worker); flow.edge(worker, collect)   # NextAll fan-out, then a join node

Nodes are decorated functions, :class:`~floxide_grpc.node.Node` instances or names of nodes
already added. A node with no outgoing success edge is terminal: its output completes the run.
The definition is validated when first built (:meth:`Workflow.definition`): the same structural
rules as the server (:meth:`Graph.validate`), plus the Python types along every edge.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from floxide_grpc import _codec as codec
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import workflow_pb2
from floxide_grpc.context import ContextSchema
from floxide_grpc.errors import InvalidDefinition, NodeNotFound
from floxide_grpc.node import NodeKind, NodeSpec, as_spec
from floxide_grpc.retry import RetryPolicy
from floxide_grpc.runner import LocalRunner

if TYPE_CHECKING:
    from floxide_grpc.stores import CheckpointStore

__all__ = ["Workflow"]

NodeRef = Any  # a NodeSpec, a Node instance, a function, or a node's name
Targets = NodeRef | Sequence[NodeRef] | None

_KINDS = {
    NodeKind.TASK: workflow_pb2.NODE_KIND_TASK,
    NodeKind.JOIN: workflow_pb2.NODE_KIND_JOIN,
    NodeKind.SUBWORKFLOW: workflow_pb2.NODE_KIND_SUBWORKFLOW,
}


class Workflow:
    """A workflow under construction, then its definition and its in-process runs.

    Args:
        name: The workflow's name, unique in its namespace.
        start: The node that receives the run's input.
        context: The context type (a dataclass or Struct whose fields all have defaults, merge
            strategies in ``Annotated``); ``None`` for a workflow without context.
        description: What the workflow does, for people.
        allow_cycles: Allow the graph to loop (for example a retry-until-done cycle).
    """

    def __init__(
        self,
        name: str,
        *,
        start: NodeRef = None,
        context: Any = None,
        description: str = "",
        allow_cycles: bool = False,
    ) -> None:
        self.name = name
        self.description = description
        self.allow_cycles = allow_cycles
        self.context_type = context
        self.context = (
            ContextSchema.from_type(context) if context is not None else ContextSchema.empty()
        )
        self._specs: dict[str, NodeSpec] = {}
        self._names: dict[int, str] = {}
        self._edges: list[workflow_pb2.Edge] = []
        self._terminals: set[str] = set()
        self._start: str | None = self.add(start) if start is not None else None
        self._definition: workflow_pb2.WorkflowDefinition | None = None

    # -- building -------------------------------------------------------------------------

    def add(
        self,
        node: NodeRef,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
    ) -> str:
        """Add a node (or find it, if this object was added before); returns its name.

        Raises:
            InvalidDefinition: another node already has that name.
        """
        if isinstance(node, str) and name is None and retry is None and timeout is None:
            return node
        if name is None and retry is None and timeout is None and id(node) in self._names:
            return self._names[id(node)]
        spec = as_spec(node).with_settings(name=name, retry=retry, timeout=timeout)
        if spec.name in self._specs:
            raise InvalidDefinition(
                f"workflow {self.name!r}: duplicate node name {spec.name!r}; "
                "pass name= to add the second one"
            )
        self._specs[spec.name] = spec
        self._names.setdefault(id(node), spec.name)
        self._definition = None
        return spec.name

    def start_at(self, node: NodeRef) -> Workflow:
        """Set the start node."""
        self._start = self.add(node)
        self._definition = None
        return self

    def edge(self, source: NodeRef, targets: Targets) -> Workflow:
        """Add direct edges: ``source``'s ``Next`` output goes to every target (several fan out)."""
        return self._edge(source, targets, workflow_pb2.EDGE_KIND_DIRECT)

    def route(self, source: NodeRef, routes: Mapping[str | type, Targets]) -> Workflow:
        """Routed edges: by output variant (a class) or route label (a string).

        A target of ``None`` (or ``[]``) makes that route's output the run's output.
        """
        for label, targets in routes.items():
            name = label if isinstance(label, str) else getattr(label, "__name__", str(label))
            self._edge(source, targets, workflow_pb2.EDGE_KIND_ROUTED, name)
        return self

    def on_failure(self, source: NodeRef, targets: Targets) -> Workflow:
        """Add fallback edges: when ``source`` fails for good, targets get its original input."""
        return self._edge(source, targets, workflow_pb2.EDGE_KIND_FALLBACK)

    def terminal(self, *nodes: NodeRef) -> Workflow:
        """Mark nodes terminal (nodes without success edges are terminal anyway)."""
        self._terminals.update(self.add(n) for n in nodes)
        self._definition = None
        return self

    def _edge(self, source: NodeRef, targets: Targets, kind: int, label: str = "") -> Workflow:
        if targets is None:
            names: list[str] = []
        elif isinstance(targets, Sequence) and not isinstance(targets, str):
            names = [self.add(t) for t in targets]
        else:
            names = [self.add(targets)]
        self._edges.append(
            workflow_pb2.Edge(source=self.add(source), targets=names, kind=kind, route=label)  # type: ignore[arg-type]
        )
        self._definition = None
        return self

    # -- reading --------------------------------------------------------------------------

    def spec(self, name: str) -> NodeSpec:
        """The code and settings of a node.

        Raises:
            NodeNotFound: the workflow has no such node.
        """
        try:
            return self._specs[name]
        except KeyError:
            raise NodeNotFound(f"workflow {self.name!r} has no node {name!r}") from None

    @property
    def nodes(self) -> dict[str, NodeSpec]:
        """Every node by name, in the order added."""
        return dict(self._specs)

    @property
    def input_type(self) -> Any:
        """The run's input type: the start node's input type."""
        return self._specs[self._start].input_type if self._start in self._specs else codec.ANY

    @property
    def output_type(self) -> Any:
        """The run's output type: the union of what terminal nodes and arms output."""
        graph = Graph(self._build())
        outputs: list[Any] = []
        for name, spec in self._specs.items():
            if graph.is_terminal(name):
                outputs.append(spec.output_type)
            for label, targets in graph.routed.get(name, {}).items():
                if not targets:
                    outputs.append(spec.variants.get(label, spec.output_type))
        if not outputs or codec.ANY in outputs:
            return codec.ANY
        unique = list(dict.fromkeys(outputs))
        return unique[0] if len(unique) == 1 else typing.Union[tuple(unique)]  # noqa: UP007

    def definition(self) -> workflow_pb2.WorkflowDefinition:
        """The validated ``floxide.v1.WorkflowDefinition``: a copy of one built once and cached.

        Raises:
            InvalidDefinition: the workflow is malformed; the message names the node at fault.
        """
        if self._definition is None:
            definition = self._build()
            graph = Graph(definition)
            graph.validate()
            self._check_types(graph)
            self._definition = definition
        copy = workflow_pb2.WorkflowDefinition()
        copy.CopyFrom(self._definition)  # callers may change theirs; the cached one stays valid
        return copy

    def to_dot(self) -> str:
        """The workflow in Graphviz DOT."""
        return Graph(self.definition()).to_dot()

    def to_mermaid(self) -> str:
        """The workflow as a Mermaid flowchart."""
        return Graph(self.definition()).to_mermaid()

    def _build(self) -> workflow_pb2.WorkflowDefinition:
        routes: dict[str, list[str]] = {}
        for edge in self._edges:
            if edge.kind == workflow_pb2.EDGE_KIND_ROUTED and edge.route not in routes.get(
                edge.source, []
            ):
                routes.setdefault(edge.source, []).append(edge.route)
        subworkflows: dict[str, workflow_pb2.WorkflowDefinition] = {}
        nodes = []
        for name, spec in self._specs.items():
            message = workflow_pb2.NodeDefinition(
                name=name,
                description=spec.description,
                kind=_KINDS[spec.kind],
                input_schema=codec.json_schema(spec.input_type),
                output_schema=codec.json_schema(spec.output_type),
                terminal=name in self._terminals,
                routes=routes.get(name, []),
            )
            if spec.config is not None:
                message.config.CopyFrom(
                    codec.to_payload(spec.config, where=f"node {name!r} config")
                )
            if spec.retry is not None:
                message.retry_policy.CopyFrom(spec.retry.to_proto())
            if spec.timeout is not None:
                message.timeout.FromTimedelta(spec.timeout)
            if spec.subworkflow is not None:
                child = spec.subworkflow.definition()
                message.subworkflow = child.name
                known = subworkflows.setdefault(child.name, child)
                if known != child:
                    raise InvalidDefinition(
                        f"workflow {self.name!r}: two different subworkflows named {child.name!r}"
                    )
            nodes.append(message)
        return workflow_pb2.WorkflowDefinition(
            name=self.name,
            description=self.description,
            start=self._start or "",
            nodes=nodes,
            edges=self._edges,
            context_fields=self.context.to_proto(),
            subworkflows=list(subworkflows.values()),
            allow_cycles=self.allow_cycles,
        )

    def _check_types(self, graph: Graph) -> None:
        """Check that every edge's target accepts what its source sends."""
        for edge in graph.definition.edges:
            source = self._specs[edge.source]
            if edge.kind == workflow_pb2.EDGE_KIND_FALLBACK:
                sent, what = source.input_type, "input"
            elif edge.kind == workflow_pb2.EDGE_KIND_ROUTED and edge.route in source.variants:
                sent, what = source.variants[edge.route], f"variant {edge.route}"
            else:
                sent, what = source.output_type, "output"
            for target in edge.targets:
                spec = self._specs[target]
                accepted = spec.input_type
                if spec.kind is NodeKind.JOIN:
                    args = typing.get_args(accepted)
                    if (
                        typing.get_origin(accepted) not in (list, Sequence)
                        and accepted is not codec.ANY
                    ):
                        raise InvalidDefinition(
                            f"workflow {self.name!r}: join node {target!r} must take a list, "
                            f"not {_name(accepted)}"
                        )
                    accepted = args[0] if args else codec.ANY
                if not _accepts(accepted, sent):
                    raise InvalidDefinition(
                        f"workflow {self.name!r}: edge {edge.source!r} -> {target!r}: "
                        f"{edge.source!r} sends its {what} of type {_name(sent)} but "
                        f"{target!r} takes {_name(accepted)}"
                    )
        for name, spec in self._specs.items():
            routed = graph.routed.get(name, {})
            for label in spec.variants:
                if routed and label not in routed and name not in graph.direct:
                    raise InvalidDefinition(
                        f"workflow {self.name!r}: node {name!r} can return variant {label!r} "
                        "but has no route for it"
                    )

    # -- running in-process -----------------------------------------------------------------

    async def run(self, input: Any, *, context: Mapping[str, Any] | None = None) -> Any:
        """Run to completion in this process and return the output (see :mod:`runner`)."""
        return await LocalRunner(self).run(input, context=context)

    async def run_with_checkpoint(
        self,
        input: Any,
        store: CheckpointStore,
        run_id: str,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run with a checkpoint per step; see :meth:`LocalRunner.run_with_checkpoint`."""
        return await LocalRunner(self).run_with_checkpoint(input, store, run_id, context=context)

    async def resume(self, store: CheckpointStore, run_id: str) -> Any:
        """Continue a checkpointed run; see :meth:`LocalRunner.resume`."""
        return await LocalRunner(self).resume(store, run_id)


def _name(tp: Any) -> str:
    if tp is codec.ANY:
        return "Any"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _accepts(accepted: Any, sent: Any) -> bool:
    """Whether a node taking ``accepted`` can receive every value of type ``sent``."""
    if accepted is codec.ANY or sent is codec.ANY or accepted is object:
        return True
    options = _members(accepted)
    return all(
        any(
            s == a
            or (isinstance(s, type) and isinstance(a, type) and issubclass(s, a))
            or (a is float and s is int)
            for a in options
        )
        for s in _members(sent)
    )
