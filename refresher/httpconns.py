"""The HTTP server's connections and the limits that hold them together: each connection's
state, the deadlines that drop slow and idle ones, the budget bigger bodies in flight share,
and which connection makes room when there is none. `refresher.httpserver` runs the loop and
decides when to read, answer and close; this module keeps the books, and reads no more than
one connection's socket at a time.

What a client is held to (`Limits`): the request head is capped in bytes (431; 414 when
the request line alone is too long) and in header count, and must arrive within
`head_timeout_s` of the connection (TLS handshake included) or of its first byte on a
kept-alive connection; a body is refused (413) unless allowed, and is capped and
deadlined; an idle kept-alive connection is dropped after `idle_timeout_s`, a client not
reading its answer after `send_timeout_s`. At `max_connections` a new connection evicts a
refused one still draining, else the one quiet longest, so a crowd cannot lock a probe out.
A connection's memory is its head buffer plus its body, both capped; bodies over 64 KiB in
flight together are held to `max_bodies_bytes`: one that does not fit makes room by
dropping bodies stalled for a second, or is refused (503). So memory is bounded whatever
every client does at once, and a crowd of big bodies cannot turn a small one away.
"""

from __future__ import annotations

import errno
import select
import selectors
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterable

from refresher.httpwire import Head, Limits

# Connection states. An idle kept-alive connection is in HEAD with an empty buffer.
HANDSHAKE, HEAD, BODY, LINGER = "handshake", "head", "body", "linger"

# Bodies up to this size are never held to `max_bodies_bytes` (a typical admission review
# is a few KiB: a crowd of big bodies must not turn it away); bigger ones share the budget.
SMALL_BODY_BYTES = 64 << 10
# A body that received nothing for this long may be dropped to make room for another: a
# real client sends its body without pauses, so only stalled ones make room.
BODY_STALL_S = 1.0
# accept() errors that mean "no descriptor or memory for a connection", not "it was reset".
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Conn:
    """One client connection: its socket, what it sent and what it is owed."""

    __slots__ = (
        "body",
        "buf",
        "close_after",
        "drained",
        "events",
        "filled",
        "head",
        "out",
        "peer",
        "received_at",
        "reserved",
        "sock",
        "state",
        "timer",
    )

    def __init__(
        self, sock: socket.socket, address: tuple[str, int] | tuple[str, int, int, int], tls: bool
    ) -> None:
        host, port = address[0], address[1]
        self.sock = sock
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.buf = bytearray()  # head bytes (and what follows them) not yet parsed
        self.body = bytearray()  # sized to the announced length; `filled` bytes received
        self.filled = 0
        self.received_at = 0.0  # when the body last received bytes (monotonic)
        self.reserved = 0  # its share of BodyBudget.in_flight
        self.state = HANDSHAKE if tls else HEAD
        self.timer = ""  # the kind of deadline armed, a key of Deadlines' queues
        self.events = selectors.EVENT_READ
        self.out = b""  # response bytes not yet sent
        self.close_after = False
        self.head: Head | None = None
        self.drained = 0

    def start_body(self, head: Head) -> None:
        """Wait for `head`'s body, taking what of it came with the head."""
        self.head, self.state = head, BODY
        # Allocated once at the announced length: no over-allocation as it grows, no copy.
        self.body = bytearray(head.length)
        self.filled = min(len(self.buf), head.length)
        self.body[: self.filled] = self.buf[: self.filled]
        del self.buf[: self.filled]
        self.received_at = time.monotonic()

    def handshake(self) -> int:
        """Go on with the TLS handshake: the selector events it waits for, or 0 once it is
        done. Raises OSError (ssl.SSLError included) when it fails."""
        assert isinstance(self.sock, ssl.SSLSocket)  # noqa: S101 - only TLS connections get here
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        self.state = HEAD
        return 0

    def receive(self, max_head_bytes: int) -> int:
        """One read into the body (straight into its buffer) or the head buffer; 0 at EOF.
        Raises what the socket raises (BlockingIOError, ssl.SSLWantReadError, ...)."""
        if self.state == BODY:
            with memoryview(self.body) as view:
                count = self.sock.recv_into(view[self.filled :])
            self.filled += count
            self.received_at = time.monotonic()
            return count
        size = max_head_bytes + 1 - len(self.buf)
        data = self.sock.recv(min(max(size, 1), 65536))
        self.buf += data
        return len(data)

    def discard(self, scratch: bytearray, linger_bytes: int) -> bool:
        """Read and throw away what a refused client still sends; True when it is done (EOF,
        an error, or more than `linger_bytes` in all) and the connection is to be closed."""
        for _ in range(4):
            try:
                count = self.sock.recv_into(scratch)
            except (BlockingIOError, ssl.SSLWantReadError):
                return False
            except OSError:
                count = 0
            self.drained += count
            if not count or self.drained > linger_bytes:
                return True
        return False

    def body_complete(self) -> bool:
        return self.state == BODY and self.head is not None and self.filled >= self.head.length


