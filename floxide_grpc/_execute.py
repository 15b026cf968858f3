"""One attempt of one item: the same code in the local runner and in a remote worker.

Decode and check the input against the node's type; run the node with its timeout and
cancellation; turn what it returned into a wire ``Transition`` (validating outputs and picking
the route of a variant); collect the context operations it recorded. Any failure becomes
:class:`AttemptFailed` carrying the ``NodeError`` to report.
"""

from __future__ import annotations

import asyncio
import functools
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from floxide_grpc import _codec as codec
from floxide_grpc._durations import format_seconds
from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_grpc.context import ContextSchema, NodeContext, Operation
from floxide_grpc.errors import FloxideError, InvalidPayload, InvalidTransition
from floxide_grpc.node import NodeKind, NodeSpec
from floxide_grpc.transition import Abort, ErrorKind, Hold, Next, NextAll

__all__ = ["AttemptFailed", "attempt", "node_error"]

NodeError = work_item_pb2.NodeError
Transition = work_item_pb2.Transition
SubworkflowRunner = Callable[
    [NodeSpec, work_item_pb2.WorkItem, Any, Mapping[str, Any]], Awaitable[Any]
]
"""Runs a ``SUBWORKFLOW`` node's child run: ``(spec, item, input, the parent's context)``."""


class AttemptFailed(Exception):
    """An attempt failed; ``error`` is what to record and report."""

    def __init__(self, error: NodeError) -> None:
        super().__init__(error.message)
        self.error = error


def node_error(kind: str, message: str, exc: BaseException | None = None) -> NodeError:
    """A ``NodeError`` of a kind, with the exception's type and (truncated) traceback."""
    error = NodeError(kind=ErrorKind.to_proto(kind), message=message)
    if exc is not None:
        error.error_type = type(exc).__name__
        error.details = "".join(traceback.format_exception(exc))[-4096:]
    return error


async def attempt(
    spec: NodeSpec,
    item: work_item_pb2.WorkItem,
    context: Mapping[str, Any],
    schema: ContextSchema,
    *,
    routes: Collection[str] = (),
    cancel: asyncio.Event | None = None,
    timeout: float | None = None,
    since: float | None = None,
    run_subworkflow: SubworkflowRunner | None = None,
) -> tuple[Transition, list[Operation]]:
    """Run one attempt of ``item`` with node ``spec``.

    Args:
        spec: The node's code and types.
        item: The item, with its input.
        context: The run's context as dispatched.
        schema: The workflow's context fields.
        routes: The route labels the node's routed edges use (a variant's class name becomes
            its route when it is one of them).
        cancel: Set to cancel the attempt; the node sees it on its context.
        timeout: Seconds the attempt may take (``None``: the node's own timeout, if any).
        since: When the timeout began, by ``time.monotonic()`` (``None``: now); a worker counts
            from when the assignment arrived.
        run_subworkflow: Runs a ``SUBWORKFLOW`` node's child run (the local runner's).

    Returns:
        The transition and the context operations the node recorded.

    Raises:
        AttemptFailed: bad input, an exception, a timeout, a cancellation, an abort, or an
            output that does not fit the node's type.
    """
    cancel = cancel or asyncio.Event()
    where = f"node {item.node!r}"
    try:
        value = codec.from_payload(item.input, spec.input_type, where=f"{where} input")
    except InvalidPayload as exc:
        raise AttemptFailed(node_error(ErrorKind.INVALID_INPUT, str(exc), exc)) from exc
    ctx = NodeContext(
        schema,
        context,
        run_id=item.run_id,
        item_id=item.item_id,
        node=item.node,
        attempt=item.attempt,
        cancelled=cancel,
    )
    if timeout is None and spec.timeout is not None:
        timeout = spec.timeout.total_seconds()
    child = None
    if spec.kind is NodeKind.SUBWORKFLOW and run_subworkflow is not None:
        child = functools.partial(run_subworkflow, spec, item, value, context)
    result = await _invoke(spec, ctx, value, cancel, timeout, since, child)
    return to_transition(spec, item.node, result, routes), ctx.operations


