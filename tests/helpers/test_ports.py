"""The free-port factory: free ports, never one twice."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.helpers.ports import FreePortFactory


def test_ports_are_distinct_and_free_to_bind() -> None:
    factory = FreePortFactory()
    given = [factory() for _ in range(50)]
    assert len(set(given)) == 50
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", given[-1]))


def test_a_port_the_kernel_picks_again_is_not_handed_out_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    picks = iter([40001, 40001, 40002, 40001, 40002, 40003])

    class Picked:
        """A socket whose port 0 is whatever the kernel picked next."""

        def __init__(self, *_: Any) -> None:
            self.port = next(picks)

        def __enter__(self) -> Picked:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            assert address == ("127.0.0.1", 0)

        def getsockname(self) -> tuple[str, int]:
            return "127.0.0.1", self.port

    monkeypatch.setattr(socket, "socket", Picked)  # for the factory's calls alone
    factory = FreePortFactory()
    assert [factory(), factory(), factory()] == [40001, 40002, 40003]
