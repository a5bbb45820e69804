"""How a `/metrics` answer is encoded: the one rule both HTTP endpoints use.

Plain text 0.0.4 unless the scraper asks for OpenMetrics (every Prometheus reads
both). prometheus_client raises TypeError on a malformed Accept header such as
`application/openmetrics-text; version=abc`; that must not become a 500.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


def encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The encoder and content type for this Accept header; plain text when it is malformed."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")
