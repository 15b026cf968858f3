"""Workflow definitions in the store: registered by content hash, validated, cached."""

from __future__ import annotations

import dataclasses
import logging
import time
import typing

from floxide_grpc import _names as names
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import workflow_pb2
from floxide_grpc.context import ContextSchema
from floxide_grpc.errors import (
    FloxideError,
    InvalidArgument,
    InvalidDefinition,
    ResourceExhausted,
    WorkflowNotFound,
)
from floxide_server.store import payloads
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Get, KeyValue, Put, Txn

__all__ = ["Definition", "WorkflowStore"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Definition:
    """A registered definition, indexed: its graph and its context schema."""

    hash: str
    graph: Graph
    context: ContextSchema
    _children: dict[str, Definition] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def definition(self) -> workflow_pb2.WorkflowDefinition:
        """The definition proto."""
        return self.graph.definition

    def child(self, name: str) -> Definition:
        """The definition of the subworkflow ``name``, as this one names it (by content hash)."""
        found = self._children.get(name)
        if found is None:
            nested = self.graph.subworkflows[name]
            found = self._children[name] = Definition(
                self.graph.child_hash(name),
                Graph(nested),
                ContextSchema.from_proto(nested.context_fields),
            )
        return found


def _check_counts(definition: workflow_pb2.WorkflowDefinition, limits: payloads.Limits) -> None:
    """Refuse a definition (or a nested one) with too many nodes or edges, or a huge schema."""
    name = definition.name
    for what, count, most in (
        ("nodes", len(definition.nodes), limits.max_definition_nodes),
        ("edges", len(definition.edges), limits.max_definition_edges),
    ):
        if count > most:
            raise ResourceExhausted(
                f"workflow {name!r}: {count} {what} is over the limit of {most}"
            )
    schemas = [
        (f"node {n.name!r} {which} schema", schema)
        for n in definition.nodes
        for which, schema in (("input", n.input_schema), ("output", n.output_schema))
    ] + [(f"context field {f.name!r} schema", f.schema) for f in definition.context_fields]
    for where, schema in schemas:
        if len(schema.encode()) > limits.max_schema_bytes:
            raise ResourceExhausted(
                f"workflow {name!r}: {where} of {len(schema.encode())} bytes is over the limit "
                f"of {limits.max_schema_bytes}"
            )
    for nested in definition.subworkflows:
        _check_counts(nested, limits)


def _check(definition: workflow_pb2.WorkflowDefinition, limits: payloads.Limits) -> Definition:
    """Validate a definition from any language; raises InvalidDefinition naming the fault."""
    size = definition.ByteSize()
    if size > limits.max_definition_bytes:
        raise ResourceExhausted(
            f"workflow {definition.name!r}: definition of {size} bytes is over the limit of "
            f"{limits.max_definition_bytes}"
        )
    _check_counts(definition, limits)
    graph = Graph(definition)
    graph.validate()
    for node in definition.nodes:
        for which, schema in (("input", node.input_schema), ("output", node.output_schema)):
            try:
                payloads.validator(schema)
            except FloxideError as exc:
                raise InvalidDefinition(
                    f"workflow {definition.name!r}: node {node.name!r} {which} schema: {exc}"
                ) from exc
        if node.HasField("retry_policy"):
            from floxide_grpc.retry import RetryPolicy  # noqa: PLC0415

            RetryPolicy.from_proto(node.retry_policy)
    context = ContextSchema.from_proto(definition.context_fields)
    return Definition(graph.definition_hash, graph, context)


def _nested(
    definition: workflow_pb2.WorkflowDefinition,
) -> list[workflow_pb2.WorkflowDefinition]:
    """Every workflow nested in a definition, at any depth, innermost first."""
    found = []
    for child in definition.subworkflows:
        found.extend([*_nested(child), child])
    return found


class WorkflowStore:
    """Register, read and list definitions; keep parsed definitions in memory by hash."""

    def __init__(self, kv: KV, limits: payloads.Limits) -> None:
        self.kv = kv
        self.limits = limits
        self._cache: dict[tuple[str, str], Definition] = {}
        self._current: dict[bytes, tuple[str, int]] = {}

    async def register(
        self, namespace: str, definition: workflow_pb2.WorkflowDefinition
    ) -> tuple[str, bool]:
        """Validate and store a definition (and the workflows nested in it).

        A new hash becomes its name's current definition, and is logged; a hash already
        registered changes nothing (only a new hash or :meth:`promote` changes which is
        current), but is made current if its name has none.

        Returns:
            The content hash, and whether this hash was new.

        Raises:
            InvalidDefinition: naming the node at fault.
            ResourceExhausted: the definition is too large.
        """
        keys = Keys(namespace)
        parsed = _check(definition, self.limits)
        created = False
        for child in [*_nested(definition), definition]:
            child_hash = parsed.hash if child is definition else Graph(child).definition_hash
            record = workflow_pb2.RegisteredWorkflow(
                namespace=namespace, name=child.name, definition_hash=child_hash, definition=child
            )
            record.registered_at.FromMilliseconds(int(time.time() * 1000))
            def_key = keys.workflow_def(child_hash)
            current_key = keys.workflow_current(child.name)
            txn = Txn(
                [Compare.missing(def_key)],
                [
                    Get(current_key, name="previous"),
                    Put(def_key, record.SerializeToString()),
                    Put(current_key, child_hash.encode()),
                ],
                # Known: which is current stays, unless the name has none at all.
                [Txn([Compare.missing(current_key)], [Put(current_key, child_hash.encode())])],
            )
            result = await self.kv.txn(txn)
            if result.succeeded:
                read = typing.cast(list[KeyValue], txn.named(result).get("previous", []))
                previous = read[0].value.decode() if read else ""
                log.info(
                    "workflow %r of %r: new definition %s is current (was %s)",
                    child.name,
                    namespace,
                    child_hash,
                    previous or "none",
                )
            if child is definition:
                created = result.succeeded
            self._current.pop(current_key, None)
        await self.kv.txn(Txn([Compare.missing(keys.index)], [Put(keys.index, b"")]))
        self._cache[(namespace, parsed.hash)] = parsed
        return parsed.hash, created

    async def current(self, namespace: str, name: str) -> tuple[str, int]:
        """A workflow's current hash, and the revision that made it current (cached).

        The cache may be stale (another replica registered since): a write that depends on it
        guards the revision, and calls :meth:`forget` when that guard fails.

        Raises:
            WorkflowNotFound: no such workflow.
        """
        key = Keys(namespace).workflow_current(names.check_name("workflow", name))
        cached = self._current.get(key)
        if cached is None:
            found = await self.kv.get(key)
            if found is None:
                raise WorkflowNotFound(
                    f"workflow {name!r} is not registered in namespace {namespace!r}"
                )
            cached = self._current[key] = (found.value.decode(), found.mod_revision)
        return cached

    def forget(self, namespace: str, name: str) -> None:
        """Drop a cached current hash."""
        self._current.pop(Keys(namespace).workflow_current(name), None)

    async def record(
        self, namespace: str, name: str, definition_hash: str = ""
    ) -> workflow_pb2.RegisteredWorkflow:
        """A registered definition by name (its current one) or by hash.

        Raises:
            WorkflowNotFound: no such workflow or hash.
        """
        keys = Keys(namespace)
        if not definition_hash:
            current = await self.kv.get(keys.workflow_current(names.check_name("workflow", name)))
            if current is None:
                raise WorkflowNotFound(
                    f"workflow {name!r} is not registered in namespace {namespace!r}"
                )
            definition_hash = current.value.decode()
        found = await self.kv.get(keys.workflow_def(definition_hash))
        if found is None:
            raise WorkflowNotFound(f"workflow {name!r} has no definition {definition_hash!r}")
        record = workflow_pb2.RegisteredWorkflow.FromString(found.value)
        if name and record.name != name:
            raise WorkflowNotFound(f"definition {definition_hash!r} is not of workflow {name!r}")
        return record

    async def get(self, namespace: str, definition_hash: str) -> Definition:
        """A parsed definition by hash (read once, then cached: definitions never change).

        Raises:
            WorkflowNotFound: no such hash.
        """
        cached = self._cache.get((namespace, definition_hash))
        if cached is not None:
            return cached
        record = await self.record(namespace, "", definition_hash)
        parsed = Definition(
            definition_hash,
            Graph(record.definition),
            ContextSchema.from_proto(record.definition.context_fields),
        )
        self._cache[(namespace, definition_hash)] = parsed
        return parsed

    async def promote(
        self, namespace: str, name: str, definition_hash: str
    ) -> tuple[workflow_pb2.RegisteredWorkflow, str]:
        """Make a registered definition its workflow's current one again (logged).

        Returns:
            The definition (without it), and the hash that was current before ("" if none).

        Raises:
            InvalidArgument: no hash given.
            WorkflowNotFound: no such workflow or hash, or a hash of another workflow.
        """
        keys = Keys(namespace)
        if not definition_hash:
            raise InvalidArgument(
                "definition_hash is required: the registered definition to promote"
            )
        record = await self.record(namespace, names.check_name("workflow", name), definition_hash)
        current_key = keys.workflow_current(name)
        txn = Txn(
            [], [Get(current_key, name="previous"), Put(current_key, definition_hash.encode())]
        )
        result = await self.kv.txn(txn)
        read = typing.cast(list[KeyValue], txn.named(result).get("previous", []))
        previous = read[0].value.decode() if read else ""
        self._current.pop(current_key, None)
        log.warning(
            "workflow %r of %r: definition %s promoted to current by request (was %s)",
            name,
            namespace,
            definition_hash,
            previous or "none",
        )
        record.ClearField("definition")
        record.current = True
        return record, previous

    async def versions(self, namespace: str) -> list[workflow_pb2.RegisteredWorkflow]:
        """Every registered definition of the namespace, by name then registration (no body)."""
        keys = Keys(namespace)
        found, _ = await self.kv.range(keys.workflow_defs)
        currents, _ = await self.kv.range(keys.workflows)
        current = {kv.key[len(keys.workflows) :].decode(): kv.value.decode() for kv in currents}
        records = []
        for kv in found:
            record = workflow_pb2.RegisteredWorkflow.FromString(kv.value)
            record.ClearField("definition")
            record.current = current.get(record.name) == record.definition_hash
            records.append(record)
        records.sort(key=lambda r: (r.name, r.registered_at.ToMilliseconds(), r.definition_hash))
        return records

    async def list_workflows(
        self, namespace: str, size: int, token: str
    ) -> tuple[list[workflow_pb2.RegisteredWorkflow], str]:
        """The namespace's workflows by name, each with its current hash (no definition)."""
        keys = Keys(namespace)
        size = payloads.page_size(size)
        after = payloads.decode_page_token(token)
        start = keys.workflow_current(after) + b"\0" if after else None
        found, _ = await self.kv.range(keys.workflows, start=start, limit=size + 1)
        result = []
        for kv in found[:size]:
            name = kv.key[len(keys.workflows) :].decode()
            record = await self.kv.get(keys.workflow_def(kv.value.decode()))
            entry = workflow_pb2.RegisteredWorkflow(
                namespace=namespace, name=name, definition_hash=kv.value.decode(), current=True
            )
            if record is not None:
                entry.registered_at.CopyFrom(
                    workflow_pb2.RegisteredWorkflow.FromString(record.value).registered_at
                )
            result.append(entry)
        more = len(found) > size
        return result, payloads.encode_page_token(result[-1].name) if more and result else ""
