"""The hosts helper: links cut and healed, leftovers of a dead run removed, root required."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers.hosts import FAMILY, Hosts, sweep

ROOT = Path(__file__).parents[2]


def reaches(hosts: Hosts, source: str, address: str, port: int) -> bool:
    """Whether a TCP connection from host ``source`` to ``address:port`` opens within a second."""
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1)"
    command = hosts.host(source).command([sys.executable, "-c", probe])
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def test_a_cut_drops_both_ways_only_between_its_hosts_until_healed() -> None:
    with Hosts() as hosts, socket.create_server((hosts.local.address, 0)) as listener:
        a, b = hosts.add("a"), hosts.add("b")
        port = listener.getsockname()[1]
        assert reaches(hosts, "a", hosts.local.address, port)
        hosts.cut(a, hosts.local)
        assert not reaches(hosts, "a", hosts.local.address, port)
        assert reaches(hosts, "b", hosts.local.address, port)  # only a's link
        assert list(hosts.faults()) == [("a", "local", 100)]
        hosts.heal()
        assert reaches(hosts, "a", hosts.local.address, port)
        assert b.address != a.address


def test_the_namespaces_of_a_run_whose_process_died_are_removed_at_start(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os
        from tests.helpers.hosts import Hosts
        hosts = Hosts()
        hosts.add("left")
        print(hosts.tag, flush=True)
        os._exit(0)  # dies without closing: its namespaces are left behind
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    tag = done.stdout.strip()
    assert tag.startswith(FAMILY)
    assert {f"{tag}-left", f"{tag}-switch"} <= namespaces()
    removed = sweep(keep=os.getpid())
    assert {f"{tag}-left", f"{tag}-switch", f"{tag}r"} <= set(removed)
    assert not {f"{tag}-left", f"{tag}-switch"} & namespaces()


def test_without_root_it_fails_naming_what_it_needs() -> None:
    script = "import os\nfrom tests.helpers.hosts import Hosts\nos.setuid(65534)\nHosts()"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode != 0
    assert "need root" in done.stderr
