"""The refresh loop with a fake clock: a day of refreshes in milliseconds, failures that
keep the last good token, slow retry on rejection, credentials changes, sink retries.

The IMS side here is `ScriptedIms`, a stand-in for `ImsClient.exchange`: the loop's
decisions are what is under test, and a real emulator cannot follow a fake clock (its
tokens carry real `created_at` times). The real exchange is covered end to end in
test_cli_e2e.py and test_ims_client.py.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from refresher.config import build_settings
from refresher.credentials import Credentials
from refresher.errors import CredentialsError, ExchangeError, PublishError, Rejected, Transient
from refresher.health import HealthState
from refresher.logs import SecretRegistry
from refresher.metrics import Metrics
from refresher.observer import Observer
from refresher.service import Service, Stages, Stopped
from refresher.sinks import Sink
from refresher.sinks.file import FileSink
from refresher.token import AccessToken
from tests.fakes import FakeClock, FakeSleeper


class ScriptedIms:
    """Answers exchanges from a script: a lifetime (success) or an exception to raise."""

    def __init__(self, clock: FakeClock, lifetime_s: float) -> None:
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.script: list[ExchangeError] = []
        self.calls: list[datetime] = []
        self.fail_always: ExchangeError | None = None

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass

    def exchange(self, credentials: Credentials, now: Callable[[], datetime]) -> AccessToken:
        sent = now()
        self.calls.append(sent)
        if self.fail_always is not None:
            raise self.fail_always
        if self.script:
            raise self.script.pop(0)
        return AccessToken(
            value=f"token-{len(self.calls):04d}-{'x' * 16}",
            issued_at=sent,
            expires_at=sent + timedelta(seconds=self.lifetime_s),
            flow="oauth",
            client_id="client-1",
            ims_endpoint="https://ims.example",
        )


class FailingSink:
    """A sink whose publish fails the first `failures` times (disk full, API down)."""

    name = "secret"
    shared = True

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[AccessToken] = []

    def prepare(self) -> None:
        pass

    def read_current(self) -> AccessToken | None:
        return self.published[-1] if self.published else None

    def publish(self, token: AccessToken) -> AccessToken:
        if self.failures > 0:
            self.failures -= 1
            raise PublishError("simulated outage", sink=self.name)
        self.published.append(token)
        return token


@pytest.fixture
def oauth_file(tmp_path: Path) -> Path:
    path = tmp_path / "oauth.json"
    path.write_text(
        '{"client_id": "client-1", "client_secret": "s3cr3t-value-1", "scopes": ["openid"]}'
    )
    return path


def make_service(
    tmp_path: Path,
    credentials: Path,
    clock: FakeClock,
    ims: ScriptedIms,
    extra_sinks: list[Sink] | None = None,
    *,
    file_sink: bool = True,
    **flags: str,
) -> tuple[Service, FileSink, Metrics, HealthState, FakeSleeper]:
    raw: dict[str, str | None] = {
        "credentials": str(credentials),
        "ims_endpoint": "https://ims.example",
        "token_dir": str(tmp_path / "tokens"),
        "watch_interval": "3600",
        **flags,
    }
    settings = build_settings(raw, needs_output=True)
    sleeper = FakeSleeper(clock)
    metrics = Metrics(CollectorRegistry())
    health = HealthState(clock, stall_after_s=7200)
    sink = FileSink(tmp_path / "tokens", clock=clock)
    sinks: list[Sink] = [*([sink] if file_sink else []), *(extra_sinks or [])]
    stages = Stages(clock, sleeper, ims, sinks, SecretRegistry(), rng=random.Random(7))
    service = Service(settings, stages, Observer(clock, metrics, health))
    return service, sink, metrics, health, sleeper


def stop_after(service: Service, clock: FakeClock, sleeper: FakeSleeper, seconds: float) -> None:
    end = clock.now() + timedelta(seconds=seconds)

    def check() -> None:
        if clock.now() >= end:
            service.stop()

    sleeper.on_sleep.append(check)


def test_a_day_of_hourly_tokens_refreshes_on_schedule(tmp_path: Path, oauth_file: Path) -> None:
    """24 h of 1 h tokens: each refresh lands at 70-80 % of the lifetime, never late."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    service, sink, metrics, _, sleeper = make_service(tmp_path, oauth_file, clock, ims)
    stop_after(service, clock, sleeper, 86400)
    assert service.run() == 0
    gaps = [(b - a).total_seconds() for a, b in zip(ims.calls, ims.calls[1:], strict=False)]
    assert 30 <= len(ims.calls) <= 35
    assert all(0.7 * 3600 <= gap <= 0.8 * 3600 + 1 for gap in gaps)
    assert len(set(gaps)) > 1  # jittered, not lock-step
    assert sink.read_current() is not None
    assert metrics.registry.get_sample_value(
        "refresher_refresh_total", {"result": "success"}
    ) == len(ims.calls)


