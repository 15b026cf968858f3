"""Reading runs: records, pages of runs and items, errors, derived metrics and the context.

Reads change nothing and take no lock; every figure is derived from per-item keys (no counter
key is ever rewritten, DESIGN section 5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_grpc.errors import InvalidArgument, NotFound, RunNotFound
from floxide_server.store import payloads
from floxide_server.store.contexts import fold
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, KeyValue
from floxide_server.store.records import WAITING, RunStatus
from floxide_server.store.workflows import WorkflowStore

__all__ = ["RunReads", "read_state"]


async def read_state(
    kv: KV, keys: Keys, run_id: str, item_id: str
) -> tuple[KeyValue, records_pb2.WorkItemState]:
    """An item's state and its key-value.

    Raises:
        NotFound: no such item.
    """
    found = await kv.get(keys.item(run_id, item_id))
    if found is None:
        raise NotFound(f"item {item_id!r} of run {run_id!r} not found")
    return found, records_pb2.WorkItemState.FromString(found.value)


class RunReads:
    """Runs, items, errors, metrics and contexts of every namespace, as they stand."""

    def __init__(self, kv: KV, workflows: WorkflowStore) -> None:
        self.kv = kv
        self.workflows = workflows

    async def get(self, namespace: str, run_id: str) -> records_pb2.RunRecord:
        """A run's record.

        Raises:
            RunNotFound: no such run.
        """
        found = await self.kv.get(Keys(namespace).run_info(payloads.check_name("run id", run_id)))
        if found is None:
            raise RunNotFound(f"run {run_id!r} not found in namespace {namespace!r}", run_id=run_id)
        return records_pb2.RunRecord.FromString(found.value)

    async def list_runs(
        self,
        namespace: str,
        statuses: Sequence[int],
        workflow: str,
        size: int,
        token: str,
        parent_run_id: str = "",
        include_children: bool = False,
    ) -> tuple[list[records_pb2.RunRecord], str]:
        """Runs newest first, filtered; a page and the next token.

        Child runs are listed only with ``include_children``, or as the children of
        ``parent_run_id`` (every attempt's).

        Raises:
            InvalidArgument: an unknown status in the filter, or a malformed token.
            NotFound: no run ``parent_run_id``.
        """
        keys = Keys(namespace)
        for status in statuses:
            if status not in RunStatus.values() or status == records_pb2.RUN_STATUS_UNSPECIFIED:
                raise InvalidArgument(f"unknown run status {status} in the filter")
        size = payloads.page_size(size)

        def wanted(record: records_pb2.RunRecord) -> bool:
            return (
                (not statuses or record.status in statuses)
                and (not workflow or record.workflow == workflow)
                and (include_children or bool(parent_run_id) or not record.HasField("parent"))
            )

        if parent_run_id:
            return await self._children(keys, parent_run_id, wanted, size, token)
        after = payloads.decode_page_token(token)
        start = keys.run_info(after) if after else None
        found: list[records_pb2.RunRecord] = []
        while len(found) < size:
            batch, _ = await self.kv.range(
                keys.run_infos, start=start, limit=size + 1, reverse=True
            )
            batch = [kv for kv in batch if after is None or kv.key != keys.run_info(after)]
            if not batch:
                break
            for kv in batch:
                record = records_pb2.RunRecord.FromString(kv.value)
                if wanted(record):
                    found.append(record)
            after = records_pb2.RunRecord.FromString(batch[-1].value).run_id
            start = keys.run_info(after)
        page = found[:size]
        more = len(found) > size or (
            len(page) == size and bool(await self._older(keys, page[-1].run_id))
        )
        return page, payloads.encode_page_token(page[-1].run_id) if more and page else ""

    async def _children(
        self,
        keys: Keys,
        parent_run_id: str,
        wanted: Callable[[records_pb2.RunRecord], bool],
        size: int,
        token: str,
    ) -> tuple[list[records_pb2.RunRecord], str]:
        """A page of a run's children, newest first (as listed under ``run/{parent}/child/``)."""
        await self.get(keys.namespace, parent_run_id)
        links, _ = await self.kv.range(keys.child(parent_run_id))
        found = await asyncio.gather(
            *(
                self.kv.get(keys.run_info(link.key[len(keys.child(parent_run_id)) :].decode()))
                for link in links
            )
        )
        records = [records_pb2.RunRecord.FromString(kv.value) for kv in found if kv is not None]
        records = [r for r in records if wanted(r)]
        records.sort(key=lambda r: (r.created_at.ToMilliseconds(), r.run_id), reverse=True)
        offset = payloads.page_offset(token)
        page = records[offset : offset + size]
        more = offset + size < len(records)
        return page, payloads.encode_page_token(str(offset + size)) if more else ""

    async def _older(self, keys: Keys, run_id: str) -> bool:
        batch, _ = await self.kv.range(
            keys.run_infos, start=keys.run_info(run_id), limit=2, reverse=True
        )
        return any(kv.key != keys.run_info(run_id) for kv in batch)

    async def items(
        self,
        namespace: str,
        run_id: str,
        statuses: Sequence[int] = (),
        size: int = 0,
        token: str = "",
    ) -> tuple[list[records_pb2.WorkItemState], str]:
        """A run's items with their states, filtered by status; a page and the next token."""
        await self.get(namespace, run_id)
        keys = Keys(namespace)
        size = payloads.page_size(size)
        after = payloads.decode_page_token(token)
        start = keys.item(run_id, after) + b"\0" if after else None
        found: list[records_pb2.WorkItemState] = []
        last = ""
        while len(found) <= size:
            batch, _ = await self.kv.range(keys.item(run_id), start=start, limit=size + 1)
            if not batch:
                break
            for kv in batch:
                state = records_pb2.WorkItemState.FromString(kv.value)
                last = state.item.item_id
                if not statuses or state.status in statuses:
                    found.append(state)
                if len(found) > size:
                    break
            start = keys.item(run_id, last) + b"\0"
        page = found[:size]
        return page, payloads.encode_page_token(page[-1].item.item_id) if len(found) > size else ""

    async def pending(
        self, namespace: str, run_id: str, size: int = 0, token: str = ""
    ) -> tuple[list[work_item_pb2.WorkItem], str]:
        """Items waiting for dispatch or a retry timer."""
        states, next_token = await self.items(namespace, run_id, WAITING, size, token)
        return [s.item for s in states], next_token

    async def errors(
        self, namespace: str, run_id: str, size: int = 0, token: str = ""
    ) -> tuple[list[records_pb2.ErrorRecord], str]:
        """A run's failed attempts, oldest first."""
        await self.get(namespace, run_id)
        keys = Keys(namespace)
        found, _ = await self.kv.range(keys.error(run_id))
        records = sorted(
            (records_pb2.ErrorRecord.FromString(kv.value) for kv in found),
            key=lambda r: (r.occurred_at.ToMilliseconds(), r.item_id, r.attempt),
        )
        size = payloads.page_size(size)
        offset = payloads.page_offset(token)
        page = records[offset : offset + size]
        more = offset + size < len(records)
        return page, payloads.encode_page_token(str(offset + size)) if more else ""

    async def metrics(self, namespace: str, run_id: str) -> records_pb2.RunMetrics:
        """Counts derived from the run's items and errors (no counter key is ever rewritten)."""
        await self.get(namespace, run_id)
        keys = Keys(namespace)
        metrics = records_pb2.RunMetrics(namespace=namespace, run_id=run_id)
        items, _ = await self.kv.range(keys.item(run_id))
        for kv in items:
            state = records_pb2.WorkItemState.FromString(kv.value)
            metrics.total_work_items += 1
            metrics.retries += max(state.attempts - 1, 0)
            match state.status:
                case records_pb2.ITEM_STATUS_COMPLETED:
                    metrics.completed += 1
                case records_pb2.ITEM_STATUS_PERMANENTLY_FAILED:
                    metrics.failed += 1
                case records_pb2.ITEM_STATUS_PENDING:
                    metrics.pending += 1
                case records_pb2.ITEM_STATUS_IN_PROGRESS:
                    metrics.in_progress += 1
                case records_pb2.ITEM_STATUS_WAITING_RETRY:
                    metrics.waiting_retry += 1
                case records_pb2.ITEM_STATUS_CANCELLED:
                    metrics.cancelled += 1
        errors, _ = await self.kv.range(keys.error(run_id))
        metrics.worker_lost = sum(
            records_pb2.ErrorRecord.FromString(kv.value).error.kind
            == work_item_pb2.ERROR_KIND_WORKER_LOST
            for kv in errors
        )
        return metrics

    async def context(self, namespace: str, run_id: str) -> dict[str, Any]:
        """The run's context now: its initial value and every item's operations, in order."""
        record = await self.get(namespace, run_id)
        return await self._context(Keys(namespace), record)

    async def _context(self, keys: Keys, record: records_pb2.RunRecord) -> dict[str, Any]:
        definition = await self.workflows.get(keys.namespace, record.definition_hash)
        init, (ops, _) = await asyncio.gather(
            self.kv.get(keys.context_init(record.run_id)),
            self.kv.range(keys.context_ops(record.run_id)),
        )
        return fold(definition, init, ops)
