"""A trickling IMS cannot stretch an exchange (issue 10, item 4).

`requests`' read timeout is per socket read, so a server that sends one byte at a time,
each well inside it, held one 0.1.0 exchange for as long as it kept trickling. Now each
exchange has one deadline, --connect-timeout + --read-timeout, for connect, headers and
body together; and SIGTERM ends an exchange in flight at once.

The trickler is a real loopback server (plain or TLS) that reads the request, then sends
its answer one byte every TRICKLE_S, for at most TRICKLE_LIMIT_S (a bound for the test,
and what 0.1.0 waited for).
"""

from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from refresher.config import build_settings
from refresher.credentials import load_credentials
from refresher.errors import Transient
from refresher.ims import ImsClient
from tests.support.harness import Harness, wait_until
from tests.support.tls import self_signed_loopback

pytestmark = pytest.mark.slow

TRICKLE_S = 0.25
TRICKLE_LIMIT_S = 12.0
CONNECT_S, READ_S = 1.0, 2.0  # each byte arrives well inside the 2 s read timeout
DEADLINE_S = CONNECT_S + READ_S
BODY = b'{"access_token": "' + b"t" * 4000 + b'", "expires_in": 86399}'


class Trickler:
    """Answers every request one byte at a time: all of it (`headers`) or the body only."""

    def __init__(self, mode: str, tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(rest) < length:
                rest += conn.recv(65536)
            self.requests += 1
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(BODY)
            )
            fast, slow = (b"", head + BODY) if self.mode == "headers" else (head, BODY)
            conn.sendall(fast)
            ends = time.monotonic() + TRICKLE_LIMIT_S
            for byte in slow:
                if self.stop.is_set() or time.monotonic() > ends:
                    break
                conn.sendall(bytes([byte]))
                self.stop.wait(TRICKLE_S)
        except (OSError, StopIteration, ValueError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self._thread.join(5)


def _tls_pair(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 and the CA file (the certificate itself) to trust."""
    cert_file, key_file = self_signed_loopback(directory, "trickler")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


@pytest.fixture(params=["headers", "body", "tls-body"])
def trickler(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Trickler]:
    mode = str(request.param)
    tls = None
    if mode.startswith("tls"):
        tls, ca_file = _tls_pair(tmp_path)
        request.node.ca_file = ca_file
    server = Trickler(mode.removeprefix("tls-"), tls)
    yield server
    server.close()


def _flags(trickler: Trickler, ca_file: Path | None) -> dict[str, str]:
    flags = {
        "credentials": "x",
        "ims_endpoint": trickler.url,
        "connect_timeout": str(CONNECT_S),
        "read_timeout": str(READ_S),
    }
    if ca_file is not None:
        flags["ca_bundle"] = str(ca_file)
    else:
        flags["allow_insecure_http"] = "true"
    return flags


def test_a_trickling_ims_meets_the_exchange_deadline(
    trickler: Trickler,
    harness: Harness,
    request: pytest.FixtureRequest,
    figures: dict[str, object],
) -> None:
    """Trickled headers, or a trickled body (plain or TLS): the exchange ends as Transient
    at connect + read timeout (3 s), not when the server stops (0.1.0: 12 s here)."""
    ca_file = getattr(request.node, "ca_file", None)
    client = ImsClient(build_settings(_flags(trickler, ca_file), needs_output=False).ims)
    started = time.monotonic()
    with pytest.raises(Transient, match="deadline"):
        client.exchange(load_credentials(harness.oauth), lambda: dt.datetime.now(dt.UTC))
    elapsed = time.monotonic() - started
    client.close()
    figures[f"deadline {DEADLINE_S:g}s, trickle {trickler.mode}"] = f"{elapsed:.2f}s"
    assert trickler.requests == 1
    assert DEADLINE_S - 0.2 <= elapsed <= DEADLINE_S + 1.5


def _once_against(
    harness: Harness, trickler: Trickler, *, connect_s: float, read_s: float
) -> list[str]:
    """`once` with the OAuth credentials against the trickling server, these timeouts."""
    return [
        *("once", "--credentials", str(harness.oauth), "--token-dir", str(harness.root / "out")),
        *("--ims-endpoint", trickler.url, "--allow-insecure-http"),
        *("--connect-timeout", f"{connect_s:g}", "--read-timeout", f"{read_s:g}"),
    ]


def test_once_exits_1_at_the_deadline(harness: Harness, figures: dict[str, object]) -> None:
    """The real `once` against a trickling IMS: exit 1 about the deadline after it starts,
    the failed attempt logged as the deadline (0.1.0 ran until the trickle ended)."""
    trickler = Trickler("body")
    try:
        started = time.monotonic()
        result = harness.run(
            *_once_against(harness, trickler, connect_s=CONNECT_S, read_s=READ_S),
            # Past the retry deadline when the exchange ends, but short of once's own
            # backstop (retry timeout + 2 s): the exchange deadline is what ends it.
            "--retry-timeout",
            "2",
            timeout=30,
        )
        elapsed = time.monotonic() - started
    finally:
        trickler.close()
    figures["once against a trickle: exit, seconds"] = [result.returncode, round(elapsed, 2)]
    assert result.returncode == 1, result.stderr
    assert "exchange deadline of 3s" in result.stdout + result.stderr
    assert elapsed < DEADLINE_S + 4  # interpreter start-up included
    assert not (harness.root / "out" / "access_token").exists()


def test_sigterm_ends_an_exchange_in_flight(harness: Harness, figures: dict[str, object]) -> None:
    """SIGTERM while `once` waits on a trickling IMS with a 60 s deadline: it exits
    within 2 s, publishing nothing."""
    trickler = Trickler("body")
    try:
        proc = harness.start(*_once_against(harness, trickler, connect_s=30, read_s=30))
        wait_until(lambda: trickler.requests == 1, timeout=20)
        time.sleep(0.5)  # well inside the trickle
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        took = time.monotonic() - sent
        out = proc.communicate()[0]
        harness.outputs.append(out)
    finally:
        trickler.close()
    figures["SIGTERM mid-exchange: seconds to exit"] = round(took, 2)
    assert took < 2.0, out
    assert not (harness.root / "out" / "access_token").exists()
