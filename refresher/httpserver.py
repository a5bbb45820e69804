"""A small HTTP/1.1 server for the probe port and the admission webhook: one thread runs one
`selectors` loop over every connection, and every client is held to explicit limits.

Why this foundation (measured in a fresh interpreter, Python 3.11, VmRSS):
- a thread per connection (0.1.0's `ThreadingHTTPServer`) cannot hold hundreds of idle or
  slow clients cheaply: each holds a thread, so 0.1.0 capped them at 64 and an idle crowd
  of 64 starved the probes;
- asyncio streams with explicit limits could, but `import asyncio` costs +1.8 MiB on top
  of what `run` already loads (+3.4 MiB where only ssl, json and logging are loaded, as in
  the webhook), 39-53 more modules and ~9 ms of start-up, to get readiness and timers;
- a `selectors` loop costs nothing more (selectors, socket and ssl are loaded anyway), and
  a handler here is synchronous and sub-millisecond, so one thread serving every connection
  in turn never waits on a client. Small libraries do not fit better: h11 is a parser only
  (it would still need this loop), waitress and cheroot serve from thread pools.

The limits (`Limits`): the request head (request line and headers) is capped in bytes
(431, or 414 when the request line alone is too long) and in header count, and must arrive
within `head_timeout_s` of the connection (TLS handshake included) or of its first byte on a
kept-alive connection; bodies are refused unless allowed (413), capped, and deadlined; an idle
kept-alive connection is dropped after `idle_timeout_s`; a client that will not read its
response is dropped after `send_timeout_s`. At `max_connections` a new connection evicts the
one that has been quiet longest, so a crowd can never lock a probe out. Memory per
connection is its head buffer (at most `max_head_bytes`) plus its body (at most
`max_body_bytes`). A refused client gets its answer, then its further input is read and
discarded for up to `linger_s` / `linger_bytes` before the close, so the answer is not lost
to a reset.

What it does not do: chunked request bodies (501: Kubernetes' apiserver, kubelet and
Prometheus send Content-Length), HTTP/2, absolute-form request targets, request logging.
Handlers get the raw path (no percent-decoding). Each response is written in one send
(status line, headers and body together) on a TCP_NODELAY socket: a small response split
over two writes would wait ~40 ms on the peer's delayed ACK.
"""

from __future__ import annotations

import contextlib
import errno
import http
import logging
import re
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

log = logging.getLogger(__name__)

SERVER = "ims-token-refresher"  # no version of Python or of us: nothing for a scanner
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")  # origin form, visible ASCII only
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_LENGTH = re.compile(r"[0-9]{1,18}")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in a header value: forbidden
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_ACCEPT_BATCH = 64  # accepts per wake-up, so a connect storm cannot starve the others
_LOG_EVERY_S = 60.0  # a repeated resource warning at most this often
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Limits:
    """Every bound one client is held to; the defaults suit probes and admission reviews."""

    max_head_bytes: int = 8192  # request line + headers together; over it: 431 and close
    head_timeout_s: float = 5.0  # whole request head must arrive within this
    body_timeout_s: float = 10.0
    max_body_bytes: int = 0  # 0: requests with a body are refused (413)
    max_connections: int = 512
    idle_timeout_s: float = 5.0  # keep-alive idle
    max_headers: int = 100  # header fields per request; over it: 431
    send_timeout_s: float = 10.0  # a client that does not read its response is dropped
    linger_s: float = 1.0  # after a refusal, read and discard input this long at most...
    linger_bytes: int = 1 << 20  # ... and this much at most, then close


# Connection states. An idle kept-alive connection is in _HEAD with an empty buffer.
_HANDSHAKE, _HEAD, _BODY, _LINGER = "handshake", "head", "body", "linger"


@dataclass(eq=False)
class _Head:
    """A parsed request head whose body (if any) is still being read."""

    method: str
    target: str
    headers: Mapping[str, str]
    length: int
    keep_alive: bool


class _Conn:
    __slots__ = (
        "buf",
        "close_after",
        "drained",
        "events",
        "head",
        "out",
        "peer",
        "sock",
        "state",
        "timer",
    )

    def __init__(self, sock: socket.socket, peer: str, tls: bool) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.state = _HANDSHAKE if tls else _HEAD
        self.timer = ""  # the kind of deadline armed, a key of HttpServer._timers
        self.events = selectors.EVENT_READ
        self.out = b""  # response bytes not yet sent
        self.close_after = False
        self.head: _Head | None = None
        self.drained = 0


