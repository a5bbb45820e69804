"""HealthState's live/ready semantics on a fake clock, and their HTTP mapping through a real
ProbeServer socket (a stall cannot be waited for in an end-to-end test: it takes a minute)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from refresher.health import MAX_ERROR_CHARS, HealthState
from refresher.metrics import Metrics
from refresher.server import ProbeServer
from tests.support.fakes import FakeClock

STALL_S = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> HealthState:
    return HealthState(clock, stall_after_s=STALL_S)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def server(health: HealthState, metrics: Metrics) -> Iterator[ProbeServer]:
    probe_server = ProbeServer("127.0.0.1", 0, health, metrics)
    probe_server.start()
    try:
        yield probe_server
    finally:
        probe_server.close()


def _get(server: ProbeServer, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        is_json = response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(body) if is_json else body
    finally:
        conn.close()


def test_live_until_no_heartbeat_for_stall_after(clock: FakeClock, health: HealthState) -> None:
    """Liveness holds up to stall_after_s after the last heartbeat, fails past it, and a
    heartbeat restores it."""
    clock.advance(STALL_S)
    assert health.liveness().ok
    clock.advance(0.5)
    probe = health.liveness()
    assert not probe.ok
    assert probe.body["status"] == "stalled"
    health.heartbeat()
    assert health.liveness().ok


def test_publishing_counts_as_a_heartbeat(clock: FakeClock, health: HealthState) -> None:
    """A publish is progress: it resets the stall timer."""
    clock.advance(STALL_S + 1)
    health.published(clock.now() + timedelta(seconds=60))
    assert health.liveness().ok


def test_not_live_once_stopped(health: HealthState) -> None:
    """After the loop stopped, liveness reports `stopping`, not ok."""
    health.stopped()
    probe = health.liveness()
    assert (probe.ok, probe.body["status"]) == (False, "stopping")


def test_ready_only_while_the_published_token_is_valid(
    clock: FakeClock, health: HealthState
) -> None:
    """Not ready before a token, ready while it is valid, not ready from its expiry on."""
    assert not health.readiness().ok
    assert health.readiness().body["reason"] == "no token published yet"
    health.published(clock.now() + timedelta(seconds=10))
    assert health.readiness().ok
    assert health.token_valid()
    clock.advance(10)
    probe = health.readiness()
    assert not probe.ok
    assert probe.body["reason"] == "the published token has expired"
    assert not health.token_valid()


def test_failing_with_a_valid_token_is_ready_with_a_warning(
    clock: FakeClock, health: HealthState
) -> None:
    """Refresh failures with a valid token keep it ready, with a warning and a count; a
    success clears the warning."""
    health.published(clock.now() + timedelta(seconds=10))
    assert health.failed("IMS down") == 1
    assert health.failed("x" * 10_000) == 2
    probe = health.readiness()
    assert probe.ok
    assert probe.body["consecutive_failures"] == 2
    warning = probe.body["warning"]
    assert isinstance(warning, str)
    assert len(warning) < MAX_ERROR_CHARS + 50
    health.succeeded()
    assert "warning" not in health.readiness().body


def test_probe_server_maps_states_to_status_codes(
    clock: FakeClock, health: HealthState, server: ProbeServer
) -> None:
    """Over a real socket: /healthz 200 then 503 `stalled`; /readyz 503 then 200; the
    token_valid gauge follows the token at scrape time."""
    assert _get(server, "/healthz")[0] == 200
    assert _get(server, "/readyz")[0] == 503
    assert "refresher_token_valid 0.0" in _get(server, "/metrics")[1]
    health.published(clock.now() + timedelta(seconds=STALL_S * 2))
    assert _get(server, "/readyz")[0] == 200
    assert "refresher_token_valid 1.0" in _get(server, "/metrics")[1]
    clock.advance(STALL_S + 1)
    status, body = _get(server, "/healthz")
    assert (status, body["status"]) == (503, "stalled")
    assert body["stall_after_s"] == STALL_S
    assert _get(server, "/readyz")[0] == 200  # stalled is not unready: the token is valid
