"""The state the probes report, updated by the loop, read by the server thread.

Live = the loop made progress recently (a heartbeat), never "IMS is reachable":
an IMS outage must not become a restart storm. The loop heartbeats at each turn
and in every sleep slice (at most `--watch-interval` apart); the one place it
cannot is inside a blocking call (an exchange, a Secret write), so `stall_after_s`
must exceed the longest such call, bounded by its timeouts. Ready = a valid token
is published; refreshing failures with a valid token are a warning, not unready.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from refresher.clock import Clock
from refresher.token import rfc3339

# Error texts carry codes and descriptions, not secrets; still, a probe body stays small.
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Probe:
    ok: bool
    body: dict[str, object]


class HealthState:
    def __init__(self, clock: Clock, *, stall_after_s: float) -> None:
        self.clock = clock
        self.stall_after_s = stall_after_s
        self._lock = threading.Lock()
        self._heartbeat = clock.monotonic()
        self._expires_at: datetime | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._stopped = False

    def heartbeat(self) -> None:
        # Called every sleep slice for as long as `run` lives: one store, no lock (a
        # float attribute is replaced whole; liveness reads it once).
        self._heartbeat = self.clock.monotonic()

    def published(self, expires_at: datetime) -> None:
        with self._lock:
            self._expires_at = expires_at
            self._heartbeat = self.clock.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            self._last_error = None
            self._failures = 0

    def failed(self, reason: str) -> int:
        with self._lock:
            self._last_error = reason[:MAX_ERROR_CHARS]
            self._failures += 1
            return self._failures

    def stopped(self) -> None:
        with self._lock:
            self._stopped = True

    def token_valid(self) -> bool:
        with self._lock:
            return self._expires_at is not None and self.clock.now() < self._expires_at

    def liveness(self) -> Probe:
        with self._lock:
            age = self.clock.monotonic() - self._heartbeat
            ok = age <= self.stall_after_s and not self._stopped
        return Probe(
            ok,
            {
                "status": "ok" if ok else ("stopping" if self._stopped else "stalled"),
                "last_heartbeat_age_s": round(age, 3),
                "stall_after_s": self.stall_after_s,
            },
        )

    def readiness(self) -> Probe:
        now = self.clock.now()
        with self._lock:
            expires_at, error, failures = self._expires_at, self._last_error, self._failures
        body: dict[str, object] = {"ready": False}
        if expires_at is None:
            body["reason"] = "no token published yet"
            if error:
                body["last_error"] = error
            return Probe(False, body)
        seconds_left = (expires_at - now).total_seconds()
        body.update(expires_at=rfc3339(expires_at), seconds_left=round(seconds_left, 1))
        if seconds_left <= 0:
            body["reason"] = "the published token has expired"
        else:
            body["ready"] = True
        if error:
            body["warning"] = f"refresh failing ({failures} in a row): {error}"
            body["consecutive_failures"] = failures
        return Probe(bool(body["ready"]), body)
