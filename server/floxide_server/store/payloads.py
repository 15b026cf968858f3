"""Checks on what clients and workers send: sizes, JSON, JSON Schemas, names and page tokens.

Every check runs before anything is written, so a refused request changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import jsonschema

from floxide_grpc import _names as names
from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_grpc.errors import InvalidArgument, InvalidPayload, ResourceExhausted

T = TypeVar("T")

__all__ = [
    "Limits",
    "check_name",
    "decode_page_token",
    "encode_page_token",
    "namespace_of",
    "page_of",
    "page_offset",
    "page_size",
    "parse_json",
    "validate",
    "validator",
]

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size and time limits. etcd takes 1.5 MiB a request and 128 operations a Txn by default.

    Attributes:
        max_payload_bytes: The largest payload (input, output, context operation value).
        max_context_bytes: The largest context, as JSON.
        max_definition_bytes: The largest workflow definition, encoded.
        max_definition_nodes: The most nodes of one definition (each nested one counted apart).
        max_definition_edges: The most edges of one definition.
        max_schema_bytes: The largest JSON Schema of a node's input, output or context field.
        max_fanout: The most branches one NextAll may open.
        max_runs_in_flight: The most runs StartRun started that run or are paused, per
            namespace (0: no quota); child runs are not counted.
        max_streams_per_token: The most worker streams one token holds open on a replica.
        max_starts_per_second: The most StartRun calls per second of one token on a replica.
        max_txn_ops: etcd's ``--max-txn-ops``.
        default_node_timeout_ms: The timeout of a node that declares none (0: none).
        max_run_timeout_ms: The longest run timeout a start may ask for.
    """

    max_payload_bytes: int = 256 * 1024
    max_context_bytes: int = 1024 * 1024
    max_definition_bytes: int = 1024 * 1024
    max_definition_nodes: int = 1000
    max_definition_edges: int = 10_000
    max_schema_bytes: int = 64 * 1024
    max_fanout: int = 10_000
    max_runs_in_flight: int = 100_000
    max_streams_per_token: int = 256
    max_starts_per_second: float = 1000.0
    max_txn_ops: int = 128
    default_node_timeout_ms: int = 0
    max_run_timeout_ms: int = 365 * 24 * 3600 * 1000


def namespace_of(namespace: str) -> str:
    """The namespace a request names ("" means "default").

    Raises:
        InvalidArgument: it breaks the rule for names (:mod:`floxide_grpc._names`).
    """
    return names.check_name("namespace", namespace or "default")


def check_name(what: str, value: str) -> str:
    """Refuse an empty or malformed id (run id, item id): the server's, or a local run's.

    Raises:
        InvalidArgument: naming ``what``.
    """
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r} is missing or malformed")
    return value


def page_offset(token: str) -> int:
    """The offset a page token of an offset-paged list holds (0 for the first page).

    Raises:
        InvalidArgument: a token this server did not make (the fuzzer's, say).
    """
    try:
        offset = int(decode_page_token(token) or 0)
    except ValueError as exc:
        raise InvalidArgument(f"page_token {token!r} is malformed") from exc
    if offset < 0:
        raise InvalidArgument(f"page_token {token!r} is malformed")
    return offset


def page_of(items: Sequence[T], size: int, token: str) -> tuple[list[T], str]:
    """A page of a list read whole, and the next page's token ("" on the last)."""
    size = page_size(size)
    offset = page_offset(token)
    page = list(items[offset : offset + size])
    return page, encode_page_token(str(offset + size)) if offset + size < len(items) else ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(payload: work_item_pb2.Payload, limit: int, where: str) -> Any:
    """Check a payload's encoding and size, and parse its JSON.

    Raises:
        InvalidPayload: not JSON-encoded, or not valid JSON (NaN and Infinity included).
        ResourceExhausted: over ``limit`` bytes.
    """
    if payload.encoding != work_item_pb2.ENCODING_JSON:
        raise InvalidPayload(f"{where}: payload encoding must be ENCODING_JSON")
    if len(payload.data) > limit:
        raise ResourceExhausted(f"{where}: {len(payload.data)} bytes is over the limit of {limit}")
    try:
        return json.loads(payload.data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"{where}: not valid JSON: {exc}") from exc


@functools.lru_cache(maxsize=4096)
def validator(schema: str) -> jsonschema.protocols.Validator | None:
    """A compiled validator for a JSON Schema text (``None`` for the empty schema).

    Raises:
        InvalidArgument: the text is not JSON or not a valid JSON Schema.
    """
    if not schema:
        return None
    try:
        document = json.loads(schema)
        cls = jsonschema.validators.validator_for(document, default=jsonschema.Draft202012Validator)
        cls.check_schema(document)
    except (ValueError, jsonschema.SchemaError) as exc:
        raise InvalidArgument(f"invalid JSON Schema: {exc}") from exc
    return cls(document)


def validate(value: Any, schema: str, where: str) -> None:
    """Validate a value against a JSON Schema text.

    Raises:
        InvalidPayload: naming the path of the first error.
    """
    checker = validator(schema)
    if checker is None:
        return
    error = jsonschema.exceptions.best_match(checker.iter_errors(value))
    if error is not None:
        path = "$" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
        raise InvalidPayload(f"{where}: {error.message} - at `{path}`")


def page_size(requested: int) -> int:
    """0 means 100; more than 1000 means 1000.

    Raises:
        InvalidArgument: negative.
    """
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative, not {requested}")
    return 100 if requested == 0 else min(requested, 1000)


def encode_page_token(last: str) -> str:
    """An opaque token for the page after ``last``."""
    return base64.urlsafe_b64encode(last.encode()).decode()


def decode_page_token(token: str) -> str | None:
    """The position a page token stands for (``None`` for the first page).

    Raises:
        InvalidArgument: the token was not made by this server.
    """
    if not token:
        return None
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"page_token {token!r} is malformed") from exc
