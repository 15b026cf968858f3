"""Nodes: typed steps, written as decorated functions or as classes.

A node takes one input and returns a :mod:`~floxide_grpc.transition` (a plain value means
``Next(value)``). Its input and output types come from its annotations; they are checked at the
edge (input before the node runs, output after) and published as JSON Schemas in the workflow
definition, so workers in other languages can check them too::

    @node
    async def double(x: int) -> int:
        return x * 2

    @node(retry=RetryPolicy(max_attempts=5), timeout=timedelta(seconds=10))
    def charge(ctx: NodeContext, order: Order) -> Next[Receipt] | Abort:
        ...

    @dataclass
    class Multiply(Node[int, int]):
        factor: int                      # config: part of the definition

        async def process(self, ctx: NodeContext, x: int) -> int:
            return x * self.factor

A function may take ``(input)``, ``(ctx, input)`` or nothing. ``async def`` nodes run on the event
loop; plain ``def`` nodes run in a thread, so they may block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from floxide_grpc import _codec as codec
from floxide_grpc._names import check_name
from floxide_grpc.context import NodeContext
from floxide_grpc.errors import InvalidDefinition
from floxide_grpc.retry import RetryPolicy
from floxide_grpc.transition import Abort, Hold, Next, NextAll

if TYPE_CHECKING:
    from floxide_grpc.workflow import Workflow

__all__ = ["Node", "NodeKind", "NodeSpec", "node", "subworkflow"]

I = TypeVar("I")  # noqa: E741 - the conventional name of an input type
O = TypeVar("O")  # noqa: E741 - the conventional name of an output type


class NodeKind(enum.Enum):
    """What a node is (``floxide.v1.NodeKind``)."""

    TASK = "TASK"
    JOIN = "JOIN"
    SUBWORKFLOW = "SUBWORKFLOW"


class Node(Generic[I, O]):
    """Base of class nodes. Make the subclass a dataclass: its fields are the node's config."""

    async def process(self, ctx: NodeContext, input: I) -> Any:
        """Run the step on one input; return a transition, or a value meaning ``Next(value)``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """A node ready to be placed in a workflow: its code, types and execution settings.

    Attributes:
        name: The default name of the node in a workflow.
        call: The step, called as ``call(ctx, input)``.
        is_async: Whether ``call`` returns an awaitable (else it runs in a thread).
        input_type: The annotated input type (``codec.ANY`` when not annotated).
        output_type: The annotated output type, unwrapped from ``Next[...]`` and friends.
        kind: What the node is.
        retry: How failed attempts are retried; ``None`` makes the first failure final.
        timeout: The longest one attempt may take; ``None`` for no limit.
        config: The node's configuration (a class node's fields), as JSON-like builtins.
        description: What the node does, from its docstring's first line.
        subworkflow: The nested workflow of a ``SUBWORKFLOW`` node.
    """

    name: str
    call: Callable[[NodeContext, Any], Any]
    is_async: bool
    input_type: Any = codec.ANY
    output_type: Any = codec.ANY
    kind: NodeKind = NodeKind.TASK
    retry: RetryPolicy | None = None
    timeout: timedelta | None = None
    config: Any = None
    description: str = ""
    subworkflow: Workflow | None = None

    def __post_init__(self) -> None:
        check_name("node name", self.name, InvalidDefinition)
        if self.timeout is not None and self.timeout <= timedelta(0):
            raise InvalidDefinition(f"node {self.name!r}: timeout must be positive")

    def with_settings(self, **changes: Any) -> NodeSpec:
        """A copy with some settings changed (``name``, ``retry``, ``timeout``, ...)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def variants(self) -> dict[str, type]:
        """The output's classes by name, when it is a union of classes (routing by variant)."""
        members = typing.get_args(self.output_type) if _is_union(self.output_type) else ()
        classes = [m for m in members if isinstance(m, type) and m is not type(None)]
        if len(classes) < 2:
            return {}
        return {cls.__name__: cls for cls in classes}

    async def invoke(self, ctx: NodeContext, value: Any) -> Any:
        """Run the step once: on the loop if it is async, else in a thread."""
        if self.is_async:
            return await typing.cast(Awaitable[Any], self.call(ctx, value))
        return await asyncio.to_thread(self.call, ctx, value)

    def __call__(self, ctx: NodeContext, value: Any) -> Any:
        """Call the step directly (for tests): ``spec(ctx, input)``."""
        return self.call(ctx, value)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _output_type(hint: Any) -> Any:
    """Unwrap the output type from a return annotation such as ``Next[T] | Abort``."""
    if hint is codec.ANY or hint is inspect.Signature.empty:
        return codec.ANY
    members = typing.get_args(hint) if _is_union(hint) else (hint,)
    outputs: list[Any] = []
    for member in members:
        origin = typing.get_origin(member)
        if origin in (Next, NextAll):
            outputs.append(typing.get_args(member)[0])
        elif member in (Next, NextAll):
            outputs.append(codec.ANY)
        elif member not in (Hold, Abort):
            outputs.append(member)
    if not outputs:
        return codec.ANY  # only Hold or Abort: nothing is ever sent on
    if codec.ANY in outputs:
        return codec.ANY
    unique = list(dict.fromkeys(outputs))
    return unique[0] if len(unique) == 1 else typing.Union[tuple(unique)]  # noqa: UP007


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _spec_from_callable(
    fn: Callable[..., Any], name: str
) -> tuple[Callable[[NodeContext, Any], Any], Any, Any, bool]:
    """Adapt ``fn(input)``, ``fn(ctx, input)``, ``fn(ctx)`` or ``fn()`` to ``call(ctx, input)``."""
    params = list(inspect.signature(fn).parameters.values())
    if len(params) > 2:
        raise InvalidDefinition(f"node {name!r}: takes (input), (ctx, input) or nothing")
    hints = typing.get_type_hints(fn)
    takes_ctx = len(params) == 2 or (len(params) == 1 and hints.get(params[0].name) is NodeContext)
    takes_input = len(params) == 2 or (len(params) == 1 and not takes_ctx)
    input_type = hints.get(params[-1].name, codec.ANY) if takes_input else codec.ANY

    def call(ctx: NodeContext, value: Any) -> Any:
        args = ((ctx,) if takes_ctx else ()) + ((value,) if takes_input else ())
        return fn(*args)

    output_type = _output_type(hints.get("return", codec.ANY))
    return call, input_type, output_type, inspect.iscoroutinefunction(fn)


