"""A 10-step chain on the whole stack: an embedded etcd, one server, worker processes.

Starts everything as processes (like ``floxide dev``), warms up, then measures:
- throughput: RUNS runs of the 10-step chain submitted at once (steps/s from the first submit to
  the last result, at the client), with each run's latency (p50, p95, p99);
- latency alone: SINGLE runs one after another (p50, p95), and per-step overhead (p50 / 10).
Every result is checked (run i must end at i + 10). Prints one JSON line and a summary.

    python bench/chain.py [--runs 200] [--single 30] [--workers 2] [--slots 2] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from floxide_server.embedded import EmbeddedEtcd

from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus

HERE = Path(__file__).parent
STEPS = 10


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


async def one_run(client: OrchestratorClient, n: int) -> float:
    started = time.perf_counter()
    run, _ = await client.start_run("chain10", n)
    final = await client.wait_for_completion(run.run_id, timeout=600)
    elapsed = time.perf_counter() - started
    if final.status is not RunStatus.COMPLETED or final.output != n + STEPS:
        raise AssertionError(f"run {n}: {final.status} {final.output!r} (expected {n + STEPS})")
    return elapsed


async def start_server(
    bin_dir: Path, ready: Path, etcd: str
) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        str(bin_dir / "floxide-server"),
        *("--port", "0", "--ready-file", str(ready), "--log-level", "warning"),
        *(("--etcd", etcd) if etcd else ()),
    )
    while not (ready.exists() and ready.read_text().endswith("\n")):
        await asyncio.sleep(0.05)
    return process, ready.read_text().strip()


async def main(runs: int, single: int, workers: int, slots: int, replicas: int) -> dict[str, Any]:
    bin_dir = Path(sys.executable).parent
    processes: list[asyncio.subprocess.Process] = []
    etcd = EmbeddedEtcd(name="bench").start() if replicas > 1 else None
    with tempfile.TemporaryDirectory(prefix="floxide-bench-") as tmp:
        try:
            servers = []
            for n in range(replicas):  # one replica: with its own embedded etcd
                process, address = await start_server(
                    bin_dir, Path(tmp) / f"server-{n}", etcd.endpoint if etcd else ""
                )
                processes.append(process)
                servers.append(address)
            for n in range(workers):  # spread over the replicas
                processes.append(
                    await asyncio.create_subprocess_exec(
                        str(bin_dir / "floxide-worker"),
                        str(HERE / "chain_workflow.py"),
                        *("--server", servers[n % replicas], "--slots", str(slots)),
                        *("--worker-id", f"bench-{n}", "--log-level", "warning"),
                    )
                )
            async with OrchestratorClient(servers[0], timeout=60) as client:
                while len(await client.workers()) < workers:
                    await asyncio.sleep(0.05)
                await asyncio.gather(*(one_run(client, n) for n in range(10)))  # warm-up
                started = time.perf_counter()
                latencies = await asyncio.gather(*(one_run(client, n) for n in range(runs)))
                wall = time.perf_counter() - started
                alone = [await one_run(client, n) for n in range(single)]
            return {
                "runs": runs,
                "steps_per_s": runs * STEPS / wall,
                "latency_ms": {
                    p: percentile(latencies, q) * 1e3
                    for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
                },
                "alone_ms": {p: percentile(alone, q) * 1e3 for p, q in (("p50", 50), ("p95", 95))},
                "per_step_overhead_ms": percentile(alone, 50) * 1e3 / STEPS,
                "workers": workers,
                "slots": slots,
                "replicas": replicas,
            }
        finally:
            for process in reversed(processes):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in reversed(processes):
                await process.wait()
            if etcd is not None:
                etcd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--single", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1, help="servers on one etcd")
    args = parser.parse_args()
    result = asyncio.run(main(args.runs, args.single, args.workers, args.slots, args.replicas))
    print(json.dumps(result))
    print(f"{args.runs} runs x {STEPS} steps at once: {result['steps_per_s']:.0f} steps/s")
    print(
        "  latency p50 {p50:.0f} ms  p95 {p95:.0f} ms  p99 {p99:.0f} ms".format(
            **result["latency_ms"]
        )
    )
    print("one run alone: p50 {p50:.1f} ms  p95 {p95:.1f} ms".format(**result["alone_ms"]))
    print(f"  per-step overhead {result['per_step_overhead_ms']:.2f} ms")
