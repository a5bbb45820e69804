"""Pure scheduling arithmetic: when to refresh, whether a token may be adopted, backoff.

No I/O, no clock reads: `now` and the random draw `u` (uniform in [0, 1)) are
arguments, so the functions are property-tested. Results are clamped so that a
refresh is never scheduled before the token was issued, nor after it expires,
and a delay is never negative (a negative interval is a hot loop against IMS).

The adoption rule lives here and only here: every place that takes a published
token instead of minting one (the loop at start, before each mint, after losing a
write race; the Secret sink on a conflict) asks `adoptable` or `outlives`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

from tenacity import RetryCallState

from refresher.errors import Transient
from refresher.token import AccessToken


@dataclass(frozen=True)
class RefreshPolicy:
    """`--refresh-ratio` and `--jitter` (their defaults live on `ScheduleSettings`)."""

    refresh_ratio: float
    jitter: float

    def __post_init__(self) -> None:
        if not 0 < self.refresh_ratio < 1 or not 0 <= self.jitter < 1:
            raise ValueError("refresh_ratio must be in (0, 1) and jitter in [0, 1)")


def refresh_at(token: AccessToken, policy: RefreshPolicy, u: float) -> datetime:
    """When to refresh: `ratio` of the lifetime, earlier by up to `jitter` of it."""
    lifetime = token.lifetime
    fraction = max(0.0, policy.refresh_ratio - policy.jitter * min(max(u, 0.0), 1.0))
    return token.issued_at + lifetime * min(fraction, 1.0)


def earliest_refresh_at(token: AccessToken, policy: RefreshPolicy) -> datetime:
    """The earliest instant any replica could refresh this token (largest jitter)."""
    return refresh_at(token, policy, 1.0)


@dataclass(frozen=True)
class Issuer:
    """Whose token it is: the client and the IMS base URL it was minted at. A token of
    another client, or of the same client at another IMS (stage vs production), is
    never ours to adopt."""

    client_id: str
    ims_endpoint: str

    @classmethod
    def of(cls, token: AccessToken) -> Issuer:
        return cls(token.client_id, token.ims_endpoint)


def usable(token: AccessToken, issuer: Issuer, now: datetime) -> bool:
    """A held token we may stand behind: ours, still valid, and one IMS could have issued
    as recorded (`AccessToken.is_plausible`: a year-9999 expiry is never taken)."""
    return Issuer.of(token) == issuer and token.is_valid(now) and token.is_plausible(now)


def adoptable(token: AccessToken, issuer: Issuer, policy: RefreshPolicy, now: datetime) -> bool:
    """Adopt a published token instead of minting: usable, and not yet due for any
    replica (before ratio - jitter of its lifetime)."""
    return usable(token, issuer, now) and now < earliest_refresh_at(token, policy)


def outlives(held: AccessToken, ours: AccessToken, now: datetime) -> bool:
    """A write race: keep the token another writer published instead of overwriting it
    with `ours` when it is usable for our issuer and expires no earlier than ours.

    Compared at the published (whole-second) precision, so a tie goes to the token
    already published: two replicas that minted within the same second must not
    overwrite each other. It need not be "not yet due": it is at least as new as ours.
    """
    return usable(held, Issuer.of(ours), now) and held.expires_at >= ours.expires_at.replace(
        microsecond=0
    )


def delay_until(instant: datetime, now: datetime) -> float:
    """Seconds from `now` to `instant`, never negative."""
    return max(0.0, (instant - now).total_seconds())


def backoff_s(attempt: int, initial_s: float, cap_s: float, u: float) -> float:
    """Exponential backoff with full jitter (AWS blog): uniform in [0, min(cap, b*2^n)].

    `attempt` counts from 1. A floor of 10% of the window keeps a run of small
    draws from turning into a burst.
    """
    window: float = min(cap_s, initial_s * 2.0 ** max(0, min(attempt - 1, 62)))
    return max(0.1 * window, window * min(max(u, 0.0), 1.0))


class RetryWait:
    """tenacity wait: exponential backoff with full jitter, but never sooner than the
    Retry-After a `Transient` failure carries."""

    def __init__(self, initial_s: float, cap_s: float, rng: random.Random) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = backoff_s(retry_state.attempt_number, self.initial_s, self.cap_s, self.rng.random())
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, Transient) and exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        return delay
