"""Structured concurrency: every long-lived part runs in a task group and says when it is ready.

Each part (the server, dispatch, maintenance, the shared watches, the etcd layer) has a
``run(ready)`` that owns its tasks in one :class:`asyncio.TaskGroup`, resolves ``ready`` once it
can be used, and runs until cancelled. A failure of any of its tasks ends ``run()`` with that
failure, and so the part that started it: nothing dies unseen. :func:`started` is AnyIO's
``TaskGroup.start()`` for asyncio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

__all__ = ["Background", "Ready", "first_done", "first_error", "started"]

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


class Background:
    """The task group of a part whose tasks start on demand, not from a ``run()`` of its own.

    The etcd layer starts its flusher and its lease renewer when a call first needs them, from
    any caller's task. They go in one task group, held by a task of its own from the first
    :meth:`spawn` to :meth:`close`. A failure of one of them ends the group: it is logged at
    once, later spawns raise it, and :meth:`close` raises it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._group: asyncio.TaskGroup | None = None
        self._holder: asyncio.Task[None] | None = None
        self._starting: list[Coroutine[Any, Any, None]] = []
        self._closing = asyncio.Event()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` in the group (which starts now if it is not running).

        Synchronous, so that a caller cancelled right after cannot leave it half started.

        Raises:
            RuntimeError: the group was closed, or failed (the failure is the cause).
        """
        if self._closing.is_set() or (self._holder is not None and self._holder.done()):
            coroutine.close()
            raise RuntimeError(f"{self.name} is not running") from self._failure()
        if self._group is not None:
            self._group.create_task(coroutine)
            return
        self._starting.append(coroutine)  # the holder starts it with its group
        if self._holder is None:
            self._holder = asyncio.create_task(self._hold(), name=self.name)

    async def _hold(self) -> None:
        try:
            async with asyncio.TaskGroup() as self._group:
                for coroutine in self._starting:
                    self._group.create_task(coroutine)
                self._starting.clear()
                await self._closing.wait()
                raise _Closing
        except* _Closing:
            pass
        except* Exception as group:
            log.critical("%s failed", self.name, exc_info=first_error(group))
            raise
        finally:
            self._group = None
            for coroutine in self._starting:  # closed before it could start them
                coroutine.close()
            self._starting.clear()

    def _failure(self) -> BaseException | None:
        if self._holder is None or not self._holder.done() or self._holder.cancelled():
            return None
        failure = self._holder.exception()
        return first_error(failure) if isinstance(failure, BaseExceptionGroup) else failure

    async def close(self) -> None:
        """Cancel every task and wait for them. Idempotent.

        Raises:
            Exception: the failure that had ended the group, if one did.
        """
        self._closing.set()
        if self._holder is not None:
            await asyncio.wait([self._holder])
            failure = self._failure()
            if failure is not None:
                raise failure


class _Closing(Exception):
    """Raised in a :class:`Background`'s group to cancel its tasks on close."""
