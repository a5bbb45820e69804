"""Outage and recovery: IMS drops every request (emulator.down()) for longer than a token
lifetime, then comes back. The old token stays published, /readyz turns 503 only once
it has expired, /healthz never flaps (an IMS outage must not become a restart storm),
and the first refresh after recovery lands within the backoff cap."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ims_emulator import Emulator
from tests.support.harness import Harness, wait_until

from .support import Refresher, TokenBook, client_ids, observed_run, percentiles, scan_for_secrets

pytestmark = pytest.mark.slow

TOKEN_TTL_S = 3.0
BACKOFF_MAX_S = 0.5
POLL_S = 0.025
# The refresher counts a lifetime from when it *sent* the request, so its expiry is a
# few milliseconds before the emulator's; polling adds POLL_S on the other side.
EXPIRY_TOLERANCE_S = 0.2
RECOVERY_SLACK_S = 1.0


class Monitor(threading.Thread):
    """Every POLL_S: /readyz, /healthz and the published token, timestamped."""

    def __init__(self, refresher: Refresher, out: Path) -> None:
        super().__init__(name="monitor", daemon=True)
        self.refresher = refresher
        self.out = out
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, int, int, str | None]] = []

    def run(self) -> None:
        while not self.stop_event.wait(POLL_S):
            ready, _ = self.refresher.get("/readyz")
            live, _ = self.refresher.get("/healthz")
            try:
                token: str | None = (self.out / "access_token").read_text()
            except FileNotFoundError:
                token = None
            self.samples.append((time.time(), ready, live, token))

    def latest(self) -> str | None:
        return self.samples[-1][3] if self.samples else None

    def between(self, start: float, end: float) -> list[tuple[float, int, int, str | None]]:
        return [s for s in list(self.samples) if start <= s[0] < end]


def _one_outage(
    emulator: Emulator,
    monitor: Monitor,
    book: TokenBook,
    start: float,
    length: float,
) -> dict[str, Any]:
    """Wait for a fresh publish; `start` lifetimes later take IMS down for `length`
    lifetimes; bring it back and measure."""
    before = monitor.latest()
    wait_until(lambda: monitor.latest() not in (None, before), timeout=TOKEN_TTL_S * 3)
    token = monitor.latest()
    assert token is not None
    expiry = book.expiry(token)
    assert expiry is not None
    time.sleep(max(0.0, expiry - TOKEN_TTL_S * (1 - start) - time.time()))
    down_at = time.time()
    emulator.down()
    # The token published when IMS went down (a refresh may have landed meanwhile).
    token = monitor.latest()
    assert token is not None
    expiry = book.expiry(token)
    assert expiry is not None
    time.sleep(max(0.0, down_at + length * TOKEN_TTL_S - time.time()))
    up_at = time.time()
    emulator.up()
    wait_until(lambda: monitor.latest() not in (None, token), timeout=BACKOFF_MAX_S + 10)
    time.sleep(4 * POLL_S)
    new_seen = min(s[0] for s in monitor.between(up_at, time.time()) if s[3] not in (None, token))
    during = monitor.between(down_at, new_seen)
    expired_during_outage = up_at > expiry
    # Ends early enough that a retry within the backoff cap lands before the expiry.
    short = up_at + BACKOFF_MAX_S + 0.3 < expiry
    not_ready = [s[0] for s in during if s[1] != 200]
    first_503 = min(not_ready) if not_ready else None
    return {
        "outage_s": round(up_at - down_at, 3),
        "token_expired_during_outage": expired_during_outage,
        "short": short,
        "old_token_kept": all(s[3] == token for s in during),
        "ready_before_expiry": all(
            s[1] == 200 for s in during if s[0] < expiry - EXPIRY_TOLERANCE_S
        ),
        "not_ready_after_expiry": all(
            s[1] == 503 for s in during if expiry + EXPIRY_TOLERANCE_S < s[0] < up_at
        ),
        "readyz_503_after_expiry_s": None if first_503 is None else round(first_503 - expiry, 3),
        "healthz_always_200": all(s[2] == 200 for s in during),
        "first_refresh_after_recovery_s": round(new_seen - up_at, 3),
        "ready_again": monitor.samples[-1][1] == 200,
        "samples": len(during),
        "window": (down_at, up_at),
    }


def _run(
    harness: Harness, outages: list[tuple[float, float]], figures: dict[str, Any]
) -> list[dict[str, Any]]:
    emulator = harness.start_emulator(token_ttl_s=TOKEN_TTL_S)
    out = harness.root / "tokens"
    book = TokenBook(emulator, client_ids(harness))
    refresher = Refresher(
        harness,
        *observed_run(harness.aem, out),
        "--read-timeout",
        "1",
        "--backoff-initial",
        "0.1",
        "--backoff-max",
        str(BACKOFF_MAX_S),
        "--refresh-ratio",  # refresh at 40-50 % of the lifetime: room for short outages
        "0.5",
        *harness.endpoint_args(),
    )
    refresher.port()
    monitor = Monitor(refresher, out)
    monitor.start()
    results = []
    try:
        for start, length in outages:
            results.append(_one_outage(emulator, monitor, book, start, length))
        metrics = refresher.metrics()
        failed = [r["_t"] for r in refresher.find("refresh attempt failed")]
        for result in results:
            start_t, end_t = result.pop("window")
            result["failed_attempts"] = sum(start_t <= t <= end_t + 0.1 for t in failed)
    finally:
        monitor.stop_event.set()
        monitor.join()
    code = refresher.stop()
    for token in {s[3] for s in monitor.samples if s[3]}:
        book.expiry(token)
    secrets = scan_for_secrets(
        [refresher.output, *refresher.fetched], harness.credentials, book.values()
    )
    long_ones = [r for r in results if r["token_expired_during_outage"]]
    figures.update(
        {
            "token_ttl_s": TOKEN_TTL_S,
            "backoff_max_s": BACKOFF_MAX_S,
            "outages": len(results),
            "outages_longer_than_token": len(long_ones),
            "outages_ending_a_backoff_before_expiry": sum(r["short"] for r in results),
            "outage_s": percentiles([r["outage_s"] for r in results]),
            "old_token_kept": sum(r["old_token_kept"] for r in results),
            "readyz_503_after_expiry_s": percentiles(
                [
                    r["readyz_503_after_expiry_s"]
                    for r in long_ones
                    if r["readyz_503_after_expiry_s"] is not None
                ]
            ),
            "readyz_503_in_short_outages": sum(
                r["readyz_503_after_expiry_s"] is not None for r in results if r["short"]
            ),
            "healthz_non_200": sum(not r["healthz_always_200"] for r in results),
            "first_refresh_after_recovery_s": percentiles(
                [r["first_refresh_after_recovery_s"] for r in results]
            ),
            "failed_attempts_per_outage": [r["failed_attempts"] for r in results],
            "retryable_errors": metrics.get('refresher_refresh_total{result="retryable_error"}'),
            "secret_scan": secrets,
        }
    )
    assert code == 0, refresher.output[-3000:]
    for result in results:
        assert result["old_token_kept"], result
        assert result["ready_before_expiry"], result
        assert result["healthz_always_200"], result
        assert result["ready_again"], result
        assert result["first_refresh_after_recovery_s"] <= BACKOFF_MAX_S + RECOVERY_SLACK_S, result
        if result["token_expired_during_outage"]:
            assert result["not_ready_after_expiry"], result
            delay = result["readyz_503_after_expiry_s"]
            assert delay is not None and -EXPIRY_TOLERANCE_S <= delay <= EXPIRY_TOLERANCE_S, result
    assert all(v == 0 for k, v in secrets.items() if k != "bytes_scanned")
    return results


def test_outage_longer_than_a_token_then_recovery(
    harness: Harness, figures: dict[str, Any]
) -> None:
    """IMS down across a refresh point but not the expiry: /readyz stays 200; then down 1.4
    lifetimes: old token kept, /readyz 503 from its expiry on, /healthz 200 throughout, a
    new token within the backoff cap of IMS coming back."""
    results = _run(harness, [(0.35, 0.3), (0.0, 1.4)], figures)
    assert results[0]["short"] and results[0]["failed_attempts"] >= 1
    assert results[1]["token_expired_during_outage"]
    assert figures["readyz_503_in_short_outages"] == 0


@pytest.mark.soak
def test_outages_repeated(harness: Harness, figures: dict[str, Any], soak_seconds: float) -> None:
    """Outages of 0.2 to 2 lifetimes at random points of a lifetime: those that end a backoff
    cap before expiry never turn /readyz 503, those past expiry do from expiry to recovery,
    and every recovery lands within the backoff cap."""
    rng = random.Random()
    count = max(6, int(soak_seconds / 60))
    plan = [(rng.uniform(0.0, 0.6), rng.uniform(0.2, 2.0)) for _ in range(count)]
    plan[:2] = [(0.35, 0.3), (0.1, 1.6)]  # at least one of each kind
    results = _run(harness, plan, figures)
    assert figures["readyz_503_in_short_outages"] == 0
    assert any(r["token_expired_during_outage"] for r in results)
    assert any(r["short"] for r in results)
