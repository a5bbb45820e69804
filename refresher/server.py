"""The probe port: /healthz, /readyz and /metrics on the project's small HTTP server.

It reads `HealthState` under a lock and never calls into the loop, so a stuck exchange
cannot stall a probe. The server runs on its own thread (`refresher.httpserver`: one
selectors loop, every client held to `LIMITS`), so a flood of clients cannot stall the
loop, and hundreds of idle or slow ones cannot lock kubelet's probes out. Bodies are small
JSON documents of state; never a token.
"""

from __future__ import annotations

import json

from refresher.exposition import encoder
from refresher.health import HealthState, Probe
from refresher.httpserver import HttpServer, Limits, Request, Response
from refresher.metrics import Metrics

# kubelet and Prometheus send their few hundred bytes at once: a short head deadline costs
# them nothing and frees a slot held by a silent or trickling client quickly.
LIMITS = Limits(max_head_bytes=8192, head_timeout_s=3.0, idle_timeout_s=5.0)
_JSON = "application/json"
_NO_STORE = (("Cache-Control", "no-store"),)
_NOT_FOUND = Response(404, b'{"error": "not found"}\n', _JSON, _NO_STORE)


class ProbeServer:
    """Binds at construction (an OSError then is a configuration error); serves after `start`."""

    def __init__(self, host: str, port: int, health: HealthState, metrics: Metrics) -> None:
        self._health = health
        self._metrics = metrics
        self._server = HttpServer(host, port, self._handle, limits=LIMITS, name="probe-server")
        # Computed at scrape time, so it turns 0 the moment the token expires.
        metrics.token_valid.set_function(lambda: 1.0 if health.token_valid() else 0.0)

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        self._server.start()

    def close(self) -> None:
        self._server.close()

    def _handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return _probe(self._health.liveness())
        if request.path == "/readyz":
            return _probe(self._health.readiness())
        if request.path == "/metrics":
            # Plain text 0.0.4 unless the scraper asks for OpenMetrics: every Prometheus reads it.
            encode, content_type = encoder(request.headers.get("accept", ""))
            return Response(200, encode(self._metrics.registry), content_type, _NO_STORE)
        return _NOT_FOUND


def _probe(probe: Probe) -> Response:
    body = (json.dumps(probe.body) + "\n").encode()
    return Response(200 if probe.ok else 503, body, _JSON, _NO_STORE)
