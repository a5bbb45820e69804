"""Time as a dependency: the real clock and an interruptible sleeper.

Everything else receives a `Clock` and a `Sleeper`, so tests run a day of
refreshes without waiting (see tests/support/fakes.py).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time (token instants are wall-clock)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (durations, heartbeats)."""
        ...


class Sleeper(Protocol):
    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; return True if woken early (shutdown or a nudge)."""
        ...

    def wake(self) -> None:
        """Interrupt the current and next sleep (used by shutdown)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class EventSleeper:
    """Sleeps on a `threading.Event`, so a signal handler can end any wait at once."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def sleep(self, seconds: float) -> bool:
        return self._event.wait(max(0.0, seconds))

    def wake(self) -> None:
        self._event.set()
