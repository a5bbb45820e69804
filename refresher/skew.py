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
  and a JWT needs no correction for it;
- between answers, the estimate follows steps of this node's clock that explain it:
  the wall clock minus the boot clock (`boot_epoch`) is constant until someone sets the
  wall clock, and changes by exactly the step. So once a skewed node's clock is fixed
  (NTP stepping it), the gauge (read at every scrape) and the next JWT's signing offset
  are right at once, not after the next exchange, hours later. A step that would make
  the estimate larger is not followed (a hypervisor that froze the VM and then stepped
  its wall clock looks the same from inside), nor is a clock slewed back slowly (NTP's
  gradual correction moves both clocks alike): the next exchange measures those. The
  boot clock counts a suspended VM's sleep, as the wall clock does, so a suspend and
  resume is no step. An answer that straddles a step is not used.

The caller passes the header and the two instants of its own clock; the step
tracking reads the two system clocks through `epoch` (injectable for tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RESOLUTION_S = 2.0
STEP_S = 5.0
SMOOTHING = 0.25
MAX_SAMPLE_RTT_S = 10.0
# A Date further off than this is a broken header (or a proxy's), not a clock to sign for.
MAX_SKEW_S = 7 * 86400.0
# Wall minus boot clock moves by less than this between two reads unless the clock is set.
EPOCH_NOISE_S = 1.0
# Linux's CLOCK_BOOTTIME counts suspend; elsewhere the monotonic clock is the best there is.
_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boot_epoch() -> float:
    """The wall clock minus the boot clock: constant until the wall clock is set."""
    return time.time() - time.clock_gettime(_BOOT_CLOCK)


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
    """The running estimate of IMS's clock minus ours. Not thread-safe: one exchanger
    observes; other threads (a metrics scrape) only read `offset_s`."""

    def __init__(self, epoch: Callable[[], float] = boot_epoch) -> None:
        self._epoch = epoch
        # (estimate, `epoch()` when it was made): one attribute, replaced whole, so that a
        # reader in another thread never pairs a new estimate with an old epoch.
        self._state: tuple[float, float] | None = None

    def epoch(self) -> float:
        """Our wall clock minus our boot clock now: read it before sending, and pass it to
        `observe`, so that an answer that straddles a step of our clock is not used."""
        return self._epoch()

    def observe(
        self,
        date_header: str | None,
        sent_at: datetime,
        received_at: datetime,
        epoch_sent: float | None = None,
    ) -> float | None:
        """Fold one answer's `Date` into the estimate; returns the sample (None if unusable).

        `epoch_sent` is `epoch()` read before `sent_at`: if our clock was set between then
        and now, `sent_at`, `received_at` and the epoch stored with the estimate may be
        readings of different clocks, and the sample is not used.
        """
        epoch_now = self._epoch()
        if epoch_sent is not None and abs(epoch_now - epoch_sent) > EPOCH_NOISE_S:
            return None
        sample = sample_offset(date_header, sent_at, received_at)
        if sample is None:
            return None
        current = self._current(epoch_now)
        if current is None or abs(sample - current) > STEP_S:
            estimate = sample
        else:
            estimate = current + SMOOTHING * (sample - current)
        self._state = (estimate, epoch_now)
        return sample

    @property
    def measured(self) -> bool:
        return self._state is not None

    @property
    def offset_s(self) -> float:
        """IMS's clock minus ours, seconds; 0 when unknown or within the header's noise."""
        return significant(self._current(self._epoch()) or 0.0)

    def _current(self, epoch_now: float) -> float | None:
        """The estimate, less the steps of our wall clock since it was made when they explain
        it (bring it closer to 0): a skewed node's clock being fixed. A step away from 0
        waits for IMS's next answer: from inside, a hypervisor that froze the VM's clocks
        and stepped the wall clock on resume looks the same as an operator setting it wrong.
        """
        state = self._state
        if state is None:
            return None
        estimate, epoch_at = state
        corrected = estimate - (epoch_now - epoch_at)
        return corrected if abs(corrected) < abs(estimate) else estimate


def significant(offset_s: float) -> float:
    """`offset_s` rounded to 0.1 s, or 0 within `RESOLUTION_S` (the Date header's noise)."""
    return 0.0 if abs(offset_s) < RESOLUTION_S else round(offset_s, 1)
