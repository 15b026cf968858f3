"""Helpers that make nodes from plain functions: floxide's ``SplitNode`` and ``BatchNode``."""

from __future__ import annotations

import asyncio
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from floxide_grpc import _codec as codec
from floxide_grpc.context import NodeContext
from floxide_grpc.node import NodeSpec, as_spec
from floxide_grpc.transition import Abort, Hold, Next, NextAll

__all__ = ["batch", "split"]


def split(fn: Callable[[Any], Sequence[Any]], *, name: str | None = None) -> NodeSpec:
    """A node that fans out: ``NextAll(fn(input))``.

    ``fn``'s input annotation is the node's input type; the element type of its returned
    sequence is the output type of each branch.
    """
    default = getattr(fn, "__name__", "")
    spec = as_spec(fn, name=name or (default if default.isidentifier() else "split"))
    args = typing.get_args(spec.output_type)
    item_type = args[0] if args else codec.ANY

    async def call(ctx: NodeContext, value: Any) -> NextAll[Any]:
        outputs = await spec.invoke(ctx, value)
        return NextAll(list(outputs))

    return NodeSpec(
        name=spec.name,
        call=call,
        is_async=True,
        input_type=spec.input_type,
        output_type=item_type,
        description=spec.description,
    )


class BatchError(Exception):
    """Raised by a batch node when one element aborts: the whole batch fails."""


def batch(inner: Any, batch_size: int, *, name: str | None = None) -> NodeSpec:
    """A node that runs ``inner`` on every element of a list, ``batch_size`` at a time.

    Outputs keep the input order: a ``Next`` adds its output, a ``NextAll`` its outputs, a
    ``Hold`` nothing; an ``Abort`` or an exception fails the whole batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    spec = as_spec(inner, name=name)
    limit = asyncio.Semaphore(batch_size)

    async def one(ctx: NodeContext, value: Any) -> list[Any]:
        async with limit:
            result = await spec.invoke(
                ctx, codec.convert(value, spec.input_type, where=f"batch {spec.name!r} element")
            )
        if isinstance(result, Abort):
            raise BatchError(f"batch element aborted: {result.message}")
        if isinstance(result, Hold):
            return []
        if isinstance(result, NextAll):
            return list(result.outputs)
        return [result.output if isinstance(result, Next) else result]

    async def call(ctx: NodeContext, values: list[Any]) -> list[Any]:
        results = await asyncio.gather(*(one(ctx, v) for v in values))
        return [output for outputs in results for output in outputs]

    return NodeSpec(
        name=name or f"{spec.name}_batch",
        call=call,
        is_async=True,
        input_type=types.GenericAlias(list, (spec.input_type,)),
        output_type=types.GenericAlias(list, (spec.output_type,)),
        description=spec.description,
    )
