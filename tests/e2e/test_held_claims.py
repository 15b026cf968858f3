"""The worker's side of orphan claims: its hello sets ``lists_claims``, and every heartbeat lists
exactly the claims of the current session it holds, running or reported and not yet acknowledged
(``worker_service.proto``, ``Hello.lists_claims`` and ``Heartbeat.held_claim_tokens``).

The Python worker talks to a scripted server in this process: the test reads every frame the
worker sends, and decides what to assign and which results to acknowledge. (The Node.js worker's
heartbeats are checked on fake streams, in clients/node/test/claims.test.js.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import NodeContext, Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    work_item_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

ConnectRequest = worker_service_pb2.ConnectRequest
ConnectResponse = worker_service_pb2.ConnectResponse
HASH = "hash-1"

gates: dict[str, asyncio.Event] = {}


@node
async def gated(ctx: NodeContext, x: int) -> int:
    await gates.setdefault(ctx.run_id, asyncio.Event()).wait()
    return x


GATED = Workflow("gated", start=gated)


@dataclass
class Link:
    """One worker stream as the scripted server sees it."""

    session_id: str
    requests: list[ConnectRequest] = field(default_factory=list)
    responses: asyncio.Queue[ConnectResponse | None] = field(default_factory=asyncio.Queue)

    def heartbeats(self) -> list[list[str]]:
        """The claims each heartbeat listed, in order."""
        return [
            list(r.heartbeat.held_claim_tokens) for r in self.requests if r.HasField("heartbeat")
        ]

    def results(self) -> list[str]:
        return [result.claim_token for r in self.requests for result in r.results]

    def granted(self) -> int:
        return sum(r.hello.credit if r.HasField("hello") else r.credit for r in self.requests)

    def assign(self, *runs: str) -> list[str]:
        """Assign one item of each run; their claim tokens."""
        tokens = [f"{self.session_id}-{run}" for run in runs]
        assignments = [assignment(token, run) for run, token in zip(runs, tokens, strict=True)]
        self.responses.put_nowait(ConnectResponse(assignments=assignments))
        return tokens

    def ack(self, **codes: int) -> None:
        """Acknowledge results, by claim token."""
        acks = [worker_service_pb2.ResultAck(claim_token=t, code=c) for t, c in codes.items()]
        self.responses.put_nowait(ConnectResponse(result_acks=acks))

    async def listing(self, *tokens: str) -> None:
        """Wait until the last heartbeat lists exactly these claims; the next two list them too."""
        expected = sorted(tokens)

        async def listed() -> bool:
            beats = self.heartbeats()
            return bool(beats) and sorted(beats[-1]) == expected

        await eventually(listed, within=10, interval=0.01)
        seen = len(self.heartbeats())

        async def two_more() -> bool:
            return len(self.heartbeats()) >= seen + 2

        await eventually(two_more, within=10, interval=0.01)
        assert [sorted(b) for b in self.heartbeats()[seen - 1 :]] == [expected] * 3


def assignment(token: str, run: str) -> worker_service_pb2.Assignment:
    item = work_item_pb2.WorkItem(
        run_id=run,
        item_id=f"item-{run}",
        workflow="gated",
        node="gated",
        definition_hash=HASH,
        attempt=1,
        input=work_item_pb2.Payload(encoding=work_item_pb2.ENCODING_JSON, data=b"1"),
    )
    return worker_service_pb2.Assignment(claim_token=token, item=item)


async def register_workflow(
    request: orchestrator_service_pb2.RegisterWorkflowRequest, context: Any
) -> orchestrator_service_pb2.RegisterWorkflowResponse:
    return orchestrator_service_pb2.RegisterWorkflowResponse(definition_hash=HASH, created=True)


class Workers(worker_service_pb2_grpc.WorkerServiceServicer):
    """Acknowledges each hello (sessions s1, s2, ...; heartbeats every 50 ms), then leaves the
    stream to the test; the stream ends when the test puts ``None`` or the worker closes it."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[Link] = asyncio.Queue()
        self._sessions = itertools.count(1)

    async def Connect(
        self, requests: AsyncIterator[ConnectRequest], context: Any
    ) -> AsyncIterator[ConnectResponse]:
        link = Link(f"s{next(self._sessions)}")
        hello = await anext(aiter(requests))
        link.requests.append(hello)
        ack = worker_service_pb2.HelloAck(session_id=link.session_id, protocol_version=1)
        ack.heartbeat_interval.FromTimedelta(timedelta(milliseconds=50))
        ack.lease_ttl.FromTimedelta(timedelta(seconds=10))
        yield ConnectResponse(hello_ack=ack)
        self.links.put_nowait(link)

        async def read() -> None:
            async for request in requests:
                link.requests.append(request)
            link.responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await link.responses.get()) is not None:
                yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, Workers]]:
    server = grpc.aio.server()
    workers = Workers()
    orchestrator = {  # the one call a worker makes
        "RegisterWorkflow": grpc.unary_unary_rpc_method_handler(
            register_workflow,
            request_deserializer=orchestrator_service_pb2.RegisterWorkflowRequest.FromString,
            response_serializer=orchestrator_service_pb2.RegisterWorkflowResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("floxide.v1.OrchestratorService", orchestrator),)
    )
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(workers, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", workers
    finally:
        await server.stop(grace=None)


async def test_heartbeats_list_exactly_the_claims_of_the_session_held(
    scripted: tuple[str, Workers],
) -> None:
    target, workers = scripted
    gates.clear()
    config = WorkerConfig(
        server=target,
        slots=3,
        reconnect_backoff=timedelta(milliseconds=50),
        drain_grace=timedelta(seconds=5),
    )
    async with Worker([GATED], config):
        first = await asyncio.wait_for(workers.links.get(), 10)
        [hello] = first.requests
        assert hello.hello.lists_claims and hello.hello.credit == 3
        a, b, c = first.assign("a", "b", "c")
        await first.listing(a, b, c)  # running
        for run in ("a", "c"):
            gates.setdefault(run, asyncio.Event()).set()

        async def reported() -> bool:
            return sorted(first.results()) == [a, c]

        await eventually(reported, within=10, interval=0.01)
        await first.listing(a, b, c)  # a and c reported, not acknowledged
        first.ack(**{c: 0, a: 14})  # a: UNAVAILABLE, sent again and still held
        await first.listing(a, b)
        assert sorted(first.results()) == [a, a, c]

        first.responses.put_nowait(None)  # the stream ends; the worker reconnects
        second = await asyncio.wait_for(workers.links.get(), 10)
        assert second.requests[0].hello.credit == 2  # b runs; a's result takes no slot
        await second.listing()  # a and b are the first session's: not this one's to list
        [d] = second.assign("d")
        await second.listing(d)
        gates.setdefault("b", asyncio.Event()).set()

        async def resent() -> bool:
            return sorted(second.results()) == [a, b]

        await eventually(resent, within=10, interval=0.01)
        assert second.granted() == 3  # b's slot came back with its result; a's was in the hello
        await second.listing(d)
        second.ack(**{a: 9, b: 9})
        gates.setdefault("d", asyncio.Event()).set()
        await second.listing(d)  # reported, not acknowledged
        second.ack(**{d: 0})
        await second.listing()


def test_heartbeats_waiting_together_go_as_the_later_one() -> None:
    """Frames merged in one write keep one list of claims: the later heartbeat's, not both."""
    from floxide_worker.worker import _Stream  # noqa: PLC0415

    async def go() -> list[ConnectRequest]:
        stream = _Stream()
        earlier = worker_service_pb2.Heartbeat(held_claim_tokens=["s1-a", "s1-b"])
        later = worker_service_pb2.Heartbeat(held_claim_tokens=["s1-a", "s1-b", "s1-c"])
        result = worker_service_pb2.StepResult(claim_token="s1-a")
        stream.outbox.put_nowait(ConnectRequest(heartbeat=earlier))
        stream.outbox.put_nowait(ConnectRequest(results=[result], credit=1))
        stream.outbox.put_nowait(ConnectRequest(heartbeat=later))
        stream.outbox.put_nowait(None)
        return [request async for request in stream.requests()]

    [frame] = asyncio.run(go())
    assert list(frame.heartbeat.held_claim_tokens) == ["s1-a", "s1-b", "s1-c"]
    assert [r.claim_token for r in frame.results] == ["s1-a"] and frame.credit == 1