async def _invoke(
    spec: NodeSpec,
    ctx: NodeContext,
    value: Any,
    cancel: asyncio.Event,
    timeout: float | None,
    since: float | None,
    child: Callable[[], Awaitable[Any]] | None,
) -> Any:
    if spec.kind is NodeKind.SUBWORKFLOW:
        if child is None:  # the server runs it as a child run: never a worker
            raise AttemptFailed(
                node_error(ErrorKind.GENERIC, f"node {spec.name!r} runs as a child run, not here")
            )
        call = child()
    else:
        call = spec.invoke(ctx, value)
    task = asyncio.ensure_future(call)
    cancelled = asyncio.ensure_future(cancel.wait())
    left = None
    if timeout is not None:
        left = max(timeout - (time.monotonic() - since), 0) if since is not None else timeout
    try:
        done, _ = await asyncio.wait(
            {task, cancelled}, timeout=left, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        _abandon(task)  # the attempt itself is cancelled (a worker abandons it): so is the node
        raise
    finally:
        cancelled.cancel()
    if task not in done:
        task.cancel()
        await asyncio.wait([task])  # the node ends before its failure is reported
        if not task.cancelled():
            task.exception()  # whatever it raised on its way out is superseded: retrieved
        if cancel.is_set():
            raise AttemptFailed(
                node_error(ErrorKind.CANCELLED, f"node {spec.name!r} was cancelled")
            )
        assert timeout is not None
        raise AttemptFailed(
            node_error(
                ErrorKind.TIMEOUT, f"node {spec.name!r} timed out after {format_seconds(timeout)}"
            )
        )
    try:
        return task.result()
    except FloxideError as exc:
        kind = ErrorKind.INVALID_OUTPUT if isinstance(exc, InvalidTransition) else ErrorKind.GENERIC
        raise AttemptFailed(node_error(kind, str(exc), exc)) from exc
    except asyncio.CancelledError as exc:
        raise AttemptFailed(
            node_error(ErrorKind.CANCELLED, f"node {spec.name!r} was cancelled", exc)
        ) from exc
    except Exception as exc:
        raise AttemptFailed(
            node_error(ErrorKind.GENERIC, f"{type(exc).__name__}: {exc}", exc)
        ) from exc


def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel a node's task whose outcome nobody awaits, and read that outcome when it comes.

    Left running, the node would go on after its attempt ended; and whatever it raised then
    would be logged as "Task exception was never retrieved".
    """
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


def to_transition(spec: NodeSpec, node: str, result: Any, routes: Collection[str]) -> Transition:
    """A node's return value as a wire transition, its outputs checked against its type.

    Raises:
        AttemptFailed: an abort, or an output that does not fit (INVALID_OUTPUT).
    """
    where = f"node {node!r} output"
    if isinstance(result, Abort):
        kind = result.kind if result.kind in ErrorKind.ALL else ErrorKind.GENERIC
        error = node_error(kind, result.message)
        error.non_retryable = result.non_retryable
        raise AttemptFailed(error)
    if isinstance(result, Hold):
        return Transition(hold=Transition.Hold())
    try:
        if isinstance(result, NextAll):
            outputs = [_output(spec, value, where)[0] for value in result.outputs]
            return Transition(next_all=Transition.NextAll(outputs=outputs))
        next_ = result if isinstance(result, Next) else Next(result)
        payload, variant = _output(spec, next_.output, where)
        label = next_.route if next_.route is not None else (variant if variant in routes else "")
        return Transition(next=Transition.Next(output=payload, route=label))
    except (InvalidPayload, InvalidTransition) as exc:
        raise AttemptFailed(node_error(ErrorKind.INVALID_OUTPUT, str(exc), exc)) from exc


def _output(spec: NodeSpec, value: Any, where: str) -> tuple[work_item_pb2.Payload, str]:
    builtins = codec.to_builtins(value, where=where)
    variant = type(value).__name__
    codec.convert(builtins, spec.variants.get(variant, spec.output_type), where=where)
    return codec.to_payload(builtins, where=where), variant
