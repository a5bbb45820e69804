"""Pure parts of the IMS boundary: Retry-After, the retry table, error classification,
units and the lifetime cross-check."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from refresher.ims import can_retry, classify_response, parse_retry_after, token_expiry

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("999999", 3600.0),
        ("Thu, 26 Nov 2026 12:00:30 GMT", 30.0),
        ("Thu, 26 Nov 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_retry_after_seconds_and_http_date(value: str | None, expected: float | None) -> None:
    """Retry-After is read as seconds or an HTTP date, clamped to [0, 1 h]; garbage is ignored."""
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("status", "error", "retry"),
    [
        (None, None, True),
        (429, None, True),
        (408, None, True),
        (500, None, True),
        (502, None, True),
        (503, None, True),
        (504, None, True),
        (200, None, True),
        (400, "invalid_client", False),
        (401, "invalid_client", False),
        (400, "invalid_scope", False),
        (400, "invalid_token", False),
        (400, "bad_request", False),
        (400, "unauthorized_client", False),
        (403, None, False),
        (404, None, False),
    ],
)
def test_retry_table(status: int | None, error: str | None, retry: bool) -> None:
    """Network trouble, 408, 429, 5xx and garbled 200s are retried; IMS verdicts are not."""
    assert can_retry(status, error) is retry


def test_classify_ims_error_body_keeps_code_description_and_debug_id() -> None:
    """An IMS 400 becomes a permanent error carrying error, description and x-debug-id."""
    body = json.dumps({"error": "invalid_scope", "error_description": "scope X not allowed"})
    exc = classify_response(400, body.encode(), {"x-debug-id": "dbg-1"}, NOW)
    assert not exc.retryable
    assert exc.exit_code == 3
    assert (exc.error, exc.error_description, exc.debug_id) == (
        "invalid_scope",
        "scope X not allowed",
        "dbg-1",
    )
    assert "invalid_scope" in str(exc)


def test_classify_429_reads_retry_after() -> None:
    """A 429 is retryable and carries the Retry-After delay."""
    exc = classify_response(429, b"", {"Retry-After": "7"}, NOW)
    assert exc.retryable
    assert exc.retry_after_s == 7.0


def test_classify_html_502_does_not_echo_the_body() -> None:
    """A proxy's HTML error page is retryable and is not copied into the message."""
    exc = classify_response(502, b"<html><body>Bad gateway SECRETISH</body></html>", {}, NOW)
    assert exc.retryable
    assert "SECRETISH" not in str(exc)


def _ims_like_token(created: datetime, life_ms: int) -> str:
    payload = {"created_at": str(int(created.timestamp() * 1000)), "expires_in": str(life_ms)}
    return jwt.encode(payload, "k" * 32, algorithm="HS256")


def test_jwt_exchange_expires_in_is_milliseconds() -> None:
    """On the JWT exchange, expires_in=86399999 means about 24 h, counted from sending."""
    expires = token_expiry("opaque", 86_399_999, 0.001, NOW)
    assert expires == NOW + timedelta(milliseconds=86_399_999)


def test_oauth_expires_in_is_seconds() -> None:
    """On OAuth, expires_in=86399 means 86399 s."""
    assert token_expiry("opaque", 86399, 1.0, NOW) == NOW + timedelta(seconds=86399)


def test_token_claims_earlier_than_response_win() -> None:
    """When the token's own created_at+expires_in ends sooner, that earlier expiry is used."""
    value = _ims_like_token(NOW - timedelta(hours=1), 3_600_000 * 24)
    expires = token_expiry(value, 86399, 1.0, NOW)
    assert expires == NOW + timedelta(hours=23)


def test_token_claims_later_than_response_are_ignored() -> None:
    """Claims never extend the lifetime beyond what the response says."""
    value = _ims_like_token(NOW, 3_600_000 * 48)
    assert token_expiry(value, 60, 1.0, NOW) == NOW + timedelta(seconds=60)


def test_garbled_claims_fall_back_to_the_response() -> None:
    """Non-numeric created_at in the token is ignored, not a crash."""
    value = jwt.encode({"created_at": "yesterday", "expires_in": "x"}, "k" * 32, algorithm="HS256")
    assert token_expiry(value, 10, 1.0, NOW) == NOW + timedelta(seconds=10)
