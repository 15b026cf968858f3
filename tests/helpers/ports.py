"""Free TCP ports for the processes tests start, never the same port twice in one test session."""

from __future__ import annotations

import socket
import threading

__all__ = ["FreePortFactory", "free_port"]


class FreePortFactory:
    """Hands out free TCP ports on loopback, each at most once (AnyIO's ``FreePortFactory``).

    A free port is found by binding port 0 and closing the socket, so the kernel may well pick
    the same port again for the next caller: two etcd members once got one peer port that way.
    This factory remembers every port it handed out and never returns one again, so ports
    picked in a row (a cluster's peer and client ports) are distinct, and a port kept for a
    restart is never given to anything else in the session.

    Only for a port that must be known before something binds it (a subprocess's flags, an
    address to restart on): a server that can bind port 0 itself and report its port should.
    Nothing stops another process from taking a handed-out port before its user binds it.
    """

    def __init__(self) -> None:
        self._given: set[int] = set()
        self._lock = threading.Lock()  # fixtures may call it from threads

    def __call__(self, family: socket.AddressFamily = socket.AF_INET) -> int:
        """A port free on loopback of ``family`` a moment ago, never handed out before.

        Raises:
            RuntimeError: the kernel kept choosing ports already handed out.
        """
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        with self._lock:
            for _ in range(1000):
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.bind((host, 0))
                    port = int(sock.getsockname()[1])
                if port not in self._given:
                    self._given.add(port)
                    return port
        raise RuntimeError("no free port that was not handed out already")


free_port = FreePortFactory()
"""The session's factory: one test session is one process, so one instance serves it whole."""
