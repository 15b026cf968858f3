"""A burst for fast workers, without and with runs queued for one busy worker (issue 16).

Runs queued for a worker that is busy must not slow dispatch to the others: before issue 16,
each wake of dispatch asked every session with credit about every queued item. This starts,
as processes, one server on an embedded etcd, 8 fast workers serving ``quick`` (a one-step
workflow, 4 slots each) and a busy worker with one slot serving ``held`` (its one node waits
until released), both from bench/burst_flows.py. After a warm-up, each repetition times a
burst of 300 ``quick`` runs started at once (every result checked), first alone, then with 200
``held`` runs queued, the busy worker's slot holding one more; then it releases the held runs
and waits for them. It prints the medians over the repetitions of both burst durations, their
ratio (with/without: the goal is at most 1.2) and the server's CPU seconds in each, then one
JSON line. What it starts is stopped at the end, also on a failure, on Ctrl-C or after
``--timeout`` seconds (killed if it takes more than 60 s to stop).

    python bench/burst.py [--runs 300] [--held 200] [--reps 5] [--workers 8] [--slots 4]
                          [--timeout 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

from burst_flows import RELEASE
from run import HERE, Stack, at_once, cpu_seconds

from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus

FLOWS = HERE / "burst_flows.py"
BUSY = "bench-busy"
WARM = 50
GOAL = 1.2
STOP_S = 60.0  # how long the processes may take to stop before they are killed


class BurstStack(Stack):
    """bench/run.py's stack (one server, the fast workers) serving ``quick``, and a busy worker."""

    def __init__(self, workers: int, slots: int) -> None:
        super().__init__(slots, replicas=1, workflows=f"{FLOWS}:quick", workers=workers)
        self.release = Path(self.tmp.name) / "release"

    async def __aenter__(self) -> BurstStack:
        try:
            await super().__aenter__()
            self.processes["workers"].append(
                await asyncio.create_subprocess_exec(
                    str(Path(sys.executable).parent / "floxide-worker"),
                    *(f"{FLOWS}:held", "--server", self.targets[0], "--slots", "1"),
                    *("--worker-id", BUSY, "--log-level", "warning"),
                    env={**os.environ, RELEASE: str(self.release)},
                )
            )
            async with OrchestratorClient(self.targets[0]) as client:
                while len(await client.workers()) < self.workers + 1:
                    await asyncio.sleep(0.05)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.touch()  # the busy worker's node returns: it drains at once
        try:
            async with asyncio.timeout(STOP_S):
                await super().__aexit__(*exc)
        finally:
            for process in [*self.processes["workers"], *self.processes["server"]]:
                if process.returncode is None:
                    process.kill()


async def burst(stack: BurstStack, client: OrchestratorClient, runs: int) -> dict[str, float]:
    """``runs`` quick runs at once: how long they all took, and the server's CPU meanwhile."""
    groups = stack.groups()
    before = cpu_seconds(groups)["server"]
    wall, _ = await at_once(client, "quick", runs, lambda n: n)
    return {"wall_s": wall, "server_cpu_s": cpu_seconds(groups)["server"] - before}


async def hold(client: OrchestratorClient, held: int) -> list[str]:
    """Start ``held`` + 1 runs for the busy worker: one in its slot, ``held`` queued."""
    run_ids = [(await client.start_run("held", n))[0].run_id for n in range(held + 1)]
    while not any(w.worker_id == BUSY and w.in_flight for w in await client.workers()):
        await asyncio.sleep(0.05)
    return run_ids


async def release(stack: BurstStack, client: OrchestratorClient, run_ids: list[str]) -> None:
    """Let the held runs finish, check each, and take the release back."""
    stack.release.touch()
    for n, run_id in enumerate(run_ids):
        final = await client.wait_for_completion(run_id, timeout=600)
        if final.status is not RunStatus.COMPLETED or final.output != n:
            raise AssertionError(f"held({n}): {final.status} {final.output!r}")
    stack.release.unlink()


async def main(runs: int, held: int, reps: int, workers: int, slots: int) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    async with (
        BurstStack(workers, slots) as stack,
        OrchestratorClient(stack.targets[0], timeout=60) as client,
    ):
        await at_once(client, "quick", WARM, lambda n: n)
        for rep in range(reps):
            alone = await burst(stack, client, runs)
            run_ids = await hold(client, held)
            crowded = await burst(stack, client, runs)
            await release(stack, client, run_ids)
            sample = {
                "without_s": alone["wall_s"],
                "with_s": crowded["wall_s"],
                "ratio": crowded["wall_s"] / alone["wall_s"],
                "server_cpu_without_s": alone["server_cpu_s"],
                "server_cpu_with_s": crowded["server_cpu_s"],
            }
            samples.append(sample)
            print(f"# rep {rep + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in sample.items()))
    figures = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    return {"runs": runs, "held": held, "workers": workers, "slots": slots, "reps": reps, **figures}


def report(result: dict[str, Any]) -> None:
    print(
        f"\n# a burst of {result['runs']} quick runs on {result['workers']} workers x "
        f"{result['slots']} slots, "
        f"medians of {result['reps']} reps\n"
        f"without held runs:         {result['without_s']:6.2f} s, "
        f"server CPU {result['server_cpu_without_s']:6.2f} s\n"
        f"with {result['held']:>4} held runs queued: {result['with_s']:6.2f} s, "
        f"server CPU {result['server_cpu_with_s']:6.2f} s\n"
        f"with/without:              {result['ratio']:6.2f}   (goal <= {GOAL})"
    )
    print(json.dumps({"system": "floxide-grpc", "benchmark": "burst", **result}), flush=True)


async def bounded(args: argparse.Namespace) -> dict[str, Any]:
    """``main`` within ``--timeout``; SIGTERM stops it as Ctrl-C does (what it started too)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(args.timeout):
            return await main(args.runs, args.held, args.reps, args.workers, args.slots)
    except TimeoutError:
        raise SystemExit(f"stopped after --timeout {args.timeout:g} s") from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="quick runs in a burst")
    parser.add_argument("--held", type=int, default=200, help="runs queued for the busy worker")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8, help="fast workers")
    parser.add_argument("--slots", type=int, default=4, help="of each fast worker")
    parser.add_argument("--timeout", type=float, default=600, help="seconds, for everything")
    try:
        report(asyncio.run(bounded(parser.parse_args())))
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise SystemExit("stopped (interrupted)") from None