def _description(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def as_spec(obj: Any, *, name: str | None = None) -> NodeSpec:
    """Turn a :class:`NodeSpec`, a :class:`Node` instance or a plain function into a spec.

    ``name`` overrides the default name (the function's, or the class's in snake case).

    Raises:
        InvalidDefinition: ``obj`` is none of these, or its signature does not fit.
    """
    if isinstance(obj, NodeSpec):
        return obj.with_settings(name=name)
    if isinstance(obj, Node):
        cls = type(obj)
        name = name or _snake(cls.__name__)
        call, input_type, output_type, is_async = _spec_from_callable(obj.process, name)
        config = (
            codec.to_builtins(obj, where=f"node {name!r} config")
            if dataclasses.is_dataclass(obj)
            else None
        )
        return NodeSpec(
            name=name,
            call=call,
            is_async=is_async,
            input_type=input_type,
            output_type=output_type,
            config=config,
            description=_description(cls),
        )
    if callable(obj) and (inspect.isfunction(obj) or inspect.ismethod(obj)):
        name = name or obj.__name__
        call, input_type, output_type, is_async = _spec_from_callable(obj, name)
        return NodeSpec(
            name=name,
            call=call,
            is_async=is_async,
            input_type=input_type,
            output_type=output_type,
            description=_description(obj),
        )
    raise InvalidDefinition(f"{obj!r} is not a node: use @node, a Node subclass or a function")


@overload
def node(fn: Callable[..., Any], /) -> NodeSpec: ...


@overload
def node(
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | None = None,
    join: bool = False,
) -> Callable[[Callable[..., Any]], NodeSpec]: ...


def node(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | None = None,
    join: bool = False,
) -> NodeSpec | Callable[[Callable[..., Any]], NodeSpec]:
    """Make a function a node, with or without settings (``@node`` or ``@node(retry=...)``).

    Args:
        fn: The step function.
        name: The node's name in workflows; the function's name by default.
        retry: How failed attempts are retried.
        timeout: The longest one attempt may take.
        join: Make it a join: it runs once per fan-out group, on the list of the group's outputs
            in index order.
    """

    def decorate(function: Callable[..., Any]) -> NodeSpec:
        spec = as_spec(function)
        kind = NodeKind.JOIN if join else NodeKind.TASK
        return dataclasses.replace(
            spec, name=name or spec.name, retry=retry, timeout=timeout, kind=kind
        )

    return decorate(fn) if fn is not None else decorate


def subworkflow(workflow: Workflow, *, name: str | None = None) -> NodeSpec:
    """A node that runs a whole workflow on its input and continues with its output."""

    def call(_ctx: NodeContext, _value: Any) -> Any:
        raise InvalidDefinition(f"subworkflow {workflow.name!r} runs as a child run, not a call")

    return NodeSpec(
        name=name or workflow.name,
        call=call,
        is_async=False,
        input_type=workflow.input_type,
        output_type=workflow.output_type,
        kind=NodeKind.SUBWORKFLOW,
        description=workflow.description,
        subworkflow=workflow,
    )
