"""Secret hygiene at --log-level debug: everything the refresher writes (stdout, stderr) and
serves (/metrics, /readyz, /healthz) is scanned for the client secrets, the private-key
lines and header, anything JWT-shaped (assertions, access tokens) and the access tokens
by value, while it goes through every IMS fault, a revoked client secret, a permanent
rejection and a TLS failure. The other reliability suites run the same scan over their
own (debug) output; the harness scans all CLI output at teardown as well.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.support.harness import Harness, wait_until

from .support import Refresher, TokenBook, client_ids, observed_run, scan_for_secrets

pytestmark = pytest.mark.slow

ALL_FAULTS = ["500", "502", "503", "504", "429", "delay", "drop", "badjson", "html"]


def _clean(hits: dict[str, int]) -> bool:
    return all(v == 0 for k, v in hits.items() if k != "bytes_scanned")


def test_debug_output_metrics_and_probes_hold_no_secret(
    harness: Harness, figures: dict[str, Any]
) -> None:
    """`run` at debug through every fault kind and a revoked first client secret, `once`
    rejected (exit 3) and refused by TLS (exit 1), `check`: zero secrets anywhere."""
    emulator = harness.start_emulator(token_ttl_s=2)
    oauth = json.loads(harness.oauth.read_text())
    emulator.register_client(oauth["client_id"], [oauth["client_secrets"][1]])  # #1 revoked
    emulator.set_faults(queue=ALL_FAULTS, retry_after=0, delay_seconds=0.6)
    book = TokenBook(emulator, client_ids(harness))
    out = harness.root / "tokens"
    texts: list[str] = []
    for credentials in (harness.aem, harness.oauth):
        refresher = Refresher(
            harness,
            *observed_run(credentials, out),
            "--read-timeout",
            "0.3",
            "--backoff-initial",
            "0.05",
            "--backoff-max",
            "0.2",
            *harness.endpoint_args(),
        )
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for path in ("/metrics", "/readyz", "/healthz", "/nope"):
                refresher.get(path)
            if (out / "access_token").exists():
                book.expiry((out / "access_token").read_text())
            time.sleep(0.2)
        assert refresher.stop() == 0
        texts += [refresher.output, *refresher.fetched]
        emulator.set_faults(queue=ALL_FAULTS)
    issued = emulator.stats()["issued"]
    assert issued >= 4
    # A permanent rejection (both secrets revoked) and a TLS failure, at debug level.
    emulator.register_client(oauth["client_id"], ["revoked-for-good-0000"])
    emulator.set_faults(queue=[])
    rejected = harness.run(
        "once",
        "--credentials",
        str(harness.oauth),
        "--token-dir",
        str(harness.root / "out-rejected"),
        "--log-level",
        "debug",
        *harness.endpoint_args(),
    )
    assert rejected.returncode == 3
    tls = harness.start_emulator(tls=True)
    refused = harness.run(
        "once",
        "--credentials",
        str(harness.aem),
        "--token-dir",
        str(harness.root / "out-tls"),
        "--ims-endpoint",
        tls.base_url,
        "--log-level",
        "debug",
    )
    assert refused.returncode == 1
    check = harness.run("check", "--credentials", str(harness.aem), "--log-level", "debug")
    texts += [rejected.stdout, rejected.stderr, refused.stdout, refused.stderr, check.stdout]
    hits = scan_for_secrets(texts, harness.credentials, book.values())
    figures.update(
        {
            "tokens_issued_to_run": issued,
            "known_access_tokens": len(book.values()),
            "outputs_scanned": len(texts),
            "scan": hits,
        }
    )
    assert _clean(hits), hits


class _EchoingIms(ThreadingHTTPServer):
    """A broken or hostile 'IMS' that quotes what it received in its error answer."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(BaseHTTPRequestHandler):
    server: _EchoingIms

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        form = {k: v[0] for k, v in parse_qs(body).items()}
        self.server.received.append(form)
        quoted = f"{form.get('client_secret')} {form.get('jwt_token', '')}"
        payload = json.dumps({"error": "invalid_client", "error_description": quoted}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-debug-id", form.get("client_secret", "-"))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def echoing_ims() -> Iterator[_EchoingIms]:
    server = _EchoingIms()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_ims_quoting_secrets_in_errors_stays_out_of_the_logs(
    harness: Harness, echoing_ims: _EchoingIms
) -> None:
    """An IMS error that quotes the client secret and the assertion: `run`'s log lines at
    debug carry IMS's error fields, but redacted (the logging filter)."""
    refresher = Refresher(
        harness,
        "run",
        "--credentials",
        str(harness.aem),
        "--token-dir",
        str(harness.root / "out"),
        "--ims-endpoint",
        f"http://127.0.0.1:{echoing_ims.server_address[1]}",
        "--allow-insecure-http",
        "--log-level",
        "debug",
    )
    wait_until(lambda: bool(refresher.find("giving up")), timeout=20)
    assert refresher.stop() == 0
    assert echoing_ims.received
    assert _clean(scan_for_secrets([refresher.output], harness.credentials))
    assert "invalid_client" in refresher.output


def test_ims_quoting_secrets_in_errors_stays_out_of_stderr(
    harness: Harness, echoing_ims: _EchoingIms
) -> None:
    """The same hostile IMS with `once`: its one-line error on stderr holds no secret."""
    result = harness.run(
        "once",
        "--credentials",
        str(harness.aem),
        "--token-dir",
        str(harness.root / "out"),
        "--ims-endpoint",
        f"http://127.0.0.1:{echoing_ims.server_address[1]}",
        "--allow-insecure-http",
        "--log-level",
        "debug",
    )
    assert result.returncode == 3
    assert _clean(scan_for_secrets([result.stdout, result.stderr], harness.credentials))