class Deadlines:
    """One queue per kind of deadline (head, body, idle, send, linger): each kind adds a
    constant to a monotonic clock, so every queue is already in deadline order and expiry
    is O(1) per connection. A connection has at most one deadline armed."""

    def __init__(self, limits: Limits) -> None:
        self._durations = {
            "head": limits.head_timeout_s,
            "body": limits.body_timeout_s,
            "idle": limits.idle_timeout_s,
            "send": limits.send_timeout_s,
            "linger": limits.linger_s,
        }
        self._queues = {kind: OrderedDict[Conn, float]() for kind in self._durations}

    def arm(self, conn: Conn, kind: str) -> None:
        """Replace `conn`'s deadline with one of `kind`, or with none for ""."""
        if conn.timer:
            self._queues[conn.timer].pop(conn, None)
        conn.timer = kind
        if kind:
            self._queues[kind][conn] = time.monotonic() + self._durations[kind]

    def first(self) -> float | None:
        """The earliest deadline armed (monotonic), or None."""
        firsts = [next(iter(queue.values())) for queue in self._queues.values() if queue]
        return min(firsts) if firsts else None

    def expired(self, now: float) -> list[Conn]:
        """The connections whose deadline has passed at `now`."""
        late: list[Conn] = []
        for queue in self._queues.values():
            for conn, deadline in queue.items():
                if deadline > now:
                    break
                late.append(conn)
        return late

    def lingering(self) -> Conn | None:
        """The refused connection that has been draining its input longest, if any."""
        return next(iter(self._queues["linger"]), None)


class BodyBudget:
    """Bodies over `SMALL_BODY_BYTES` in flight on all connections together share
    `max_bodies_bytes` (announced lengths; never below `max_body_bytes`)."""

    def __init__(self, limits: Limits) -> None:
        self._budget = max(limits.max_bodies_bytes, limits.max_body_bytes)
        self.in_flight = 0

    @staticmethod
    def exempt(head: Head, buffered: int) -> bool:
        """Whether the body is small or already arrived with its head: it takes no budget."""
        return head.length <= SMALL_BODY_BYTES or buffered >= head.length

    def fits(self, length: int) -> bool:
        return self.in_flight + length <= self._budget

    def stalled(self, length: int, conns: Iterable[Conn]) -> list[Conn]:
        """The connections whose bodies to drop so that `length` more fits, quiet longest
        first: only bodies stalled for `BODY_STALL_S`. Dropping busy ones instead would let
        a crowd starting bodies in turn drop every real one, and churn connections. All the
        stalled ones when even that is not room enough."""
        stalled_at = time.monotonic() - BODY_STALL_S
        in_flight, victims = self.in_flight, []
        for conn in conns:  # least recently active first
            if in_flight + length <= self._budget:
                break
            if conn.reserved and conn.received_at <= stalled_at:
                victims.append(conn)
                in_flight -= conn.reserved
        return victims

    def reserve(self, conn: Conn, length: int) -> None:
        conn.reserved = length
        self.in_flight += length

    def release(self, conn: Conn) -> None:
        """Give back `conn`'s share and forget its body."""
        self.in_flight -= conn.reserved
        conn.body, conn.filled, conn.reserved = bytearray(), 0, 0


def victim(conns: Iterable[Conn], deadlines: Deadlines) -> Conn:
    """The connection to close for a new one: a refused one still draining its input (it
    has its answer), else the one quiet longest (`conns` in least recently active order)."""
    lingering = deadlines.lingering()
    return lingering if lingering is not None else next(iter(conns))


def connection_waiting(listener: socket.socket) -> bool:
    """Whether a connection waits in the listener's backlog (poll needs no descriptor)."""
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    return bool(poller.poll(0))


def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on `host`:`port`; raises OSError (closing it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        # A burst of probes and scrapes waits in the kernel's backlog, not refused.
        listener.listen(511)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener
