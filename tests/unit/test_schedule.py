"""The pure schedule: when to refresh, adoption, backoff (hypothesis property tests)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tenacity import RetryCallState, Retrying

from refresher.errors import Rejected, Transient
from refresher.schedule import (
    Issuer,
    RefreshPolicy,
    RetryWait,
    adoptable,
    backoff_s,
    delay_until,
    earliest_refresh_at,
    outlives,
    refresh_at,
    usable,
)
from refresher.token import AccessToken

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ISSUER = Issuer("c", "https://ims")


def token(lifetime_s: float, issued: datetime = T0) -> AccessToken:
    return AccessToken(
        value="v" * 20,
        issued_at=issued,
        expires_at=issued + timedelta(seconds=lifetime_s),
        flow="jwt",
        client_id="c",
        ims_endpoint="https://ims",
    )


def test_refresh_at_default_ratio_without_jitter_draw() -> None:
    """With u=0 the refresh lands at exactly 80% of a 24 h lifetime."""
    tok = token(86400)
    assert refresh_at(tok, RefreshPolicy(0.8, 0.1), 0.0) == T0 + timedelta(seconds=0.8 * 86400)


def test_refresh_at_full_jitter_draw_is_ten_percent_earlier() -> None:
    """With u=1 the refresh lands at 70% of the lifetime (ratio minus jitter)."""
    tok = token(1000)
    assert refresh_at(tok, RefreshPolicy(0.8, 0.1), 1.0) == T0 + timedelta(seconds=700)


@given(
    lifetime=st.floats(min_value=0.001, max_value=10 * 86400),
    ratio=st.floats(min_value=0.01, max_value=0.99),
    jitter=st.floats(min_value=0.0, max_value=0.99),
    u=st.floats(min_value=-1.0, max_value=2.0),
)
def test_refresh_never_before_issue_nor_after_expiry(
    lifetime: float, ratio: float, jitter: float, u: float
) -> None:
    """Whatever the policy and draw, the refresh instant lies within the token's lifetime."""
    tok = token(lifetime)
    when = refresh_at(tok, RefreshPolicy(ratio, jitter), u)
    assert tok.issued_at <= when <= tok.expires_at


@given(
    instant_offset=st.floats(min_value=-1e6, max_value=1e6),
)
def test_delay_is_never_negative(instant_offset: float) -> None:
    """A due time in the past gives a zero delay, never a negative one (no hot loop)."""
    assert delay_until(T0 + timedelta(seconds=instant_offset), T0) >= 0


def test_adoptable_until_the_earliest_jittered_refresh() -> None:
    """A published token is adopted while no replica would refresh it yet, not after."""
    tok = token(1000)
    policy = RefreshPolicy(0.8, 0.1)
    assert earliest_refresh_at(tok, policy) == T0 + timedelta(seconds=700)
    assert adoptable(tok, ISSUER, policy, T0 + timedelta(seconds=699))
    assert not adoptable(tok, ISSUER, policy, T0 + timedelta(seconds=700))


def test_token_from_the_far_future_is_not_adopted() -> None:
    """A token 'issued' an hour from now (clock skew, forgery) is not trusted for adoption."""
    tok = token(86400, issued=T0 + timedelta(hours=1))
    assert not adoptable(tok, ISSUER, RefreshPolicy(0.8, 0.1), T0)


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    initial=st.floats(min_value=0.001, max_value=100),
    cap=st.floats(min_value=0.001, max_value=3600),
    u=st.floats(min_value=0, max_value=1),
)
def test_backoff_is_bounded_by_the_cap(attempt: int, initial: float, cap: float, u: float) -> None:
    """Full-jitter backoff stays in (0, cap] for any attempt number, even huge ones."""
    delay = backoff_s(attempt, initial, cap, u)
    assert 0 < delay <= cap + 1e-9


