"""Operability of the real `refresher run` process through its real HTTP endpoint:
probe transitions, every metric moving, certificate warnings, prompt shutdown,
the --on-refresh hook, and a probe server that garbage and floods cannot break."""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from ims_emulator import AEM_CREDENTIALS_FILE, Emulator
from refresher.server import LIMITS
from tests.support.harness import Harness, read_token, secret_values, wait_until

pytestmark = pytest.mark.slow

METRICS = (
    "refresher_token_expiry_timestamp_seconds",
    "refresher_last_success_timestamp_seconds",
    "refresher_refresh_total",
    "refresher_exchange_duration_seconds",
    "refresher_sink_write_total",
    "refresher_certificate_expiry_timestamp_seconds",
    "refresher_token_valid",
    "refresher_consecutive_failures",
    "refresher_credentials_reload_total",
    "refresher_on_refresh_total",
    "refresher_adopted_total",
    "refresher_build_info",
)
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
FAST_RETRY = ("--backoff-initial", "0.1", "--backoff-max", "0.3")


# ---------------------------------------------------------------- the process and its endpoint


@dataclass
class Running:
    """A `refresher run` subprocess, its probe port and every output line read so far."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    reader: threading.Thread | None = None

    def logs(self) -> list[dict[str, Any]]:
        records = []
        for line in list(self.lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds until exit)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        elapsed = time.monotonic() - started
        if self.reader is not None:
            self.reader.join(5)
        return code, elapsed


Launch = Callable[..., Running]


@pytest.fixture
def launch(harness: Harness) -> Iterator[Launch]:
    """Start `refresher run --listen 127.0.0.1:0`; wait for its port; scan its output at the end."""
    started: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refresher", "run", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=harness.env(env),
        )
        running = Running(proc)
        started.append(running)
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                running.lines.append(line)
                if not ready.is_set() and "serving probes and metrics" in line:
                    running.port = int(json.loads(line)["listen"].rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        running.reader = threading.Thread(target=read, daemon=True)
        running.reader.start()
        assert ready.wait(20), "the probe server did not start"
        assert running.port, "".join(running.lines)
        return running

    try:
        yield start
    finally:
        for running in started:
            if running.proc.poll() is None:
                running.proc.kill()
                running.proc.wait(10)
            if running.reader is not None:
                running.reader.join(5)
            if running.proc.stdout is not None:
                running.proc.stdout.close()
            harness.outputs.append("".join(running.lines))


def _get(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, body, headers = _get(port, path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def _metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text, _ = _get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(port: int, name: str, **labels: str) -> float:
    return _metrics(port)[(name, frozenset(labels.items()))]


def _base_args(h: Harness, out: Path, credentials: Path | None = None) -> list[str]:
    return [
        "--credentials",
        str(credentials or h.aem),
        "--token-dir",
        str(out),
        *h.endpoint_args(),
        *FAST_RETRY,
    ]


def _expires_at(out: Path) -> float:
    text = (out / "expires_at").read_text()
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _not_after(credentials: Path) -> float:
    pem = json.loads(credentials.read_text())["integration"]["publicKey"]
    return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp()


def _ready_with(port: int, predicate: Callable[[int, dict[str, Any]], bool]) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        status, body = _probe(port, "/readyz")
        seen[:] = [body]
        return predicate(status, body)

    wait_until(check, timeout=15, interval=0.03)
    return seen[0]


# ---------------------------------------------------------------- probes


def test_readyz_is_503_before_the_first_token_then_200(harness: Harness, launch: Launch) -> None:
    """/readyz is 503 (no token yet) while IMS is down and 200 once a token is published;
    /healthz is 200 throughout, and no body carries the token."""
    emulator = harness.start_emulator()
    emulator.down()
    out = harness.root / "out"
    running = launch(*_base_args(harness, out))
    body = _ready_with(running.port, lambda s, b: s == 503 and "last_error" in b)
    assert body["ready"] is False
    assert body["reason"] == "no token published yet"
    assert _probe(running.port, "/healthz")[0] == 200
    emulator.up()
    body = _ready_with(running.port, lambda s, _: s == 200)
    token = read_token(out)
    harness.extra_secrets.append(token)
    assert body["ready"] is True
    assert body["expires_at"] == (out / "expires_at").read_text()
    assert "warning" not in body
    status, live = _probe(running.port, "/healthz")
    assert status == 200
    assert live["status"] == "ok"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert token not in _get(running.port, path)[1]
    assert running.stop()[0] == 0


def test_readyz_warns_while_failing_then_503_after_expiry(harness: Harness, launch: Launch) -> None:
    """With 3 s tokens and IMS down: /readyz is 200 with a warning while the token is valid,
    503 once it expired, 200 without warning after IMS returns; /healthz stays 200."""
    emulator = harness.start_emulator(token_ttl_s=3)
    out = harness.root / "out"
    running = launch(*_base_args(harness, out))
    _ready_with(running.port, lambda s, _: s == 200)
    harness.extra_secrets.append(read_token(out))
    emulator.down()
    warned = _ready_with(running.port, lambda s, b: s == 200 and "warning" in b)
    assert warned["ready"] is True
    assert "refresh failing" in warned["warning"]
    assert warned["seconds_left"] > 0
    expired = _ready_with(running.port, lambda s, _: s == 503)
    assert expired["reason"] == "the published token has expired"
    assert "warning" in expired
    assert _probe(running.port, "/healthz")[0] == 200  # an IMS outage is not a restart
    assert _value(running.port, "refresher_token_valid") == 0
    emulator.up()
    recovered = _ready_with(running.port, lambda s, _: s == 200)
    assert "warning" not in recovered
    assert _value(running.port, "refresher_token_valid") == 1
    harness.extra_secrets.append(read_token(out))
    assert running.stop()[0] == 0


# ---------------------------------------------------------------- metrics


def test_metrics_expose_every_metric_and_gauges_match_the_files(
    harness: Harness, launch: Launch
) -> None:
    """/metrics has every metric of refresher/metrics.py; the expiry gauge equals the
    expires_at file and the certificate gauge the certificate's not-after."""
    harness.start_emulator()
    out = harness.root / "out"
    running = launch(*_base_args(harness, out))
    _ready_with(running.port, lambda s, _: s == 200)
    harness.extra_secrets.append(read_token(out))
    status, text, headers = _get(running.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    openmetrics = _get(running.port, "/metrics", headers={"Accept": OPENMETRICS})
    assert openmetrics[2]["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics[1].rstrip().endswith("# EOF")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in METRICS:
        family = families.get(name.removesuffix("_total"))
        assert family is not None, f"{name} missing"
        assert family.samples, f"{name} has no samples"
    samples = _metrics(running.port)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert int(value("refresher_token_expiry_timestamp_seconds")) == _expires_at(out)
    assert value("refresher_certificate_expiry_timestamp_seconds") == _not_after(harness.aem)
    assert abs(value("refresher_last_success_timestamp_seconds") - time.time()) < 30
    assert value("refresher_refresh_total", result="success") == 1
    assert value("refresher_refresh_total", result="retryable_error") == 0
    assert value("refresher_sink_write_total", sink="file", result="success") == 1
    assert value("refresher_exchange_duration_seconds_count", flow="jwt") == 1
    assert value("refresher_token_valid") == 1
    assert value("refresher_consecutive_failures") == 0
    assert value("refresher_credentials_reload_total") == 0
    assert value("refresher_adopted_total", source="file") == 0
    assert [v for (n, _), v in samples.items() if n == "refresher_build_info"] == [1]
    assert running.stop()[0] == 0


def test_refresh_counters_follow_outcomes(harness: Harness, launch: Launch) -> None:
    """retryable_error (503) and permanent_error (invalid_client) counters increment, then
    success; consecutive failures rise during an outage and reset on the next success."""
    emulator = harness.start_emulator(token_ttl_s=3)
    emulator.set_faults(queue=["503", "503", "invalid_client"])
    out = harness.root / "out"
    running = launch(*_base_args(harness, out), "--permanent-retry-interval", "0.5")
    port = running.port

    def counter(result: str) -> float:
        return _value(port, "refresher_refresh_total", result=result)

    wait_until(lambda: counter("success") == 1, timeout=15)
    assert counter("retryable_error") == 2
    assert counter("permanent_error") == 1
    assert _value(port, "refresher_consecutive_failures") == 0
    emulator.down()  # the next refresh, at ~2.4 s, fails until IMS is back
    wait_until(lambda: _value(port, "refresher_consecutive_failures") >= 2, timeout=15)
    assert counter("retryable_error") >= 4
    emulator.up()
    wait_until(lambda: _value(port, "refresher_consecutive_failures") == 0, timeout=15)
    assert counter("success") == 2
    assert counter("permanent_error") == 1
    harness.extra_secrets.append(read_token(out))
    assert running.stop()[0] == 0
    rejected = [r for r in running.logs() if r.get("error") == "invalid_client"]
    assert rejected, "the IMS error code was not logged"


# ---------------------------------------------------------------- certificate expiry


@pytest.mark.parametrize(("days", "level"), [(10, "warning"), (3, "error")])
def test_certificate_expiry_is_warned_and_exported(
    harness: Harness, launch: Launch, days: int, level: str
) -> None:
    """A certificate expiring in 10 days logs a warning, in 3 days an error; `check` prints
    certificate_days_left and the gauge equals the certificate's not-after."""
    fresh = harness.root / "expiring"
    fresh.mkdir()
    harness.emulator = Emulator.start(fresh, cert_days=days)
    harness.extra_secrets.extend(secret_values(fresh))
    credentials = fresh / AEM_CREDENTIALS_FILE
    checked = harness.run("check", "--credentials", str(credentials))
    assert checked.returncode == 0, checked.stderr
    assert f"certificate_days_left: {days}.0" in checked.stdout.splitlines()
    out = harness.root / "out"
    running = launch(*_base_args(harness, out, credentials))
    _ready_with(running.port, lambda s, _: s == 200)
    harness.extra_secrets.append(read_token(out))
    gauge = _value(running.port, "refresher_certificate_expiry_timestamp_seconds")
    assert gauge == _not_after(credentials)
    assert running.stop()[0] == 0
    warnings = [r for r in running.logs() if "certificate" in r["message"]]
    assert warnings
    assert {r["level"] for r in warnings} == {level}
    assert warnings[0]["days_left"] == pytest.approx(days, abs=0.1)


# ---------------------------------------------------------------- shutdown


def _assert_intact(out: Path, token: str) -> None:
    assert (out / "..data").is_symlink()
    assert read_token(out) == token
    assert json.loads((out / "token.json").read_text())["access_token"] == token
    assert (out / "expires_at").read_text()


def test_sigterm_exits_0_within_2s_keeping_the_token(harness: Harness, launch: Launch) -> None:
    """SIGTERM during `run` exits 0 within 2 s and leaves the token directory as it was."""
    harness.start_emulator()
    out = harness.root / "out"
    running = launch(*_base_args(harness, out))
    _ready_with(running.port, lambda s, _: s == 200)
    token = read_token(out)
    harness.extra_secrets.append(token)
    code, elapsed = running.stop()
    assert code == 0
    assert elapsed < 2
    _assert_intact(out, token)
    events = [record.get("event") for record in running.logs()]
    assert events[0] == "starting"
    assert "serving" in events
    assert events.index("stopping") < events.index("stopped")
    stopping = next(r for r in running.logs() if r.get("event") == "stopping")
    assert stopping["reason"] == "SIGTERM"


def test_probes_answer_and_sigterm_exits_while_an_exchange_is_stuck(
    harness: Harness, launch: Launch
) -> None:
    """While an exchange hangs in a 30 s injected delay, probes and /metrics answer at once,
    and SIGTERM still exits 0 within 2 s with the token directory intact."""
    emulator = harness.start_emulator(token_ttl_s=2)
    out = harness.root / "out"
    running = launch(*_base_args(harness, out), "--read-timeout", "60")
    _ready_with(running.port, lambda s, _: s == 200)
    emulator.set_faults(queue=["delay"], delay_seconds=30)
    token = read_token(out)
    harness.extra_secrets.append(token)
    wait_until(lambda: emulator.stats()["faults"].get("delay") == 1, timeout=10)
    for path in ("/healthz", "/readyz", "/metrics"):
        started = time.monotonic()
        status = _get(running.port, path)[0]
        assert time.monotonic() - started < 0.5, path
        assert status in (200, 503)
    assert _probe(running.port, "/healthz")[0] == 200
    code, elapsed = running.stop()
    assert code == 0
    assert elapsed < 2, elapsed
    _assert_intact(out, token)


# ---------------------------------------------------------------- --on-refresh


def _hook(path: Path, body: str) -> str:
    path.write_text(textwrap.dedent(body))
    return f"{sys.executable} {path}"


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead, waiting to be reaped


def test_on_refresh_receives_token_dir_and_expiry(harness: Harness, launch: Launch) -> None:
    """--on-refresh runs after the publish with IMS_TOKEN_DIR and IMS_TOKEN_EXPIRES_AT."""
    harness.start_emulator()
    out = harness.root / "out"
    dump = harness.root / "env.json"
    command = _hook(
        harness.root / "hook.py",
        f"""
        import json, os
        names = ("IMS_TOKEN_DIR", "IMS_TOKEN_EXPIRES_AT")
        with open({str(dump)!r}, "w") as f:
            json.dump({{n: os.environ.get(n) for n in names}}, f)
        """,
    )
    running = launch(*_base_args(harness, out), "--on-refresh", command)
    port = running.port
    wait_until(lambda: _value(port, "refresher_on_refresh_total", result="success") == 1)
    harness.extra_secrets.append(read_token(out))
    env = json.loads(dump.read_text())
    assert env == {
        "IMS_TOKEN_DIR": str(out),
        "IMS_TOKEN_EXPIRES_AT": (out / "expires_at").read_text(),
    }
    assert running.stop()[0] == 0


@pytest.mark.parametrize("outcome", ["error", "timeout"])
def test_failing_or_hanging_on_refresh_is_counted_and_refreshing_goes_on(
    harness: Harness, launch: Launch, outcome: str
) -> None:
    """A hook exiting 1, or hanging past --on-refresh-timeout 1 (killed with its children),
    is logged and counted, and tokens keep refreshing."""
    emulator = harness.start_emulator(token_ttl_s=3)
    out = harness.root / "out"
    pids = harness.root / "pids"
    body = (
        "import sys; sys.exit(1)\n"
        if outcome == "error"
        else f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open({str(pids)!r}, "a") as f:
            f.write(f"{{child.pid}}\\n")
        time.sleep(60)
        """
    )
    command = _hook(harness.root / "hook.py", body)
    running = launch(
        *_base_args(harness, out), "--on-refresh", command, "--on-refresh-timeout", "1"
    )
    port = running.port
    wait_until(lambda: _value(port, "refresher_on_refresh_total", result=outcome) >= 1, timeout=15)
    issued = emulator.stats()["issued"]
    wait_until(lambda: emulator.stats()["issued"] > issued, timeout=15)  # refreshing goes on
    assert _probe(port, "/readyz")[0] == 200
    assert _value(port, "refresher_on_refresh_total", result="success") == 0
    harness.extra_secrets.append(read_token(out))
    assert running.stop()[0] == 0
    expected = "exited 1" if outcome == "error" else "timed out after 1s"
    assert any(expected in r["message"] and r["level"] == "warning" for r in running.logs())
    if outcome == "timeout":
        children = [int(p) for p in pids.read_text().split()]
        assert children
        wait_until(lambda: _dead(children[0]), timeout=5)


# ---------------------------------------------------------------- a server that survives


def _raw(port: int, payload: bytes, timeout: float = 3) -> bytes:
    """Send raw bytes, half-close, and read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # the server closed first: also fine
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_server_survives_garbage_slowloris_and_floods(harness: Harness, launch: Launch) -> None:
    """Random bytes, a 64 KiB request line, an idle client, other methods and hundreds of
    concurrent connections get bounded answers; /healthz still answers at once afterwards."""
    harness.start_emulator()
    out = harness.root / "out"
    running = launch(*_base_args(harness, out))
    port = running.port
    _ready_with(port, lambda s, _: s == 200)
    harness.extra_secrets.append(read_token(out))

    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # sends nothing
    idle_since = time.monotonic()
    started = time.monotonic()
    assert _probe(port, "/healthz")[0] == 200
    assert time.monotonic() - started < 1, "an idle client held up the probe"

    rng = random.Random(7)
    for _ in range(20):
        _raw(port, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
    assert _raw(port, b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    assert _raw(port, b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n").startswith(b"HTTP/1.1 431")
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, _, response_headers = _get(port, "/healthz", method)
        assert (status, response_headers.get("Allow")) == (405, "GET, HEAD"), method
    status, body, _ = _get(port, "/healthz", "HEAD")
    assert (status, body) == (200, "")
    assert _raw(port, b"BREW /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 501")
    assert _get(port, "/nope")[0] == 404

    crowd = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 3 == 0:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never finish
        crowd.append(sock)
    answers: list[int] = []

    def probe() -> None:
        try:
            answers.append(_get(port, "/healthz")[0])
        except OSError:
            answers.append(0)  # refused or reset while the server is full: allowed

    threads = [threading.Thread(target=probe) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert set(answers) <= {200, 0}
    for sock in crowd:
        sock.close()

    wait_until(lambda: _probe(port, "/healthz")[0] == 200, timeout=3)
    started = time.monotonic()
    assert _probe(port, "/readyz")[0] == 200
    assert time.monotonic() - started < 1
    assert idle.recv(1) == b"", "the idle client was not dropped"
    assert time.monotonic() - idle_since < LIMITS.head_timeout_s + 3
    idle.close()
    assert running.proc.poll() is None
    assert running.stop()[0] == 0
    assert "Traceback" not in "".join(running.lines)
