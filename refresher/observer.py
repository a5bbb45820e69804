"""What the loop did, turned into metrics, probe state and log lines, in one place.

`Service` decides; it reports each outcome here as one event and never touches a
metric, the health state or a logger itself. Every log line written here carries a
stable `event` field (docs/operations.md lists them), so log queries and the
benchmarks key on it rather than on the message text, which may be reworded.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from refresher.clock import Clock
from refresher.errors import RefresherError
from refresher.health import HealthState
from refresher.token import AccessToken, rfc3339

if TYPE_CHECKING:  # prometheus_client is imported only by a process that serves metrics
    from refresher.metrics import Metrics

log = logging.getLogger("refresher.service")

CERT_WARN_DAYS = 30
CERT_ERROR_DAYS = 7


def _say(level: int, event: str, message: str, *args: object, **fields: object) -> None:
    log.log(level, message, *args, extra={"event": event, **fields})


class Observer:
    """The one listener of the loop's events: metrics, health and logs.

    `metrics` is None where nothing serves them (`once`, `run` without --listen): such a
    process never imports prometheus_client (its import alone costs tens of ms at start).
    """

    def __init__(self, clock: Clock, metrics: Metrics | None, health: HealthState) -> None:
        self.clock = clock
        self.metrics = metrics
        self.health = health
        self._certificate_reported: tuple[datetime, int] | None = None

    # ---- progress ------------------------------------------------------------------

    def heartbeat(self) -> None:
        """The loop made progress (each turn, each sleep slice, after each blocking call)."""
        self.health.heartbeat()

    def stopped(self) -> None:
        self.health.stopped()
        _say(logging.INFO, "stopped", "the refresh loop stopped")

    # ---- obtaining a token ---------------------------------------------------------

    def exchange_took(self, flow: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.exchange_duration.labels(flow=flow).observe(seconds)

    def minted(self, token: AccessToken) -> None:
        self._succeeded()
        _say(
            logging.INFO,
            "token_minted",
            "obtained a new access token",
            flow=token.flow,
            client_id=token.client_id,
            ims_endpoint=token.ims_endpoint,
            expires_at=rfc3339(token.expires_at),
            lifetime_s=round(token.lifetime.total_seconds(), 3),
        )

    def adopted(self, token: AccessToken, source: str, *, why: str) -> None:
        """A published token taken instead of minting. `why`: `start` (found at start),
        `shared` (another replica published it before our mint), `race` (another writer
        won the write)."""
        if self.metrics is not None:
            self.metrics.adopted.labels(source=source).inc()
        if why == "shared":
            self._succeeded()
        messages = {
            "start": "found a published token (adopted) from the %s sink",
            "shared": "adopted the token another replica published (%s sink)",
            "race": "adopted the newer token another replica wrote (%s sink)",
        }
        _say(
            logging.INFO,
            "token_adopted",
            messages[why],
            source,
            sink=source,
            reason=why,
            expires_at=rfc3339(token.expires_at),
        )

    def found_due(self, token: AccessToken, source: str) -> None:
        """At start, a valid published token that is already due: kept, refreshed at once."""
        _say(
            logging.INFO,
            "token_found_due",
            "found a published token (valid but due for refresh) from the %s sink",
            source,
            sink=source,
            expires_at=rfc3339(token.expires_at),
        )

    def attempt_failed(self, exc: RefresherError, *, transient: bool) -> None:
        result = "retryable_error" if transient else "permanent_error"
        failures = self.health.failed(str(exc))
        if self.metrics is not None:
            self.metrics.refresh.labels(result=result).inc()
            self.metrics.consecutive_failures.set(failures)
        _say(
            logging.WARNING,
            "refresh_failed",
            "refresh attempt failed: %s",
            exc,
            result=result,
            **exc.log_fields(),
        )

    def retrying(self, delay_s: float, attempt: int) -> None:
        _say(
            logging.INFO,
            "retry_scheduled",
            "retrying in %.2fs (attempt %d)",
            delay_s,
            attempt,
            delay_s=round(delay_s, 3),
            attempt=attempt,
        )

    def gave_up(self, exc: RefresherError, pause_s: float) -> None:
        """A permanent failure in `run`: a slow retry follows (a credentials change ends it)."""
        _say(
            logging.ERROR,
            "refresh_paused",
            "giving up for %gs: %s",
            pause_s,
            exc,
            pause_s=pause_s,
            **exc.log_fields(),
        )

    def deadline_reached(self) -> None:
        _say(logging.ERROR, "retry_timeout", "--retry-timeout reached: giving up")

    def sink_unreadable(self, sink: str, exc: RefresherError, *, when: str) -> None:
        _say(
            logging.WARNING,
            "sink_unreadable",
            "cannot read the %s sink %s: %s",
            sink,
            when,
            exc,
            sink=sink,
        )

    # ---- publishing ----------------------------------------------------------------

    def published(self, sink: str, token: AccessToken) -> None:
        if self.metrics is not None:
            self.metrics.sink_write.labels(sink=sink, result="success").inc()
        self.health.heartbeat()  # a slow API server must not look like a stall
        _say(
            logging.INFO,
            "published",
            "published the token to the %s sink",
            sink,
            sink=sink,
            expires_at=rfc3339(token.expires_at),
        )

    def publish_failed(self, sink: str, exc: RefresherError) -> None:
        if self.metrics is not None:
            self.metrics.sink_write.labels(sink=sink, result="error").inc()
        self.health.heartbeat()
        _say(logging.ERROR, "publish_failed", "publishing failed: %s", exc, sink=sink)

    def once_unpublished(self, sinks: list[str]) -> None:
        _say(
            logging.ERROR,
            "publish_failed",
            "one-shot publish failed for the %s sink",
            ", ".join(sinks),
            sink=", ".join(sinks),
        )

    def serving(self, token: AccessToken) -> None:
        """`token` is what readers now get: ready, and the expiry gauge follows it."""
        self.health.published(token.expires_at)
        if self.metrics is not None:
            self.metrics.token_expiry.set(token.expires_at.timestamp())
            self.metrics.last_success.set(self.clock.now().timestamp())

    def scheduled(self, refresh_at: datetime, token: AccessToken) -> None:
        _say(
            logging.INFO,
            "refresh_scheduled",
            "next refresh scheduled",
            refresh_at=rfc3339(refresh_at),
            expires_at=rfc3339(token.expires_at),
        )

    # ---- the credentials ---------------------------------------------------------------

    def credentials_changed(self, path: str) -> None:
        if self.metrics is not None:
            self.metrics.credentials_reload.inc()
        _say(
            logging.INFO,
            "credentials_changed",
            "credentials changed: refreshing now",
            path=path,
        )

    def certificate(self, not_after: datetime) -> None:
        """The credentials' certificate: a gauge always; a log line at start, then once a
        day (or when it changes) inside the warning window, not on every retry."""
        if self.metrics is not None:
            self.metrics.certificate_expiry.set(not_after.timestamp())
        days_left = (not_after - self.clock.now()).total_seconds() / 86400
        key = (not_after, int(days_left))
        if key == self._certificate_reported:
            return
        self._certificate_reported = key
        fields: dict[str, object] = {
            "certificate_expires_at": rfc3339(not_after),
            "days_left": round(days_left, 1),
        }
        if days_left < CERT_ERROR_DAYS:
            _say(
                logging.ERROR,
                "certificate_expiring",
                "the credentials' certificate expires in %.1f days: create a new one in the "
                "AEM Developer Console now",
                days_left,
                **fields,
            )
        elif days_left < CERT_WARN_DAYS:
            _say(
                logging.WARNING,
                "certificate_expiring",
                "the credentials' certificate expires in %.1f days: plan its renewal",
                days_left,
                **fields,
            )

    def _succeeded(self) -> None:
        self.health.succeeded()
        if self.metrics is not None:
            self.metrics.refresh.labels(result="success").inc()
            self.metrics.consecutive_failures.set(0)
