"""Typed payloads: conversion at the edge, clear errors, JSON without NaN, JSON Schemas."""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgspec
import pydantic
import pytest

from floxide_grpc import InvalidPayload
from floxide_grpc import _codec as codec
from floxide_grpc._proto.floxide.v1 import work_item_pb2


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    id: int
    lines: list[Line]


class Point(msgspec.Struct):
    x: float
    y: float


class User(pydantic.BaseModel):
    name: str
    age: int


def test_dataclasses_round_trip() -> None:
    order = Order(1, [Line("a", 2)])
    data = codec.encode(order, where="w")
    assert json.loads(data) == {"id": 1, "lines": [{"sku": "a", "qty": 2}]}
    assert codec.decode(data, Order, where="w") == order


def test_msgspec_structs_and_pydantic_models_round_trip() -> None:
    assert codec.decode(codec.encode(Point(1.5, 2), where="w"), Point, where="w") == Point(1.5, 2)
    users = [User(name="ada", age=36)]
    assert codec.decode(codec.encode(users, where="w"), list[User], where="w") == users


def test_a_bad_field_is_named_with_its_path() -> None:
    data = b'{"id": 1, "lines": [{"sku": "a", "qty": "two"}]}'
    with pytest.raises(
        InvalidPayload, match=r"node 'x' input: Expected `int`, got `str` - at `\$.lines\[0\].qty`"
    ):
        codec.decode(data, Order, where="node 'x' input")


def test_a_bad_pydantic_field_is_named() -> None:
    with pytest.raises(InvalidPayload, match=r"(?s)node 'u' input: .*age"):
        codec.convert({"name": "a", "age": "old"}, User, where="node 'u' input")


def test_not_json_is_refused() -> None:
    with pytest.raises(InvalidPayload, match="node 'x' input: not valid JSON"):
        codec.decode(b"{nope", where="node 'x' input")


@pytest.mark.parametrize("text", [b"NaN", b"[1, Infinity]", b'{"a": -Infinity}'])
def test_nan_and_infinity_are_refused_when_reading(text: bytes) -> None:
    with pytest.raises(InvalidPayload, match="not valid JSON"):
        codec.decode(text, where="w")


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], {"a": -float("inf")}])
def test_nan_and_infinity_are_refused_when_writing(value: object) -> None:
    with pytest.raises(InvalidPayload, match="NaN and Infinity are not valid JSON"):
        codec.encode(value, where="w")


def test_an_unknown_payload_encoding_is_refused() -> None:
    payload = work_item_pb2.Payload(data=b"1")
    with pytest.raises(InvalidPayload, match="unsupported payload encoding 0"):
        codec.from_payload(payload, where="w")


def test_json_schemas_are_generated_from_annotations() -> None:
    schema = json.loads(codec.json_schema(Order))
    assert schema["$ref"] == "#/$defs/Order"
    assert schema["$defs"]["Line"]["properties"]["qty"] == {"type": "integer"}
    assert json.loads(codec.json_schema(User))["properties"]["age"]["type"] == "integer"
    assert codec.json_schema(codec.ANY) == ""
    assert codec.json_schema(Order) == codec.json_schema(Order)  # canonical text


def test_unions_of_classes_convert_to_the_member_that_fits() -> None:
    assert codec.convert({"x": 1, "y": 2}, Line | Point, where="w") == Point(1, 2)
    with pytest.raises(InvalidPayload, match="fits none of"):
        codec.convert({"z": 1}, Line | Point, where="w")
