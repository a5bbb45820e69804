"""The refresh loop with a fake clock: a day of refreshes in milliseconds, failures that
keep the last good token, slow retry on rejection, credentials changes, sink retries.

The IMS side here is `ScriptedIms` (tests/support/scripted.py), a stand-in for
`ImsClient.exchange`: the loop's decisions are what is under test, and a real emulator
cannot follow a fake clock (its tokens carry real `created_at` times). The real exchange
is covered end to end in tests/e2e/test_cli_e2e.py and tests/unit/test_ims_client.py.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from refresher.errors import CredentialsError, ExchangeError, Rejected, Transient
from refresher.service import Stopped
from refresher.token import AccessToken
from tests.support.fakes import FakeClock
from tests.support.scripted import FailingSink, ScriptedIms, make_service, stop_after


@pytest.fixture
def oauth_file(tmp_path: Path) -> Path:
    path = tmp_path / "oauth.json"
    path.write_text(
        '{"client_id": "client-1", "client_secret": "s3cr3t-value-1", "scopes": ["openid"]}'
    )
    return path


def test_a_day_of_hourly_tokens_refreshes_on_schedule(tmp_path: Path, oauth_file: Path) -> None:
    """24 h of 1 h tokens: each refresh lands at 70-80 % of the lifetime, never late."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    rig = make_service(tmp_path, oauth_file, clock, ims)
    stop_after(rig.service, clock, rig.sleeper, 86400)
    assert rig.service.run() == 0
    gaps = [(b - a).total_seconds() for a, b in zip(ims.calls, ims.calls[1:], strict=False)]
    assert 30 <= len(ims.calls) <= 35
    assert all(0.7 * 3600 <= gap <= 0.8 * 3600 + 1 for gap in gaps)
    assert len(set(gaps)) > 1  # jittered, not lock-step
    assert rig.sink.read_current() is not None
    assert rig.metrics.registry.get_sample_value(
        "refresher_refresh_total", {"result": "success"}
    ) == len(ims.calls)


def test_failures_keep_the_last_good_token_until_it_expires(
    tmp_path: Path, oauth_file: Path
) -> None:
    """When IMS fails after the first token, the file keeps it; ready until expiry, then not."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 600)
    rig = make_service(tmp_path, oauth_file, clock, ims)
    first_expiry: list[datetime] = []
    observed: list[tuple[bool, str | None]] = []

    def after_first() -> None:
        token = rig.sink.read_current()
        if token is not None and not first_expiry:
            first_expiry.append(token.expires_at)
            ims.fail_always = Transient("IMS down", status=503)
        if first_expiry:
            current = rig.sink.read_current()
            observed.append((rig.health.readiness().ok, current.value if current else None))

    rig.sleeper.on_sleep.append(after_first)
    stop_after(rig.service, clock, rig.sleeper, 1200)
    rig.service.run()
    assert first_expiry
    values = {value for _, value in observed}
    assert values == {"token-0001-xxxxxxxxxxxxxxxx"}  # never replaced, never removed
    assert observed[0][0] is True
    assert observed[-1][0] is False  # expired: not ready
    assert (
        rig.metrics.registry.get_sample_value(
            "refresher_refresh_total", {"result": "retryable_error"}
        )
        >= 5
    )
    assert max(rig.sleeper.sleeps[1:]) <= 60  # after the wait until due: backoff capped at 60 s


def test_rejection_is_retried_slowly(tmp_path: Path, oauth_file: Path) -> None:
    """After invalid_client the loop pauses --permanent-retry-interval before trying again."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 600)
    ims.fail_always = Rejected("invalid_client", status=401, error="invalid_client")
    rig = make_service(tmp_path, oauth_file, clock, ims, permanent_retry_interval="300")
    stop_after(rig.service, clock, rig.sleeper, 1000)
    rig.service.run()
    gaps = [(b - a).total_seconds() for a, b in zip(ims.calls, ims.calls[1:], strict=False)]
    assert len(ims.calls) == 4
    assert all(gap >= 300 for gap in gaps)
    assert (
        rig.metrics.registry.get_sample_value(
            "refresher_refresh_total", {"result": "permanent_error"}
        )
        == 4
    )


def test_credentials_change_triggers_an_immediate_refresh(tmp_path: Path, oauth_file: Path) -> None:
    """A changed credentials file ends the sleep and mints a token at once."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 86400)
    rig = make_service(tmp_path, oauth_file, clock, ims, watch_interval="2")
    changed: list[datetime] = []

    def rotate() -> None:
        if len(ims.calls) == 1 and not changed and clock.now() > ims.calls[0] + timedelta(hours=1):
            oauth_file.write_text(
                '{"client_id": "client-1", "client_secret": "rotated-secret-2",'
                ' "scopes": ["openid"]}'
            )
            changed.append(clock.now())

    rig.sleeper.on_sleep.append(rotate)
    stop_after(rig.service, clock, rig.sleeper, 7200)
    rig.service.run()
    assert len(ims.calls) == 2
    assert (ims.calls[1] - changed[0]).total_seconds() <= 2.0
    assert rig.metrics.registry.get_sample_value("refresher_credentials_reload_total") == 1


def test_failed_sink_is_retried_without_minting_again(tmp_path: Path, oauth_file: Path) -> None:
    """A sink that fails twice gets the same token later; the file sink is not held up."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    flaky = FailingSink(failures=2)
    rig = make_service(tmp_path, oauth_file, clock, ims, extra_sinks=[flaky])
    stop_after(rig.service, clock, rig.sleeper, 600)
    rig.service.run()
    assert len(ims.calls) == 1
    assert flaky.published and flaky.published[0].value == rig.sink.read_current().value  # type: ignore[union-attr]
    sample = rig.metrics.registry.get_sample_value
    assert sample("refresher_sink_write_total", {"sink": "secret", "result": "error"}) == 2
    assert sample("refresher_sink_write_total", {"sink": "file", "result": "success"}) == 1


