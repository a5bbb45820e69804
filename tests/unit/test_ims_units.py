"""Pure parts of the IMS boundary: Retry-After, the retry table, error classification,
units and the lifetime cross-check."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refresher.errors import Rejected, Transient
from refresher.ims import (
    can_retry,
    classify_response,
    is_token_text,
    parse_retry_after,
    token_lifetime_s,
)
from refresher.skew import SkewEstimate, boot_epoch, sample_offset, significant

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
FUZZ_SETTINGS = settings(max_examples=200, deadline=None)


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
        (400, "server_error", True),
        (400, "temporarily_unavailable", True),
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
    assert token_lifetime_s("opaque", 86_399_999 * 0.001, NOW) == (86_399.999, False)


def test_oauth_expires_in_is_seconds() -> None:
    """On OAuth, expires_in=86399 means 86399 s."""
    assert token_lifetime_s("opaque", 86399.0, NOW) == (86399.0, False)


def test_token_claims_earlier_than_response_win() -> None:
    """When the token's own created_at+expires_in ends sooner, that earlier expiry is used."""
    value = _ims_like_token(NOW - timedelta(hours=1), 3_600_000 * 24)
    assert token_lifetime_s(value, 86399.0, NOW) == (23 * 3600.0, False)


def test_token_claims_later_than_response_are_ignored() -> None:
    """Claims never extend the lifetime beyond what the response says (units aside)."""
    value = _ims_like_token(NOW, 3_600_000 * 48)
    assert token_lifetime_s(value, 60.0, NOW) == (60.0, False)


def test_garbled_claims_fall_back_to_the_response() -> None:
    """Non-numeric created_at in the token is ignored, not a crash."""
    value = jwt.encode({"created_at": "yesterday", "expires_in": "x"}, "k" * 32, algorithm="HS256")
    assert token_lifetime_s(value, 10.0, NOW) == (10.0, False)


@pytest.mark.parametrize(
    ("response_s", "guarded"),
    [
        (86.399, True),  # the JWT exchange answered in seconds, read as milliseconds
        (86_399_000.0, True),  # OAuth answered in milliseconds, read as seconds
        (86_399.0, False),
        (43_200.0, False),  # half: a short grant, not a unit mix-up
        (300.0, False),  # 288x: too far from 1000x to call it units
    ],
)
def test_units_guard_trusts_the_claims_at_1000x(response_s: float, guarded: bool) -> None:
    """A response lifetime about 1000x off the token's own claims is a unit mix-up: the
    claims win (refreshing every 70 s forever is not an option); otherwise the earlier."""
    value = _ims_like_token(NOW, 86_400_000)
    lifetime_s, units = token_lifetime_s(value, response_s, NOW)
    assert units is guarded
    assert lifetime_s == (86_400.0 if guarded else min(response_s, 86_400.0))


def test_claims_created_at_is_read_in_ims_clock() -> None:
    """created_at is IMS's clock: with IMS 600 s ahead, a token created 'now' by IMS's clock
    ends 24 h from our now, not 24 h + 600 s (nor 24 h - 600 s when it is behind)."""
    value = _ims_like_token(NOW + timedelta(seconds=600), 86_400_000)
    assert token_lifetime_s(value, 86_400.0, NOW, skew_s=600.0) == (86_400.0, False)
    assert token_lifetime_s(value, 86_400.0, NOW, skew_s=0.0) == (86_400.0, False)
    behind = _ims_like_token(NOW - timedelta(seconds=600), 86_400_000)
    assert token_lifetime_s(behind, 86_400.0, NOW, skew_s=-600.0) == (86_400.0, False)
    assert token_lifetime_s(behind, 86_400.0, NOW, skew_s=0.0) == (85_800.0, False)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("eyJhbGciOi.abc-_~+/=", True),
        ("a", True),
        ("", False),
        ("tok en", False),
        ("tok\ren", False),
        ("tok\nen", False),
        ("tok\x00en", False),
        ("tok\ten", False),
        ("t\u00f6ken", False),
        ("tok\x7fen", False),
        (None, False),
        (12345, False),
    ],
)
def test_token_is_one_line_of_visible_ascii(value: object, ok: bool) -> None:
    """Only visible ASCII without spaces passes: CR, LF, NUL, space, tab, DEL, non-ASCII fail."""
    assert is_token_text(value) is ok


