"""Fuzzing that reaches the logic: valid requests for every RPC, then mutated, against one server.

Each example is a request built from the RPC's own message type, field by field, from values
that mean something to the server (this namespace's runs and items, another namespace's, ids of
nothing, pages, payloads at each limit and one past it, huge repeated fields, enum values out of
range), sent with an operator's token of the fuzzed namespace. The worker stream gets valid
frames, then mutated ones: results with claim tokens of other sessions and runs, credits out of
range, frames out of order, a second hello.

After each example: the server is SERVING, the call's status is one docs/protocol.md lists
(never INTERNAL or UNKNOWN), and every run of another namespace (a witness: completed, paused,
running) is intact, key for key, in etcd.

The stack runs once for the module, on an event loop of its own in a thread: hypothesis runs
each example synchronously, and refuses function-scoped fixtures under ``@given``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.keys import Keys
from floxide_server.store.payloads import Limits
from floxide_worker import Worker, WorkerConfig
from google.protobuf import descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    store_service_pb2,
    worker_service_pb2,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers.channels import authorized_channel

pytestmark = pytest.mark.timeout(300)
T = TypeVar("T")

LIMITS = Limits(max_payload_bytes=2048, max_context_bytes=8192)
EXAMPLES = 100
"""Examples per test: bounded in count, and by ``deadline=None`` plus the module's timeout."""
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,  # another namespace than the token's
}
"""The statuses docs/protocol.md lists for these RPCs (its common rules and the tokens')."""
STREAMS_TOO = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
"""A stream's too: it is read for a moment, then left (its deadline, or our cancel)."""


@node
def bump(x: int) -> int:
    return x + 1


@node
def hold(x: int) -> int:  # served by nobody: its runs wait, running
    return x


FLOW = Workflow("fuzz_bump", start=bump)
WAITING = Workflow("fuzz_hold", start=hold)


class _Internal(logging.Handler):
    """Every error the server logged as internal (its answer was INTERNAL)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(
            record.getMessage() + (f" {record.exc_info[1]!r}" if record.exc_info else "")
        )


@dataclass
class Stack:
    """The server, its etcd, a witness namespace and the fuzzed one, on a loop of their own."""

    loop: asyncio.AbstractEventLoop
    server: Server
    kv: EtcdKV
    namespace: str
    witness: str
    token: str
    worker_token: str
    runs: dict[str, list[str]] = field(default_factory=dict)
    items: dict[str, list[str]] = field(default_factory=dict)
    before: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    internal: _Internal = field(default_factory=_Internal)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def do(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    async def witness_keys(self) -> list[tuple[bytes, bytes, int]]:
        found, _ = await self.kv.range(Keys(self.witness).prefix)
        return [(kv.key, kv.value, kv.mod_revision) for kv in found]

    async def check(self) -> None:
        """The server serves, and the witness namespace is as it was, key for key."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert not self.internal.seen, self.internal.seen  # never an INTERNAL answer
        assert await self.witness_keys() == self.before


