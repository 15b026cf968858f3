"""The queue: how an item becomes ready for dispatch, and how dispatch reads what is ready.

An item is ready while its entry ``queue/{run}/{item}`` exists; a claim deletes it in the
claiming Txn. Entries hold the item without its input, except a *fresh* item's (just made, never
attempted) when its input is small: a claim then rebuilds the item's state from the entry
instead of reading it, and dispatch keeps those entries in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Put, Request
from floxide_server.store.records import fresh_state

__all__ = ["QUEUED_INPUT_BYTES", "entry", "live", "new_items", "queue_entry", "ready"]

QUEUED_INPUT_BYTES = 1024
"""Inputs up to this size ride in fresh items' queue entries (held in dispatch's memory)."""


def entry(item: work_item_pb2.WorkItem, *, fresh: bool = False) -> work_item_pb2.WorkItem:
    """An item as a queue entry or a timer holds it: without its input, unless fresh and small."""
    queued = work_item_pb2.WorkItem()
    queued.CopyFrom(item)
    if not fresh or queued.input.ByteSize() > QUEUED_INPUT_BYTES:
        queued.ClearField("input")
    return queued


def queue_entry(keys: Keys, item: work_item_pb2.WorkItem, *, fresh: bool = False) -> Put:
    """The write that makes an item ready: its queue entry."""
    return Put(keys.queue(item.run_id, item.item_id), entry(item, fresh=fresh).SerializeToString())


def new_items(keys: Keys, items: Sequence[work_item_pb2.WorkItem]) -> list[Request]:
    """Writes that create pending items, their queue entries and their live markers."""
    writes: list[Request] = []
    for item in items:
        writes.append(
            Put(keys.item(item.run_id, item.item_id), fresh_state(item).SerializeToString())
        )
        writes.append(queue_entry(keys, item, fresh=True))
        writes.append(live(keys, item))
    return writes


def live(keys: Keys, item: work_item_pb2.WorkItem) -> Put:
    """The marker of an item not done yet: a run with none left and no output is stuck."""
    return Put(keys.live(item.run_id, item.item_id), b"")


async def ready(kv: KV, namespace: str, limit: int = 0) -> list[work_item_pb2.WorkItem]:
    """Queue entries in run order (inputs not included)."""
    found, _ = await kv.range(Keys(namespace).queue(), limit=limit)
    entries = [work_item_pb2.WorkItem.FromString(kv.value) for kv in found]
    for queued in entries:
        queued.ClearField("input")
    return entries
