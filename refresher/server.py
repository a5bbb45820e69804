"""The small HTTP server: /healthz, /readyz, /metrics, in its own daemon threads.

It reads `HealthState` under a lock and never calls into the loop, so a stuck
exchange cannot stall a probe, and a flood of probes cannot stall the loop.
Bodies are small JSON documents of state; never a token.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from refresher.health import HealthState, Probe
from refresher.metrics import Metrics

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    health: HealthState
    metrics: Metrics


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5  # a client that sends nothing cannot hold a thread for long
    server_version = "ims-token-refresher"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._probe(self.server.health.liveness())
        elif path == "/readyz":
            self._probe(self.server.health.readiness())
        elif path == "/metrics":
            self.server.metrics.token_valid.set(1 if self.server.health.token_valid() else 0)
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, b'{"error": "not found"}\n', "application/json")

    def do_HEAD(self) -> None:
        self._send(405, b"", "text/plain")

    def _probe(self, probe: Probe) -> None:
        body = (json.dumps(probe.body) + "\n").encode()
        self._send(200 if probe.ok else 503, body, "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)


class ProbeServer:
    def __init__(self, host: str, port: int, health: HealthState, metrics: Metrics) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.health = health
        self._server.metrics = metrics
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probe-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
