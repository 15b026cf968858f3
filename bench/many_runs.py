"""10,000 runs started at once, twice: do all complete, and does the server's memory level off?

Starts the stack as bench/run.py does (embedded etcd, one server, 2 workers with 2 slots each),
then for each wave submits N runs of the W1 chain (10 steps) without waiting, waits for every
result, checks it, and samples the server's RSS each second. Memory that plateaus shows up as a
second wave peaking no higher than the first.

    python bench/many_runs.py [--runs 10000] [--waves 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psutil
from run import Stack

from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus


async def wave(client: OrchestratorClient, runs: int, server: psutil.Process) -> dict[str, float]:
    peak = 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.memory_info().rss / 2**20)
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    limit = asyncio.Semaphore(500)  # calls in flight at once, so the client keeps up

    async def one(n: int) -> None:
        async with limit:
            run, _ = await client.start_run("chain10", n)
        final = await client.wait_for_completion(run.run_id, timeout=3600)
        if final.status is not RunStatus.COMPLETED or final.output != n + 10:
            raise AssertionError(f"run {n}: {final.status} {final.output!r}")

    await asyncio.gather(*(one(n) for n in range(runs)))
    wall = time.perf_counter() - started
    done.set()
    await sampler
    return {
        "runs": runs,
        "wall_s": round(wall, 1),
        "steps_per_s": round(runs * 10 / wall, 1),
        "server_peak_rss_mb": round(peak, 1),
        "server_rss_after_mb": round(server.memory_info().rss / 2**20, 1),
    }


async def main(runs: int, waves: int) -> None:
    async with (
        Stack(2, 1) as stack,
        OrchestratorClient(stack.targets[0], timeout=120) as client,
    ):
        server = stack.groups()["server"][0]
        for n in range(waves):
            result = await wave(client, runs, server)
            print(json.dumps({"system": "floxide-grpc", "wave": n + 1, **result}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--waves", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.waves))
