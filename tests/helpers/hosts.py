"""Hosts on one machine: network namespaces on one bridge, their links failed with nftables.

Each host is a network namespace with ``lo`` up and a veth into a bridge that lives in a
namespace of its own (the switch). The caller's own namespace joins the bridge too
(:attr:`Hosts.local`), so a test reaches every host by its address. A link between two hosts is
cut by nftables rules in one of their namespaces (every packet dropped, both ways: the silent
partition, not a refusal), or made lossy with ``numgen random``. This kernel has no netem: delay
is the TCP proxy's (``tests.helpers.TcpProxy``).

Namespaces outlive their processes, and tests run again on the machine that ran them: every name
starts with ``flxt{pid}``, :meth:`Hosts.close` removes a run's (killing what still runs in them),
and a new :class:`Hosts` first removes those of runs whose process is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Host", "Hosts", "sweep"]

FAMILY = "flxt"
"""The start of every namespace and link name these hosts make, followed by the owner's pid."""
_TABLE = "floxide_faults"
_OWNED = re.compile(rf"^{FAMILY}(\d+)")


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def require() -> None:
    """Raise, naming what is missing, unless this process may make namespaces and rules.

    Raises:
        RuntimeError: not root, or ``ip`` or ``nft`` is not installed.
    """
    if os.geteuid() != 0:
        raise RuntimeError(
            "the partition tests make network namespaces and nftables rules: they need root "
            "(run them as root, as .ci/run does on CI)"
        )
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"the partition tests need `{tool}`: apt-get install {package} "
                "(scripts/test installs it)"
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    for pid in _ip("netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def sweep(keep: int | None = None) -> list[str]:
    """Remove the namespaces and links of runs whose process is gone (not ``keep``'s).

    Returns:
        The names removed.
    """
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if (match := _OWNED.match(name)) and int(match[1]) != keep and not _alive(int(match[1])):
            _kill_inside(name)
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if (match := _OWNED.match(name)) and int(match[1]) != keep and not _alive(int(match[1])):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    """A host: a network namespace (``None``: the caller's own) and its address on the bridge."""

    name: str
    address: str
    netns: str | None

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host."""
        return list(argv) if self.netns is None else ["ip", "netns", "exec", self.netns, *argv]


@dataclass(frozen=True)
class _Fault:
    on: Host  # the host whose namespace holds the rules
    peer: Host
    loss: int  # percent of packets dropped each way; 100: cut


class Hosts:
    """Hosts joined by one bridge, whose links can be cut, made lossy and healed.

    Raises:
        RuntimeError: :func:`require` failed, or ``ip`` refused a step (the message says which).
    """

    def __init__(self) -> None:
        require()
        self.tag = f"{FAMILY}{os.getpid()}"
        sweep(keep=os.getpid())
        self._netns: list[str] = []
        self._hosts: dict[str, Host] = {}
        self._made = 0
        self._faults: dict[frozenset[str], _Fault] = {}
        self._subnet = _free_subnet()
        self._switch = f"{self.tag}-switch"
        self._local_link = f"{self.tag}r"
        try:
            self._add_netns(self._switch)
            _ip("-n", self._switch, "link", "add", "name", "bridge0", "type", "bridge")
            _ip("-n", self._switch, "link", "set", "bridge0", "up")
            _ip(*f"link add {self._local_link} type veth peer name p1 netns {self._switch}".split())
            _ip("-n", self._switch, "link", "set", "dev", "p1", "master", "bridge0", "up")
            _ip("addr", "add", f"{self._address(1)}/24", "dev", self._local_link)
            _ip("link", "set", self._local_link, "up")
        except BaseException:
            self.close()
            raise
        self.local = Host("local", self._address(1), None)

    def _address(self, index: int) -> str:
        return str(self._subnet.network_address + index)

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._netns.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add(self, name: str) -> Host:
        """A new host named ``name`` (a letter, then letters, digits or dashes)."""
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,20}", name) or name in self._hosts:
            raise ValueError(f"bad or taken host name {name!r}")
        self._made += 1  # never the same index twice, even after a host that failed halfway
        index = self._made + 1
        netns = f"{self.tag}-{name}"
        self._add_netns(netns)
        port = f"p{index}"
        _ip(*f"-n {self._switch} link add {port} type veth peer name eth0 netns {netns}".split())
        _ip("-n", self._switch, "link", "set", port, "master", "bridge0", "up")
        _ip("-n", netns, "addr", "add", f"{self._address(index)}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        host = self._hosts[name] = Host(name, self._address(index), netns)
        return host

    def host(self, name: str) -> Host:
        """The host named ``name``, added if it is new."""
        return self._hosts.get(name) or self.add(name)

    # -- faults --------------------------------------------------------------------------------

    def cut(self, a: Host, *others: Host) -> None:
        """Drop every packet between ``a`` and each of ``others``, both ways, until healed."""
        self.lose(100, a, *others)

    def lose(self, percent: int, a: Host, *others: Host) -> None:
        """Drop ``percent`` % of the packets between ``a`` and each of ``others``, each way."""
        if not 0 < percent <= 100:
            raise ValueError(f"loss is a percentage in 1..100, not {percent}")
        for b in others:
            on, peer = (a, b) if a.netns is not None else (b, a)
            if on.netns is None:
                raise ValueError("a fault needs a host with a namespace of its own")
            self._faults[frozenset((a.name, b.name))] = _Fault(on, peer, percent)
        self._apply()

    def heal(self, *pairs: tuple[Host, Host]) -> None:
        """Restore the links of ``pairs`` (none given: every link)."""
        if pairs:
            for a, b in pairs:
                self._faults.pop(frozenset((a.name, b.name)), None)
        else:
            self._faults.clear()
        self._apply()

    def faults(self) -> Iterator[tuple[str, str, int]]:
        """The faulted links now: host, host, percent lost."""
        for fault in self._faults.values():
            yield fault.on.name, fault.peer.name, fault.loss

    def _apply(self) -> None:
        """Write every namespace's rules again, each namespace's in one atomic nft script."""
        for host in self._hosts.values():
            assert host.netns is not None
            rules = [f for f in self._faults.values() if f.on is host]
            script = [f"table inet {_TABLE}", f"delete table inet {_TABLE}"]
            if rules:
                script += [f"table inet {_TABLE} {{"]
                for chain, field in (("input", "saddr"), ("output", "daddr")):
                    script += [f"  chain {chain} {{", f"    type filter hook {chain} priority 0;"]
                    for fault in rules:
                        some = f"numgen random mod 100 < {fault.loss} " if fault.loss < 100 else ""
                        script.append(f"    ip {field} {fault.peer.address} {some}drop")
                    script.append("  }")
                script.append("}")
            done = subprocess.run(
                ["ip", "netns", "exec", host.netns, "nft", "-f", "-"],
                input="\n".join(script) + "\n",
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"nft in {host.netns}: {done.stderr.strip()}")

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what still runs on these hosts, then remove their namespaces and links."""
        for netns in reversed(self._netns):
            _kill_inside(netns)
            _ip("netns", "delete", netns, check=False)
        self._netns.clear()
        _ip("link", "delete", self._local_link, check=False)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no address of this namespace is in (another run's, say)."""
    taken = set()
    for line in _ip("-o", "-4", "addr", "show").splitlines():
        address = line.split()[3]
        taken.add(ipaddress.ip_interface(address).network)
    start = os.getpid() % 250
    for offset in range(250):
        subnet = ipaddress.IPv4Network(f"10.213.{(start + offset) % 250}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError("no free /24 left in 10.213.0.0/16")
