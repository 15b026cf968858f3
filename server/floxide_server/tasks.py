"""Structured concurrency: every long-lived part runs in a task group and says when it is ready.

Each part (the server, dispatch, maintenance, the shared watches, the etcd layer) has a
``run(ready)`` that owns its tasks in one :class:`asyncio.TaskGroup`, resolves ``ready`` once it
can be used, and runs until cancelled. A failure of any of its tasks ends ``run()`` with that
failure, and so the part that started it: nothing dies unseen. :func:`started` is AnyIO's
``TaskGroup.start()`` for asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

__all__ = ["Ready", "first_done", "first_error", "started"]

T = TypeVar("T")
Ready = asyncio.Future
"""What a part's ``run()`` resolves once it is ready (with a value it reports, or ``None``)."""


async def started(
    tasks: asyncio.TaskGroup, run: Callable[[asyncio.Future[T]], Coroutine[Any, Any, None]]
) -> tuple[T, asyncio.Task[None]]:
    """Start ``run(ready)`` in ``tasks``; the value it reports ready with, and its task.

    Raises:
        Whatever ``run`` raised if it ended before it was ready.
    """
    ready: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    task = tasks.create_task(run(ready))
    either: list[asyncio.Future[Any]] = [ready, task]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        task.result()  # raises why it ended
        raise RuntimeError(f"{run!r} ended without being ready")
    return ready.result(), task


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure in a task group's exceptions that is not a cancellation."""
    for member in group.exceptions:
        exc = first_error(member) if isinstance(member, BaseExceptionGroup) else member
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return asyncio.CancelledError()


async def first_done(futures: Sequence[asyncio.Future[Any]]) -> set[asyncio.Future[Any]]:
    """Wait for the first of ``futures`` to finish, then cancel the others.

    They are cancelled also when the waiter itself is cancelled, so that no task it made is
    left pending ("Task was destroyed but it is pending!").
    """
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()  # a no-op on those done
    return done
