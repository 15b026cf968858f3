"""The benchmark workloads (shared/bench/WORKLOADS.md) on the whole floxide-grpc stack.

For each workload it starts everything as processes (an embedded etcd under one server, or
several servers on one etcd with ``--replicas``, and 2 worker processes: 2 slots each for W1-W3,
16 each for W4), warms up, runs the timed repetitions, checks every run's result, and stops
everything. Prints one JSON line per workload (median, min and max of each figure over the
repetitions) and a table shaped like the peer scripts': steps/s, latency p50/p95/p99 (submit ->
result at the client), CPU ms per executed step of server, etcd, workers and client, how busy
the machine was, and the peak RSS of each group.

    python bench/run.py [--only W1,W3] [--reps 3] [--replicas 2] [--profile DIR] [--tls]

``--tls`` runs the servers on TLS (a development CA of the run's own), the workers and the
client trusting it.

``--profile DIR`` samples the servers and workers with py-spy during the timed repetitions
(collapsed stacks in DIR, one file per process) and prints each group's top functions by own
time: the profile behind docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from floxide_grpc._certs import make_authority
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from floxide_grpc.tls import Tls

HERE = Path(__file__).parent
GROUPS = ("server", "etcd", "workers", "client")
# workload -> (workflow, slots per worker, warm-up size)
PLAN = {
    "W1": ("chain10", 2, 20),
    "W2": ("fan100", 2, 2),
    "W3": ("chain10", 2, 3),
    "W4": ("sleep10", 16, 20),
}


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Stack:
    """Servers, their etcd and workers, as processes."""

    def __init__(
        self,
        slots: int,
        replicas: int,
        workflows: str = str(HERE / "workloads.py"),
        workers: int = 2,
        *,
        tls: bool = False,
    ) -> None:
        self.slots = slots
        self.replicas = replicas
        self.workflows = workflows  # what the workers serve: a file, or FILE.py:NAME
        self.workers = workers
        self.tmp = tempfile.TemporaryDirectory(prefix="floxide-bench-")
        self.processes: dict[str, list[asyncio.subprocess.Process]] = {"server": [], "workers": []}
        self.targets: list[str] = []
        self.etcd_process: Any = None
        self.tls: Tls | None = None  # the workers' and clients', with --tls
        self._serving: tuple[str, ...] = ()
        self._reaching: tuple[str, ...] = ()
        if tls:  # a development CA of its own: the server's certificate, trusted by the rest
            authority = make_authority(Path(self.tmp.name) / "pki")
            served = authority.issue("bench server", hosts=["127.0.0.1"])
            self.tls = Tls(ca=authority.cert)
            self._serving = ("--tls-cert", str(served.cert), "--tls-key", str(served.key))
            self._reaching = ("--tls-ca", str(authority.cert))

    async def __aenter__(self) -> Stack:
        # One admin token for the servers (stored at start), their workers and this process's
        # clients (which read FLOXIDE_TOKEN), as floxide dev makes one.
        token = "fxt_bench-" + secrets.token_urlsafe(32)  # never a token of the user's shell
        os.environ["FLOXIDE_TOKEN"] = os.environ["FLOXIDE_ADMIN_TOKEN"] = token
        bin_dir = Path(sys.executable).parent
        etcd_args: tuple[str, ...] = ()
        if self.replicas > 1:
            from floxide_server.embedded import EmbeddedEtcd  # noqa: PLC0415 - only for replicas

            self.etcd_process = EmbeddedEtcd(name="bench").start()
            etcd_args = ("--etcd", self.etcd_process.endpoint)
        for n in range(self.replicas):
            ready = Path(self.tmp.name) / f"server-{n}"
            process = await asyncio.create_subprocess_exec(
                str(bin_dir / "floxide-server"),
                *("--port", "0", "--ready-file", str(ready), "--log-level", "warning", *etcd_args),
                *self._serving,
            )
            self.processes["server"].append(process)
            while not (ready.exists() and ready.read_text().endswith("\n")):
                if process.returncode is not None:
                    raise RuntimeError("floxide-server exited")
                await asyncio.sleep(0.05)
            self.targets.append(ready.read_text().strip())
        for n in range(self.workers):
            self.processes["workers"].append(
                await asyncio.create_subprocess_exec(
                    str(bin_dir / "floxide-worker"),
                    self.workflows,
                    *("--server", self.targets[n % self.replicas], "--slots", str(self.slots)),
                    *("--worker-id", f"bench-{n}", "--log-level", "warning"),
                    *self._reaching,
                )
            )
        async with OrchestratorClient(self.targets[0], tls=self.tls) as client:
            while len(await client.workers()) < self.workers:
                await asyncio.sleep(0.05)
        return self

    def groups(self) -> dict[str, list[psutil.Process]]:
        """The processes of each group (etcd: the servers' children, or the one for replicas)."""
        servers = [psutil.Process(p.pid) for p in self.processes["server"]]
        etcd = [c for s in servers for c in s.children(recursive=True)]
        if self.etcd_process is not None:
            etcd.append(psutil.Process(self.etcd_process.process.pid))
        return {
            "server": servers,
            "etcd": etcd,
            "workers": [psutil.Process(p.pid) for p in self.processes["workers"]],
            "client": [psutil.Process(os.getpid())],
        }

    async def __aexit__(self, *exc: object) -> None:
        for group in ("workers", "server"):
            for process in self.processes[group]:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in self.processes[group]:
                await process.wait()
        if self.etcd_process is not None:
            self.etcd_process.stop()
        self.tmp.cleanup()


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for name, procs in groups.items():
        out[name] = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                out[name] += t.user + t.system
            except psutil.Error:
                pass
    return out


def peak_rss_mb(procs: list[psutil.Process]) -> float:
    total_kb = 0
    for p in procs:
        try:
            with Path(f"/proc/{p.pid}/status").open() as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return round(total_kb / 1024, 1)


async def timed(client: OrchestratorClient, workflow: str, value: int, expected: Any) -> float:
    started = time.perf_counter()
    run, _ = await client.start_run(workflow, value)
    final = await client.wait_for_completion(run.run_id, timeout=600)
    latency = time.perf_counter() - started
    if final.status is not RunStatus.COMPLETED or final.output != expected:
        raise AssertionError(
            f"{workflow}({value}): {final.status} {final.output!r} != {expected!r}"
        )
    return latency


async def at_once(
    client: OrchestratorClient, workflow: str, runs: int, expect: Callable[[int], Any]
) -> tuple[float, list[float]]:
    started = time.perf_counter()
    latencies = await asyncio.gather(*(timed(client, workflow, n, expect(n)) for n in range(runs)))
    return time.perf_counter() - started, list(latencies)


async def w1(client: OrchestratorClient, runs: int = 200) -> dict[str, float]:
    wall, lat = await at_once(client, "chain10", runs, lambda n: n + 10)
    return {
        "steps": runs * 10,
        "steps_per_s": runs * 10 / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p95_ms": pct(lat, 95) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
    }


async def w2(client: OrchestratorClient, runs: int = 20) -> dict[str, float]:
    wall, lat = await at_once(client, "fan100", runs, lambda n: 200 * n + 9900)
    steps = runs * 103
    return {
        "steps": steps,
        "steps_per_s": steps / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p95_ms": pct(lat, 95) * 1e3,
    }


async def w3(client: OrchestratorClient, runs: int = 30) -> dict[str, float]:
    lat = [await timed(client, "chain10", n, n + 10) for n in range(runs)]
    return {
        "steps": runs * 10,
        "p50_ms": pct(lat, 50) * 1e3,
        "p95_ms": pct(lat, 95) * 1e3,
        "per_step_ms": pct(lat, 50) * 1e3 / 10,
    }


async def w4(client: OrchestratorClient, runs: int = 100) -> dict[str, float]:
    wall, lat = await at_once(client, "sleep10", runs, lambda n: n + 10)
    steps_per_s = runs * 10 / wall
    return {
        "steps": runs * 10,
        "steps_per_s": steps_per_s,
        "p50_ms": pct(lat, 50) * 1e3,
        "p95_ms": pct(lat, 95) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "fraction_of_ideal": steps_per_s / 3200,
    }


WORKLOADS: dict[str, Callable[..., Awaitable[dict[str, float]]]] = {
    "W1": w1,
    "W2": w2,
    "W3": w3,
    "W4": w4,
}


async def profile(name: str, groups: dict[str, list[psutil.Process]], into: Path) -> list[Any]:
    """Start py-spy on the servers and workers; each writes collapsed stacks when interrupted."""
    into.mkdir(parents=True, exist_ok=True)
    spies = []
    for group in ("server", "workers"):
        for n, process in enumerate(groups[group]):
            out = into / f"{name}-{group}-{n}.txt"
            spies.append(
                await asyncio.create_subprocess_exec(
                    *("py-spy", "record", "--pid", str(process.pid), "--rate", "250"),
                    *("--format", "raw", "--nonblocking", "-o", str(out)),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
    await asyncio.sleep(1.0)  # py-spy attaches
    return spies


def top_functions(files: list[Path], n: int = 12) -> list[tuple[float, str]]:
    """The functions with the most own samples in collapsed stacks, as shares of all samples."""
    own: dict[str, int] = {}
    total = 0
    for file in files:
        for line in file.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            frame = stack.rsplit(";", 1)[-1]
            own[frame] = own.get(frame, 0) + int(count)
            total += int(count)
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return [(100 * count / max(total, 1), frame) for frame, count in ranked]


async def run_workload(
    name: str, reps: int, replicas: int, profile_dir: Path | None = None, *, tls: bool = False
) -> dict[str, Any]:
    _, slots, warm = PLAN[name]
    async with (
        Stack(slots, replicas, tls=tls) as stack,
        OrchestratorClient(stack.targets[0], timeout=60, tls=stack.tls) as client,
    ):
        await WORKLOADS[name](client, warm)
        spies = await profile(name, stack.groups(), profile_dir) if profile_dir else []
        results = []
        for _ in range(reps):
            groups = stack.groups()
            before, sys_before, t0 = cpu_seconds(groups), psutil.cpu_times(), time.perf_counter()
            result = await WORKLOADS[name](client)
            wall = time.perf_counter() - t0
            after, sys_after = cpu_seconds(groups), psutil.cpu_times()
            capacity = wall * (psutil.cpu_count() or 1)
            idle = (sys_after.idle + sys_after.iowait) - (sys_before.idle + sys_before.iowait)
            ours = {k: after[k] - before[k] for k in after}
            result["cpu_busy_pct"] = 100 * (capacity - idle) / capacity
            result["cpu_other_pct"] = max(
                0.0, 100 * (capacity - idle - sum(ours.values())) / capacity
            )
            for group, seconds in ours.items():
                result[f"cpu_ms_per_step_{group}"] = seconds * 1e3 / result["steps"]
            results.append(result)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            await spy.wait()
        summary: dict[str, Any] = {
            key: {
                "median": statistics.median(r[key] for r in results),
                "min": min(r[key] for r in results),
                "max": max(r[key] for r in results),
            }
            for key in results[0]
        }
        summary["peak_rss_mb"] = {
            group: peak_rss_mb(procs) for group, procs in stack.groups().items()
        }
        summary["config"] = {"workers": 2, "slots": 2 * slots, "replicas": replicas, "reps": reps}
    return summary


def _fmt(summary: dict[str, Any], key: str, digits: int = 0) -> str:
    if key not in summary:
        return "-"
    m = summary[key]
    return f"{m['median']:.{digits}f} [{m['min']:.{digits}f}-{m['max']:.{digits}f}]"


def print_table(results: dict[str, dict[str, Any]], reps: int) -> None:
    print(
        f"\n# medians of {reps} reps [min-max]; latency = submit -> result at client, ms;\n"
        f"# cpu ms/step of {'+'.join(GROUPS)}; busy/other = % of all cores busy / busy with other "
        f"processes; peak RSS MB of {'/'.join(GROUPS)}"
    )
    print(
        f"{'workload':<10} {'slots':>5} {'steps/s':>18} {'p50 ms':>20} {'p95 ms':>20} "
        f"{'p99 ms':>20} {'cpu ms/step':>22} {'busy':>4} {'other':>5} {'peak RSS':>16}"
    )
    for name, s in results.items():
        cpu = "+".join(f"{s[f'cpu_ms_per_step_{g}']['median']:.2f}" for g in GROUPS)
        rss = "/".join(f"{s['peak_rss_mb'][g]:.0f}" for g in GROUPS)
        print(
            f"{name:<10} {s['config']['slots']:>5} {_fmt(s, 'steps_per_s'):>18} "
            f"{_fmt(s, 'p50_ms', 1):>20} "
            f"{_fmt(s, 'p95_ms', 1):>20} {_fmt(s, 'p99_ms', 1):>20} {cpu:>22} "
            f"{s['cpu_busy_pct']['median']:>4.0f} {s['cpu_other_pct']['median']:>5.1f} {rss:>16}"
        )
        if "per_step_ms" in s:
            print(f"{'':<10} per-step overhead (p50/10): {_fmt(s, 'per_step_ms', 2)} ms")
        if "fraction_of_ideal" in s:
            print(f"{'':<10} fraction of the ideal 3200 steps/s: {_fmt(s, 'fraction_of_ideal', 2)}")


async def main(
    names: list[str], reps: int, replicas: int, profile_dir: Path | None, *, tls: bool = False
) -> None:
    results = {}
    for name in names:
        results[name] = await run_workload(name, reps, replicas, profile_dir, tls=tls)
        print(json.dumps({"system": "floxide-grpc", "workload": name, **results[name]}), flush=True)
        if profile_dir is not None:
            for group in ("server", "workers"):
                files = sorted(profile_dir.glob(f"{name}-{group}-*.txt"))
                print(f"# {name} {group}: top functions by own time (py-spy, {profile_dir})")
                for share, frame in top_functions(files):
                    print(f"#   {share:5.1f}%  {frame}")
    print_table(results, reps)
    load = os.getloadavg()
    print(f"# {psutil.cpu_count()} cpus, loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="W1,W2,W3,W4", help="a subset, e.g. W1,W3")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, help="servers on one etcd")
    parser.add_argument("--profile", type=Path, help="sample servers and workers with py-spy")
    parser.add_argument("--tls", action="store_true", help="servers, workers and client over TLS")
    args = parser.parse_args()
    chosen = [n.strip().upper() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in PLAN]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(PLAN)}")
    asyncio.run(main(chosen, args.reps, args.replicas, args.profile, tls=args.tls))
