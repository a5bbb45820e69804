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

What a client is held to, and the books kept on it, are in `refresher.httpconns`.
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
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from refresher.httpconns import (
    BODY,
    HANDSHAKE,
    HEAD,
    LINGER,
    OUT_OF_DESCRIPTORS,
    BodyBudget,
    Conn,
    Deadlines,
    connection_waiting,
    listen,
    victim,
)
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
_LOG_EVERY_S = 10.0  # one line per kind of trouble at most this often: clients cannot flood logs
_DEFAULT_LIMITS = Limits()
_FAILURE = Response(500, b'{"error": "500 Internal Server Error"}\n', "application/json")


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
        self._listener = listener = listen(host, port)
        self._port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: OrderedDict[Conn, None] = OrderedDict()  # least recently active first
        # Connections holding complete requests not answered yet (their turn comes next).
        self._backlog: OrderedDict[Conn, None] = OrderedDict()
        self._bodies = BodyBudget(limits)
        self._deadlines = Deadlines(limits)
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

    def _dispatch(self, conn: Conn) -> None:
        if conn not in self._conns:
            return  # closed earlier in this round of events
        self._conns.move_to_end(conn)
        try:
            if conn.state == HANDSHAKE:
                self._handshake(conn)
            elif conn.out:
                if self._flush(conn):
                    self._advance(conn)
                    self._read_pending(conn)
            elif conn.state == LINGER:
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
        first = self._deadlines.first()
        firsts = [] if first is None else [first]
        if self._paused_until:
            firsts.append(self._paused_until)
        if not firsts:
            return None
        return max(0.0, min(firsts) - time.monotonic())

    def _expire(self, now: float) -> None:
        for conn in self._deadlines.expired(now):
            self._counts["timeouts"] += 1
            self._close(conn)  # slow, idle or silent: nothing more is owed to it
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _want(self, conn: Conn, events: int) -> None:
        if conn.events != events:
            self._selector.modify(conn.sock, events, conn)
            conn.events = events

    def _close(self, conn: Conn) -> None:
        if self._conns.pop(conn, False) is not False:
            self._deadlines.arm(conn, "")
            self._backlog.pop(conn, None)
            self._bodies.release(conn)
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
                self._evict()
            self._counts["accepted"] += 1
            try:
                self._adopt(sock, address)
            except OSError:  # reset between accept and setup
                sock.close()

    def _out_of_descriptors(self, exc: OSError) -> None:
        if exc.errno not in OUT_OF_DESCRIPTORS:
            return  # a connection reset before it was accepted: nothing to do
        if not connection_waiting(self._listener):
            # Linux takes the descriptor before it looks for a connection: with the last one
            # just used, the next accept fails although nobody waits. Nothing to make room for.
            return
        self._log(logging.WARNING, "out of file descriptors: closing a connection to accept one")
        if self._conns:
            self._evict()
        else:  # nothing to give back: stop accepting for a moment rather than spin
            self._selector.unregister(self._listener)
            self._paused_until = time.monotonic() + 0.5

    def _evict(self) -> None:
        self._counts["evicted"] += 1
        self._close(victim(self._conns, self._deadlines))

    def _adopt(
        self, sock: socket.socket, address: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
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
        conn = Conn(sock, address, tls=self._tls is not None)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._conns[conn] = None
        self._deadlines.arm(conn, "head")  # the handshake counts against the head deadline

    def _handshake(self, conn: Conn) -> None:
        try:
            wanted = conn.handshake()
        except OSError:  # ssl.SSLError included: a scanner, an old client, a wrong CA
            self._counts["tls_failures"] += 1
            self._close(conn)
            return
        self._want(conn, wanted or selectors.EVENT_READ)
        if not wanted:
            self._read_pending(conn)  # TLS may hold decrypted bytes the selector cannot see

    # ------------------------------------------------------------------ reading

    def _read(self, conn: Conn) -> None:
        while True:
            try:
                count = conn.receive(self._limits.max_head_bytes)
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
            if conn.state == HEAD and conn.timer == "idle":
                self._deadlines.arm(conn, "head")  # a new request on a kept-alive connection
            self._advance(conn)
            if not self._has_pending(conn):
                return

    def _has_pending(self, conn: Conn) -> bool:
        """TLS may hold decrypted bytes the selector cannot see, to be read now."""
        sock = conn.sock
        if conn not in self._conns or conn.out or conn.state not in (HEAD, BODY):
            return False
        if conn in self._backlog:
            return False  # read on its next turn
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _read_pending(self, conn: Conn) -> None:
        if self._has_pending(conn):
            self._read(conn)

    def _advance(self, conn: Conn) -> None:
        """Answer the complete requests the buffer holds, `_ANSWERS_PER_TURN` of them; the
        connection then goes to the backlog if it has more bytes buffered."""
        for _ in range(_ANSWERS_PER_TURN):
            if not self._answer_next(conn):
                return
        if conn.buf:
            self._backlog[conn] = None

    def _answer_next(self, conn: Conn) -> bool:
        """Parse and answer the next complete request buffered; True when it is answered and
        the answer sent in full (False: waiting for bytes or for the client, or closed)."""
        while conn in self._conns and not conn.out:
            if conn.state == HEAD:
                head = self._take_head(conn)
                if head is None:
                    return False
                if head.length:
                    if not self._start_body(conn, head):
                        return False
                    continue
                self._answer(conn, head, b"")
            elif conn.body_complete():
                self._answer(conn, *self._take_body(conn))
            else:
                return False
            return self._flush(conn)
        return False

    def _start_body(self, conn: Conn, head: Head) -> bool:
        """Reserve the announced length, take what of the body came with the head and ask
        for the rest; False when refused (503: the budget is held by bodies that are still
        arriving) or when the 100 Continue is not sent yet."""
        exempt = self._bodies.exempt(head, len(conn.buf))
        if not exempt and not self._make_room(head.length):
            self._refuse(conn, Refusal(503, (("Retry-After", "1"),)))
            return False
        conn.start_body(head)
        self._bodies.reserve(conn, 0 if exempt else head.length)
        self._deadlines.arm(conn, "body")
        if head.headers.get("expect", "").lower() == "100-continue":
            conn.out = CONTINUE
            return self._flush(conn)
        return True

    def _make_room(self, length: int) -> bool:
        """Whether `length` more fits the body budget once stalled bodies are dropped."""
        for other in self._bodies.stalled(length, self._conns):
            self._counts["evicted"] += 1
            self._log(logging.WARNING, "bodies in flight over budget: dropping a stalled one")
            self._close(other)
        return self._bodies.fits(length)

    def _take_body(self, conn: Conn) -> tuple[Head, bytes]:
        """The request whose body is complete; the connection waits for the next head."""
        assert conn.head is not None  # noqa: S101 - body_complete() said so
        head, body = conn.head, bytes(conn.body)
        self._bodies.release(conn)
        conn.head, conn.state = None, HEAD
        return head, body

    def _take_head(self, conn: Conn) -> Head | None:
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

    def _drain(self, conn: Conn) -> None:
        """A refused client's further input: read and thrown away, up to the linger budget."""
        if conn.discard(self._scratch, self._limits.linger_bytes):
            self._close(conn)

    # ------------------------------------------------------------------ answering

    def _answer(self, conn: Conn, head: Head, body: bytes) -> None:
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

    def _refuse(self, conn: Conn, refusal: Refusal) -> None:
        """Answer a request the server itself refuses, then close (after lingering)."""
        self._counts["refused"] += 1
        response = refusal.response()
        conn.out = serialize(response, head_only=False, close=True, date=self._http_date())
        conn.close_after, conn.state = True, LINGER
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

    def _flush(self, conn: Conn) -> bool:
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
                self._deadlines.arm(conn, "send")
            return False
        self._want(conn, selectors.EVENT_READ)
        if conn.close_after:
            self._finish(conn)
            return False
        if conn.state == HEAD:
            self._deadlines.arm(conn, "head" if conn.buf else "idle")
        elif conn.timer == "send":
            self._deadlines.arm(conn, "body")
        return True

    def _finish(self, conn: Conn) -> None:
        if conn.state != LINGER:
            self._close(conn)
            return
        # Refused mid-request: the client may still be sending. Closing now would reset the
        # connection and could destroy the answer before the client reads it.
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._deadlines.arm(conn, "linger")
        self._drain(conn)