@pytest.fixture(scope="module")
def stack(etcd: EmbeddedEtcd) -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-stack", daemon=True)
    thread.start()
    made = asyncio.run_coroutine_threadsafe(_start(etcd, loop), loop).result(120)
    errors = logging.getLogger("floxide_server.errors")
    errors.addHandler(made.internal)
    try:
        yield made
    finally:
        errors.removeHandler(made.internal)
        asyncio.run_coroutine_threadsafe(_stop(made), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


async def _start(etcd: EmbeddedEtcd, loop: asyncio.AbstractEventLoop) -> Stack:
    kv = EtcdKV([etcd.endpoint])
    server = Server(kv, ServerConfig(port=0, limits=LIMITS))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    namespace, witness = f"fuzz-{uuid.uuid4().hex[:6]}", f"witness-{uuid.uuid4().hex[:6]}"
    async with OrchestratorClient(target, namespace=witness, retries=5) as admin:
        token, _ = await admin.create_token("fuzzer", "operator", [namespace])
        worker_token, _ = await admin.create_token("fuzzed worker", "worker", [namespace])
        stack = Stack(loop, server, kv, namespace, witness, token, worker_token)
        for ns in (witness, namespace):  # each: a completed run, a paused one, a running one
            async with OrchestratorClient(target, namespace=ns, retries=5) as client:
                await client.register_workflow(FLOW)
                await client.register_workflow(WAITING)
                async with Worker([FLOW], WorkerConfig(server=target, namespace=ns)):
                    run, _ = await client.start_run("fuzz_bump", 1)
                    final = await client.wait_for_completion(run.run_id, timeout=60)
                    assert final.status is RunStatus.COMPLETED, final.error
                paused, _ = await client.start_run("fuzz_hold", 2)
                await client.pause_run(paused.run_id)
                running, _ = await client.start_run("fuzz_hold", 3)
                stack.runs[ns] = [run.run_id, paused.run_id, running.run_id]
                stack.items[ns] = [
                    i.item_id for r in stack.runs[ns] for i in await client.work_items(r)
                ]
    stack.before = await stack.witness_keys()
    return stack


async def _stop(stack: Stack) -> None:
    try:
        await stack.server.stop()
    finally:
        await stack.kv.close()


# -- values that mean something ------------------------------------------------------------------


def _values(stack: Stack) -> dict[str, st.SearchStrategy[Any]]:
    """By field name: the strategies of values worth sending."""
    ours, theirs = stack.runs[stack.namespace], stack.runs[stack.witness]
    ids = st.sampled_from(
        [*ours, *theirs, str(uuid.uuid4()), "", "../../etc", "01a2-not-a-run", "x" * 300]
    )
    return {
        "namespace": st.sampled_from([stack.namespace] * 8 + [stack.witness, "", "Bad Name!"]),
        "run_id": ids,
        "parent_run_id": ids,
        "item_id": st.sampled_from(
            [*stack.items[stack.namespace], *stack.items[stack.witness], "", "nope"]
        ),
        "workflow": st.sampled_from(["fuzz_bump", "fuzz_hold", "", "nothing", "x" * 200]),
        "name": st.sampled_from(["fuzz_bump", "fuzz_hold", "", "nothing"]),
        "definition_hash": st.sampled_from(["", "0" * 16, "deadbeef"]),
        "idempotency_key": st.sampled_from(["", "k1", "k2", "\n", "x" * 300]),
        "request_id": st.sampled_from(["", "r1", "\x00"]),
        "page_token": st.sampled_from(["", "garbage", "eyJ4IjoxfQ=="]),
        "field": st.sampled_from(["", "steps", "nope"]),
        "worker_id": st.sampled_from(["", "w", "x" * 300]),
        "session_id": st.sampled_from(["", "1", "ffffffffffffffff"]),
    }


def _payloads() -> st.SearchStrategy[bytes]:
    limit = LIMITS.max_payload_bytes
    return st.sampled_from(
        [
            b"1",
            b'"text"',
            b"null",
            b"{}",
            b"not json",
            b"NaN",
            b"[" * 2000,
            b'"' + b"x" * (limit - 2) + b'"',  # at the limit
            b'"' + b"x" * (limit - 1) + b'"',  # one past it
        ]
    )


def _message(
    draw: st.DrawFn, kind: descriptor.Descriptor, values: dict[str, Any], depth: int = 0
) -> Any:
    """A message of ``kind``, each field drawn from what its name means (or its type)."""
    from google.protobuf.message_factory import GetMessageClass  # noqa: PLC0415

    message = GetMessageClass(kind)()
    for f in kind.fields:
        if f.containing_oneof is not None and draw(st.booleans()):
            continue
        if f.name != "namespace" and not draw(st.integers(0, 3)):  # unset, a quarter of the time
            continue
        count = draw(st.sampled_from([1, 1, 1, 2, 3, 500])) if _repeated(f) else 1
        for _ in range(count if _repeated(f) else 1):
            value = _field(draw, f, values, depth)
            if value is None:
                continue
            if f.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                target = (
                    getattr(message, f.name).add() if _repeated(f) else getattr(message, f.name)
                )
                target.CopyFrom(value)
            elif _repeated(f):
                getattr(message, f.name).append(value)
            else:
                setattr(message, f.name, value)
    return message


def _repeated(f: descriptor.FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def _field(
    draw: st.DrawFn, f: descriptor.FieldDescriptor, values: dict[str, Any], depth: int
) -> Any:
    types = descriptor.FieldDescriptor
    if f.type == types.TYPE_MESSAGE:
        return _submessage(draw, f, values, depth)
    if f.type == types.TYPE_STRING:
        return draw(values[f.name]) if f.name in values else draw(st.text(max_size=40))
    simple: dict[int, st.SearchStrategy[Any]] = {
        types.TYPE_BYTES: st.binary(max_size=64),
        types.TYPE_BOOL: st.booleans(),
        types.TYPE_DOUBLE: st.sampled_from([0.0, -1.0, 1e308, 0.5]),
        types.TYPE_FLOAT: st.sampled_from([0.0, -1.0, 0.5]),
    }
    if f.type in simple:
        return draw(simple[f.type])
    if f.type == types.TYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return draw(st.sampled_from([*known, 99, -1]))
    signed = f.type in (types.TYPE_INT32, types.TYPE_INT64, types.TYPE_SINT32, types.TYPE_SINT64)
    wide = f.type in (types.TYPE_INT64, types.TYPE_UINT64, types.TYPE_SINT64, types.TYPE_FIXED64)
    edges = [0, 1, 2, 100, 1000, 1001, 2**31 - 1]
    if wide:
        edges.append(2**62)
    if signed:
        edges += [-1, -(2**31)]
    return draw(st.sampled_from(edges))


def _submessage(
    draw: st.DrawFn, f: descriptor.FieldDescriptor, values: dict[str, Any], depth: int
) -> Any:
    kind = f.message_type
    assert kind is not None
    if kind.full_name == "floxide.v1.Payload":
        from floxide_grpc._proto.floxide.v1 import work_item_pb2  # noqa: PLC0415

        encoding = draw(st.sampled_from([1, 1, 1, 0, 7]))
        return work_item_pb2.Payload(encoding=encoding, data=draw(_payloads()))  # type: ignore[arg-type]
    if kind.GetOptions().map_entry or depth > 2:
        return None
    return _message(draw, kind, values, depth + 1)


# -- the unary and server-streaming RPCs --------------------------------------------------------

METHODS = [
    (service, method)
    for module in (orchestrator_service_pb2, store_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
    if not method.client_streaming
]


@st.composite
def _calls(draw: st.DrawFn, stack: Stack) -> tuple[str, Any, bool]:
    service, method = draw(st.sampled_from(METHODS))
    request = _message(draw, method.input_type, _values(stack))
    return f"/{service.full_name}/{method.name}", request, method.server_streaming


async def _send(stack: Stack, path: str, request: Any, streaming: bool) -> grpc.StatusCode:
    from google.protobuf.message_factory import GetMessageClass  # noqa: PLC0415

    service, name = path.strip("/").split("/")
    method = next(m for s, m in METHODS if s.full_name == service and m.name == name)
    reply = GetMessageClass(method.output_type).FromString
    async with authorized_channel(stack.target, stack.token) as channel:
        try:
            if streaming:
                call = channel.unary_stream(
                    path, request_serializer=type(request).SerializeToString,
                    response_deserializer=reply,
                )(request, timeout=1.0)  # fmt: skip
                async for _ in call:
                    break  # what it says first is enough; it is left then
                call.cancel()
                return grpc.StatusCode.OK
            await channel.unary_unary(
                path, request_serializer=type(request).SerializeToString,
                response_deserializer=reply,
            )(request, timeout=20)  # fmt: skip
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


CALLS: dict[str, set[grpc.StatusCode]] = {}
"""Each RPC's statuses seen, for the note's record (printed at the end with -s)."""


@settings(
    max_examples=EXAMPLES * 4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_every_rpc_with_valid_then_mutated_requests(stack: Stack, data: st.DataObject) -> None:
    path, request, streaming = data.draw(_calls(stack))
    code = stack.do(_send(stack, path, request, streaming))
    CALLS.setdefault(path.rsplit("/", 1)[1], set()).add(code)
    assert code in (ALLOWED | STREAMS_TOO if streaming else ALLOWED), (path, code, request)
    stack.do(stack.check())


# -- the worker stream ---------------------------------------------------------------------------


@st.composite
def _frames(draw: st.DrawFn, stack: Stack) -> list[worker_service_pb2.ConnectRequest]:
    values = _values(stack)
    hello = worker_service_pb2.Hello(
        protocol_version=draw(st.sampled_from([1, 1, 1, 0, 99])),
        namespace=draw(st.sampled_from([stack.namespace] * 3 + [stack.witness, ""])),
        worker_id="fuzzed",
        credit=draw(st.sampled_from([1, 2, 0, 1024, 1025, 2**31 - 1])),
        lists_claims=draw(st.booleans()),
    )
    frames = [worker_service_pb2.ConnectRequest(hello=hello)]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["result", "credit", "heartbeat", "hello", "drain", "junk"]))
        if kind == "hello":
            frames.append(worker_service_pb2.ConnectRequest(hello=hello))  # out of order
        elif kind == "credit":
            amount = draw(st.sampled_from([1, 0, 1000, 2**31 - 1]))
            frames.append(worker_service_pb2.ConnectRequest(credit=amount))
        elif kind == "heartbeat":
            held = draw(st.lists(st.text(max_size=20), max_size=3)) * draw(
                st.sampled_from([1, 300])
            )
            frames.append(
                worker_service_pb2.ConnectRequest(
                    heartbeat=worker_service_pb2.Heartbeat(held_claim_tokens=held)
                )
            )
        elif kind == "drain":
            frames.append(worker_service_pb2.ConnectRequest(drain=worker_service_pb2.Drain()))
        else:
            result = _message(draw, worker_service_pb2.StepResult.DESCRIPTOR, values)
            lease = draw(st.sampled_from(["1", "7f", "deadbeefdeadbeef"]))
            run = draw(values["run_id"])
            item = draw(values["item_id"])
            result.claim_token = draw(
                st.sampled_from([f"{lease}:{'0' * 16}:1:{run}:{item}", "", "::::", "x" * 400])
            )  # another session's token, another run's, or not a token at all
            frames.append(worker_service_pb2.ConnectRequest(results=[result]))
    return frames


CORE = "Internal error from Core"
"""What grpc's client reports when it wrote into a stream the server had already ended: the
server's own status is lost to it, so that a server never answers INTERNAL is checked in its
log instead (:class:`_Internal`)."""


async def _stream(stack: Stack, frames: list[worker_service_pb2.ConnectRequest]) -> grpc.StatusCode:
    async with authorized_channel(stack.target, stack.worker_token) as channel:
        call = channel.stream_stream(
            "/floxide.v1.WorkerService/Connect",
            request_serializer=worker_service_pb2.ConnectRequest.SerializeToString,
            response_deserializer=worker_service_pb2.ConnectResponse.FromString,
        )(timeout=3.0)
        try:
            for frame in frames:
                await call.write(frame)
            await call.done_writing()
            async for _ in call:
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return _seen(exc.code(), exc.details())
        except (grpc.aio.UsageError, asyncio.InvalidStateError):  # after the server ended it
            return _seen(await call.code(), await call.details())


def _seen(code: grpc.StatusCode, details: str | None) -> grpc.StatusCode:
    if code == grpc.StatusCode.INTERNAL and CORE in (details or ""):
        return grpc.StatusCode.CANCELLED  # the client's own race (see CORE)
    return code


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_the_worker_stream_with_valid_then_mutated_frames(
    stack: Stack, data: st.DataObject
) -> None:
    frames = data.draw(_frames(stack))
    code = stack.do(_stream(stack, frames))
    CALLS.setdefault("Connect", set()).add(code)
    assert code in ALLOWED | STREAMS_TOO, (code, frames)
    stack.do(stack.check())


def test_fuzz_statuses_seen(stack: Stack) -> None:
    """What the fuzzing above reached, per RPC (run with -s to see it)."""
    for name, codes in sorted(CALLS.items()):
        print(f"fuzz {name}: {sorted(c.name for c in codes)}")
    assert stack.do(stack.witness_keys()) == stack.before


@pytest.mark.parametrize("token", ["eyJ4IjoxfQ==", "LTU="])  # '{"x":1}', '-5'
def test_fuzz_found_a_page_token_the_server_did_not_make_is_invalid_argument(
    stack: Stack, token: str
) -> None:
    """Found by the fuzzer: offset-paged lists answered INTERNAL to such a token."""
    for path, request in (
        (
            "/floxide.v1.OrchestratorService/ListRunErrors",
            orchestrator_service_pb2.ListRunErrorsRequest(
                namespace=stack.namespace, run_id=stack.runs[stack.namespace][0], page_token=token
            ),
        ),
        (
            "/floxide.v1.ErrorStoreService/ListErrors",
            store_service_pb2.ListErrorsRequest(
                namespace=stack.namespace, run_id=stack.runs[stack.namespace][0], page_token=token
            ),
        ),
    ):
        assert stack.do(_send(stack, path, request, False)) == grpc.StatusCode.INVALID_ARGUMENT
    stack.do(stack.check())
