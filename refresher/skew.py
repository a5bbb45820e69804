"""IMS's clock against ours, measured from the `Date` header of its answers.

IMS judges a JWT's `exp` by its own clock, so a pod whose clock is minutes behind signs
JWTs that IMS finds expired. Every answer (success or error) carries `Date`, stamped
somewhere between our sending and our receiving, to the whole second: one sample reads
IMS's clock to within half the round trip plus a second. Hence:

- a sample is the header plus half a second (the truncated fraction) minus the middle of
  our round trip; answers slower than `MAX_SAMPLE_RTT_S` are too vague to use;
- the estimate follows samples smoothly (an exponential average), except that a sample
  further than `STEP_S` from it is a clock step (NTP correcting a node, a VM resumed)
  and is taken at once;
- an estimate under `RESOLUTION_S` in size reads as 0: that is the header's own noise,
  and a JWT needs no correction for it.

Pure: the caller passes the header and the two instants of its own clock.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RESOLUTION_S = 2.0
STEP_S = 5.0
SMOOTHING = 0.25
MAX_SAMPLE_RTT_S = 10.0
# A Date further off than this is a broken header (or a proxy's), not a clock to sign for.
MAX_SKEW_S = 7 * 86400.0


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP `Date` as an aware UTC instant; None when absent or garbled."""
    if value is None or not value.strip():
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def sample_offset(
    date_header: str | None, sent_at: datetime, received_at: datetime
) -> float | None:
    """IMS's clock minus ours, in seconds, from one answer; None when it cannot tell."""
    date = parse_http_date(date_header)
    rtt_s = (received_at - sent_at).total_seconds()
    if date is None or not 0 <= rtt_s <= MAX_SAMPLE_RTT_S:
        return None
    try:
        middle = sent_at.timestamp() + rtt_s / 2
        offset = date.timestamp() + 0.5 - middle
    except (OverflowError, OSError, ValueError):
        return None
    if not math.isfinite(offset) or abs(offset) > MAX_SKEW_S:
        return None
    return offset


class SkewEstimate:
    """The running estimate of IMS's clock minus ours. Not thread-safe: one exchanger."""

    def __init__(self) -> None:
        self._estimate_s: float | None = None

    def observe(
        self, date_header: str | None, sent_at: datetime, received_at: datetime
    ) -> float | None:
        """Fold one answer's `Date` into the estimate; returns the sample (None if unusable)."""
        sample = sample_offset(date_header, sent_at, received_at)
        if sample is None:
            return None
        current = self._estimate_s
        if current is None or abs(sample - current) > STEP_S:
            self._estimate_s = sample
        else:
            self._estimate_s = current + SMOOTHING * (sample - current)
        return sample

    @property
    def measured(self) -> bool:
        return self._estimate_s is not None

    @property
    def offset_s(self) -> float:
        """IMS's clock minus ours, seconds; 0 when unknown or within the header's noise."""
        return significant(self._estimate_s or 0.0)


def significant(offset_s: float) -> float:
    """`offset_s` rounded to 0.1 s, or 0 within `RESOLUTION_S` (the Date header's noise)."""
    return 0.0 if abs(offset_s) < RESOLUTION_S else round(offset_s, 1)
