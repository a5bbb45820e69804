"""`refresher token` and `refresher check --online`, the real CLI against the emulator: the
token alone on stdout, what IMS granted, and each rejection with its hint (exit 3).

Every output is scanned for secrets by the harness; `token`'s stdout is the one place a
token may appear, so it is checked and then left out of the scan.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support import keys
from tests.support.harness import Harness

pytestmark = pytest.mark.slow

TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")


def _token(harness: Harness, credentials: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `token`; its stdout (the token) is taken out of the secret scan, stderr stays."""
    result = harness.run(*harness.args("token", credentials, *extra))
    harness.outputs.remove(result.stdout)
    assert not result.stdout or result.stdout not in result.stderr
    return result


@pytest.mark.parametrize("flow", ["jwt", "oauth"])
def test_token_prints_only_the_token(harness: Harness, flow: str) -> None:
    """Exit 0; stdout is exactly one token (visible ASCII, no newline when not a terminal);
    the logs go to stderr and never hold it."""
    harness.start_emulator()
    credentials = harness.aem if flow == "jwt" else harness.oauth
    result = _token(harness, credentials)
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, err
    assert TOKEN_CHARS.match(out), "stdout holds more than the token"
    assert out.count(".") == 2  # the emulator's tokens are JWTs, like IMS's
    assert out not in err
    assert err.splitlines(), "no log line on stderr"
    for line in err.splitlines():
        json.loads(line)  # every stderr line is a log line
    stats = harness.emulator.stats()  # type: ignore[union-attr]
    assert stats["requests"][flow] == 1


def test_token_rejected_exits_3_with_the_hint(harness: Harness, tmp_path: Path) -> None:
    """A wrong client secret: exit 3, nothing on stdout, and stderr says what to fix."""
    harness.start_emulator()
    document = json.loads(harness.oauth.read_text())
    document["client_secrets"] = ["p8e-" + "x" * 30]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(document))
    result = _token(harness, wrong)
    assert (result.returncode, result.stdout) == (3, "")
    assert "invalid_client" in result.stderr
    assert "hint: IMS refused the client secret" in result.stderr


@pytest.mark.parametrize("flow", ["jwt", "oauth"])
def test_check_online_reports_what_ims_granted(harness: Harness, flow: str) -> None:
    """The offline summary, then scopes, lifetime, expiry and clock skew; never the token."""
    harness.start_emulator(token_ttl_s=3600)
    credentials = harness.aem if flow == "jwt" else harness.oauth
    result = harness.run(*harness.args("check", credentials, "--online"))
    assert result.returncode == 0, result.stderr
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert report["flow"] == flow
    assert report["online"] == "ok"
    assert report["granted_scopes"]
    assert 3590 <= int(report["lifetime_s"]) <= 3600
    assert report["expires_at"].endswith("Z")
    assert report["clock_skew_s"] == "0.0"
    if flow == "oauth":  # the credentials' org_id is sent as a form field, as Adobe's SDKs do
        org_id = json.loads(harness.oauth.read_text())["org_id"]
        assert harness.emulator is not None
        assert harness.emulator.stats()["org_ids"] == {org_id: 1}


def _with(path: Path, tmp_path: Path, change: Callable[[dict[str, object]], None]) -> Path:
    document = json.loads(path.read_text())
    change(document)
    out = tmp_path / f"changed-{path.name}"
    out.write_text(json.dumps(document))
    return out


def _integration(document: dict[str, object]) -> dict[str, object]:
    integration = document["integration"]
    assert isinstance(integration, dict)
    return integration


def _rebind(harness: Harness, credentials: Path) -> None:
    """The console now holds another certificate for the integration (regenerated there)."""
    pem = keys.rsa_keypair("registered-elsewhere").certificate.public_bytes(
        serialization.Encoding.PEM
    )
    client_id = _integration(json.loads(credentials.read_text()))["technicalAccount"]
    assert harness.emulator is not None and isinstance(client_id, dict)
    harness.emulator.register_client(client_id["clientId"], certificate_pem=pem.decode())


def _more_metascopes(d: dict[str, object]) -> None:
    integration = _integration(d)
    integration["metascopes"] = f"{integration['metascopes']},ent_not_granted_sdk"