def test_failures_keep_the_last_good_token_until_it_expires(
    tmp_path: Path, oauth_file: Path
) -> None:
    """When IMS fails after the first token, the file keeps it; ready until expiry, then not."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 600)
    service, sink, metrics, health, sleeper = make_service(tmp_path, oauth_file, clock, ims)
    first_expiry: list[datetime] = []
    observed: list[tuple[bool, str | None]] = []

    def after_first() -> None:
        token = sink.read_current()
        if token is not None and not first_expiry:
            first_expiry.append(token.expires_at)
            ims.fail_always = Transient("IMS down", status=503)
        if first_expiry:
            current = sink.read_current()
            observed.append((health.readiness().ok, current.value if current else None))

    sleeper.on_sleep.append(after_first)
    stop_after(service, clock, sleeper, 1200)
    service.run()
    assert first_expiry
    values = {value for _, value in observed}
    assert values == {"token-0001-xxxxxxxxxxxxxxxx"}  # never replaced, never removed
    assert observed[0][0] is True
    assert observed[-1][0] is False  # expired: not ready
    assert (
        metrics.registry.get_sample_value("refresher_refresh_total", {"result": "retryable_error"})
        >= 5
    )
    assert max(sleeper.sleeps[1:]) <= 60  # after the wait until due: backoff capped at 60 s


def test_rejection_is_retried_slowly(tmp_path: Path, oauth_file: Path) -> None:
    """After invalid_client the loop pauses --permanent-retry-interval before trying again."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 600)
    ims.fail_always = Rejected("invalid_client", status=401, error="invalid_client")
    service, _, metrics, _, sleeper = make_service(
        tmp_path, oauth_file, clock, ims, permanent_retry_interval="300"
    )
    stop_after(service, clock, sleeper, 1000)
    service.run()
    gaps = [(b - a).total_seconds() for a, b in zip(ims.calls, ims.calls[1:], strict=False)]
    assert len(ims.calls) == 4
    assert all(gap >= 300 for gap in gaps)
    assert (
        metrics.registry.get_sample_value("refresher_refresh_total", {"result": "permanent_error"})
        == 4
    )


def test_credentials_change_triggers_an_immediate_refresh(tmp_path: Path, oauth_file: Path) -> None:
    """A changed credentials file ends the sleep and mints a token at once."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 86400)
    service, _, metrics, _, sleeper = make_service(
        tmp_path, oauth_file, clock, ims, watch_interval="2"
    )
    changed: list[datetime] = []

    def rotate() -> None:
        if len(ims.calls) == 1 and not changed and clock.now() > ims.calls[0] + timedelta(hours=1):
            oauth_file.write_text(
                '{"client_id": "client-1", "client_secret": "rotated-secret-2",'
                ' "scopes": ["openid"]}'
            )
            changed.append(clock.now())

    sleeper.on_sleep.append(rotate)
    stop_after(service, clock, sleeper, 7200)
    service.run()
    assert len(ims.calls) == 2
    assert (ims.calls[1] - changed[0]).total_seconds() <= 2.0
    assert metrics.registry.get_sample_value("refresher_credentials_reload_total") == 1


def test_failed_sink_is_retried_without_minting_again(tmp_path: Path, oauth_file: Path) -> None:
    """A sink that fails twice gets the same token later; the file sink is not held up."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    flaky = FailingSink(failures=2)
    service, sink, metrics, _, sleeper = make_service(
        tmp_path, oauth_file, clock, ims, extra_sinks=[flaky]
    )
    stop_after(service, clock, sleeper, 600)
    service.run()
    assert len(ims.calls) == 1
    assert flaky.published and flaky.published[0].value == sink.read_current().value  # type: ignore[union-attr]
    sample = metrics.registry.get_sample_value
    assert sample("refresher_sink_write_total", {"sink": "secret", "result": "error"}) == 2
    assert sample("refresher_sink_write_total", {"sink": "file", "result": "success"}) == 1


def test_once_adopts_a_fresh_published_token(tmp_path: Path, oauth_file: Path) -> None:
    """`once` with a fresh token already in the directory mints nothing."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    service, _sink, _metrics, _, _ = make_service(tmp_path, oauth_file, clock, ims)
    assert service.once() == 0
    clock.advance(600)
    again, _, metrics2, _, _ = make_service(tmp_path, oauth_file, clock, ims)
    assert again.once() == 0
    assert len(ims.calls) == 1
    assert metrics2.registry.get_sample_value("refresher_adopted_total", {"source": "file"}) == 1


def test_once_refreshes_a_published_token_that_is_due(tmp_path: Path, oauth_file: Path) -> None:
    """A valid but due token is kept for readers yet replaced by `once`."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    service, _sink, _, _, _ = make_service(tmp_path, oauth_file, clock, ims)
    assert service.once() == 0
    clock.advance(3000)
    again, _, _, _, _ = make_service(tmp_path, oauth_file, clock, ims)
    assert again.once() == 0
    assert len(ims.calls) == 2


