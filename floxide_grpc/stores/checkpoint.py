"""Checkpoint stores: save and load the state of a local run, keyed by run id.

floxide's ``CheckpointStore`` trait, async. A checkpoint is opaque bytes to a store (the
serialized ``floxide.v1.Checkpoint``), so a store of one's own (Redis, S3, a database) is two
methods over bytes. The file store writes atomically (a temporary file in
the same directory, fsync, rename, fsync of the directory), so a process killed at any instant
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from floxide_grpc._auth import bearer, token_from_env
from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, store_service_pb2, store_service_pb2_grpc
from floxide_grpc._status import error_from_rpc
from floxide_grpc.errors import InvalidArgument
from floxide_grpc.tls import Tls, open_channel

__all__ = [
    "CheckpointStore",
    "FileCheckpointStore",
    "InMemoryCheckpointStore",
    "RemoteCheckpointStore",
]

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def checkpoint_of(data: bytes) -> checkpoint_pb2.Checkpoint:
    """The ``floxide.v1.Checkpoint`` that a store's bytes hold.

    Raises:
        InvalidArgument: they hold none.
    """
    try:
        return checkpoint_pb2.Checkpoint.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"not a checkpoint: {exc}") from None


def check_run_id(run_id: str) -> str:
    """Refuse run ids that are empty, too long or not safe as a file or key name.

    Raises:
        InvalidArgument: naming the id.
    """
    if not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise InvalidArgument(f"run id {run_id!r}: use 1 to 128 letters, digits, '_', '-' and '.'")
    return run_id


class CheckpointStore(Protocol):
    """Where a local run's checkpoints live: bytes by run id."""

    async def save(self, run_id: str, checkpoint: bytes) -> None:
        """Store ``checkpoint`` as the latest of ``run_id``, replacing any earlier one."""

    async def load(self, run_id: str) -> bytes | None:
        """The latest checkpoint of ``run_id``, or ``None`` if there is none."""


class InMemoryCheckpointStore:
    """Checkpoints in a dict, copied in and out (for tests and development)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    async def save(self, run_id: str, checkpoint: bytes) -> None:
        """Store ``checkpoint``."""
        self._data[check_run_id(run_id)] = bytes(checkpoint)

    async def load(self, run_id: str) -> bytes | None:
        """The latest checkpoint, or ``None``."""
        return self._data.get(check_run_id(run_id))


class FileCheckpointStore:
    """One file per run in a directory, each replaced atomically on save."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, run_id: str) -> Path:
        """The file holding ``run_id``'s checkpoint."""
        return self.directory / f"{check_run_id(run_id)}.checkpoint"

    async def save(self, run_id: str, checkpoint: bytes) -> None:
        """Write the checkpoint durably: temp file, fsync, rename, fsync the directory."""
        await asyncio.to_thread(self._write, self.path(run_id), checkpoint)

    async def load(self, run_id: str) -> bytes | None:
        """Read the checkpoint, or ``None`` if the run has none."""
        try:
            return await asyncio.to_thread(self.path(run_id).read_bytes)
        except FileNotFoundError:
            return None

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class RemoteCheckpointStore:
    """Checkpoints on a floxide-grpc server (its ``CheckpointStoreService``, kept in etcd).

    Lets a local run outlive its machine: resume it anywhere that reaches the server.
    ``tls``: TLS to the server (``None``: plain text); ``token``: the bearer token
    (``None``: ``FLOXIDE_TOKEN``).
    """

    def __init__(
        self,
        target: str,
        *,
        namespace: str = "default",
        timeout: float = 10.0,
        tls: Tls | None = None,
        token: str | None = None,
    ) -> None:
        self.namespace = namespace
        self._metadata = bearer(token_from_env() if token is None else token)
        self.timeout = timeout
        self._channel = open_channel(target, tls)
        self._stub = store_service_pb2_grpc.CheckpointStoreServiceStub(self._channel)

    async def save(self, run_id: str, checkpoint: bytes) -> None:
        """Store ``checkpoint`` as the latest of ``run_id``.

        Raises:
            InvalidArgument: the bytes are not a ``floxide.v1.Checkpoint``.
        """
        copy = checkpoint_of(checkpoint)
        copy.namespace, copy.run_id = self.namespace, check_run_id(run_id)
        try:
            await self._stub.SaveCheckpoint(
                store_service_pb2.SaveCheckpointRequest(checkpoint=copy),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    async def load(self, run_id: str) -> bytes | None:
        """The latest checkpoint of ``run_id``, or ``None``."""
        request = store_service_pb2.LoadCheckpointRequest(
            namespace=self.namespace, run_id=check_run_id(run_id)
        )
        try:
            response = await self._stub.LoadCheckpoint(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_rpc(exc) from exc
        return bytes(response.checkpoint.SerializeToString())

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
