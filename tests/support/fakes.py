"""Test doubles for time only: a clock that a sleep advances. Everything else in the
tests is real (sockets, files, processes)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class FakeClock:
    """Wall and monotonic time that move only when the test (or a FakeSleeper) says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def step_wall(self, seconds: float) -> None:
        """A wall-clock step (NTP correction, a VM resumed): the monotonic clock does not move."""
        self._now += timedelta(seconds=seconds)


class FakeSleeper:
    """Sleeping advances the fake clock at once; records every requested delay."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleeps: list[float] = []
        self.woken = False
        self.on_sleep: list[Callable[[], None]] = []

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.clock.advance(max(0.0, seconds))
        for hook in list(self.on_sleep):
            hook()
        return self.woken

    def wake(self) -> None:
        self.woken = True
