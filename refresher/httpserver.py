"""A small HTTP/1.1 server for the probe port and the admission webhook: one thread runs one
`selectors` loop over every connection, and every client is held to explicit limits.

Why this foundation:
- a thread per connection (0.1.0's `ThreadingHTTPServer`) cannot hold hundreds of idle or
  slow clients cheaply, so 0.1.0 capped them at 64, and 64 idle clients starved the probes;
- asyncio streams with explicit limits could, but `import asyncio` adds about 1.8 MiB of
  RSS to what `run` already loads (3.4 MiB to a process with only ssl, json and logging,
  like the webhook) and ~9 ms of start-up, for what a loop needs: readiness and timers;
- a `selectors` loop adds nothing (selectors, socket and ssl are loaded anyway), and as
  every handler here is synchronous and sub-millisecond, one thread serving each ready
  connection in turn never waits on a client. Libraries do not fit better: h11 is a parser
  only (it would still need this loop); waitress and cheroot add a dependency and a thread
  pool. The limit of the choice: a slow handler delays every client, so handlers stay fast.

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
Requests pipelined in one packet are answered one per turn of the loop, as if each
connection sent one at a time. At the descriptor limit, the quietest connection makes room
only for a connection that really waits. A refused client gets its answer, then
its further input is read and thrown away (up to `linger_s` and `linger_bytes`) before the
close, so that the answer is not lost to a reset.

Each answer is written in one send (status line, headers and body) on a TCP_NODELAY
socket: split over two writes, a small answer would wait ~40 ms on a delayed ACK. Not
supported: chunked request bodies (501; kube-apiserver, kubelet and Prometheus send
Content-Length), HTTP/2, absolute-form targets. Handlers get the raw path (no
percent-decoding); nothing about requests is logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from refresher.httpwire import (
    CONTINUE,
    SERVER,
    Head,
    Limits,
    Refusal,
    Request,
    Response,
    head_length,
    http_date,
    parse_head,
    serialize,
)

__all__ = ["SERVER", "HttpServer", "Limits", "Request", "Response"]

log = logging.getLogger(__name__)

_ACCEPT_BATCH = 64  # accepts per wake-up, so a connect storm cannot starve the others
# Requests answered per connection per turn: a client pipelining hundreds of requests in
# one packet gets one answer per round of the loop, like a client that sends them one by
# one; its other requests wait their turn, so it cannot hold every other client back.
_ANSWERS_PER_TURN = 1
# Bodies up to this size are never held to `max_bodies_bytes` (a typical admission review
# is a few KiB: a crowd of big bodies must not turn it away); bigger ones share the budget.
_SMALL_BODY_BYTES = 64 << 10
# A body that received nothing for this long may be dropped to make room for another: a
# real client sends its body without pauses, so only stalled ones make room.
_BODY_STALL_S = 1.0
_LOG_EVERY_S = 10.0  # one line per kind of trouble at most this often: clients cannot flood logs
_DEFAULT_LIMITS = Limits()
_FAILURE = Response(500, b'{"error": "500 Internal Server Error"}\n', "application/json")


# Connection states. An idle kept-alive connection is in _HEAD with an empty buffer.
_HANDSHAKE, _HEAD, _BODY, _LINGER = "handshake", "head", "body", "linger"


class _Conn:
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

    def __init__(self, sock: socket.socket, peer: str, tls: bool) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()  # head bytes (and what follows them) not yet parsed
        self.body = bytearray()  # sized to the announced length; `filled` bytes received
        self.filled = 0
        self.received_at = 0.0  # when the body last received bytes (monotonic)
        self.reserved = 0  # its share of HttpServer._body_bytes
        self.state = _HANDSHAKE if tls else _HEAD
        self.timer = ""  # the kind of deadline armed, a key of HttpServer._timers
        self.events = selectors.EVENT_READ
        self.out = b""  # response bytes not yet sent
        self.close_after = False
        self.head: Head | None = None
        self.drained = 0


class HttpServer:
    """Binds at construction (an OSError then is a configuration error); serves after `start`
    in one daemon thread, which also runs `handler` for every request."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[Request], Response],
        *,
        limits: Limits = _DEFAULT_LIMITS,
        methods: frozenset[str] = frozenset({"GET", "HEAD"}),
        tls: Callable[[], ssl.SSLContext] | None = None,
        name: str = "http",
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._methods = methods
        self._tls = tls
        self._name = name
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
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: OrderedDict[_Conn, None] = OrderedDict()  # least recently active first
        # Connections holding complete requests not answered yet (their turn comes next).
        self._backlog: OrderedDict[_Conn, None] = OrderedDict()
        self._body_bytes = 0  # bodies in flight: sum of their announced lengths
        self._body_budget = max(limits.max_bodies_bytes, limits.max_body_bytes)
        self._durations = {
            "head": limits.head_timeout_s,
            "body": limits.body_timeout_s,
            "idle": limits.idle_timeout_s,
            "send": limits.send_timeout_s,
            "linger": limits.linger_s,
        }
        # One queue per kind of deadline: each kind adds a constant to a monotonic clock, so
        # every queue is already in deadline order and expiry is O(1) per connection.
        self._timers = {kind: OrderedDict[_Conn, float]() for kind in self._durations}
        self._paused_until = 0.0  # the listener, after running out of file descriptors
        self._logged_at: dict[str, float] = {}
        self._date = (0, "")
        self._scratch = bytearray(65536)
        self._stopping = False
        kinds = ("accepted", "requests", "refused", "timeouts", "evicted", "handler_errors")
        self._counts = dict.fromkeys((*kinds, "tls_failures"), 0)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start, and the connections open now (a snapshot; for tests)."""
        return {**self._counts, "open": len(self._conns)}

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection; returns within about a second."""
        self._stopping = True
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join(1.0)
        if not self._thread.is_alive():
            self._release()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        try:
            while not self._stopping:
                # Requests still buffered are answered without sleeping; otherwise sleep until
                # the next deadline, or with none pending until a client comes (idle is free).
                turns = list(self._backlog)
                timeout = 0.0 if turns else self._next_timeout()
                for key, _ in self._selector.select(timeout):
                    if key.data is not None:
                        self._dispatch(key.data)
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                for conn in turns:  # unless served by an event above
                    if conn in self._backlog:
                        self._dispatch(conn)
                self._expire(time.monotonic())
        except Exception as exc:
            # A bug, not a client: the port closes and the liveness probe fails, visibly.
            log.critical("%s: server stopped after %s", self._name, type(exc).__name__)
            raise
        finally:
            self._release()

    def _release(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def _dispatch(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return  # closed earlier in this round of events
        self._conns.move_to_end(conn)
        try:
            if conn.state == _HANDSHAKE:
                self._handshake(conn)
            elif conn.out:
                if self._flush(conn):
                    self._advance(conn)
                    self._read_pending(conn)
            elif conn.state == _LINGER:
                self._drain(conn)
            elif conn in self._backlog:  # its next buffered request, before reading more
                del self._backlog[conn]
                self._advance(conn)
                self._read_pending(conn)
            else:
                self._read(conn)
        except Exception as exc:  # noqa: BLE001 - one broken connection never stops the server
            # The type only: an exception's text may quote what the client sent.
            self._log(logging.ERROR, "dropped a connection after %s", type(exc).__name__)
            self._close(conn)

    def _next_timeout(self) -> float | None:
        firsts = [next(iter(q.values())) for q in self._timers.values() if q]
        if self._paused_until:
            firsts.append(self._paused_until)
        if not firsts:
            return None
        return max(0.0, min(firsts) - time.monotonic())

    def _expire(self, now: float) -> None:
        for queue in self._timers.values():
            while queue:
                conn, deadline = next(iter(queue.items()))
                if deadline > now:
                    break
                self._counts["timeouts"] += 1
                self._close(conn)  # slow, idle or silent: nothing more is owed to it
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _arm(self, conn: _Conn, kind: str) -> None:
        if conn.timer:
            self._timers[conn.timer].pop(conn, None)
        conn.timer = kind
        if kind:
            self._timers[kind][conn] = time.monotonic() + self._durations[kind]

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.events != events:
            self._selector.modify(conn.sock, events, conn)
            conn.events = events

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn, False) is not False:
            self._arm(conn, "")
            self._backlog.pop(conn, None)
            self._drop_body(conn)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.sock.close()
            conn.buf = bytearray()
            conn.out = b""

    # ------------------------------------------------------------------ accepting

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._out_of_descriptors(exc)
                return
            if len(self._conns) >= self._limits.max_connections:
                self._counts["evicted"] += 1
                self._close(self._victim())
            self._counts["accepted"] += 1
            try:
                self._adopt(sock, address)
            except OSError:  # reset between accept and setup
                sock.close()

    def _victim(self) -> _Conn:
        """The connection to close for a new one: a refused one still draining its input
        (it has its answer), else the one quiet longest."""
        lingering = self._timers["linger"]
        return next(iter(lingering)) if lingering else next(iter(self._conns))

    def _out_of_descriptors(self, exc: OSError) -> None:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            return  # a connection reset before it was accepted: nothing to do
        if not self._connection_waiting():
            # Linux takes the descriptor before it looks for a connection: with the last one
            # just used, the next accept fails although nobody waits. Nothing to make room for.
            return
        self._log(logging.WARNING, "out of file descriptors: closing a connection to accept one")
        if self._conns:
            self._counts["evicted"] += 1
            self._close(self._victim())
        else:  # nothing to give back: stop accepting for a moment rather than spin
            self._selector.unregister(self._listener)
            self._paused_until = time.monotonic() + 0.5

    def _connection_waiting(self) -> bool:
        """Whether a connection waits in the backlog (poll needs no descriptor of its own)."""
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        return bool(poller.poll(0))

    def _adopt(
        self, sock: socket.socket, address: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        host, port = address[0], address[1]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                context = self._tls()  # per connection: a reloaded certificate applies at once
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except Exception as exc:  # noqa: BLE001 - a bad certificate must not stop the server
                self._log(logging.ERROR, "no TLS context: %s", type(exc).__name__)
                sock.close()
                return
        conn = _Conn(sock, peer, tls=self._tls is not None)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._conns[conn] = None
        self._arm(conn, "head")  # the handshake counts against the head deadline

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)  # noqa: S101 - only TLS connections get here
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except OSError:  # ssl.SSLError included: a scanner, an old client, a wrong CA
            self._counts["tls_failures"] += 1
            self._close(conn)
            return
        conn.state = _HEAD
        self._want(conn, selectors.EVENT_READ)
        if conn.sock.pending():
            self._read(conn)

    # ------------------------------------------------------------------ reading

    def _read(self, conn: _Conn) -> None:
        while True:
            try:
                count = self._receive(conn)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._want(conn, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
            if not count:  # the client is gone (or half-closed with nothing pending for us)
                self._close(conn)
                return
            if conn.state == _HEAD and conn.timer == "idle":
                self._arm(conn, "head")  # a new request on a kept-alive connection
            self._advance(conn)
            if not self._has_pending(conn):
                return

    def _receive(self, conn: _Conn) -> int:
        """One read into the body (straight into its buffer) or the head buffer; 0 at EOF."""
        if conn.state == _BODY:
            with memoryview(conn.body) as view:
                count = conn.sock.recv_into(view[conn.filled :])
            conn.filled += count
            conn.received_at = time.monotonic()
            return count
        size = self._limits.max_head_bytes + 1 - len(conn.buf)
        data = conn.sock.recv(min(max(size, 1), 65536))
        conn.buf += data
        return len(data)

    def _has_pending(self, conn: _Conn) -> bool:
        """TLS may hold decrypted bytes the selector cannot see, to be read now."""
        sock = conn.sock
        if conn not in self._conns or conn.out or conn.state not in (_HEAD, _BODY):
            return False
        if conn in self._backlog:
            return False  # read on its next turn
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _read_pending(self, conn: _Conn) -> None:
        if self._has_pending(conn):
            self._read(conn)

    def _advance(self, conn: _Conn) -> None:
        """Parse and answer the complete requests the buffer holds, `_ANSWERS_PER_TURN` of
        them; the connection then goes to the backlog if it has more bytes buffered."""
        answered = 0
        while conn in self._conns and not conn.out:
            if answered == _ANSWERS_PER_TURN:
                if conn.buf:
                    self._backlog[conn] = None
                return
            if conn.state == _HEAD:
                head = self._take_head(conn)
                if head is None:
                    return
                if head.length:
                    if not self._start_body(conn, head):
                        return
                    if head.headers.get("expect", "").lower() == "100-continue":
                        conn.out = CONTINUE
                        if not self._flush(conn):
                            return
                    continue
                self._answer(conn, head, b"")
            elif conn.state == _BODY:
                assert conn.head is not None  # noqa: S101
                head = conn.head
                if conn.filled < head.length:
                    return
                body = bytes(conn.body)
                self._drop_body(conn)
                conn.head, conn.state = None, _HEAD
                self._answer(conn, head, body)
            else:
                return
            answered += 1
            if not self._flush(conn):
                return

    def _start_body(self, conn: _Conn, head: Head) -> bool:
        """Reserve the announced length and take what of the body came with the head; False
        when refused (503: the budget is held by bodies that are still arriving)."""
        small = head.length <= _SMALL_BODY_BYTES or len(conn.buf) >= head.length
        if not small and not self._make_room(head.length):
            self._refuse(conn, Refusal(503, (("Retry-After", "1"),)))
            return False
        conn.head, conn.state = head, _BODY
        # Allocated once at the announced length: no over-allocation as it grows, no copy.
        conn.body = bytearray(head.length)
        conn.filled = min(len(conn.buf), head.length)
        conn.body[: conn.filled] = conn.buf[: conn.filled]
        del conn.buf[: conn.filled]
        conn.received_at = time.monotonic()
        conn.reserved = 0 if small else head.length
        self._body_bytes += conn.reserved
        self._arm(conn, "body")
        return True

    def _make_room(self, length: int) -> bool:
        """Whether `length` more fits the budget once bodies stalled for `_BODY_STALL_S`
        are dropped, quiet longest first. Dropping busy ones instead would let a crowd
        starting bodies in turn drop every real one, and churn connections."""
        stalled = time.monotonic() - _BODY_STALL_S
        for other in list(self._conns):  # least recently active first
            if self._body_bytes + length <= self._body_budget:
                return True
            if other.reserved and other.received_at <= stalled:
                self._counts["evicted"] += 1
                self._log(logging.WARNING, "bodies in flight over budget: dropping a stalled one")
                self._close(other)
        return self._body_bytes + length <= self._body_budget

    def _drop_body(self, conn: _Conn) -> None:
        self._body_bytes -= conn.reserved
        conn.body, conn.filled, conn.reserved = bytearray(), 0, 0

    def _take_head(self, conn: _Conn) -> Head | None:
        """The next complete head from the buffer, or None (waiting, or refused)."""
        try:
            length = head_length(conn.buf, self._limits.max_head_bytes)
            if not length:
                return None
            raw = bytes(conn.buf[:length])
            del conn.buf[:length]
            return parse_head(raw, self._limits, self._methods)
        except Refusal as refusal:
            self._refuse(conn, refusal)
            return None

    def _drain(self, conn: _Conn) -> None:
        """A refused client's further input: read and thrown away, up to the linger budget."""
        for _ in range(4):
            try:
                count = conn.sock.recv_into(self._scratch)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except OSError:
                count = 0
            conn.drained += count
            if not count or conn.drained > self._limits.linger_bytes:
                self._close(conn)
                return

    # ------------------------------------------------------------------ answering

    def _answer(self, conn: _Conn, head: Head, body: bytes) -> None:
        self._counts["requests"] += 1
        path, _, query = head.target.partition("?")
        request = Request(head.method, path, query, head.headers, body, conn.peer)
        head_only, close = head.method == "HEAD", not head.keep_alive
        try:
            response = self._handler(request)
            data = serialize(response, head_only=head_only, close=close, date=self._http_date())
        except Exception as exc:  # noqa: BLE001 - a handler bug is a 500, never a crash
            # The type only: the exception's text may hold a secret.
            self._counts["handler_errors"] += 1
            self._log(logging.ERROR, "handler failed on %s: %s", head.method, type(exc).__name__)
            data = serialize(_FAILURE, head_only=head_only, close=close, date=self._http_date())
        conn.out, conn.close_after = data, close

    def _refuse(self, conn: _Conn, refusal: Refusal) -> None:
        """Answer a request the server itself refuses, then close (after lingering)."""
        self._counts["refused"] += 1
        response = refusal.response()
        conn.out = serialize(response, head_only=False, close=True, date=self._http_date())
        conn.close_after, conn.state = True, _LINGER
        conn.buf = bytearray()
        self._flush(conn)

    def _log(self, level: int, message: str, *args: object) -> None:
        """One line per kind of trouble per `_LOG_EVERY_S`; the rest at debug level."""
        now = time.monotonic()
        if now - self._logged_at.get(message, -_LOG_EVERY_S) < _LOG_EVERY_S:
            level = logging.DEBUG
        else:
            self._logged_at[message] = now
        log.log(level, "%s: " + message, self._name, *args)

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, http_date(now))
        return self._date[1]

    def _flush(self, conn: _Conn) -> bool:
        """Send what is pending; True when all is sent and the connection goes on."""
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, ssl.SSLWantWriteError):
            sent = 0
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return False
        except OSError:
            self._close(conn)
            return False
        conn.out = conn.out[sent:]
        if conn.out:  # the client reads slowly: wait, but not forever
            self._want(conn, selectors.EVENT_WRITE)
            if conn.timer != "send":
                self._arm(conn, "send")
            return False
        self._want(conn, selectors.EVENT_READ)
        if conn.close_after:
            self._finish(conn)
            return False
        if conn.state == _HEAD:
            self._arm(conn, "head" if conn.buf else "idle")
        elif conn.timer == "send":
            self._arm(conn, "body")
        return True

    def _finish(self, conn: _Conn) -> None:
        if conn.state != _LINGER:
            self._close(conn)
            return
        # Refused mid-request: the client may still be sending. Closing now would reset the
        # connection and could destroy the answer before the client reads it.
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._arm(conn, "linger")
        self._drain(conn)
