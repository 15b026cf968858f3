"""The local runner: a workflow run to completion in this process.

floxide's ``run``, ``run_with_checkpoint`` and ``resume``. Items run one at a time in queue
order, so a run is deterministic; the same :mod:`~floxide_grpc._routing` as the server decides what
comes next, and the same :func:`~floxide_grpc.context.apply` merges the context. With a checkpoint
store, the whole state (context, pending items, half-arrived joins, attempt counts) is saved after
every step, *before* the next step starts: a process killed at any instant resumes from the last
completed step and reaches the same output as an uninterrupted run (the step in flight runs
again, as it would on a lost worker).

Retries wait in-process here (the server makes them durable timers); a node's timeout applies
to each attempt; cancelling the run cancels the node in flight, which sees it on its context.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from floxide_grpc import _codec as codec
from floxide_grpc._children import child_run_id, outcome
from floxide_grpc._execute import AttemptFailed, attempt, node_error
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import (
    checkpoint_pb2,
    records_pb2,
    work_item_pb2,
)
from floxide_grpc._routing import Step, arrive, route, route_failure, start_item
from floxide_grpc.context import Operation, apply
from floxide_grpc.errors import (
    AlreadyCompleted,
    FloxideError,
    InvalidTransition,
    NotStarted,
    RunCancelled,
    RunFailed,
    RunStuck,
)
from floxide_grpc.node import NodeSpec
from floxide_grpc.records import ErrorInfo
from floxide_grpc.stores.checkpoint import CheckpointStore, check_run_id, checkpoint_of
from floxide_grpc.transition import ErrorKind

if TYPE_CHECKING:
    from floxide_grpc.workflow import Workflow

__all__ = ["LocalRunner"]

Checkpoint = checkpoint_pb2.Checkpoint
WorkItem = work_item_pb2.WorkItem
NodeError = work_item_pb2.NodeError

DEFAULT_NAMESPACE = "default"


class LocalRunner:
    """Runs one workflow in this process.

    Args:
        workflow: The workflow to run.
        namespace: The namespace recorded in checkpoints.

    Attributes:
        context: The context of the last run as it ended (a dict).
    """

    def __init__(self, workflow: Workflow, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.workflow = workflow
        self.namespace = namespace
        self.graph = Graph(workflow.definition())
        self._errors: list[records_pb2.ErrorRecord] = []
        self.context: dict[str, Any] = {}
        self._cancel = asyncio.Event()

    def cancel(self) -> None:
        """Cancel the run in progress; idempotent.

        The node in flight is cancelled (it sees ``ctx.cancelled``) and the run raises
        :class:`RunCancelled`.
        """
        self._cancel.set()

    def _here(self) -> None:
        """Make the cancel event anew in this event loop, keeping a cancel already asked.

        A runner may run again under another loop (``asyncio.run`` twice): an event bound to
        the last one would fail there.
        """
        asked = self._cancel.is_set()
        self._cancel = asyncio.Event()
        if asked:
            self._cancel.set()

    async def run(self, input: Any, *, context: Mapping[str, Any] | None = None) -> Any:
        """Run to completion and return the output, with no checkpoints.

        Raises:
            InvalidPayload: the input does not fit the start node (nothing ran).
            RunFailed: an item failed for good and its node has no fallback.
            RunCancelled: :meth:`cancel` was called.
            RunStuck: no work was left but no terminal node was reached.
        """
        self._here()
        state = self._new(str(uuid.uuid4()), input, context)
        return await self._drive(state, None)

    async def run_with_checkpoint(
        self,
        input: Any,
        store: CheckpointStore,
        run_id: str,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run, saving a checkpoint after every step; continue from one if ``run_id`` has it.

        Raises:
            AlreadyCompleted: the run's checkpoint says it already finished.
            InvalidPayload, RunFailed, RunCancelled, RunStuck: as :meth:`run`.
        """
        check_run_id(run_id)
        self._here()
        saved = await store.load(run_id)
        if saved is not None:
            return await self._continue(checkpoint_of(saved), store)
        state = self._new(run_id, input, context)
        await store.save(run_id, state.SerializeToString())
        return await self._drive(state, store)

    async def resume(self, store: CheckpointStore, run_id: str) -> Any:
        """Continue a checkpointed run from its last completed step.

        A failed run is resumed too: its failed item runs again with its attempt count kept.

        Raises:
            NotStarted: ``run_id`` has no checkpoint.
            AlreadyCompleted: the run already completed or was cancelled.
            RunFailed, RunCancelled, RunStuck: as :meth:`run`.
        """
        self._here()
        saved = await store.load(check_run_id(run_id))
        if saved is None:
            raise NotStarted(f"run {run_id!r} has no checkpoint", run_id=run_id)
        return await self._continue(checkpoint_of(saved), store)

    async def _continue(self, saved: Checkpoint, store: CheckpointStore) -> Any:
        if saved.status in (records_pb2.RUN_STATUS_COMPLETED, records_pb2.RUN_STATUS_CANCELLED):
            status = records_pb2.RunStatus.Name(saved.status).removeprefix("RUN_STATUS_").lower()
            raise AlreadyCompleted(f"run {saved.run_id!r} is already {status}")
        if saved.definition_hash and saved.definition_hash != self.graph.definition_hash:
            raise AlreadyCompleted(
                f"run {saved.run_id!r} was checkpointed by another definition of "
                f"{saved.workflow!r}; it cannot resume with this one"
            )
        for item in saved.pending:
            self.workflow.spec(item.node)  # NodeNotFound before anything runs
        if saved.status == records_pb2.RUN_STATUS_FAILED and saved.pending:
            saved.pending[0].attempt += 1  # the failed item runs again; attempts never go back
        saved.status = records_pb2.RUN_STATUS_RUNNING
        saved.ClearField("error")
        return await self._drive(saved, store)

    def _new(self, run_id: str, value: Any, context: Mapping[str, Any] | None) -> Checkpoint:
        start = self.workflow.spec(self.graph.definition.start)
        where = f"workflow {self.workflow.name!r} input"
        payload = codec.to_payload(
            codec.convert(codec.to_builtins(value, where=where), start.input_type, where=where),
            where=where,
        )
        initial = self.workflow.context.initial(context)
        definition_hash = self.graph.definition_hash
        state = Checkpoint(
            namespace=self.namespace,
            run_id=run_id,
            workflow=self.workflow.name,
            definition_hash=definition_hash,
            context=codec.to_payload(initial, where="context"),
            status=records_pb2.RUN_STATUS_RUNNING,
        )
        state.pending.append(
            start_item(
                self.graph.definition,
                namespace=self.namespace,
                run_id=run_id,
                definition_hash=definition_hash,
                input=payload,
            )
        )
        return state

    async def _drive(self, state: Checkpoint, store: CheckpointStore | None) -> Any:
        """Run items until the run completes, fails or is cancelled; save after every step."""
        self._errors = []
        run = _RunState(state, store)
        self.context = run.context
        while run.pending:
            item = run.pending[0]
            try:
                if self._cancel.is_set():
                    raise RunCancelled(f"run {state.run_id!r} was cancelled")
                step = await self._step(item, run.context)
            except RunCancelled:
                await run.finish(
                    records_pb2.RUN_STATUS_CANCELLED,
                    node_error(ErrorKind.CANCELLED, "run cancelled"),
                )
                raise
            except AttemptFailed as failure:
                fallback = await self._failed(run, item, failure)
                if fallback is None:
                    continue  # retried: the same item runs again
                step = fallback
            output = run.advance(item, step)
            if output is not None:
                await run.finish(records_pb2.RUN_STATUS_COMPLETED, output=output)
                where = f"workflow {self.workflow.name!r} output"
                return codec.from_payload(output, self.workflow.output_type, where=where)
            await run.save()
        error = node_error(ErrorKind.GENERIC, "no work left and no terminal node reached")
        await run.finish(records_pb2.RUN_STATUS_FAILED, error)
        raise RunStuck(
            f"run {state.run_id!r} of {self.workflow.name!r} ran out of work without reaching "
            "a terminal node (a branch held outside any join?)"
        )

    async def _step(self, item: WorkItem, context: dict[str, Any]) -> Step:
        """Run one attempt of ``item``, route its transition, apply its context operations.

        Raises:
            AttemptFailed: the attempt failed, or its transition or operations were refused.
            RunCancelled: the run was cancelled meanwhile.
        """
        transition, operations = await self._attempt(item, context)
        try:
            step = route(self.graph, item, transition)
            apply(context, operations, self.workflow.context)
        except FloxideError as exc:
            kind = (
                ErrorKind.INVALID_OUTPUT
                if isinstance(exc, InvalidTransition)
                else ErrorKind.GENERIC
            )
            raise AttemptFailed(node_error(kind, str(exc), exc)) from exc
        return step

    async def _failed(self, run: _RunState, item: WorkItem, failure: AttemptFailed) -> Step | None:
        """Record a failed attempt; retry it (``None``), else take the fallback edge.

        Raises:
            RunFailed: no retry is left and the node has no fallback.
        """
        error = failure.error
        self._record(item, error)
        policy = self.workflow.spec(item.node).retry
        kind = ErrorKind.from_proto(error.kind)
        if policy and policy.should_retry(kind, item.attempt, non_retryable=error.non_retryable):
            wait = policy.backoff_for(item.attempt)
            item.attempt += 1
            run.state.sequence += 1
            await run.save()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait.total_seconds()):
                    await self._cancel.wait()  # a cancel cuts the wait short
            return None
        fallback = route_failure(self.graph, item)
        if fallback is not None:
            return fallback
        await run.finish(records_pb2.RUN_STATUS_FAILED, error)
        raise RunFailed(
            f"run {run.state.run_id!r} failed: node {item.node!r} attempt {item.attempt}: "
            f"{error.message}",
            node=item.node,
            kind=kind,
            attempts=item.attempt,
            details=error.details,
            run_id=run.state.run_id,
        ) from failure.__cause__

    def _record(self, item: WorkItem, error: NodeError) -> None:
        record = records_pb2.ErrorRecord(
            namespace=item.namespace,
            run_id=item.run_id,
            item_id=item.item_id,
            node=item.node,
            attempt=item.attempt,
            error=error,
        )
        record.occurred_at.GetCurrentTime()
        self._errors.append(record)

    @property
    def errors(self) -> list[ErrorInfo]:
        """Every failed attempt of the last run, in order."""
        return [ErrorInfo.from_proto(record) for record in self._errors]

    async def _attempt(
        self, item: WorkItem, context: Mapping[str, Any]
    ) -> tuple[work_item_pb2.Transition, list[Operation]]:
        """Run one attempt of an item (see :func:`floxide_grpc._execute.attempt`).

        Raises:
            AttemptFailed: the attempt failed.
            RunCancelled: the run was cancelled meanwhile.
        """
        try:
            return await attempt(
                self.workflow.spec(item.node),
                item,
                context,
                self.workflow.context,
                routes=self.graph.node(item.node).routes,
                cancel=self._cancel,
                run_subworkflow=self._run_subworkflow,
            )
        except AttemptFailed:
            if self._cancel.is_set():
                raise RunCancelled(f"run {item.run_id!r} was cancelled") from None
            raise

    async def _run_subworkflow(
        self, spec: NodeSpec, item: WorkItem, value: Any, parent: Mapping[str, Any]
    ) -> Any:
        """Run one attempt of a subworkflow node as a child run (:mod:`floxide_grpc._children`).

        It starts from a copy of this run's context and keeps its own; its failure is a failed
        attempt of the node; cancelling this run cancels it.
        """
        assert spec.subworkflow is not None
        child = LocalRunner(spec.subworkflow, namespace=self.namespace)
        child._cancel = self._cancel  # a parent's cancel is its children's
        run_id = child_run_id(item.run_id, item.item_id, item.attempt)
        state = child._new(run_id, value, None)
        inherited = spec.subworkflow.context.inherit(parent)
        state.context.CopyFrom(codec.to_payload(inherited, where="context"))
        try:
            return await child._drive(state, None)
        except (RunFailed, RunStuck) as exc:
            last = child._errors[-1].error if isinstance(exc, RunFailed) and child._errors else None
            record = records_pb2.RunRecord(
                run_id=run_id,
                workflow=spec.subworkflow.name,
                status=records_pb2.RUN_STATUS_FAILED,
                error=last or node_error(ErrorKind.GENERIC, str(exc)),
            )
            failed = outcome(record)
            assert failed is not None
            raise AttemptFailed(failed.abort) from exc