def test_backoff_window_doubles() -> None:
    """The backoff window doubles per attempt until the cap."""
    assert [backoff_s(n, 1.0, 60.0, 1.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_policy_rejects_nonsense() -> None:
    """A ratio outside (0, 1) is refused rather than scheduling past expiry."""
    with pytest.raises(ValueError, match="refresh_ratio"):
        RefreshPolicy(1.5, 0.1)


def test_implausible_tokens_are_not_adoptable() -> None:
    """Issued more than a few seconds ahead, or living longer than IMS grants (a year-9999
    expiry), is never adopted, however far its refresh seems."""
    assert not adoptable(
        token(3600, issued=T0 + timedelta(seconds=30)), ISSUER, RefreshPolicy(0.8, 0.1), T0
    )
    assert not adoptable(token(49 * 3600), ISSUER, RefreshPolicy(0.8, 0.1), T0 + timedelta(hours=1))
    assert adoptable(
        token(24 * 3600, issued=T0 + timedelta(seconds=2)), ISSUER, RefreshPolicy(0.8, 0.1), T0
    )


policies = st.builds(
    RefreshPolicy,
    refresh_ratio=st.floats(min_value=0.05, max_value=0.95),
    jitter=st.floats(min_value=0, max_value=0.04),
)
lifetimes = st.floats(min_value=1, max_value=48 * 3600)
offsets = st.floats(min_value=-3600, max_value=50 * 3600)


@given(policy=policies, lifetime_s=lifetimes, offset_s=offsets)
def test_adoptable_means_usable_and_not_yet_due(
    policy: RefreshPolicy, lifetime_s: float, offset_s: float
) -> None:
    """Adoptable exactly when the token is usable (ours, valid, plausible) and no replica
    would refresh it yet; an adoptable token is always still valid."""
    tok = token(lifetime_s)
    now = T0 + timedelta(seconds=offset_s)
    expected = usable(tok, ISSUER, now) and now < earliest_refresh_at(tok, policy)
    assert adoptable(tok, ISSUER, policy, now) == expected
    if expected:
        assert tok.is_valid(now) and tok.is_plausible(now)


@given(
    policy=policies,
    lifetime_s=lifetimes,
    offset_s=offsets,
    other=st.sampled_from([Issuer("other", "https://ims"), Issuer("c", "https://ims-stage")]),
)
def test_another_issuers_token_is_never_adopted(
    policy: RefreshPolicy, lifetime_s: float, offset_s: float, other: Issuer
) -> None:
    """A token of another client, or of the same client at another IMS base URL, is never
    adopted nor kept in a race, however fresh."""
    tok = token(lifetime_s)
    now = T0 + timedelta(seconds=offset_s)
    assert not adoptable(tok, other, policy, now)
    ours = replace(tok, client_id=other.client_id, ims_endpoint=other.ims_endpoint)
    assert not outlives(tok, ours, now)


@given(
    held_s=lifetimes,
    ours_s=lifetimes,
    micros=st.integers(min_value=0, max_value=999_999),
    offset_s=st.floats(min_value=0, max_value=3600),
)
def test_outlives_keeps_the_published_token_on_a_tie(
    held_s: float, ours_s: float, micros: int, offset_s: float
) -> None:
    """In a write race the published token is kept when usable and expiring no earlier
    than ours at whole-second precision (a tie goes to the token already there)."""
    now = T0 + timedelta(seconds=offset_s)
    held = token(held_s)
    held = replace(held, expires_at=held.expires_at.replace(microsecond=0))
    ours = replace(token(ours_s), value="w" * 20)
    expected = usable(held, ISSUER, now) and held.expires_at >= ours.expires_at.replace(
        microsecond=0
    )
    assert outlives(held, ours, now) == expected
    same_second = replace(ours, expires_at=held.expires_at.replace(microsecond=micros))
    assert outlives(held, same_second, now) == usable(held, ISSUER, now)


def test_implausible_token_never_outlives_ours() -> None:
    """A year-9999 token in a shared sink does not win a race, whatever it claims."""
    forged = replace(token(3600), expires_at=T0.replace(year=9999))
    assert not outlives(forged, token(3600), T0)


def _wait_after(exc: BaseException, attempt: int, wait: RetryWait) -> float:
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return wait(state)


@given(
    attempt=st.integers(min_value=1, max_value=50),
    retry_after_s=st.floats(min_value=0, max_value=3600),
)
def test_retry_wait_honours_retry_after_of_a_transient_failure(
    attempt: int, retry_after_s: float
) -> None:
    """The loop's retry wait is the backoff, but never sooner than a Transient's
    Retry-After; a Rejected failure's Retry-After does not stretch it."""
    wait = RetryWait(1.0, 60.0, random.Random(1))
    transient = _wait_after(Transient("busy", retry_after_s=retry_after_s), attempt, wait)
    assert transient >= retry_after_s
    assert transient <= max(60.0, retry_after_s)
    rejected = _wait_after(Rejected("no", retry_after_s=retry_after_s), attempt, wait)
    assert rejected <= 60.0
