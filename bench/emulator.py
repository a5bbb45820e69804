"""`refresher emulator` for the benchmarks, with TCP_NODELAY on every accepted connection.

The emulator writes a response's headers and body in two `send` calls. Without
TCP_NODELAY, Nagle's algorithm holds the body back until the client ACKs the
headers, and the client delays that ACK (up to 40 ms on Linux) on a kept-alive
connection: every exchange after the first stalls ~40 ms. Adobe IMS does not do
that, and the stall would dominate the wall time of refresh loops (not their CPU).
tests/fakeapi.py sets TCP_NODELAY for the same reason; until the emulator does,
this launcher sets it by wrapping `socket.accept`, and is a no-op once it does.

    python bench/emulator.py [refresher emulator flags]
"""

from __future__ import annotations

import socket
import sys

_accept = socket.socket.accept


def _accept_nodelay(self: socket.socket) -> tuple[socket.socket, object]:
    conn, address = _accept(self)
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, address


socket.socket.accept = _accept_nodelay  # type: ignore[method-assign]

if __name__ == "__main__":
    from refresher.cli import main

    main(["emulator", *sys.argv[1:]])