class _Refusal(Exception):
    """A request refused by the server itself, before any handler sees it."""

    def __init__(self, status: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers


class HttpServer:
    """Binds at construction (an OSError then is a configuration error); serves after `start`
    in one daemon thread, which also runs `handler` for every request."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[Request], Response],
        *,
        limits: Limits = Limits(),  # frozen: one shared default is safe
        methods: frozenset[str] = frozenset({"GET", "HEAD"}),
        tls: Callable[[], ssl.SSLContext] | None = None,
        name: str = "http",
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._methods = methods
        self._allow = ", ".join(sorted(methods))
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
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: OrderedDict[_Conn, None] = OrderedDict()  # least recently active first
        durations = {
            "head": limits.head_timeout_s,
            "body": limits.body_timeout_s,
            "idle": limits.idle_timeout_s,
            "send": limits.send_timeout_s,
            "linger": limits.linger_s,
        }
        self._durations = durations
        # One queue per kind of deadline: each kind adds a constant to a monotonic clock, so
        # every queue is already in deadline order and expiry is O(1) per connection.
        self._timers: dict[str, OrderedDict[_Conn, float]] = {k: OrderedDict() for k in durations}
        self._paused_until = 0.0  # the listener, after running out of file descriptors
        self._warned_at = -_LOG_EVERY_S
        self._date = (0, "")
        self._scratch = bytearray(65536)
        self._stopping = False
        self._counts = dict.fromkeys(
            ("accepted", "requests", "refused", "timeouts", "evicted", "handler_errors"), 0
        )
        self._counts["tls_failures"] = 0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

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
                # No deadline pending: sleep until a connection arrives (idle costs no wake-ups).
                for key, _ in self._selector.select(self._next_timeout()):
                    if key.data is not None:
                        self._dispatch(key.data)
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                self._expire(time.monotonic())
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
            elif conn.state == _LINGER:
                self._drain(conn)
            else:
                self._read(conn)
        except Exception as exc:  # noqa: BLE001 - one broken connection never stops the server
            # The type only: an exception's text may quote what the client sent.
            log.error("%s: dropped a connection after %s", self._name, type(exc).__name__)
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
                self._close(next(iter(self._conns)))
            self._counts["accepted"] += 1
            self._adopt(sock, address)

    def _out_of_descriptors(self, exc: OSError) -> None:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            return  # a connection reset before it was accepted: nothing to do
        now = time.monotonic()
        if now - self._warned_at >= _LOG_EVERY_S:
            self._warned_at = now
            log.warning("%s: out of file descriptors: dropping the quietest connection", self._name)
        if self._conns:
            self._counts["evicted"] += 1
            self._close(next(iter(self._conns)))
        else:  # nothing to give back: stop accepting for a moment rather than spin
            self._selector.unregister(self._listener)
            self._paused_until = now + 0.5

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
                log.error("%s: no TLS context: %s", self._name, type(exc).__name__)
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
            if conn.state == _BODY:
                assert conn.head is not None  # noqa: S101
                size = conn.head.length - len(conn.buf)
            else:
                size = self._limits.max_head_bytes + 1 - len(conn.buf)
            try:
                data = conn.sock.recv(min(max(size, 1), 65536))
            except (BlockingIOError, ssl.SSLWantReadError):
                self._want(conn, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
            if not data:  # the client is gone (or half-closed with nothing pending for us)
                self._close(conn)
                return
            if conn.state == _HEAD and conn.timer == "idle":
                self._arm(conn, "head")  # a new request on a kept-alive connection
            conn.buf += data
            self._advance(conn)
            # TLS may hold decrypted bytes the selector cannot see: read them now.
            sock = conn.sock
            if not (isinstance(sock, ssl.SSLSocket) and conn in self._conns and not conn.out):
                return
            if not sock.pending():
                return
            if conn.state not in (_HEAD, _BODY):
                return

    def _advance(self, conn: _Conn) -> None:
        """Parse and answer whatever complete requests the buffer holds."""
        while conn in self._conns and not conn.out:
            if conn.state == _HEAD:
                head = self._take_head(conn)
                if head is None:
                    return
                if head.length:
                    conn.head, conn.state = head, _BODY
                    self._arm(conn, "body")
                    if head.headers.get("expect", "").lower() == "100-continue":
                        conn.out = _CONTINUE
                        if not self._flush(conn):
                            return
                    continue
                self._answer(conn, head, b"")
            elif conn.state == _BODY:
                assert conn.head is not None  # noqa: S101
                head = conn.head
                if len(conn.buf) < head.length:
                    return
                body = bytes(conn.buf[: head.length])
                del conn.buf[: head.length]
                conn.head, conn.state = None, _HEAD
                self._answer(conn, head, body)
            else:
                return
            if not self._flush(conn):
                return

    def _take_head(self, conn: _Conn) -> _Head | None:
        """The next complete head from the buffer, or None (waiting, or refused)."""
        limit = self._limits.max_head_bytes
        blank = len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))
        del conn.buf[:blank]  # blank lines before a request are ignored (RFC 9112, 2.2)
        match = _HEAD_END.search(conn.buf, 0, limit + 4)
        if match is None or match.end() > limit:
            if len(conn.buf) > limit or match is not None:
                too_long_line = b"\n" not in conn.buf[:limit]
                self._refuse(conn, _Refusal(414 if too_long_line else 431))
            return None
        raw = bytes(conn.buf[: match.end()])
        del conn.buf[: match.end()]
        try:
            return self._parse(raw)
        except _Refusal as refusal:
            self._refuse(conn, refusal)
            return None

    def _parse(self, raw: bytes) -> _Head:
        lines = raw.decode("latin-1").split("\n")
        parts = lines[0].rstrip("\r").split(" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise _Refusal(400)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _Refusal(505 if _VERSION.fullmatch(version) else 400)
        if not _TARGET.fullmatch(target):
            raise _Refusal(400)
        headers = self._parse_headers([line.rstrip("\r") for line in lines[1:] if line.strip()])
        if method not in self._methods:
            # Unknown to HTTP: 501; known but not served here: 405 with what is.
            raise _Refusal(405 if method in _KNOWN_METHODS else 501, (("Allow", self._allow),))
        if "transfer-encoding" in headers:
            raise _Refusal(501)  # chunked bodies are not accepted; Content-Length is
        length_text = headers.get("content-length", "0")
        if not _LENGTH.fullmatch(length_text):
            raise _Refusal(400)
        length = int(length_text)
        if length > self._limits.max_body_bytes:
            raise _Refusal(413)
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise _Refusal(417)
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = version == "HTTP/1.1" and "close" not in tokens
        return _Head(method, target, MappingProxyType(headers), length, keep_alive)

    def _parse_headers(self, lines: list[str]) -> dict[str, str]:
        if len(lines) > self._limits.max_headers:
            raise _Refusal(431)
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            # No folded lines, no space before the colon, no control characters: the
            # ambiguities that request smuggling lives on.
            if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
                raise _Refusal(400)
            key, value = name.lower(), value.strip(" \t")
            if key not in headers:
                headers[key] = value
            elif key in ("content-length", "host"):
                if headers[key] != value:
                    raise _Refusal(400)
            else:
                headers[key] += ", " + value
        return headers

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

    def _answer(self, conn: _Conn, head: _Head, body: bytes) -> None:
        self._counts["requests"] += 1
        path, _, query = head.target.partition("?")
        request = Request(head.method, path, query, head.headers, body, conn.peer)
        try:
            response = self._handler(request)
            data = self._serialize(response, head.method == "HEAD", not head.keep_alive)
        except Exception as exc:  # noqa: BLE001 - a handler bug is a 500, never a crash
            # The type only: the exception's text may hold a secret.
            self._counts["handler_errors"] += 1
            log.error("%s: handler failed on %s: %s", self._name, head.method, type(exc).__name__)
            failure = Response(500, b'{"error": "500 Internal Server Error"}\n', "application/json")
            data = self._serialize(failure, head.method == "HEAD", not head.keep_alive)
        conn.out, conn.close_after = data, not head.keep_alive

    def _refuse(self, conn: _Conn, refusal: _Refusal) -> None:
        """Answer a request the server itself refuses, then close (after lingering)."""
        self._counts["refused"] += 1
        status = refusal.status
        body = b'{"error": "%d %s"}\n' % (status, _phrase(status).encode())
        conn.out = self._serialize(
            Response(status, body, "application/json", refusal.headers), False, True
        )
        conn.close_after, conn.state = True, _LINGER
        conn.buf = bytearray()
        self._flush(conn)

    def _serialize(self, response: Response, head_only: bool, close: bool) -> bytes:
        if not isinstance(response, Response) or not 200 <= response.status <= 599:
            raise TypeError("the handler returned no valid Response")
        status = response.status
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            f"Server: {SERVER}",
            f"Date: {self._http_date()}",
        ]
        fields = [("Content-Type", response.content_type), *response.headers]
        if status != 204:
            fields.append(("Content-Length", str(len(response.body))))
        if close:
            fields.append(("Connection", "close"))
        for name, value in fields:
            if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
                raise ValueError("a response header would split the response")
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only or status == 204 else head + response.body

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            # Fixed English names: strftime's %a and %b follow the locale.
            t = time.gmtime(now)
            day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday]
            month = "JanFebMarAprMayJunJulAugSepOctNovDec"[3 * t.tm_mon - 3 : 3 * t.tm_mon]
            text = f"{day}, {t.tm_mday:02d} {month} {t.tm_year} {t.tm_hour:02d}:"
            self._date = (now, text + f"{t.tm_min:02d}:{t.tm_sec:02d} GMT")
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


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"  # a status this Python does not name: the code is what counts
