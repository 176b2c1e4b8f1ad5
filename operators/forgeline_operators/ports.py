"""Free loopback ports for the processes operators start (tritonserver, megatron's rendezvous).

One place for the rule every caller needs: ports picked together stay bound until all are chosen,
so the kernel cannot hand the same ephemeral port out twice. It imports nothing of the operators, so
the training and the serving code (and the tests' control planes) can all use it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

__all__ = ["free_port", "free_ports"]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, avoid: Iterable[int] = ()) -> list[int]:
    """``n`` distinct free loopback ports, none of them in ``avoid``.

    The sockets stay bound until all are picked: bound and closed one at a time, the kernel may hand
    the same ephemeral port out twice (CI saw tritonserver refuse HTTP and metrics on one port).
    """
    avoided = set(avoid)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            if port not in avoided:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports
