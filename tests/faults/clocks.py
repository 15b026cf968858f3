"""Skewed clocks for the fault tests: ``floxide-server`` replicas and ``floxide-worker``
processes whose wall clock is off by an offset, or follows a file the test rewrites.

libfaketime, preloaded into the process (LD_PRELOAD), moves only the wall clock
(FAKETIME_DONT_FAKE_MONOTONIC=1), as NTP skew or a step does: ``time.monotonic()`` stays the
machine's. etcd is never faked. Every skewed process is checked before a test uses it
(:func:`assert_on_clock`): libfaketime is mapped into it, and its own log lines are stamped
with its clock; a stepped clock is checked by a probe under the same environment. So a test can
never pass because the skew silently did not apply.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from floxide_server.election import MAINTENANCE

from tests.faults.harness import Faults
from tests.helpers import eventually, start_server, stop_all

__all__ = [
    "Clock",
    "Clocks",
    "Replica",
    "assert_offset",
    "assert_on_clock",
    "first_stamp",
    "libfaketime",
    "loaded",
    "measured_offset",
]

TOLERANCE = 2.0
"""How far (s) an observed offset may be from the configured one: process start, log stamps'
milliseconds, a probe's own run."""

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", re.MULTILINE)
"""The time at the start of a server's or worker's log line (logging's ``asctime``)."""


def libfaketime() -> str:
    """The path of libfaketime; fails the test (never skips) when it is not installed."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed: apt-get install faketime (scripts/test does)")
    return found[0]


@dataclass
class Clock:
    """A process's wall clock: ``offset`` seconds from the machine's, or what ``file`` says.

    A clock with a file (:meth:`stepping`) is read by libfaketime at every call
    (FAKETIME_NO_CACHE=1), so :meth:`step` moves it in a running process.
    """

    offset: int = 0
    file: Path | None = None

    @classmethod
    def skewed(cls, offset: int) -> Clock:
        """A wall clock ``offset`` seconds ahead of the machine's (behind if negative)."""
        return cls(offset)

    @classmethod
    def stepping(cls, file: Path, offset: int = 0) -> Clock:
        """A wall clock following ``file``, which starts at ``offset``."""
        clock = cls(offset, file)
        clock.step(offset)
        return clock

    def step(self, offset: int) -> None:
        """Move a clock with a file to ``offset`` (written whole, then renamed into place)."""
        assert self.file is not None, "only a clock that follows a file can be stepped"
        part = self.file.with_name(f"{self.file.name}.part")
        part.write_text(f"{offset:+d}s\n")
        part.replace(self.file)
        self.offset = offset

    def env(self) -> dict[str, str]:
        """The environment that puts a process on this clock."""
        env = {"LD_PRELOAD": libfaketime(), "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        if self.file is None:
            env["FAKETIME"] = f"{self.offset:+d}s"
        else:
            env |= {"FAKETIME_TIMESTAMP_FILE": str(self.file), "FAKETIME_NO_CACHE": "1"}
        return env


def measured_offset(env: Mapping[str, str]) -> float:
    """How far ahead (s) the wall clock of a process started with ``env`` is: a probe, a tiny
    ``python -c`` under the same environment, asked for its time."""
    before = time.time()
    probe = subprocess.run(
        [sys.executable, "-c", "import time; print(repr(time.time()))"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    after = time.time()
    return float(probe.stdout) - (before + after) / 2


def assert_offset(clock: Clock) -> None:
    """Fail unless a probe on ``clock`` is off by the clock's offset (say, just after a step)."""
    measured = measured_offset(clock.env())
    assert abs(measured - clock.offset) <= TOLERANCE, (
        f"libfaketime is not in effect: a process on a clock {clock.offset:+d} s off is "
        f"{measured:+.1f} s off"
    )


def first_stamp(log: Path) -> float:
    """The time stamped on a process's first log line (0 while it has none)."""
    found = _STAMP.search(log.read_text()) if log.exists() else None
    if found is None:
        return 0.0
    return time.mktime(time.strptime(found[1], "%Y-%m-%d %H:%M:%S")) + int(found[2]) / 1000


def loaded(pid: int) -> bool:
    """Whether libfaketime is mapped into the process ``pid``."""
    return "libfaketime" in Path(f"/proc/{pid}/maps").read_text()


async def assert_on_clock(
    clock: Clock, process: subprocess.Popen[bytes], log: Path, started: float
) -> None:
    """Fail unless ``process`` (started at ``started`` by the test's clock) runs on ``clock``.

    Its log's first line, written between its start and now, must be stamped by a clock that is
    ``clock.offset`` off; libfaketime must be mapped into it; a probe under the same environment
    must be off by the offset too.
    """
    stamp = await eventually(lambda: asyncio.to_thread(first_stamp, log), within=30)
    now = time.time()
    assert started + clock.offset - TOLERANCE <= stamp <= now + clock.offset + TOLERANCE, (
        f"{log.name}: stamped {stamp - now:+.1f} s from now; its clock is {clock.offset:+d} s off"
    )
    # Checked once it has logged: the loader has mapped what LD_PRELOAD names by then.
    assert loaded(process.pid), f"libfaketime is not loaded in process {process.pid}"
    await asyncio.to_thread(assert_offset, clock)


@dataclass
class Replica:
    """A ``floxide-server`` process of the test's."""

    name: str
    process: subprocess.Popen[bytes]
    target: str
    log: Path


@dataclass
class Clocks(Faults):
    """The fault harness with several replicas, and processes on clocks of their own.

    Replicas share the harness's etcd, with a short lease TTL and heartbeat; the worker
    processes serve tests/faults/timed.py.
    """

    workflows: str = str(Path(__file__).parent / "timed.py")
    replicas: dict[str, Replica] = field(default_factory=dict)

    async def start_replica(
        self, name: str, clock: Clock | None = None, *, lease_ttl: float = 2, heartbeat: float = 0.5
    ) -> Replica:
        """Start a replica named ``name`` (its ``--server-id``) on ``clock`` (the machine's if
        ``None``); return it once it serves and is checked to run on its clock."""
        ready = self.tmp / f"{name}.ready"
        started = time.time()
        process, address = start_server(
            "--etcd", self.etcd.endpoint, "--server-id", name,
            "--lease-ttl", str(lease_ttl), "--heartbeat", str(heartbeat),
            ready_file=str(ready), env=clock.env() if clock else None,
        )  # fmt: skip
        replica = Replica(name, process, address, Path(f"{ready}.log"))
        self.replicas[name] = replica
        if clock is not None:
            await assert_on_clock(clock, process, replica.log, started)
        return replica

    async def start_worker_on(
        self, name: str, replica: Replica, clock: Clock | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a worker connected to ``replica`` on ``clock``; return it once it is checked
        to run on its clock and its session is open."""
        started = time.time()
        process = self.start_worker(name, replica.target, env=clock.env() if clock else None)
        log = self.tmp / f"{name}.log"
        if clock is not None:
            await assert_on_clock(clock, process, log, started)

        async def connected() -> bool:
            assert process.poll() is None, f"worker {name} exited: {log.read_text()[-3000:]}"
            return " open on " in log.read_text()

        await eventually(connected, within=30)
        return process

    async def leading(self, replica: Replica) -> bool:
        """Whether ``replica`` has become the elected one (it runs the elected duties)."""
        return f"leading {MAINTENANCE} as {replica.name}" in replica.log.read_text()

    def stop_all(self) -> None:
        stop_all([*self.workers.values(), *(r.process for r in self.replicas.values())])
