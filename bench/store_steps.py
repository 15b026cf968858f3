"""Claim and complete latency against a real etcd, and what one step writes to etcd.

Starts an embedded etcd, registers a 10-step chain, starts RUNS runs, and plays a worker that
claims and completes every item (CONCURRENCY claims in flight at a time). Prints, as one JSON
line and a table: claim and complete latency (p50, p99, ms), transactions, keys written and
bytes put per step (counted at the client, exact), and etcd's own view of it (its mvcc put
and txn counters, and the bytes its gRPC server received, from /metrics).

    python bench/store_steps.py [--runs 50] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store import Store, queue
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Delete, Put, Txn, TxnResult
from floxide_server.store.payloads import Limits
from floxide_server.store.workflows import WorkflowStore

from floxide_grpc import Workflow
from floxide_grpc._proto.floxide.v1 import work_item_pb2

sys.path.insert(0, str(Path(__file__).parent))
import workloads

STEPS = workloads.STEPS


def chain() -> Workflow:
    flow: Workflow = workloads.chain10
    return flow


@dataclass
class Counter:
    txns: int = 0
    puts: int = 0
    deletes: int = 0
    put_bytes: int = 0


class CountingKV(EtcdKV):
    """EtcdKV that counts what each transaction writes (the token wrapper included)."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints)
        self.counter = Counter()

    def _count(self, requests: Any) -> None:
        for request in requests:
            if isinstance(request, Put):
                self.counter.puts += 1
                self.counter.put_bytes += len(request.key) + len(request.value)
            elif isinstance(request, Delete):
                self.counter.deletes += 1
            elif isinstance(request, Txn):
                self._count([*request.success])  # the branch that runs on success

    async def txn(self, txn: Txn) -> TxnResult:
        self.counter.txns += 1
        self.counter.puts += 1  # the transaction's token
        self._count(txn.success)
        return await super().txn(txn)


def etcd_metrics(etcd: EmbeddedEtcd) -> dict[str, float]:
    wanted = (
        "etcd_mvcc_put_total",
        "etcd_mvcc_delete_total",
        "etcd_mvcc_txn_total",
        "etcd_network_client_grpc_received_bytes_total",
    )
    with urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


async def main(runs: int, concurrency: int) -> dict[str, Any]:
    etcd = EmbeddedEtcd(name="bench").start()
    kv = CountingKV([etcd.endpoint])
    limits = Limits()
    workflows = WorkflowStore(kv, limits)
    store = Store.open(kv, limits, workflows)
    namespace = "bench"
    try:
        await workflows.register(namespace, chain().definition())  # chain10
        lease = await kv.grant(60)
        await kv.txn(Txn([], [Put(Keys(namespace).session(lease), b"bench", lease)]))
        for n in range(runs):
            await store.lifecycle.start(namespace, "chain10", "", _json(n), "", None)
        before, metrics_before = Counter(**vars(kv.counter)), etcd_metrics(etcd)
        claims: list[float] = []
        completes: list[float] = []
        semaphore = asyncio.Semaphore(concurrency)

        async def one(item: work_item_pb2.WorkItem) -> None:
            async with semaphore:
                started = time.perf_counter()
                claim = await store.claims.claim(namespace, lease, item.run_id, item.item_id)
                claims.append(time.perf_counter() - started)
                assert claim is not None
                value = json.loads(claim.item.input.data) + 1
                output = _json(value)
                transition = work_item_pb2.Transition(
                    next=work_item_pb2.Transition.Next(output=output)
                )
                started = time.perf_counter()
                await store.completions.complete(namespace, claim.token, transition)
                completes.append(time.perf_counter() - started)

        wall = time.perf_counter()
        while ready := await queue.ready(kv, namespace):
            await asyncio.gather(*(one(item) for item in ready))
        wall = time.perf_counter() - wall
        steps = len(claims)
        assert steps == runs * STEPS, steps
        after, metrics_after = kv.counter, etcd_metrics(etcd)
        delta = {k: metrics_after[k] - metrics_before.get(k, 0) for k in metrics_after}
        result = {
            "steps": steps,
            "claim_ms": {"p50": percentile(claims, 50) * 1e3, "p99": percentile(claims, 99) * 1e3},
            "complete_ms": {
                "p50": percentile(completes, 50) * 1e3,
                "p99": percentile(completes, 99) * 1e3,
            },
            "steps_per_s": steps / wall,
            "per_step": {
                "txns": (after.txns - before.txns) / steps,
                "keys_put": (after.puts - before.puts) / steps,
                "keys_deleted": (after.deletes - before.deletes) / steps,
                "bytes_put": (after.put_bytes - before.put_bytes) / steps,
                "etcd_puts": delta.get("etcd_mvcc_put_total", 0) / steps,
                "etcd_txns": delta.get("etcd_mvcc_txn_total", 0) / steps,
                "etcd_bytes_received": delta.get("etcd_network_client_grpc_received_bytes_total", 0)
                / steps,
            },
            "mean_claim_ms": statistics.fmean(claims) * 1e3,
        }
        return result
    finally:
        await kv.close()
        etcd.stop()


def _json(value: Any) -> work_item_pb2.Payload:
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode()
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    result = asyncio.run(main(args.runs, args.concurrency))
    print(json.dumps(result))
    print(f"steps: {result['steps']}  ({result['steps_per_s']:.0f}/s, store only, one process)")
    print(
        f"claim    p50 {result['claim_ms']['p50']:.2f} ms  p99 {result['claim_ms']['p99']:.2f} ms"
    )
    print(
        f"complete p50 {result['complete_ms']['p50']:.2f} ms"
        f"  p99 {result['complete_ms']['p99']:.2f} ms"
    )
    for name, value in result["per_step"].items():
        print(f"per step {name:22s} {value:10.1f}")