def test_once_adopts_a_fresh_published_token(tmp_path: Path, oauth_file: Path) -> None:
    """`once` with a fresh token already in the directory mints nothing."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    rig = make_service(tmp_path, oauth_file, clock, ims)
    assert rig.service.once() == 0
    clock.advance(600)
    again = make_service(tmp_path, oauth_file, clock, ims)
    assert again.service.once() == 0
    assert len(ims.calls) == 1
    assert (
        again.metrics.registry.get_sample_value("refresher_adopted_total", {"source": "file"}) == 1
    )


def test_once_refreshes_a_published_token_that_is_due(tmp_path: Path, oauth_file: Path) -> None:
    """A valid but due token is kept for readers yet replaced by `once`."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    rig = make_service(tmp_path, oauth_file, clock, ims)
    assert rig.service.once() == 0
    clock.advance(3000)
    again = make_service(tmp_path, oauth_file, clock, ims)
    assert again.service.once() == 0
    assert len(ims.calls) == 2


def test_not_ready_while_no_sink_accepted_the_token(tmp_path: Path, oauth_file: Path) -> None:
    """A minted token that no sink accepted is not reported ready; it is once a sink takes it."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    flaky = FailingSink(failures=3)
    rig = make_service(tmp_path, oauth_file, clock, ims, extra_sinks=[flaky], file_sink=False)
    readiness: list[bool] = []
    rig.sleeper.on_sleep.append(lambda: readiness.append(rig.health.readiness().ok))
    stop_after(rig.service, clock, rig.sleeper, 900)
    rig.service.run()
    assert readiness[0] is False
    assert readiness[-1] is True
    assert len(ims.calls) == 1
    assert rig.metrics.registry.get_sample_value("refresher_token_expiry_timestamp_seconds") == (
        flaky.published[0].expires_at.timestamp()
    )


def test_once_deadline_holds_against_a_retry_after_of_an_hour(
    tmp_path: Path, oauth_file: Path
) -> None:
    """429 with Retry-After 3600 and --retry-timeout 10: `once` sleeps until the deadline,
    not past it, and gives up with IMS's error (exit 1) after one request."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    ims.fail_always = Transient("throttled", status=429, retry_after_s=3600)
    rig = make_service(tmp_path, oauth_file, clock, ims, retry_timeout="10", watch_interval="1")
    started = clock.monotonic()
    with pytest.raises(ExchangeError) as info:
        rig.service.once()
    assert info.value.status == 429 and info.value.exit_code == 1
    assert clock.monotonic() - started == pytest.approx(10, abs=0.01)
    assert len(ims.calls) == 1
    assert max(rig.sleeper.sleeps) <= 1.0  # in watch-interval slices, none past the deadline


def test_once_records_the_starting_credentials(tmp_path: Path, oauth_file: Path) -> None:
    """Unchanged credentials are never taken for a change: no reload, no early request."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    ims.fail_always = Transient("throttled", status=429, retry_after_s=4)
    rig = make_service(tmp_path, oauth_file, clock, ims, retry_timeout="10", watch_interval="0.5")
    with pytest.raises(ExchangeError):
        rig.service.once()
    assert rig.metrics.registry.get_sample_value("refresher_credentials_reload_total") == 0
    gaps = [(b - a).total_seconds() for a, b in zip(ims.calls, ims.calls[1:], strict=False)]
    assert len(ims.calls) == 3 and all(gap >= 4 for gap in gaps)


@pytest.mark.parametrize("command", ["run", "once"])
def test_stop_during_a_retry_wait_makes_no_further_exchange(
    tmp_path: Path, oauth_file: Path, command: str
) -> None:
    """A stop while waiting out a backoff ends the wait and no IMS call follows."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    ims.fail_always = Transient("IMS down", status=503, retry_after_s=30)
    rig = make_service(tmp_path, oauth_file, clock, ims, watch_interval="5")
    rig.sleeper.on_sleep.append(lambda: rig.service.stop() if ims.calls else None)
    if command == "run":
        assert rig.service.run() == 0
    else:
        with pytest.raises(Stopped):
            rig.service.once()
    assert len(ims.calls) == 1