def test_classify_gives_kinds_and_hints() -> None:
    """A 400 verdict is Rejected with its hint; a 429 is Transient with the throttling hint;
    IMS's server_error is Transient whatever the status; an unknown text gets no hint."""
    body = json.dumps(
        {
            "error": "invalid_token",
            "error_description": "Could not match JWT signature to any of the bindings",
        }
    ).encode()
    rejected = classify_response(400, body, {"x-debug-id": "d1"}, NOW)
    assert isinstance(rejected, Rejected)
    assert rejected.hint is not None and "certificate" in rejected.hint
    assert rejected.log_fields()["hint"] == rejected.hint
    throttled = classify_response(429, b"", {"Retry-After": "3"}, NOW)
    assert isinstance(throttled, Transient) and throttled.hint and "throttl" in throttled.hint
    server = classify_response(400, b'{"error": "server_error"}', {}, NOW)
    assert isinstance(server, Transient)
    unknown = classify_response(
        400, b'{"error": "invalid_token", "error_description": "?"}', {}, NOW
    )
    assert isinstance(unknown, Rejected) and unknown.hint is None


# --------------------------------------------------------------- the skew estimate


def _date(instant: datetime) -> str:
    return format_datetime(instant.astimezone(UTC), usegmt=True)


def test_a_skew_sample_reads_the_date_to_the_second() -> None:
    """Date truncates to the second: the sample adds half a second and takes the middle
    of our round trip; under 2 s reads as 0 (the header's own noise)."""
    ims = NOW + timedelta(seconds=600, milliseconds=300)
    sample = sample_offset(_date(ims), NOW, NOW + timedelta(milliseconds=100))
    assert sample is not None and abs(sample - 600.3) <= 0.6
    assert significant(1.9) == 0.0 and significant(-1.9) == 0.0
    assert significant(2.04) == 2.0 and significant(-600.26) == -600.3


@pytest.mark.parametrize(
    "header", [None, "", "yesterday", "Mon, 99 Foo 2026 99:99:99 GMT", "0", "\x00"]
)
def test_a_garbled_or_missing_date_is_no_sample(header: str | None) -> None:
    """No Date, or one that does not parse, measures nothing (and never raises)."""
    assert sample_offset(header, NOW, NOW) is None


def test_slow_answers_and_absurd_dates_are_ignored() -> None:
    """A round trip over 10 s is too vague; a Date weeks away is a broken header."""
    ims = _date(NOW + timedelta(seconds=60))
    assert sample_offset(ims, NOW, NOW + timedelta(seconds=11)) is None
    assert sample_offset(_date(NOW + timedelta(days=30)), NOW, NOW) is None


def test_the_estimate_smooths_noise_and_follows_steps() -> None:
    """Samples within 5 s of the estimate move it a quarter of the way; a sample further
    off is a clock step (NTP, a resumed VM) and is taken at once."""
    skew = SkewEstimate()
    assert (skew.measured, skew.offset_s) == (False, 0.0)

    def observe(offset_s: float) -> None:
        # A Date that truncates to exactly `offset_s` from the middle of a 0 s round trip.
        skew.observe(_date(NOW + timedelta(seconds=offset_s)), NOW, NOW)

    observe(600)
    assert skew.offset_s == 600.5
    observe(604)
    assert skew.offset_s == pytest.approx(601.5)
    observe(0)
    assert skew.offset_s == 0.0  # |0.5| is noise
    observe(-120)
    assert skew.offset_s == -119.5


def test_the_estimate_follows_steps_of_our_own_clock_between_answers() -> None:
    """Our wall clock set forward by 600 s (a node 600 s behind, fixed) takes 600 s off the
    estimate at once; set back 100 s, it adds 100. A later answer is judged against the
    estimate so corrected (a sample agreeing with it is noise, not a step)."""
    epoch = [0.0]
    skew = SkewEstimate(epoch=lambda: epoch[0])
    skew.observe(_date(NOW + timedelta(seconds=600)), NOW, NOW)
    assert skew.offset_s == 600.5
    epoch[0] += 600.0
    assert skew.offset_s == 0.0
    epoch[0] -= 100.0
    assert skew.offset_s == 100.5
    later = NOW + timedelta(seconds=500)  # our clock now reads 500 s later than it did
    skew.observe(_date(later + timedelta(seconds=104)), later, later)
    assert skew.offset_s == pytest.approx(101.5)  # smoothed: within 5 s of 100.5


def test_the_boot_epoch_stands_still_while_nobody_sets_the_clock() -> None:
    """Wall minus boot clock: two reads a moment apart agree to well under a second."""
    first = boot_epoch()
    time.sleep(0.05)
    assert abs(boot_epoch() - first) < 0.01


@FUZZ_SETTINGS
@given(header=st.text(max_size=60))
def test_fuzz_any_date_header_never_raises(header: str) -> None:
    """Whatever a server puts in Date: a bounded sample or None, never an exception."""
    sample = sample_offset(header, NOW, NOW)
    assert sample is None or abs(sample) <= 7 * 86400
