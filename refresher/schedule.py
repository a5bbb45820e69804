"""Pure scheduling arithmetic: when to refresh, whether a token may be adopted, backoff.

No I/O, no clock reads: `now` and the random draw `u` (uniform in [0, 1)) are
arguments, so the functions are property-tested. Results are clamped so that a
refresh is never scheduled before the token was issued, nor after it expires,
and a delay is never negative (a negative interval is a hot loop against IMS).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from refresher.token import AccessToken


@dataclass(frozen=True)
class RefreshPolicy:
    refresh_ratio: float = 0.8
    jitter: float = 0.1

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


def adoptable(token: AccessToken, policy: RefreshPolicy, now: datetime) -> bool:
    """A published token is adopted, not re-minted, while no replica would refresh it yet,
    and only if IMS could have issued it as recorded (`AccessToken.is_plausible`, the one
    adoption rule: a year-9999 expiry would otherwise be "not yet due" forever)."""
    return token.is_plausible(now) and now < earliest_refresh_at(token, policy)


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
