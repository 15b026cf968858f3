"""A hand-driven worker stream: the protocol spoken frame by frame, from the contracts alone."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from floxide_grpc import PROTOCOL_VERSION
from floxide_grpc._proto.floxide.v1 import (
    records_pb2,
    work_item_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from tests.helpers.channels import authorized_channel

__all__ = ["Raw", "hello", "result_of"]


def hello(
    namespace: str, workflow: str = "echo", node_name: str = "echo", credit: int = 1
) -> worker_service_pb2.ConnectRequest:
    return worker_service_pb2.ConnectRequest(
        hello=worker_service_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            namespace=namespace,
            worker_id="raw",
            nodes=[records_pb2.ServedNode(workflow=workflow, node=node_name)],
            credit=credit,
        )
    )


class Raw:
    """A hand-driven worker stream."""

    def __init__(self, target: str) -> None:
        self.channel = authorized_channel(target)
        self.call = worker_service_pb2_grpc.WorkerServiceStub(self.channel).Connect()
        self._writing = asyncio.Lock()

    async def send(self, message: worker_service_pb2.ConnectRequest) -> None:
        """Write a frame; one at a time (grpc.aio refuses a write while one is in flight, as
        a test heartbeating in a task of its own would otherwise do beside its results)."""
        async with self._writing:
            await self.call.write(message)

    async def read(self) -> worker_service_pb2.ConnectResponse:
        response = await asyncio.wait_for(self.call.read(), 10)
        assert response is not grpc.aio.EOF
        return response  # type: ignore[return-value]

    async def acks(self) -> list[worker_service_pb2.ResultAck]:
        """The next result acknowledgements (other messages, such as cancels, are skipped)."""
        while not (response := await self.read()).result_acks:
            pass
        return list(response.result_acks)

    async def assignments(self) -> list[worker_service_pb2.Assignment]:
        """The next assignments (other messages, such as acknowledgements, are skipped)."""
        while not (response := await self.read()).assignments:
            pass
        return list(response.assignments)

    async def status(self) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await asyncio.wait_for(self.call.read(), 10)
        return caught.value.code()

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def result_of(
    assignment: worker_service_pb2.Assignment, output: Any
) -> worker_service_pb2.ConnectRequest:
    """The result of an assignment: its node returned ``output``."""
    payload = work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(output).encode()
    )
    return worker_service_pb2.ConnectRequest(
        results=[
            worker_service_pb2.StepResult(
                claim_token=assignment.claim_token,
                run_id=assignment.item.run_id,
                item_id=assignment.item.item_id,
                attempt=assignment.item.attempt,
                transition=work_item_pb2.Transition(
                    next=work_item_pb2.Transition.Next(output=payload)
                ),
            )
        ]
    )