def test_not_ready_while_no_sink_accepted_the_token(tmp_path: Path, oauth_file: Path) -> None:
    """A minted token that no sink accepted is not reported ready; it is once a sink takes it."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    flaky = FailingSink(failures=3)
    service, _, metrics, health, sleeper = make_service(
        tmp_path, oauth_file, clock, ims, extra_sinks=[flaky], file_sink=False
    )
    readiness: list[bool] = []
    sleeper.on_sleep.append(lambda: readiness.append(health.readiness().ok))
    stop_after(service, clock, sleeper, 900)
    service.run()
    assert readiness[0] is False
    assert readiness[-1] is True
    assert len(ims.calls) == 1
    assert metrics.registry.get_sample_value("refresher_token_expiry_timestamp_seconds") == (
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
    service, _, _, _, sleeper = make_service(
        tmp_path, oauth_file, clock, ims, retry_timeout="10", watch_interval="1"
    )
    started = clock.monotonic()
    with pytest.raises(ExchangeError) as info:
        service.once()
    assert info.value.status == 429 and info.value.exit_code == 1
    assert clock.monotonic() - started == pytest.approx(10, abs=0.01)
    assert len(ims.calls) == 1
    assert max(sleeper.sleeps) <= 1.0  # in watch-interval slices, none past the deadline


def test_once_records_the_starting_credentials(tmp_path: Path, oauth_file: Path) -> None:
    """Unchanged credentials are never taken for a change: no reload, no early request."""
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    ims.fail_always = Transient("throttled", status=429, retry_after_s=4)
    service, _, metrics, _, _ = make_service(
        tmp_path, oauth_file, clock, ims, retry_timeout="10", watch_interval="0.5"
    )
    with pytest.raises(ExchangeError):
        service.once()
    assert metrics.registry.get_sample_value("refresher_credentials_reload_total") == 0
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
    service, _, _, _, sleeper = make_service(tmp_path, oauth_file, clock, ims, watch_interval="5")
    sleeper.on_sleep.append(lambda: service.stop() if ims.calls else None)
    if command == "run":
        assert service.run() == 0
    else:
        with pytest.raises(Stopped):
            service.once()
    assert len(ims.calls) == 1


def test_a_stable_truncated_file_is_broken_in_once(tmp_path: Path, oauth_file: Path) -> None:
    """`once` on a truncated file that stays so: a permanent credentials error after one
    settle moment (1 s), no IMS request, not a retry until --retry-timeout."""
    oauth_file.write_text(oauth_file.read_text()[:30])
    clock = FakeClock()
    ims = ScriptedIms(clock, 3600)
    service, _, _, _, _ = make_service(tmp_path, oauth_file, clock, ims, retry_timeout="120")
    started = clock.monotonic()
    with pytest.raises(CredentialsError) as info:
        service.once()
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
    service, _, metrics, health, sleeper = make_service(
        tmp_path, oauth_file, clock, ims, extra_sinks=[planted], file_sink=False
    )
    stop_after(service, clock, sleeper, 600)
    assert service.run() == 0
    assert ims.calls  # it tried to mint
    assert not health.readiness().ok
    assert metrics.registry.get_sample_value("refresher_token_expiry_timestamp_seconds") in (
        None,
        0.0,
    )


def _documented_events() -> list[str]:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    table = doc.split("| `event` | when |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \| ", table, flags=re.MULTILINE)


@pytest.mark.parametrize("event", _documented_events())
def test_every_documented_event_is_emitted_by_the_code(event: str) -> None:
    """Each `event` in docs/operations.md is one the observer or the app writes."""
    package = Path(__file__).resolve().parent.parent / "refresher"
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
    service, _, _, _, sleeper = make_service(tmp_path, oauth_file, clock, ims)
    stop_after(service, clock, sleeper, 60)
    assert service.run() == 0
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
    first, _, _, _, _ = make_service(tmp_path / "b", oauth_file, clock, ims)
    assert first.once() == 0
    again, _, _, _, _ = make_service(tmp_path / "b", oauth_file, clock, ims)
    caplog.clear()
    assert again.once() == 0
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
    service, sink, metrics, _, _ = make_service(
        tmp_path, oauth_file, clock, ims, extra_sinks=[RaceSink(winner)]
    )
    assert service.once() == (0 if adopted else 1)
    held = sink.read_current()
    assert held is not None
    assert (held.value == winner.value) is adopted
    errors = metrics.registry.get_sample_value(
        "refresher_sink_write_total", {"sink": "secret", "result": "error"}
    )
    assert (errors == 0) is adopted