class _RunState:
    """A run in progress: its checkpoint, with the context, queue and groups unpacked."""

    def __init__(self, state: Checkpoint, store: CheckpointStore | None) -> None:
        self.state = state
        self.store = store
        self.context: dict[str, Any] = codec.from_payload(state.context, where="context")
        self.pending: deque[WorkItem] = deque(state.pending)
        self.groups = {g.group_id: g for g in state.groups}

    def advance(self, item: WorkItem, step: Step) -> work_item_pb2.Payload | None:
        """Replace ``item`` (the queue's head) by what its step caused; the run's output if any."""
        self.pending.popleft()
        self.pending.extend(step.items)
        for arrival in step.arrivals:
            group, join = arrive(self.groups.get(arrival.frame.group_id), arrival, item)
            self.groups[group.group_id] = group
            if join is not None:
                del self.groups[group.group_id]
                self.pending.append(join)
        self.state.sequence += 1
        return step.output

    async def save(self) -> None:
        """Pack the state into the checkpoint and store it (the first terminal output wins)."""
        state = self.state
        state.ClearField("pending")
        state.pending.extend(self.pending)
        state.ClearField("groups")
        state.groups.extend(self.groups.values())
        state.context.CopyFrom(codec.to_payload(self.context, where="context"))
        state.updated_at.GetCurrentTime()
        if self.store is not None:
            await self.store.save(state.run_id, state.SerializeToString())

    async def finish(
        self,
        status: records_pb2.RunStatus.ValueType,
        error: NodeError | None = None,
        output: work_item_pb2.Payload | None = None,
    ) -> None:
        """Record the run's end; a completed run drops what remains queued."""
        self.state.status = status
        if error is not None:
            self.state.error.CopyFrom(error)
        if output is not None:
            self.state.output.CopyFrom(output)
            self.pending.clear()
            self.groups.clear()
        await self.save()
