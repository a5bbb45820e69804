"""Transport security, against real sockets and the real CLI:

- TLS verification cannot be turned off: no flag does it, an unknown `REFRESHER_*`
  variable is a configuration error, and the variables that steer `requests` and
  OpenSSL (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, `SSL_CERT_FILE`, `PYTHONHTTPSVERIFY`)
  empty or bogus never make an untrusted certificate acceptable;
- a certificate from an unknown CA, or for another host name, fails with one clear line;
- plain HTTP is refused unless --allow-insecure-http, whether the http:// comes from the
  flag or from the credentials' `imsEndpoint`;
- a redirect is never followed: the host it points to receives nothing (no client
  secret, no assertion).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ims_emulator import Emulator
from tests.support.harness import Harness

pytestmark = pytest.mark.slow

TLS_VARIABLES = (
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NIX_SSL_CERT_FILE",
    "PYTHONHTTPSVERIFY",
)
UNKNOWN_CA_ENVIRONMENTS: list[dict[str, str]] = [
    {},
    {"REQUESTS_CA_BUNDLE": ""},
    {"CURL_CA_BUNDLE": ""},
    {"REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": ""},
    {"CURL_CA_BUNDLE": "/dev/null"},
    {"REQUESTS_CA_BUNDLE": "/dev/null"},
    {"REQUESTS_CA_BUNDLE": "/etc"},
    {"SSL_CERT_FILE": "/dev/null"},
    {"SSL_CERT_DIR": "/nonexistent"},
    {"PYTHONHTTPSVERIFY": "0"},
    {"REFRESHER_ALLOW_INSECURE_HTTP": "true"},
]


def _one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


def _once(harness: Harness, *extra: str, env: dict[str, str] | None = None) -> Any:
    """`refresher once` with the TLS-steering variables of this machine removed, then `env`
    applied: each case starts from the same, known environment."""
    clean = {k: v for k, v in harness.env().items() if k not in TLS_VARIABLES}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refresher",
            "once",
            "--credentials",
            str(harness.aem),
            "--token-dir",
            str(harness.root / "out"),
            "--retry-timeout",
            "3",
            "--backoff-initial",
            "0.1",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )
    harness.outputs.extend([result.stdout, result.stderr])
    return result


def test_no_flag_turns_verification_off() -> None:
    """The only transport-relaxing flag of any subcommand is --allow-insecure-http."""
    from refresher.cli import COMMANDS

    names = {flag.name for _, flags in COMMANDS.values() for flag in flags}
    suspicious = {n for n in names if re.search(r"verify|insecure|skip|no-tls|tls", n)}
    assert suspicious == {"allow-insecure-http"}


@pytest.mark.parametrize(
    "variable", ["REFRESHER_TLS_VERIFY", "REFRESHER_INSECURE_SKIP_TLS_VERIFY", "REFRESHER_VERIFY"]
)
def test_a_made_up_verify_variable_is_a_configuration_error(
    harness: Harness, variable: str
) -> None:
    """REFRESHER_* variables that name no flag (e.g. a hoped-for TLS switch) exit 2."""
    result = _once(harness, "--ims-endpoint", "https://127.0.0.1:9", env={variable: "false"})
    assert result.returncode == 2
    assert variable in result.stderr and _one_line(result.stderr)


def test_unknown_ca_is_refused_whatever_the_environment(
    harness: Harness, figures: dict[str, Any]
) -> None:
    """An emulator certificate from an unknown CA fails in one line (exit 1, nothing issued)
    with CA-bundle variables empty or bogus; only a real CA file adds trust."""
    emulator = harness.start_emulator(tls=True)
    outcomes = {}
    for env in UNKNOWN_CA_ENVIRONMENTS:
        result = _once(harness, "--ims-endpoint", emulator.base_url, env=env)
        label = ",".join(f"{k}={v!r}" for k, v in env.items()) or "(none)"
        why = result.stderr.strip().rsplit("): ", 1)[-1]
        outcomes[label] = f"exit {result.returncode}: {why[:60]}"
        assert result.returncode == 1, (env, result.stderr)
        assert "TLS verification" in result.stderr and "--ca-bundle" in result.stderr, env
        assert _one_line(result.stderr), result.stderr
        assert emulator.stats()["issued"] == 0
    assert emulator.ca_path is not None
    # requests' documented knob: a CA file named here *replaces* the trust store. It can
    # add trust for a corporate CA; it cannot switch verification off.
    trusted = _once(
        harness,
        "--ims-endpoint",
        emulator.base_url,
        env={"REQUESTS_CA_BUNDLE": str(emulator.ca_path)},
    )
    outcomes["REQUESTS_CA_BUNDLE=<the emulator's CA file>"] = f"exit {trusted.returncode}"
    figures["outcomes"] = outcomes
    assert trusted.returncode == 0


def test_bogus_ca_bundle_path_fails_closed_with_a_clear_line(harness: Harness) -> None:
    """REQUESTS_CA_BUNDLE naming a missing file fails closed, and says so in one line."""
    emulator = harness.start_emulator(tls=True)
    result = _once(
        harness,
        "--ims-endpoint",
        emulator.base_url,
        env={"REQUESTS_CA_BUNDLE": "/nonexistent/ca.pem"},
    )
    assert result.returncode == 1 and emulator.stats()["issued"] == 0
    assert "internal error" not in result.stderr, result.stderr
    assert "CA" in result.stderr and _one_line(result.stderr)


def test_certificate_for_another_host_is_refused(harness: Harness) -> None:
    """A certificate from a trusted CA that does not name the host fails in one line."""
    emulator = harness.start_emulator(tls=True)  # writes the CA and trusts it below
    assert emulator.ca_path is not None
    ca = emulator.ca_path
    emulator.stop()
    other = Emulator.start(harness.credentials, tls=True, host="127.0.0.2")
    harness.emulator = other
    result = _once(harness, "--ims-endpoint", other.base_url, "--ca-bundle", str(ca))
    assert result.returncode == 1
    assert "TLS verification" in result.stderr and _one_line(result.stderr), result.stderr
    assert "127.0.0.2" in result.stderr
    assert other.stats()["issued"] == 0


@pytest.mark.parametrize("env", [{}, {"REFRESHER_ALLOW_INSECURE_HTTP": "false"}])
def test_plain_http_refused_from_flag_or_credentials(harness: Harness, env: dict[str, str]) -> None:
    """http:// is refused before any request, whether given by flag or by the credentials'
    imsEndpoint; with --allow-insecure-http it works."""
    emulator = harness.start_emulator()
    by_flag = _once(harness, "--ims-endpoint", emulator.base_url, env=env)
    assert by_flag.returncode == 2 and "--allow-insecure-http" in by_flag.stderr
    document = json.loads(harness.aem.read_text())
    document["integration"]["imsEndpoint"] = emulator.base_url  # "http://127.0.0.1:port"
    harness.aem.write_text(json.dumps(document))
    by_credentials = _once(harness, env=env)
    assert by_credentials.returncode != 0
    assert "--allow-insecure-http" in by_credentials.stderr
    assert _one_line(by_credentials.stderr)
    assert emulator.stats()["requests"] == {"jwt": 0, "oauth": 0}
    allowed = _once(harness, "--allow-insecure-http", env=env)
    assert allowed.returncode == 0, allowed.stderr


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, status: int, location: str = "") -> None:
        self.status = status
        self.location = location
        self.received: list[tuple[str, str, bytes]] = []
        super().__init__((host, 0), _RecordingHandler)


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.received.append((self.command, self.path, body))
        if self.server.location:
            payload = b""
            self.send_response(self.server.status)
            self.send_header("Location", self.server.location + self.path)
        else:
            # Were the redirect followed, this would look like a token to the client.
            payload = json.dumps(
                {"access_token": "x" * 40, "token_type": "bearer", "expires_in": 86399999}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _any


def _serve(server: _Recorder) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return thread


@pytest.fixture
def redirect_target() -> Iterator[_Recorder]:
    server = _Recorder("127.0.0.2", 200)
    _serve(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_host_carries_nothing(
    harness: Harness, redirect_target: _Recorder, status: int
) -> None:
    """IMS answering a redirect (to a server on another address) is a clear one-line error
    for both flows; the other server receives no request at all."""
    target = f"http://127.0.0.2:{redirect_target.server_address[1]}"
    redirector = _Recorder("127.0.0.1", status, location=target)
    _serve(redirector)
    try:
        for credentials in (harness.aem, harness.oauth):
            result = harness.run(
                "once",
                "--credentials",
                str(credentials),
                "--token-dir",
                str(harness.root / "out"),
                "--ims-endpoint",
                f"http://127.0.0.1:{redirector.server_address[1]}",
                "--allow-insecure-http",
                "--retry-timeout",
                "2",
            )
            assert result.returncode == 1, result.stderr
            assert "redirect" in result.stderr and _one_line(result.stderr), result.stderr
    finally:
        redirector.shutdown()
        redirector.server_close()
    assert len(redirector.received) == 2  # one POST per flow, to the configured endpoint
    assert all(b"client_secret=" in body for _, _, body in redirector.received)
    assert redirect_target.received == []
