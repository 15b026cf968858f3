"""The storage-format version: which layout of keys and values a cluster's etcd holds.

Every key the server writes (see :mod:`floxide_server.store.keys`) and every value (the floxide.v1
records stored as they are returned, and the server's own floxide.storage.v1 records) make up
one storage format, numbered by :data:`STORAGE_FORMAT`. The cluster records its format at
``/floxide/v1/storage-format``, as a decimal number. A server starting on an etcd that holds no
format writes its own (an etcd written before the key existed holds format 1, which is the same
layout); one that finds another format refuses to start, so that replicas of different formats
never read each other's data. A change to a key or to a storage message that older servers could
not read takes a new number here (and a migration).
"""

from __future__ import annotations

import logging

from floxide_grpc.errors import FailedPrecondition
from floxide_server.store.keys import STORAGE_FORMAT_KEY
from floxide_server.store.kv import KV, Compare, Put, Txn

__all__ = ["STORAGE_FORMAT", "StorageFormatMismatch", "ensure_format"]

log = logging.getLogger(__name__)

STORAGE_FORMAT = 2
"""The storage format this server reads and writes.

2: every item not yet done has a live marker (``run/{run}/live/{item}``), which tells a stuck run;
a format-1 keyspace has none, so its running runs would all look stuck.
"""


class StorageFormatMismatch(FailedPrecondition):
    """Raised at startup when etcd holds another storage format than this server's."""


async def ensure_format(kv: KV) -> None:
    """Record this server's storage format if etcd holds none; refuse another one.

    The write is one guarded Txn (only if the key is missing), so that replicas starting together
    agree on one value: the first one's.

    Raises:
        StorageFormatMismatch: etcd holds another format (it is left as it is).
    """
    ours = str(STORAGE_FORMAT).encode()
    while True:
        result = await kv.txn(
            Txn([Compare.missing(STORAGE_FORMAT_KEY)], [Put(STORAGE_FORMAT_KEY, ours)])
        )
        if result.succeeded:
            log.info("recorded storage format %d in etcd", STORAGE_FORMAT)
            return
        found = await kv.get(STORAGE_FORMAT_KEY)
        if found is not None:
            break  # else it was deleted since the Txn saw it: write it again
    if found.value == ours:
        return
    theirs = found.value.decode(errors="replace")
    raise StorageFormatMismatch(
        f"etcd holds storage format {theirs} at {STORAGE_FORMAT_KEY.decode()}, but this server "
        f"reads and writes storage format {STORAGE_FORMAT}: run a server of format {theirs}, "
        "or migrate the data"
    )
