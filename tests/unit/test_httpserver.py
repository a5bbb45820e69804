"""The HTTP/1.1 server foundation (refresher.httpserver) over real loopback sockets, plain
and TLS: keep-alive, every limit and deadline, refusals with the right status, handler
failures, eviction at the connection cap, prompt close."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.httpserver import SERVER, HttpServer, Limits, Request, Response
from refresher.httpwire import Head, Refusal, head_length, parse_head, serialize
from tests.support.harness import wait_until
from tests.support.tls import self_signed_loopback

# `make fuzz` sets FUZZ_EXAMPLES=10000; the default keeps `make test` fast.
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FAST = Limits(head_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=0.5, send_timeout_s=0.5)
Serve = Callable[..., HttpServer]


def _echo(request: Request) -> Response:
    """Answers with what it saw, so tests can check the parsed request."""
    text = f"{request.method} {request.path} ?{request.query} {len(request.body)}"
    text += f" host={request.headers.get('host')} peer={request.peer.rsplit(':', 1)[0]}"
    return Response(200, text.encode(), headers=(("X-Echo", "1"),))


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start an HttpServer on 127.0.0.1:0; every one started is closed at the end."""
    servers: list[HttpServer] = []

    def start(handler: Callable[[Request], Response] = _echo, **kwargs: object) -> HttpServer:
        server = HttpServer("127.0.0.1", 0, handler, **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _connect(server: HttpServer, timeout: float = 3) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def _exchange(server: HttpServer, payload: bytes) -> bytes:
    """Send raw bytes, half-close, read until the server closes."""
    with _connect(server) as sock:
        sock.sendall(payload)
        # A server that drops the connection at once (plain HTTP on the TLS port) may have
        # closed it before the half-close: then there is nothing to read but its silence.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        return _read_all(sock)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


# ---------------------------------------------------------------- the protocol


def test_keep_alive_serves_several_requests_on_one_connection(serve: Serve) -> None:
    """Two requests on one HTTP/1.1 connection both get answers; the parsed request is right."""
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
    conn.request("GET", "/a/b?x=1&y=2", headers={"Host": "h"})
    first = conn.getresponse()
    assert first.read() == b"GET /a/b ?x=1&y=2 0 host=h peer=127.0.0.1"
    assert first.getheader("X-Echo") == "1"
    assert first.getheader("Server") == SERVER
    assert first.getheader("Date", "").endswith(" GMT")
    conn.request("GET", "/second")
    assert conn.getresponse().read().startswith(b"GET /second ")
    assert server.stats["accepted"] == 1
    conn.close()


def test_connection_close_and_http_1_0_close_after_the_answer(serve: Serve) -> None:
    """`Connection: close` (and HTTP/1.0) get their answer, then the server closes."""
    server = serve()
    for request in (
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ):
        with _connect(server) as sock:
            sock.sendall(request)  # no half-close: the server must close by itself
            raw = _read_all(sock)
        assert _status(raw) == 200
        assert b"\r\nConnection: close\r\n" in raw


def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    """Two requests in one packet get two answers, in order."""
    raw = _exchange(serve(), b"GET /one HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b"GET /one") < raw.index(b"GET /two")


def test_head_has_the_length_of_get_and_no_body(serve: Serve) -> None:
    """HEAD answers with GET's Content-Length and sends no body."""
    raw = _exchange(serve(), b"HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert _status(raw) == 200
    assert b"Content-Length: " in head
    assert body == b""


def test_small_answers_are_fast_on_a_kept_alive_connection(serve: Serve) -> None:
    """Each answer leaves in one write on a TCP_NODELAY socket: no ~40 ms delayed-ACK stall."""
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
    durations = []
    for _ in range(30):
        started = time.perf_counter()
        conn.request("GET", "/")
        conn.getresponse().read()
        durations.append(time.perf_counter() - started)
    conn.close()
    # A stall is >= 40 ms each; 20 ms leaves room for a loaded 2-CPU machine's wake-ups.
    assert statistics.median(durations) < 0.02, durations


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
        (b"BREW / HTTP/1.1\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 413),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, bytes) else str(v),
)
def test_bad_requests_are_refused_with_their_status_and_closed(
    serve: Serve, payload: bytes, status: int
) -> None:
    """Each malformed, oversized or unsupported request gets its status, then the close."""
    raw = _exchange(serve(), payload)
    assert _status(raw) == status, raw[:200]
    assert b"\r\nConnection: close\r\n" in raw
    assert raw.count(b"HTTP/1.1 ") == 1  # nothing after the refusal was served


def test_a_method_not_served_is_405_with_allow(serve: Serve) -> None:
    """A known method outside `methods` is 405 and names the methods that are served."""
    raw = _exchange(serve(), b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert _status(raw) == 405
    assert b"\r\nAllow: GET, HEAD\r\n" in raw


def test_a_refused_client_still_sending_reads_its_answer(serve: Serve) -> None:
    """A 64 KiB request line is refused after 8 KiB; the rest is read and discarded, so the
    client that sends it all and then reads gets the 414 instead of a reset."""
    raw = _exchange(serve(), b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n")
    assert _status(raw) == 414


# ---------------------------------------------------------------- bodies


def test_bodies_within_the_cap_reach_the_handler(serve: Serve) -> None:
    """With a body cap, a POST's body reaches the handler; over the cap is 413."""
    server = serve(methods=frozenset({"POST"}), limits=Limits(max_body_bytes=100))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
    conn.request("POST", "/mutate", body=b"x" * 100)
    assert conn.getresponse().read().startswith(b"POST /mutate ? 100")
    conn.close()
    raw = _exchange(server, b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n" + b"x" * 101)
    assert _status(raw) == 413


def test_expect_100_continue_gets_the_interim_answer(serve: Serve) -> None:
    """`Expect: 100-continue` gets `100 Continue` before the body is sent, then the answer."""
    server = serve(methods=frozenset({"POST"}), limits=Limits(max_body_bytes=10))
    with _connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abc")
        sock.shutdown(socket.SHUT_WR)
        raw = _read_all(sock)
    assert _status(raw) == 200
    assert raw.endswith(b"POST / ? 3 host=None peer=127.0.0.1")


def test_a_body_that_never_finishes_is_dropped_at_its_deadline(serve: Serve) -> None:
    """A body sent in part, then nothing: the connection is closed at the body deadline."""
    server = serve(
        methods=frozenset({"POST"}), limits=Limits(max_body_bytes=10, body_timeout_s=0.3)
    )
    with _connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        assert _read_all(sock) == b""
        assert time.monotonic() - started < 2.5


# ---------------------------------------------------------------- slow and idle clients


def test_silent_trickling_and_idle_clients_are_dropped_at_their_deadlines(serve: Serve) -> None:
    """A client sending nothing, one trickling a header line every 0.1 s, and a kept-alive one
    left idle are all closed within their deadlines, while others are served."""
    server = serve(limits=FAST)
    silent, trickler, kept = _connect(server), _connect(server), _connect(server)
    kept.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert _status(kept.recv(4096)) == 200
    trickler.sendall(b"GET / HTTP/1.1\r\n")
    started = time.monotonic()
    trickler.settimeout(0.1)
    closed = False
    while time.monotonic() - started < 3 and not closed:
        try:
            trickler.sendall(b"X-Slow: y\r\n")
            closed = trickler.recv(1) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
    assert closed, "the trickling client was never dropped"
    assert time.monotonic() - started < FAST.head_timeout_s + 1
    for sock in (silent, kept):
        assert sock.recv(1) == b""
        sock.close()
    trickler.close()
    assert server.stats["timeouts"] >= 3
    assert _status(_exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 200


def test_a_client_that_does_not_read_is_dropped_and_costs_nothing_else(serve: Serve) -> None:
    """An 8 MB answer to a client that never reads: dropped at the send deadline; others
    are served meanwhile."""
    big = Response(200, b"x" * 8_000_000)
    server = serve(lambda r: big if r.path == "/big" else _echo(r), limits=FAST)
    with _connect(server) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        assert _status(_exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 200
        # Counted just before it is closed: wait for both, not one then the other.
        wait_until(lambda: server.stats["timeouts"] >= 1 and server.stats["open"] == 0, timeout=3)


def test_at_the_connection_cap_the_quietest_connection_makes_room(serve: Serve) -> None:
    """With the cap reached by idle clients, a new client is served and the client quiet
    longest is the one closed."""
    server = serve(limits=Limits(max_connections=4, head_timeout_s=30))
    idle = [_connect(server) for _ in range(4)]
    wait_until(lambda: server.stats["open"] == 4, timeout=3)
    assert _status(_exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 200
    assert idle[0].recv(1) == b""  # the oldest, quietest one
    assert server.stats["evicted"] >= 1
    for sock in idle:
        sock.close()


def test_hundreds_of_idle_clients_do_not_delay_an_answer(serve: Serve) -> None:
    """300 idle connections held open: a new request is still answered within 1 s."""
    server = serve(limits=Limits(head_timeout_s=30))
    idle = [_connect(server) for _ in range(300)]
    try:
        started = time.monotonic()
        assert _status(_exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 200
        assert time.monotonic() - started < 1
        wait_until(lambda: server.stats["open"] >= 300, timeout=3)
    finally:
        for sock in idle:
            sock.close()


# ---------------------------------------------------------------- handler failures


def test_a_handler_exception_is_a_fixed_500_logged_without_its_text(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler raising (its message holding a secret) gives a fixed 500, one log line
    without the message, and the server keeps serving."""

    def broken(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("s3cr3t-value")
        return _echo(request)

    server = serve(broken)
    with caplog.at_level(logging.ERROR, logger="refresher.httpserver"):
        raw = _exchange(server, b"GET /boom HTTP/1.1\r\n\r\n")
        assert _status(raw) == 500
        assert raw.endswith(b'{"error": "500 Internal Server Error"}\n')
        assert _status(_exchange(server, b"GET /fine HTTP/1.1\r\n\r\n")) == 200
    assert "RuntimeError" in caplog.text
    assert "s3cr3t" not in caplog.text
    assert server.stats["handler_errors"] == 1


def test_a_response_header_with_a_line_break_cannot_split_the_response(serve: Serve) -> None:
    """A handler header holding CR LF is a 500, never a second header or response."""
    server = serve(lambda r: Response(200, b"ok", headers=(("X-A", "b\r\nSet-Cookie: x"),)))
    raw = _exchange(server, b"GET / HTTP/1.1\r\n\r\n")
    assert _status(raw) == 500
    assert b"Set-Cookie" not in raw


# ---------------------------------------------------------------- closing


def test_close_returns_promptly_and_closes_every_connection(serve: Serve) -> None:
    """`close` with idle and half-sent clients returns within 1 s; each of them sees EOF."""
    server = serve(limits=Limits(head_timeout_s=30))
    clients = [_connect(server) for _ in range(20)]
    clients[0].sendall(b"GET / HTTP/1.1\r\n")
    wait_until(lambda: server.stats["open"] == 20, timeout=3)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 1
    for sock in clients:
        assert _read_all(sock) == b""
        sock.close()
    with pytest.raises(OSError):
        _connect(server, timeout=1).close()


def test_a_busy_port_fails_at_construction() -> None:
    """Binding happens in the constructor: a port in use is an OSError there, not later."""
    first = HttpServer("127.0.0.1", 0, _echo)
    try:
        with pytest.raises(OSError):
            HttpServer("127.0.0.1", first.port, _echo)
    finally:
        first.close()


# ---------------------------------------------------------------- TLS


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    return self_signed_loopback(directory, name, stem=name)


_LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True)
class TlsAnswer:
    """An answer over TLS and who gave it (the server certificate's common name)."""

    status: int
    body: bytes
    common_name: str


def _tls_get(server: HttpServer, ca: Path) -> TlsAnswer:
    """GET / over TLS trusting `ca`."""
    client = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=3, context=client)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        assert conn.sock is not None
        peer = conn.sock.getpeercert()
        assert peer is not None
        subject = dict(item[0] for item in peer["subject"])  # type: ignore[misc]
        return TlsAnswer(response.status, body, str(subject["commonName"]))
    finally:
        conn.close()


def test_tls_serves_and_takes_a_new_certificate_without_a_restart(
    serve: Serve, tmp_path: Path
) -> None:
    """Over TLS a request is answered; the context callable is asked per connection, so a
    new certificate applies to the next connection."""
    first, second = _certificate(tmp_path, "first"), _certificate(tmp_path, "second")
    current = [_context(*first)]
    calls: list[int] = []

    def tls() -> ssl.SSLContext:
        calls.append(1)
        return current[0]

    server = serve(tls=tls)
    answer = _tls_get(server, first[0])
    assert (answer.status, answer.common_name) == (200, "first")
    current[0] = _context(*second)
    answer = _tls_get(server, second[0])
    assert (answer.status, answer.common_name) == (200, "second")
    assert len(calls) == 2


def test_tls_handshake_garbage_and_silence_are_dropped(serve: Serve, tmp_path: Path) -> None:
    """Plain HTTP sent to the TLS port is closed; a client that never starts the handshake
    is dropped at the head deadline; the server then still serves TLS."""
    cert = _certificate(tmp_path, "server")
    context = _context(*cert)
    server = serve(tls=lambda: context, limits=FAST)
    assert b"200" not in _exchange(server, b"GET / HTTP/1.1\r\n\r\n")
    with _connect(server) as silent:
        started = time.monotonic()
        assert _read_all(silent) == b""
        assert time.monotonic() - started < FAST.head_timeout_s + 1
    assert server.stats["tls_failures"] >= 1
    assert _tls_get(server, cert[0]).status == 200


def test_a_failing_tls_callable_drops_the_connection_not_the_server(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The context callable raising (a half-written certificate) closes that connection and
    logs the type only; the next connection gets the good context."""
    cert = _certificate(tmp_path, "server")
    good = _context(*cert)
    answers = iter([ValueError("private key s3cr3t"), good])

    def tls() -> ssl.SSLContext:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    server = serve(tls=tls)
    with caplog.at_level(logging.ERROR, logger="refresher.httpserver"):
        with _connect(server) as sock:
            assert _read_all(sock) == b""
        assert _tls_get(server, cert[0]).status == 200
    assert "ValueError" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_the_server_runs_on_its_own_thread(serve: Serve) -> None:
    """The handler runs on the server's named thread, never the caller's."""
    seen: list[str] = []

    def handler(request: Request) -> Response:
        seen.append(threading.current_thread().name)
        return _echo(request)

    server = serve(handler, name="probe-test")
    assert _status(_exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 200
    assert seen == ["probe-test"]


# ---------------------------------------------------------------- fuzzing the wire format

VALID = (
    b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: injector.svc:443\r\n"
    b"Content-Type: application/json\r\nContent-Length: 12\r\nAccept: */*\r\n\r\n"
)
WIRE_LIMITS = Limits(max_body_bytes=1 << 20)
METHODS = frozenset({"GET", "HEAD", "POST"})


def _parse_or_refuse(data: bytes) -> Head | Refusal | None:
    """What the server would make of `data` at the start of a connection."""
    buf = bytearray(data)
    try:
        length = head_length(buf, WIRE_LIMITS.max_head_bytes)
        if not length:
            return None
        return parse_head(bytes(buf[:length]), WIRE_LIMITS, METHODS)
    except Refusal as refusal:
        return refusal


def _check(outcome: Head | Refusal | None) -> None:
    if isinstance(outcome, Refusal):
        assert 400 <= outcome.status <= 505
    elif isinstance(outcome, Head):
        assert outcome.method in METHODS
        assert outcome.target.startswith("/")
        assert 0 <= outcome.length <= WIRE_LIMITS.max_body_bytes
        for name, value in outcome.headers.items():
            assert name == name.lower() and ":" not in name
            assert not any(c in value for c in "\r\n\x00")


@FUZZ
@given(st.binary(max_size=10_000))
def test_fuzz_random_bytes_are_parsed_or_refused(data: bytes) -> None:
    """Any bytes at all: a head, a refusal with a 4xx/5xx status, or 'wait for more'."""
    _check(_parse_or_refuse(data))


@FUZZ
@given(st.data())
def test_fuzz_mutated_requests_are_parsed_or_refused(data: st.DataObject) -> None:
    """A valid request with bytes replaced, inserted or deleted is parsed or refused, and a
    parsed one never carries a line break or NUL in a header value."""
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = data.draw(st.sampled_from(b"\r\n\x00 :\t,/?%-aZ0\x7f\xff"))
        if action == "insert" or at == len(raw):
            raw.insert(at, byte)
        elif action == "replace":
            raw[at] = byte
        else:
            del raw[at]
    _check(_parse_or_refuse(bytes(raw)))


@FUZZ
@given(st.text(max_size=40), st.text(max_size=40))
def test_fuzz_response_headers_cannot_inject(name: str, value: str) -> None:
    """Whatever a handler puts in a header, the response has exactly its own header lines,
    or serializing it fails (a 500 in the server)."""
    try:
        raw = serialize(
            Response(200, b"ok", headers=((name, value),)),
            head_only=False,
            close=False,
            date="Thu, 01 Jan 1970 00:00:00 GMT",
        )
    except (ValueError, UnicodeEncodeError):
        return
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert len(head.split(b"\r\n")) == 6  # status, Server, Date, Content-Type, X, Length
    assert b"\n" not in head.replace(b"\r\n", b"")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[HttpServer]:
    """One server for every example of the connection fuzz (a server per example is slow)."""
    server = HttpServer("127.0.0.1", 0, _echo, limits=FAST)
    server.start()
    yield server
    server.close()


@settings(max_examples=max(20, FUZZ_EXAMPLES // 10), deadline=None, parent=FUZZ)
@given(payloads=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=5))
def test_fuzz_random_connections_never_stop_the_server(
    fuzz_server: HttpServer, payloads: list[bytes]
) -> None:
    """Random bytes on real connections get a refusal or nothing; the server answers a valid
    request afterwards."""
    for payload in payloads:
        raw = _exchange(fuzz_server, payload)
        assert raw == b"" or raw.startswith(b"HTTP/1.1 "), raw[:100]
    assert _status(_exchange(fuzz_server, b"GET / HTTP/1.1\r\n\r\n")) == 200


def test_tls_bytes_already_decrypted_are_read_without_a_new_event(
    serve: Serve, tmp_path: Path
) -> None:
    """Bytes TLS has decrypted but the selector cannot see are read at once, not left until a
    deadline: two requests in one TLS record, the second split by a read while the 2 MB
    answer to the first (16 MB) was still being written."""
    cert = _certificate(tmp_path, "server")
    context = _context(*cert)
    big = Response(200, b"y" * 16_000_000)  # more than the kernel buffers: written in parts
    server = serve(
        lambda r: big if r.path == "/big" else _echo(r),
        tls=lambda: context,
        methods=frozenset({"GET", "POST"}),
        limits=Limits(max_body_bytes=20_000, head_timeout_s=3),
    )
    client = ssl.create_default_context(cafile=str(cert[0]))
    first = b"GET /big HTTP/1.1\r\nX-Pad: " + b"p" * 8100 + b"\r\n\r\n"  # just under 8 KiB
    second = b"POST /b HTTP/1.1\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer cannot fit at once
    plain.connect(("127.0.0.1", server.port))
    with client.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
        started = time.monotonic()
        sock.sendall(first + second + b"x" * 100)  # one record: under 16 KiB
        time.sleep(0.2)
        raw = bytearray()
        with contextlib.suppress(ssl.SSLError):
            while chunk := sock.recv(65536):
                raw += chunk
    assert raw.count(b"HTTP/1.1 200 OK") == 2, bytes(raw[:300])
    assert raw.endswith(b"POST /b ? 100 host=None peer=127.0.0.1")
    assert time.monotonic() - started < 2.5
