"""Typed payloads: Python values to JSON bytes and back, checked against annotated types.

msgspec does the conversion and the JSON Schemas: it understands dataclasses, msgspec Structs,
TypedDicts, enums, unions, containers and the standard scalars, converts without a round trip
through text, and reports the path of a bad field (``$.items[2].qty``). Pydantic models, when
pydantic is installed, are handled through msgspec's hooks. JSON is written by the standard
library with ``allow_nan=False``: msgspec would quietly write NaN as ``null``.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any

import msgspec

from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_grpc.errors import InvalidPayload

__all__ = [
    "ANY",
    "convert",
    "decode",
    "encode",
    "from_payload",
    "json_schema",
    "to_builtins",
    "to_payload",
]

ANY: Any = typing.Any
"""The type of a value that is not checked (an unannotated parameter)."""


def _pydantic_model(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is object:
        return obj
    if _pydantic_model(tp):
        return tp.model_validate(obj)
    raise NotImplementedError(f"unsupported type {tp!r}")


def _enc_hook(obj: Any) -> Any:
    if _pydantic_model(type(obj)):
        return obj.model_dump(mode="json")
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _schema_hook(tp: Any) -> dict[str, Any]:
    if tp is object:
        return {}
    if _pydantic_model(tp):
        schema: dict[str, Any] = tp.model_json_schema()
        return schema
    raise NotImplementedError(f"no JSON Schema for {tp!r}")


def _union_members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return ()


def convert(obj: Any, tp: Any, *, where: str) -> Any:
    """Convert JSON-like builtins to ``tp``, validating them.

    Raises:
        InvalidPayload: ``obj`` does not fit ``tp``; the message starts with ``where`` and names
            the offending field.
    """
    if tp is ANY or tp is object:
        return obj
    try:
        return msgspec.convert(obj, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise InvalidPayload(f"{where}: {exc}") from exc
    except TypeError:
        # msgspec refuses unions of several untagged classes: try the members one by one.
        members = _union_members(tp)
        if not members:
            raise
    except Exception as exc:  # a pydantic model's own validation error
        raise InvalidPayload(f"{where}: {exc}") from exc
    errors = []
    for member in members:
        try:
            return convert(obj, member, where=where)
        except InvalidPayload as exc:
            errors.append(str(exc).removeprefix(f"{where}: "))
    raise InvalidPayload(f"{where}: fits none of {_type_name(tp)}: {'; '.join(errors)}")


def to_builtins(value: Any, *, where: str) -> Any:
    """Turn a value into JSON-like builtins (dicts, lists, str, int, float, bool, None).

    Raises:
        InvalidPayload: the value has a type that cannot be written as JSON.
    """
    try:
        return msgspec.to_builtins(value, enc_hook=_enc_hook)
    except (TypeError, NotImplementedError) as exc:
        raise InvalidPayload(f"{where}: cannot be written as JSON: {exc}") from exc


def encode(value: Any, *, where: str) -> bytes:
    """Write a value as compact UTF-8 JSON.

    Raises:
        InvalidPayload: the value holds NaN or Infinity, or a type JSON cannot hold.
    """
    builtins = to_builtins(value, where=where)
    try:
        return json.dumps(
            builtins, allow_nan=False, ensure_ascii=False, separators=(",", ":")
        ).encode()
    except ValueError as exc:
        raise InvalidPayload(f"{where}: NaN and Infinity are not valid JSON") from exc
    except TypeError as exc:
        raise InvalidPayload(f"{where}: cannot be written as JSON: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(data: bytes, tp: Any = ANY, *, where: str) -> Any:
    """Read JSON bytes into a value of type ``tp``.

    Raises:
        InvalidPayload: the bytes are not JSON (NaN and Infinity included), or do not fit ``tp``.
    """
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"{where}: not valid JSON: {exc}") from exc
    return convert(obj, tp, where=where)


def to_payload(value: Any, *, where: str) -> work_item_pb2.Payload:
    """Encode a value into a JSON ``Payload``."""
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=encode(value, where=where)
    )


def from_payload(payload: work_item_pb2.Payload, tp: Any = ANY, *, where: str) -> Any:
    """Decode a ``Payload`` into a value of type ``tp``.

    Raises:
        InvalidPayload: the encoding is not JSON, or the data does not decode to ``tp``.
    """
    if payload.encoding != work_item_pb2.ENCODING_JSON:
        raise InvalidPayload(f"{where}: unsupported payload encoding {payload.encoding}")
    return decode(payload.data, tp, where=where)


def json_schema(tp: Any) -> str:
    """A type's JSON Schema (draft 2020-12) as canonical JSON text; ``""`` accepts anything."""
    if tp is ANY or tp is object:
        return ""
    members = _union_members(tp) or (tp,)
    try:
        schemas, components = msgspec.json.schema_components(
            members, schema_hook=_schema_hook, ref_template="#/$defs/{name}"
        )
    except (TypeError, NotImplementedError):
        return ""
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": list(schemas)}
    if components:
        schema = {**schema, "$defs": components}
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)
