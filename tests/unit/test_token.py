"""`AccessToken.is_plausible`: the one rule every sink adopts by (issued not in the future,
expiring after issue, living no longer than MAX_LIFETIME)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from refresher.token import MAX_LIFETIME, AccessToken

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _token(issued: datetime, lifetime: timedelta) -> AccessToken:
    return AccessToken("value-of-a-token", issued, issued + lifetime, "jwt", "c", "https://x")


@pytest.mark.parametrize(
    ("issued", "lifetime", "plausible"),
    [
        (NOW - timedelta(hours=1), timedelta(hours=24), True),  # what IMS issues
        (NOW + timedelta(seconds=5), timedelta(hours=24), True),  # a little clock skew
        (NOW + timedelta(seconds=6), timedelta(hours=24), False),  # issued in the future
        (NOW, MAX_LIFETIME, True),
        (NOW, MAX_LIFETIME + timedelta(seconds=1), False),
        (NOW, timedelta(days=365 * 7000), False),  # the forged year-9999 token
        (NOW, timedelta(0), False),
        (NOW, timedelta(seconds=-1), False),
        (NOW - timedelta(days=3), timedelta(hours=24), True),  # expired, yet plausible
    ],
)
def test_is_plausible(issued: datetime, lifetime: timedelta, plausible: bool) -> None:
    """Each row: a token issued at `issued` living `lifetime`, judged at NOW."""
    assert _token(issued, lifetime).is_plausible(NOW) is plausible


def test_max_lifetime_covers_what_ims_issues() -> None:
    """IMS issues 24 h; MAX_LIFETIME leaves room but is not unbounded."""
    assert timedelta(hours=24) < MAX_LIFETIME <= timedelta(days=7)
