"""Stores of the SDK: where the local runner keeps its checkpoints."""

from floxide_grpc.stores.checkpoint import (
    CheckpointStore,
    FileCheckpointStore,
    InMemoryCheckpointStore,
    RemoteCheckpointStore,
)

__all__ = [
    "CheckpointStore",
    "FileCheckpointStore",
    "InMemoryCheckpointStore",
    "RemoteCheckpointStore",
]
