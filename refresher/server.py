"""The small HTTP server: /healthz, /readyz, /metrics, in its own daemon threads.

It reads `HealthState` under a lock and never calls into the loop, so a stuck
exchange cannot stall a probe, and a flood of probes cannot stall the loop.
Bodies are small JSON documents of state; never a token.

Hostile or broken clients are bounded, not trusted: one request per connection
(HTTP/1.0), a socket timeout on every read (a client that sends nothing is
dropped), the stdlib's 64 KiB cap on the request line and on each header, and
at most `MAX_CONNECTIONS` handler threads (beyond that a connection is closed at
once rather than queued behind idle ones). The limit: a client trickling one
byte per `READ_TIMEOUT_S` can hold a slot for longer; the slot cap bounds what a
crowd of them costs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder

from refresher.health import HealthState, Probe
from refresher.metrics import Metrics

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 3.0  # kubelet and Prometheus send their few hundred bytes at once
MAX_CONNECTIONS = 64
_JSON = "application/json"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of probes and scrapes waits in the backlog, not refused

    def __init__(
        self, address: tuple[str, int], health: HealthState, metrics: Metrics, *, ipv6: bool
    ) -> None:
        self.address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
        self.health = health
        self.metrics = metrics
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.debug("probe server busy: closing a connection from %s", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()  # the thread did not start: give its slot back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; a reset or garbage connection is not news.
        log.debug("probe connection from %s ended abnormally", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = READ_TIMEOUT_S
    server_version = "ims-token-refresher"
    sys_version = ""
    # The stdlib's own error page echoes the request line; keep it to a fixed message.
    error_message_format = '{"error": "%(code)d %(message)s"}\n'
    error_content_type = _JSON

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._probe(self.server.health.liveness())
        elif path == "/readyz":
            self._probe(self.server.health.readiness())
        elif path == "/metrics":
            # Plain text 0.0.4 unless the scraper asks for OpenMetrics: every Prometheus reads it.
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encode(self.server.metrics.registry), content_type)
        else:
            self._send(404, b'{"error": "not found"}\n', _JSON)

    def do_HEAD(self) -> None:
        self.do_GET()  # same status and headers; `_send` leaves the body out

    def _method_not_allowed(self) -> None:
        self._send(405, b'{"error": "method not allowed"}\n', _JSON, allow="GET, HEAD")

    # The stdlib dispatches on `do_<METHOD>`; an unknown method still gets its 501.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed  # noqa: N815

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib would quote (escaped) bytes of the bad request line back; say less.
        del message, explain
        super().send_error(code, None, None)

    def _probe(self, probe: Probe) -> None:
        body = (json.dumps(probe.body) + "\n").encode()
        self._send(200 if probe.ok else 503, body, _JSON)

    def _send(self, status: int, body: bytes, content_type: str, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)


class ProbeServer:
    """Binds at construction (an OSError then is a configuration error); serves after `start`."""

    def __init__(self, host: str, port: int, health: HealthState, metrics: Metrics) -> None:
        self._server = _Server((host, port), health, metrics, ipv6=":" in host)
        # Computed at scrape time, so it turns 0 the moment the token expires.
        metrics.token_valid.set_function(lambda: 1.0 if health.token_valid() else 0.0)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # No timeout: the selector sleeps until a connection arrives, so an idle sidecar
            # costs no wake-ups; `close` wakes it with a connection of its own.
            kwargs={"poll_interval": None},
            name="probe-server",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            # shutdown() only sets a flag the serve loop checks after select() returns:
            # poke it with connections until it has noticed (a few ms; bounded).
            address = self._wake_address()
            for _ in range(40):
                with contextlib.suppress(OSError):
                    socket.create_connection(address, timeout=0.2).close()
                stopper.join(0.025)
                if not stopper.is_alive():
                    break
        self._server.server_close()

    def _wake_address(self) -> tuple[str, int]:
        host = str(self._server.server_address[0])
        if host in ("0.0.0.0", ""):  # noqa: S104 - not binding, connecting to ourselves
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return host, self.port