def _more_scopes(d: dict[str, object]) -> None:
    d["scopes"] = [*d["scopes"], "not_granted_scope"]  # type: ignore[misc]


def _wrong_secret(d: dict[str, object]) -> None:
    d["client_secrets"] = ["p8e-" + "y" * 30]


CASES = {
    "signature": ("aem", "signature", 3, "does not match this private key"),
    "metascopes": ("aem", "metascopes", 3, "product profile"),
    "oauth-scope": ("oauth", "scopes", 3, "scope is not granted"),
    "client-secret": ("oauth", "secret", 3, "refused the client secret"),
    "throttled": ("oauth", "429", 1, "throttling"),
    "server-error": ("oauth", "500", 1, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_online_rejections_carry_their_hint(
    harness: Harness, tmp_path: Path, case: str
) -> None:
    """Each IMS refusal is reported with its error, x-debug-id and hint, and the exit code
    of `once` (3 rejected, 1 failed); a 500 gets no hint rather than a wrong one."""
    which, change, code, hint = CASES[case]
    emulator = harness.start_emulator()
    credentials = harness.aem if which == "aem" else harness.oauth
    if change == "signature":
        _rebind(harness, credentials)
    elif change == "metascopes":
        credentials = _with(credentials, tmp_path, _more_metascopes)
    elif change == "scopes":
        credentials = _with(credentials, tmp_path, _more_scopes)
    elif change == "secret":
        credentials = _with(credentials, tmp_path, _wrong_secret)
    else:
        emulator.set_faults(queue=[change])
    result = harness.run(*harness.args("check", str(credentials), "--online"))
    assert result.returncode == code, result.stdout + result.stderr
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert report["online"] == ("rejected" if code == 3 else "failed")
    assert "status" in report
    if hint is None:
        assert "hint" not in report
        assert "hint" not in result.stderr
    else:
        assert hint in report["hint"]
        logged = [json.loads(line) for line in result.stderr.splitlines()]
        failure = next(entry for entry in logged if entry["message"].startswith("IMS exchange"))
        assert hint in failure["hint"]
    if code == 3:
        assert report["x_debug_id"]
        assert report["error"] and report["error_description"]


class _Gateway(BaseHTTPRequestHandler):
    """A reverse proxy that reaches IMS under IMS's own host name (`Host` rewritten), as an
    egress gateway does: the client connects to the gateway's address."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        upstream = self.server.upstream  # type: ignore[attr-defined]
        request = Request(upstream + self.path, data=self.rfile.read(length), method="POST")
        request.add_header("Content-Type", self.headers["Content-Type"])
        request.add_header("Host", GATEWAY_IMS_HOST)
        try:
            with urlopen(request, timeout=10) as answer:
                status, body = answer.status, answer.read()
        except HTTPError as exc:
            status, body = exc.code, exc.read()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


GATEWAY_IMS_HOST = "ims-na1.adobelogin.com"


@pytest.mark.parametrize("audience", [None, f"http://{GATEWAY_IMS_HOST}"])
def test_ims_audience_through_a_gateway(harness: Harness, audience: str | None) -> None:
    """Through a gateway under another host name, `aud` must name IMS's host: without
    --ims-audience IMS refuses (exit 3, the audience hint, the host warned about once);
    with it the token comes at the first request."""
    emulator = harness.start_emulator()
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    gateway.upstream = emulator.base_url  # type: ignore[attr-defined]
    threading.Thread(target=gateway.serve_forever, args=(0.05,), daemon=True).start()
    try:
        extra = ["--ims-audience", audience] if audience else []
        result = harness.run(
            "check",
            "--credentials",
            str(harness.aem),
            "--online",
            "--ims-endpoint",
            f"http://127.0.0.1:{gateway.server_address[1]}",
            "--allow-insecure-http",
            *extra,
        )
    finally:
        gateway.shutdown()
        gateway.server_close()
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    warned = [line for line in result.stderr.splitlines() if "not an Adobe IMS host" in line]
    assert emulator.stats()["requests"]["jwt"] == 1
    if audience is None:
        assert result.returncode == 3, result.stdout + result.stderr
        assert report["error"] == "invalid_client"
        assert "--ims-audience" in report["hint"]
        assert len(warned) == 1
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert report["online"] == "ok"
        assert warned == []
