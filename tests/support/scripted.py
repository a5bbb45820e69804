"""The refresh loop wired for tests: a scripted IMS (`ScriptedIms`, a stand-in for
`ImsClient.exchange` that follows the fake clock; a real emulator cannot, its tokens carry
real `created_at` times), a sink that fails on demand, and `make_service`, which builds a
`Service` on a fake clock and returns it with the parts a test watches (a `LoopRig`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from refresher.config import build_settings
from refresher.credentials import Credentials
from refresher.errors import ExchangeError, PublishError
from refresher.health import HealthState
from refresher.logs import SecretRegistry
from refresher.metrics import Metrics
from refresher.observer import Observer
from refresher.service import Service, Stages
from refresher.sinks import Sink
from refresher.sinks.file import FileSink
from refresher.token import AccessToken
from tests.support.fakes import FakeClock, FakeSleeper


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


@dataclass(frozen=True)
class LoopRig:
    """A `Service` and the parts a test watches: its file sink, metrics, health and sleeper."""

    service: Service
    sink: FileSink
    metrics: Metrics
    health: HealthState
    sleeper: FakeSleeper


def make_service(
    tmp_path: Path,
    credentials: Path,
    clock: FakeClock,
    ims: ScriptedIms,
    extra_sinks: list[Sink] | None = None,
    *,
    file_sink: bool = True,
    **flags: str,
) -> LoopRig:
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
    return LoopRig(service, sink, metrics, health, sleeper)


def stop_after(service: Service, clock: FakeClock, sleeper: FakeSleeper, seconds: float) -> None:
    end = clock.now() + timedelta(seconds=seconds)

    def check() -> None:
        if clock.now() >= end:
            service.stop()

    sleeper.on_sleep.append(check)
