"""`ImsClient` over real sockets: both flows against the emulator, the response-size cap,
redirects that are never followed, and proxies taken from the environment."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import pytest

from refresher.config import build_settings
from refresher.credentials import load_credentials
from refresher.errors import ExchangeError
from refresher.ims import MAX_BODY_BYTES, ImsClient
from tests.conftest import Harness


def client_for(base_url: str, **flags: str) -> ImsClient:
    raw = {"credentials": "x", "ims_endpoint": base_url, "allow_insecure_http": "true", **flags}
    return ImsClient(build_settings(raw, needs_output=False).ims)


def now() -> datetime:
    return datetime.now(UTC)


class _Canned(BaseHTTPRequestHandler):
    """Answers every POST with the server's canned (status, headers, body); records requests."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.seen.append((self.path, self.rfile.read(length)))  # type: ignore[attr-defined]
        status, headers, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.seen = []  # type: ignore[attr-defined]
    server.answer = (200, {}, b"{}")  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_jwt_exchange_against_the_emulator(harness: Harness) -> None:
    """The JWT flow yields a token whose lifetime is the emulator's TTL (ms → s)."""
    emulator = harness.start_emulator(token_ttl_s=600)
    client = client_for(emulator.base_url)
    token = client.exchange(load_credentials(harness.aem), now)
    assert token.flow == "jwt"
    assert 599 <= token.lifetime.total_seconds() <= 600
    assert token.ims_endpoint == emulator.base_url


def test_oauth_exchange_against_the_emulator(harness: Harness) -> None:
    """The OAuth flow yields a token whose lifetime is the emulator's TTL (seconds)."""
    emulator = harness.start_emulator(token_ttl_s=600)
    token = client_for(emulator.base_url).exchange(load_credentials(harness.oauth), now)
    assert token.flow == "oauth"
    assert 599 <= token.lifetime.total_seconds() <= 600


def test_oversized_body_is_cut_off(canned: ThreadingHTTPServer, harness: Harness) -> None:
    """A response over 1 MiB is refused (retryable), not read into memory whole."""
    canned.answer = (200, {}, b"x" * (MAX_BODY_BYTES + 10))  # type: ignore[attr-defined]
    with pytest.raises(ExchangeError, match="exceeds") as info:
        client_for(url_of(canned)).exchange(load_credentials(harness.oauth), now)
    assert info.value.retryable


def test_redirect_is_not_followed(canned: ThreadingHTTPServer, harness: Harness) -> None:
    """A 307 to another host is an error; the secret is never sent to the target."""
    target = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    target.seen = []  # type: ignore[attr-defined]
    target.answer = (200, {}, b"{}")  # type: ignore[attr-defined]
    threading.Thread(target=target.serve_forever, daemon=True).start()
    try:
        canned.answer = (307, {"Location": url_of(target) + "/steal"}, b"")  # type: ignore[attr-defined]
        with pytest.raises(ExchangeError, match="redirect") as info:
            client_for(url_of(canned)).exchange(load_credentials(harness.oauth), now)
        assert not info.value.retryable
        assert target.seen == []  # type: ignore[attr-defined]
    finally:
        target.shutdown()
        target.server_close()


def test_ims_error_body_fields_are_kept(canned: ThreadingHTTPServer, harness: Harness) -> None:
    """IMS's error, error_description and x-debug-id reach the ExchangeError."""
    body = json.dumps({"error": "invalid_scope", "error_description": "bad scope"}).encode()
    canned.answer = (400, {"x-debug-id": "abc123", "Content-Type": "application/json"}, body)  # type: ignore[attr-defined]
    with pytest.raises(ExchangeError) as info:
        client_for(url_of(canned)).exchange(load_credentials(harness.oauth), now)
    assert (info.value.error, info.value.debug_id) == ("invalid_scope", "abc123")
    assert info.value.exit_code == 3


def test_jwt_form_fields_and_path(canned: ThreadingHTTPServer, harness: Harness) -> None:
    """The JWT exchange posts client_id, client_secret and jwt_token to /ims/exchange/jwt."""
    canned.answer = (200, {}, b'{"access_token": "abc", "expires_in": 1000}')  # type: ignore[attr-defined]
    token = client_for(url_of(canned)).exchange(load_credentials(harness.aem), now)
    path, body = canned.seen[0]  # type: ignore[attr-defined]
    assert path == "/ims/exchange/jwt"
    fields = dict(p.split("=", 1) for p in body.decode().split("&"))
    assert set(fields) == {"client_id", "client_secret", "jwt_token"}
    assert token.lifetime.total_seconds() == pytest.approx(1.0)  # 1000 ms


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy for plain HTTP that records the absolute URIs it relays."""

    def do_POST(self) -> None:
        self.server.relayed.append(self.path)  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", "0"))
        request = Request(self.path, data=self.rfile.read(length), method="POST")
        request.add_header("Content-Type", self.headers["Content-Type"])
        try:
            with urlopen(request, timeout=10) as upstream:
                status, body = upstream.status, upstream.read()
        except Exception as exc:  # urllib raises HTTPError for 4xx
            status, body = getattr(exc, "code", 502), getattr(exc, "read", lambda: b"")()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_proxy_from_the_environment_is_used(harness: Harness, tmp_path: Path) -> None:
    """HTTP_PROXY/HTTPS_PROXY from the environment carry the exchange (the real CLI)."""
    emulator = harness.start_emulator()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    proxy.relayed = []  # type: ignore[attr-defined]
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        proxy_url = url_of(proxy)
        result = harness.run(
            *harness.args("once", harness.oauth, "--token-dir", str(tmp_path / "out")),
            env={"HTTP_PROXY": proxy_url, "http_proxy": proxy_url, "NO_PROXY": "", "no_proxy": ""},
        )
        assert result.returncode == 0, result.stderr
        assert proxy.relayed == [emulator.base_url + "/ims/token/v3"]  # type: ignore[attr-defined]
    finally:
        proxy.shutdown()
        proxy.server_close()
