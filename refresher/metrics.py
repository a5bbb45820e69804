"""Prometheus metrics on an injected `CollectorRegistry` (never the global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from refresher import __version__

REFRESH_RESULTS = ("success", "retryable_error", "permanent_error")
SINKS = ("file", "secret")
SINK_RESULTS = ("success", "error")
ON_REFRESH_RESULTS = ("success", "error", "timeout")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._token_series(registry)
        self._activity_series(registry)
        self.build_info = Gauge(
            "refresher_build_info", "Build information.", ["version"], registry=registry
        )
        self.build_info.labels(version=__version__).set(1)
        self._precreate()

    def _token_series(self, registry: CollectorRegistry) -> None:
        """What readers get: the token, the certificate, the clocks."""
        self.token_expiry = Gauge(
            "refresher_token_expiry_timestamp_seconds",
            "Unix time at which the published token expires (0 before the first).",
            registry=registry,
        )
        self.last_success = Gauge(
            "refresher_last_success_timestamp_seconds",
            "Unix time of the last successful refresh (minted or adopted).",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "refresher_certificate_expiry_timestamp_seconds",
            "Unix time at which the credentials' certificate expires (JWT flow).",
            registry=registry,
        )
        self.token_valid = Gauge(
            "refresher_token_valid",
            "1 while the published token is valid, else 0 (computed at scrape time).",
            registry=registry,
        )
        self.clock_skew = Gauge(
            "refresher_clock_skew_seconds",
            "IMS's clock minus this node's, from the Date header of IMS's answers "
            "(0 until measured, and within the header's 1 s resolution).",
            registry=registry,
        )

    def _activity_series(self, registry: CollectorRegistry) -> None:
        """What the loop did: refreshes, exchanges, publications, hooks, adoptions."""
        self.refresh = Counter(
            "refresher_refresh",
            "Refresh attempts by outcome class.",
            ["result"],
            registry=registry,
        )
        self.exchange_duration = Histogram(
            "refresher_exchange_duration_seconds",
            "Duration of one IMS token request.",
            ["flow"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.sink_write = Counter(
            "refresher_sink_write",
            "Token publications by sink and outcome.",
            ["sink", "result"],
            registry=registry,
        )
        self.consecutive_failures = Gauge(
            "refresher_consecutive_failures",
            "Failed refresh attempts since the last success.",
            registry=registry,
        )
        self.credentials_reload = Counter(
            "refresher_credentials_reload",
            "Credentials changes detected (mounted Secret swapped).",
            registry=registry,
        )
        self.on_refresh = Counter(
            "refresher_on_refresh",
            "--on-refresh command runs by outcome.",
            ["result"],
            registry=registry,
        )
        self.adopted = Counter(
            "refresher_adopted",
            "Published tokens adopted instead of minting a new one.",
            ["source"],
            registry=registry,
        )

    def _precreate(self) -> None:
        # Pre-create label sets so dashboards and alerts see zeros, not gaps: an alert on
        # `increase()` cannot see the first error of a series that did not exist before it.
        for result in REFRESH_RESULTS:
            self.refresh.labels(result=result)
        for sink in SINKS:
            self.adopted.labels(source=sink)
            for result in SINK_RESULTS:
                self.sink_write.labels(sink=sink, result=result)
        for result in ON_REFRESH_RESULTS:
            self.on_refresh.labels(result=result)

    def follow_clock_skew(self, read: Callable[[], float]) -> None:
        """Report the skew as `read()` says it at scrape time (the IMS client measures it)."""
        self.clock_skew.set_function(read)
