"""Attacks on the refresh loop and its commands (issue 10, items 5, 9, 10, 14, 15 and the
"also attack" list): deadlines that must hold against an IMS asking for an hour's pause,
credentials that are broken rather than half-written, FIFOs among the credentials, an
`http://` endpoint hidden in the credentials, SIGTERM in a retry wait, in a held
exchange and exactly mid-publish, and wall-clock steps of an hour.

Everything is the real CLI against the real emulator or the fake apiserver on loopback,
except where a real event cannot be made on demand: the wall-clock steps use the
injected clock (a test cannot step the machine's clock), and "mid-publish" for the file
sink is a sink that holds its publish open (its own atomicity is pinned by
test_crash_consistency.py). Each test is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from refresher import app
from refresher.clock import EventSleeper, SystemClock
from refresher.config import build_settings
from refresher.credentials import Credentials
from refresher.health import HealthState
from refresher.logs import SecretRegistry
from refresher.metrics import Metrics
from refresher.observer import Observer
from refresher.service import Service, Stages
from refresher.sinks.file import FileSink
from refresher.token import AccessToken
from tests.reliability.support import Refresher, observed_run
from tests.support import scripted
from tests.support.fakeapi import FakeApiServer
from tests.support.fakes import FakeClock
from tests.support.harness import Harness, read_token, wait_until

pytestmark = pytest.mark.slow

NS = "team-a"
SECRET = "adobe-ims-token"


def requests_seen(harness: Harness) -> int:
    assert harness.emulator is not None
    counts = harness.emulator.stats()["requests"]
    return int(counts["jwt"]) + int(counts["oauth"])


def once_args(harness: Harness, credentials: Path, *extra: str) -> list[str]:
    return harness.args("once", credentials, "--token-dir", str(harness.root / "t"), *extra)


def timed(
    harness: Harness, *args: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = harness.run(*args, timeout=timeout)
    return result, time.monotonic() - started


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failing `check`/`once` prints on stderr (no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --------------------------------------------------------------------------- item 5


def test_once_retry_timeout_is_a_deadline_under_retry_after_an_hour(harness: Harness) -> None:
    """IMS answers 429 with Retry-After: 3600; `once --retry-timeout 3` exits 1 at the
    deadline (no sleep runs past it), after one request."""
    emulator = harness.start_emulator()
    emulator.set_faults(fail_rate=1.0, mix=["429"], retry_after=3600)
    result, elapsed = timed(
        harness, *once_args(harness, harness.oauth, "--retry-timeout", "3"), timeout=30
    )
    assert result.returncode == 1, result.stderr
    assert 3 <= elapsed < 5.5
    assert "429" in error_line(result)
    assert requests_seen(harness) == 1


def test_once_sees_no_false_credentials_change(harness: Harness) -> None:
    """With unchanged credentials and a 0.5 s watch interval, `once` logs no "credentials
    changed" and sends no early request: 429 with Retry-After 2 over a 4 s deadline makes
    exactly two requests (at 0 s and 2 s; a third would be at 4 s, past the deadline).
    The deadline leaves the first answer 2 s to come, ample on a loaded machine."""
    emulator = harness.start_emulator()
    emulator.set_faults(fail_rate=1.0, mix=["429"], retry_after=2)
    result, elapsed = timed(
        harness,
        *once_args(harness, harness.oauth, "--retry-timeout", "4", "--watch-interval", "0.5"),
        timeout=30,
    )
    assert result.returncode == 1
    assert elapsed < 6.5
    assert "credentials changed" not in result.stdout
    assert requests_seen(harness) == 2


# --------------------------------------------------------------------------- item 9


def _truncated(harness: Harness) -> Path:
    path = harness.root / "truncated.json"
    text = harness.oauth.read_text()
    path.write_text(text[: len(text) // 2])
    return path


def _empty_dir(harness: Harness) -> Path:
    path = harness.root / "empty"
    path.mkdir()
    return path


BROKEN: dict[str, Callable[[Harness], Path]] = {
    "truncated-json": _truncated,
    "empty-dir": _empty_dir,
}


@pytest.mark.parametrize("command", ["once", "check"])
@pytest.mark.parametrize("make", BROKEN.values(), ids=BROKEN.keys())
def test_broken_credentials_exit_2_within_seconds(
    harness: Harness, command: str, make: Callable[[Harness], Path]
) -> None:
    """A truncated JSON file or an empty directory that stays so is broken, not half-written:
    `once` and `check` exit 2 in a few seconds, not after --retry-timeout (20 s here)."""
    harness.start_emulator()
    credentials = make(harness)
    if command == "once":
        args = once_args(harness, credentials, "--retry-timeout", "20")
    else:
        args = ["check", "--credentials", str(credentials)]
    result, elapsed = timed(harness, *args, timeout=40)
    assert result.returncode == 2, result.stderr
    assert elapsed < 5
    line = error_line(result)
    assert "so broken, not half-written" in line  # (the test's own path says "broken")
    assert str(credentials) in line


def test_run_reports_broken_credentials_and_recovers_when_fixed(harness: Harness) -> None:
    """`run` on a truncated credentials file reports it as broken, is not ready, makes no IMS
    request, and publishes a token soon after the file is fixed."""
    harness.start_emulator()
    credentials = _truncated(harness)
    token_dir = harness.root / "t"
    refresher = Refresher(
        harness,
        *observed_run(credentials, token_dir),
        "--watch-interval",
        "0.5",
        *harness.endpoint_args(),
    )
    wait_until(lambda: bool(refresher.find("broken, not half-written")), timeout=15)
    assert refresher.get("/readyz")[0] == 503
    assert requests_seen(harness) == 0
    credentials.write_text(harness.oauth.read_text())
    wait_until(lambda: (token_dir / "access_token").exists(), timeout=15)
    # Readiness follows the sinks' answer, a moment after the files become visible.
    wait_until(lambda: refresher.get("/readyz")[0] == 200, timeout=5)
    assert refresher.stop() == 0


# --------------------------------------------------------------------------- item 10


@pytest.mark.parametrize("command", ["run", "once"])
def test_sigterm_in_a_retry_wait_makes_no_further_exchange(harness: Harness, command: str) -> None:
    """SIGTERM while waiting out a 30 s Retry-After ends the process within 2 s, and IMS
    sees no further request."""
    emulator = harness.start_emulator()
    emulator.set_faults(fail_rate=1.0, mix=["429"], retry_after=30)
    token_dir = harness.root / "t"
    refresher = Refresher(
        harness,
        command,
        "--credentials",
        str(harness.oauth),
        "--token-dir",
        str(token_dir),
        *harness.endpoint_args(),
    )
    wait_until(lambda: bool(refresher.find("retrying in")), timeout=15)
    signalled = time.monotonic()
    code = refresher.stop(timeout=10)
    assert time.monotonic() - signalled < 2.0
    assert code == (0 if command == "run" else 1)
    time.sleep(0.3)
    assert requests_seen(harness) == 1


def test_sigterm_ends_once_while_an_exchange_is_held(harness: Harness) -> None:
    """SIGTERM while IMS holds the answer (30 s) ends `once` within 2 s, exit 1 (no token)."""
    emulator = harness.start_emulator()
    emulator.set_faults(fail_rate=1.0, mix=["delay"], delay_seconds=30)
    refresher = Refresher(
        harness,
        *once_args(harness, harness.oauth, "--read-timeout", "60", "--retry-timeout", "100"),
    )
    wait_until(lambda: requests_seen(harness) >= 1, timeout=15)
    time.sleep(0.3)  # the exchange is now waiting on the answer
    signalled = time.monotonic()
    code = refresher.stop(timeout=10)
    assert time.monotonic() - signalled < 2.0
    assert code == 1
    assert not (harness.root / "t" / "access_token").exists()


# --------------------------------------------------------------------------- item 14


@pytest.mark.parametrize("command", ["check", "once", "run"])
def test_plain_http_endpoint_in_the_credentials_is_the_same_verdict_everywhere(
    harness: Harness, command: str
) -> None:
    """An http:// imsEndpoint inside the credentials, without --allow-insecure-http: exit 2
    with the same one-line reason from check, once and run (run used to retry forever)."""
    document = json.loads(harness.oauth.read_text())
    document["ims_endpoint"] = "http://127.0.0.1:9"
    credentials = harness.root / "plain-http.json"
    credentials.write_text(json.dumps(document))
    args = [command, "--credentials", str(credentials)]
    if command != "check":
        args += ["--token-dir", str(harness.root / "t")]
    result, elapsed = timed(harness, *args, timeout=30)
    assert result.returncode == 2
    assert elapsed < 10
    needle = (
        "the IMS endpoint in the credentials http://127.0.0.1:9 is plain HTTP: "
        "pass --allow-insecure-http"
    )
    assert needle in result.stdout + result.stderr
    if command != "run":  # run reports through its log on stdout
        assert needle in error_line(result)


# --------------------------------------------------------------------------- item 15


def _fifo_in_plain_dir(harness: Harness) -> Path:
    document = json.loads(harness.oauth.read_text())
    directory = harness.root / "fields"
    directory.mkdir()
    (directory / "client_id").write_text(document["client_id"])
    (directory / "scopes").write_text(",".join(document["scopes"]))
    os.mkfifo(directory / "client_secret")
    return directory


def _fifo_in_kubelet_dir(harness: Harness) -> Path:
    directory = harness.root / "volume"
    snapshot = directory / "..2026_12_01_00_00_00.1"
    snapshot.mkdir(parents=True)
    os.mkfifo(snapshot / "credentials.json")
    (directory / "..data").symlink_to(snapshot.name)
    (directory / "credentials.json").symlink_to("..data/credentials.json")
    return directory


FIFOS: dict[str, Callable[[Harness], Path]] = {
    "plain-dir": _fifo_in_plain_dir,
    "kubelet-data-dir": _fifo_in_kubelet_dir,
}


@pytest.mark.parametrize("command", ["check", "once", "run"])
@pytest.mark.parametrize("make", FIFOS.values(), ids=FIFOS.keys())
def test_a_fifo_among_the_credentials_never_hangs(
    harness: Harness, command: str, make: Callable[[Harness], Path]
) -> None:
    """A FIFO among the credentials files (plain directory or kubelet's ..data layout) is a
    credentials error, exit 2 at once, in every subcommand; it never blocks a read."""
    credentials = make(harness)
    args = [command, "--credentials", str(credentials)]
    if command != "check":
        args += ["--token-dir", str(harness.root / "t"), "--ims-endpoint", "http://127.0.0.1:9"]
        args += ["--allow-insecure-http"]
    result, elapsed = timed(harness, *args, timeout=15)
    assert result.returncode == 2
    assert elapsed < 8
    assert "is not a regular file" in result.stdout + result.stderr


# --------------------------------------------------------------------------- mid-publish


def test_sigterm_mid_publish_to_the_secret_finishes_the_publish(
    harness: Harness, tmp_path: Path
) -> None:
    """SIGTERM arrives while the apiserver holds the Secret's create: the create completes,
    the token dir gets the same token, and `run` exits 0 within 2 s."""
    harness.start_emulator()
    token_dir = harness.root / "t"
    with FakeApiServer((NS,)) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", NS)
        refresher = Refresher(
            harness,
            *harness.args(
                "run",
                harness.oauth,
                "--token-dir",
                str(token_dir),
                "--secret",
                SECRET,
                "--secret-namespace",
                NS,
            ),
            env={"KUBECONFIG": str(kubeconfig)},
        )
        signalled: list[float] = []

        def terminate_then_answer(_: FakeApiServer) -> None:
            refresher.proc.send_signal(signal.SIGTERM)
            signalled.append(time.monotonic())
            time.sleep(0.5)  # the create is still in flight when the handler runs

        api.before_next("POST", terminate_then_answer)
        wait_until(lambda: bool(signalled), timeout=20)
        refresher.proc.wait(timeout=10)
        assert time.monotonic() - signalled[0] < 2.0
        assert refresher.stop() == 0
        data = api.secret_data(NS, SECRET)
    value = data["access_token"].decode()
    harness.extra_secrets.append(value)
    assert read_token(token_dir) == value


class _HeldSink:
    """The real FileSink, whose publish is held open until the test lets it go."""

    name = "file"
    shared = False

    def __init__(self, inner: FileSink) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished_at: float | None = None

    def prepare(self) -> None:
        self.inner.prepare()

    def read_current(self) -> AccessToken | None:
        return self.inner.read_current()

    def publish(self, token: AccessToken) -> AccessToken:
        self.entered.set()
        self.release.wait(10)
        held = self.inner.publish(token)
        self.finished_at = time.monotonic()
        return held


class _OneHourIms:
    """Real-time stand-in for IMS (the emulator's own path is covered above): 1 h tokens."""

    def __init__(self) -> None:
        self.calls = 0

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass

    def exchange(self, credentials: Credentials, now: Callable[[], datetime]) -> AccessToken:
        self.calls += 1
        sent = now()
        return AccessToken(
            f"token-{self.calls}-{'y' * 24}",
            sent,
            sent + timedelta(hours=1),
            "oauth",
            "client-1",
            "https://ims.example",
        )


def _held_service(tmp_path: Path, oauth_file: Path) -> tuple[Service, _HeldSink]:
    settings = build_settings(
        {"credentials": str(oauth_file), "token_dir": str(tmp_path / "tokens")},
        needs_output=True,
    )
    clock = SystemClock()
    sink = _HeldSink(FileSink(tmp_path / "tokens", clock=clock))
    stages = Stages(clock, EventSleeper(), _OneHourIms(), [sink], SecretRegistry())
    observer = Observer(clock, Metrics(CollectorRegistry()), HealthState(clock, stall_after_s=60))
    service = Service(settings, stages, observer)
    return service, sink


@pytest.mark.parametrize(("hold_s", "published"), [(0.4, True), (4.0, False)])
def test_stop_mid_file_publish_finishes_it_or_leaves_the_previous_state(
    tmp_path: Path, hold_s: float, published: bool
) -> None:
    """A stop (what SIGTERM's handler does) while the file sink is inside its publish: a
    publish that ends within the grace completes before the exit (exit 0, token in place);
    one that does not is left behind after ~2 s, and the directory keeps its previous
    complete state (here: nothing). In-process: the handler's two calls are made here."""
    oauth = tmp_path / "oauth.json"
    oauth.write_text('{"client_id": "client-1", "client_secret": "s3cr3t-v", "scopes": ["a"]}')
    service, sink = _held_service(tmp_path, oauth)
    wake_main = threading.Event()
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(app.run_loop(service, None, wake_main)))
    runner.start()
    assert sink.entered.wait(10)
    stopped = time.monotonic()
    service.stop()
    wake_main.set()
    timer = threading.Timer(hold_s, sink.release.set)
    timer.start()
    runner.join(10)
    returned = time.monotonic()
    assert result == [0]
    assert returned - stopped < 2.2
    token_file = tmp_path / "tokens" / "access_token"
    if published:
        assert sink.finished_at is not None and sink.finished_at <= returned
        assert token_file.read_text().startswith("token-1-")
    else:
        assert not token_file.exists()
    timer.cancel()
    sink.release.set()


# --------------------------------------------------------------------------- clock steps
# A test cannot step the machine's wall clock: these use the injected clock
# (tests/support/fakes.py), whose wall time steps while its monotonic time does not,
# exactly as after an NTP step.


@dataclass
class _Stepped:
    calls: list[datetime]
    """When IMS was called, on the (stepped) wall clock."""
    stepped_at: datetime
    """The wall clock just after the step."""
    expired_seen: list[str]
    """Instants at which the file held an expired token (one per sleep slice)."""


def _stepped_run(tmp_path: Path, step_s: float) -> _Stepped:
    """`run` with 1 h tokens; 10 min after the first token the wall clock steps by
    `step_s`; 3 h of monotonic time pass."""
    oauth = tmp_path / "oauth.json"
    oauth.write_text('{"client_id": "client-1", "client_secret": "s3cr3t-v", "scopes": ["a"]}')
    clock = FakeClock()
    ims = scripted.ScriptedIms(clock, 3600)
    rig = scripted.make_service(tmp_path, oauth, clock, ims, watch_interval="5")
    stepped: list[datetime] = []
    expired_seen: list[str] = []
    mono_end = clock.monotonic() + 3 * 3600

    def observe() -> None:
        if ims.calls and not stepped and clock.monotonic() >= 1000 + 600:
            clock.step_wall(step_s)
            stepped.append(clock.now())
        held = rig.sink.read_current()
        if held is not None and not held.is_valid(clock.now()):
            expired_seen.append(clock.now().isoformat())
        if clock.monotonic() >= mono_end:
            rig.service.stop()

    rig.sleeper.on_sleep.append(observe)
    assert rig.service.run() == 0
    assert clock.monotonic() >= mono_end
    return _Stepped(ims.calls, stepped[0], expired_seen)


def test_wall_clock_step_forward_refreshes_once_within_the_watch_interval(tmp_path: Path) -> None:
    """The wall clock jumps 1 h ahead 10 min after a 1 h token was issued (so it now looks
    expired): one refresh within --watch-interval, no mint storm, and no expired token is
    left published for longer than that."""
    run = _stepped_run(tmp_path, +3600)
    after = [call for call in run.calls if call >= run.stepped_at]
    assert after and (after[0] - run.stepped_at).total_seconds() <= 5.0
    # 3 h of real time with 1 h tokens refreshed at 70-80 %: 4 or 5 mints, not a storm.
    assert len(run.calls) <= 6
    assert len(run.expired_seen) <= 1  # the slice in which the step happened


def test_wall_clock_step_back_keeps_the_refresh_on_time(tmp_path: Path) -> None:
    """The wall clock jumps 1 h back: the refresh still comes at 70-80 % of the token's life
    as the monotonic clock measures it (the token lives by IMS's clock, not ours), not an
    hour late; no mint storm."""
    run = _stepped_run(tmp_path, -3600)
    assert len(run.calls) >= 2
    # In monotonic terms the second call came 0.7-0.8 h after the first; on the stepped wall
    # clock that reads as 1 h earlier.
    gap = (run.calls[1] - run.calls[0]).total_seconds() + 3600
    assert 0.7 * 3600 <= gap <= 0.8 * 3600 + 1
    assert len(run.calls) <= 6
    assert not run.expired_seen
