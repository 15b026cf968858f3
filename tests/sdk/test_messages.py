"""The generated messages round-trip, and unknown values behave as docs/protocol.md says."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import duration_pb2, json_format, timestamp_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floxide_grpc._proto.floxide import v1
from floxide_grpc._proto.floxide.v1 import (
    records_pb2,
    work_item_pb2,
    worker_service_pb2,
    workflow_pb2,
)


def _modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{v1.__name__}.{info.name}")
        for info in pkgutil.iter_modules(v1.__path__)
        if info.name.endswith("_pb2")
    ]


def _all_descriptors() -> list[Descriptor]:
    found: list[Descriptor] = []

    def visit(descriptor: Descriptor) -> None:
        if not descriptor.GetOptions().map_entry:
            found.append(descriptor)
        for nested in descriptor.nested_types:
            visit(nested)

    for module in _modules():
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            visit(descriptor)
    return found


DESCRIPTORS = _all_descriptors()

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: st.text(max_size=12),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=12),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.enum_type is not None:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if field.message_type is not None:
        return _message(field.message_type, depth + 1)
    return _SCALARS[field.type]


@st.composite
def _filled(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> Message:
    message = GetMessageClass(descriptor)()
    # At most one field of each oneof (proto3 `optional` fields are one-field oneofs).
    oneof_fields = {f.name for o in descriptor.oneofs for f in o.fields}
    for oneof in descriptor.oneofs:
        chosen = draw(st.sampled_from([None, *oneof.fields]))
        if chosen is not None:
            _set(message, chosen, draw(_value(chosen, depth)))
    for field in descriptor.fields:
        if field.name in oneof_fields:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE and depth >= 3:
            continue
        if field.is_repeated:
            values = draw(st.lists(_value(field, depth), max_size=2))
            container = getattr(message, field.name)
            for item in values:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    container.add().CopyFrom(item)
                else:
                    container.append(item)
        elif draw(st.booleans()):
            _set(message, field, draw(_value(field, depth)))
    return message


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


# Well-known types whose JSON form admits only a range of values.
_TIMESTAMP = st.builds(
    lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
    st.integers(0, 253402300799),
    st.integers(0, 999_999_999),
)
_DURATION = st.builds(
    lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
    st.integers(0, 315576000000),
    st.integers(0, 999_999_999),
)


def _message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    if descriptor.full_name == "google.protobuf.Timestamp":
        return _TIMESTAMP
    if descriptor.full_name == "google.protobuf.Duration":
        return _DURATION
    return _filled(descriptor, depth)


def test_every_contract_message_is_covered() -> None:
    names = {d.full_name for d in DESCRIPTORS}
    for expected in ("floxide.v1.WorkItem", "floxide.v1.Transition.Next", "floxide.v1.Checkpoint"):
        assert expected in names
    assert len(DESCRIPTORS) > 100


@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=lambda d: d.full_name)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_message_round_trips_in_binary_and_json(
    descriptor: Descriptor, data: st.DataObject
) -> None:
    message = data.draw(_message(descriptor))
    cls = type(message)
    assert cls.FromString(message.SerializeToString()) == message
    parsed = json_format.Parse(json_format.MessageToJson(message), cls())
    assert parsed == message


def test_transition_holds_exactly_one_outcome() -> None:
    transition = work_item_pb2.Transition(
        next=work_item_pb2.Transition.Next(
            output=work_item_pb2.Payload(encoding=work_item_pb2.ENCODING_JSON, data=b"41"),
            route="ok",
        )
    )
    assert transition.WhichOneof("outcome") == "next"
    transition.abort.CopyFrom(
        work_item_pb2.NodeError(kind=work_item_pb2.ERROR_KIND_TIMEOUT, message="slow")
    )
    assert transition.WhichOneof("outcome") == "abort"
    assert not transition.HasField("next")
    wire = work_item_pb2.Transition.FromString(transition.SerializeToString())
    assert wire.abort.kind == work_item_pb2.ERROR_KIND_TIMEOUT


def test_payload_bytes_pass_through_unchanged() -> None:
    data = bytes(range(256))
    payload = work_item_pb2.Payload(encoding=work_item_pb2.ENCODING_JSON, data=data)
    assert work_item_pb2.Payload.FromString(payload.SerializeToString()).data == data


# proto3 enums are open. A receiver built from an older proto keeps a value it does not know, so
# a newer peer's value survives a pass through it; the receiver must not act on it (the server
# answers INVALID_ARGUMENT), and the SDK's conversion to Python enums raises. In JSON, an unknown
# enum *name* cannot be parsed and is rejected; an unknown number is kept.
UNKNOWN_STATUS = 99


def test_unknown_enum_value_survives_a_binary_round_trip() -> None:
    record = records_pb2.RunRecord(run_id="r1")
    record.status = UNKNOWN_STATUS  # type: ignore[assignment]
    wire = record.SerializeToString()
    parsed = records_pb2.RunRecord.FromString(wire)
    assert parsed.status == UNKNOWN_STATUS
    assert parsed.SerializeToString() == wire


def test_unknown_enum_value_is_rejected_by_name_conversion() -> None:
    with pytest.raises(ValueError, match="99"):
        records_pb2.RunStatus.Name(UNKNOWN_STATUS)  # type: ignore[arg-type]


def test_unknown_enum_name_in_json_is_rejected() -> None:
    with pytest.raises(json_format.ParseError, match="RUN_STATUS_EXPLODED"):
        json_format.Parse('{"status": "RUN_STATUS_EXPLODED"}', records_pb2.RunRecord())


def test_unknown_enum_number_in_json_is_kept() -> None:
    parsed = json_format.Parse('{"status": 99}', records_pb2.RunRecord())
    assert parsed.status == UNKNOWN_STATUS


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_fields_from_a_newer_peer_are_kept_by_an_older_reader() -> None:
    # A newer Hello with a field 42 (varint 7) this build does not know.
    hello = worker_service_pb2.Hello(protocol_version=1, worker_id="w", credit=4)
    newer = hello.SerializeToString() + _varint(42 << 3) + _varint(7)
    parsed = worker_service_pb2.Hello.FromString(newer)
    assert (parsed.protocol_version, parsed.worker_id, parsed.credit) == (1, "w", 4)
    unknown = unknown_fields.UnknownFieldSet(parsed)
    assert [(unknown[i].field_number, unknown[i].data) for i in range(len(unknown))] == [(42, 7)]
    assert parsed.SerializeToString() == newer


def test_definitions_nest_whole_subworkflows() -> None:
    child = workflow_pb2.WorkflowDefinition(name="child", start="a")
    parent = workflow_pb2.WorkflowDefinition(
        name="parent",
        start="sub",
        nodes=[
            workflow_pb2.NodeDefinition(
                name="sub",
                kind=workflow_pb2.NODE_KIND_SUBWORKFLOW,
                subworkflow="child",
                terminal=True,
            )
        ],
        subworkflows=[child],
    )
    parsed = workflow_pb2.WorkflowDefinition.FromString(parent.SerializeToString())
    assert parsed.subworkflows[0] == child