def test_a_stable_truncated_file_is_broken_in_once(tmp_path: Path, oauth_file: Path) -> None:
    """`once` on a truncated file that stays so: a permanent credentials error after one
    settle moment (1 s), no IMS request, not a retry until --retry-timeout."""
    oauth_file.write_text(oauth_file.read_text()[:30])
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    rig = make_service(tmp_path, oauth_file, clock, ims, retry_timeout="120")
    started = clock.monotonic()
    with pytest.raises(CredentialsError) as info:
        rig.service.once()
    assert info.value.exit_code == 2 and "so broken, not half-written" in str(info.value)
    assert clock.monotonic() - started <= 2
    assert not ims.calls


class PlantedSink(FailingSink):
    """A sink that holds whatever token was planted in it (no plausibility check of its own)."""

    def __init__(self, planted: AccessToken) -> None:
        super().__init__(failures=0)
        self.published.append(planted)


def test_a_forged_year_9999_token_in_a_sink_is_never_made_current(
    tmp_path: Path, oauth_file: Path
) -> None:
    """Even from a sink that does not check plausibility, a year-9999 token is not taken as
    current: with IMS down the refresher is not ready (it would be "ready forever")."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    ims.fail_always = Transient("IMS down", status=503)
    forged = AccessToken(
        value="forged-" + "f" * 20,
        issued_at=clock.now() - timedelta(minutes=1),
        expires_at=clock.now().replace(year=9999),
        flow="oauth",
        client_id="client-1",
        ims_endpoint="https://ims.example",
    )
    planted = PlantedSink(forged)
    rig = make_service(tmp_path, oauth_file, clock, ims, extra_sinks=[planted], file_sink=False)
    stop_after(rig.service, clock, rig.sleeper, 600)
    assert rig.service.run() == 0
    assert ims.calls  # it tried to mint
    assert not rig.health.readiness().ok
    assert rig.metrics.registry.get_sample_value("refresher_token_expiry_timestamp_seconds") in (
        None,
        0.0,
    )


def _documented_events() -> list[str]:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    table = doc.split("| `event` | when |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \| ", table, flags=re.MULTILINE)


@pytest.mark.parametrize("event", _documented_events())
def test_every_documented_event_is_emitted_by_the_code(event: str) -> None:
    """Each `event` in docs/operations.md is one the observer or the app writes."""
    package = Path(__file__).resolve().parents[2] / "refresher"
    sources = (package / "observer.py").read_text() + (package / "app.py").read_text()
    assert f'"{event}"' in sources


def test_a_refresh_cycle_logs_its_events(
    tmp_path: Path, oauth_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mint, its publish, the schedule, a failure and the stop each log their event."""
    caplog.set_level(logging.INFO, logger="refresher")
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    ims.script.append(Transient("IMS down", status=503))
    rig = make_service(tmp_path, oauth_file, clock, ims)
    stop_after(rig.service, clock, rig.sleeper, 60)
    assert rig.service.run() == 0
    events = [getattr(r, "event", None) for r in caplog.records]
    for expected in (
        "refresh_failed",
        "retry_scheduled",
        "token_minted",
        "published",
        "refresh_scheduled",
        "stopped",
    ):
        assert expected in events
    assert events.index("token_minted") < events.index("published")
    first = make_service(tmp_path / "b", oauth_file, clock, ims)
    assert first.service.once() == 0
    again = make_service(tmp_path / "b", oauth_file, clock, ims)
    caplog.clear()
    assert again.service.once() == 0
    assert "token_adopted" in [getattr(r, "event", None) for r in caplog.records]


class RaceSink(FailingSink):
    """A shared sink that reports another writer's token instead of ours (a lost race)."""

    def __init__(self, winner: AccessToken) -> None:
        super().__init__(failures=0)
        self.winner = winner

    def publish(self, token: AccessToken) -> AccessToken:
        return self.winner


@pytest.mark.parametrize(
    ("client_id", "ims_endpoint", "adopted"),
    [
        ("client-1", "https://ims.example", True),
        ("client-2", "https://ims.example", False),
        ("client-1", "https://ims-stage.example", False),
    ],
)
def test_a_lost_race_adopts_only_a_token_the_one_rule_accepts(
    tmp_path: Path, oauth_file: Path, client_id: str, ims_endpoint: str, adopted: bool
) -> None:
    """After a lost write race the winner's token is adopted only if it is ours (same
    client, same IMS base URL) and outlives ours; another's is a failed publish, never
    made current nor copied to the file."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    winner = AccessToken(
        value="winner-" + "w" * 20,
        issued_at=clock.now(),
        expires_at=clock.now() + timedelta(hours=1, minutes=1),
        flow="oauth",
        client_id=client_id,
        ims_endpoint=ims_endpoint,
    )
    rig = make_service(tmp_path, oauth_file, clock, ims, extra_sinks=[RaceSink(winner)])
    assert rig.service.once() == (0 if adopted else 1)
    held = rig.sink.read_current()
    assert held is not None
    assert (held.value == winner.value) is adopted
    errors = rig.metrics.registry.get_sample_value(
        "refresher_sink_write_total", {"sink": "secret", "result": "error"}
    )
    assert (errors == 0) is adopted
