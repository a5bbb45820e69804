"""`ImsClient` over real sockets: both flows against the emulator, the response-size cap,
redirects that are never followed, and proxies taken from the environment."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.request import Request, urlopen

import jwt as pyjwt
import pytest

from refresher.config import build_settings
from refresher.credentials import load_credentials
from refresher.errors import ExchangeError, LocalSetup, Rejected, Transient
from refresher.ims import MAX_BODY_BYTES, ImsClient
from refresher.skew import SkewEstimate, boot_epoch
from tests.support.harness import Harness


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
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
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
        assert isinstance(info.value, LocalSetup) and info.value.exit_code == 1
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


# --------------------------------------------------------------- bad answers (issue 10)


class _Scripted(_Canned):
    """`_Canned`, but answers from `server.script` first, with `Date` moved by `offset_s`."""

    def do_POST(self) -> None:
        script = self.server.script  # type: ignore[attr-defined]
        if script:
            self.server.answer = script.pop(0)  # type: ignore[attr-defined]
        super().do_POST()

    def date_time_string(self, timestamp: float | None = None) -> str:
        offset = self.server.offset_s  # type: ignore[attr-defined]
        return super().date_time_string(time.time() + offset)


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.seen = []  # type: ignore[attr-defined]
    server.script = []  # type: ignore[attr-defined]
    server.offset_s = 0.0  # type: ignore[attr-defined]
    server.answer = (200, {}, b"{}")  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _form(raw: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(raw.decode()).items()}


def _ok(expires_in: object, value: str = "tok-123") -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps({"access_token": value, "expires_in": expires_in}).encode()


def _rejection(status: int, error: str, description: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": error, "error_description": description}).encode()
    return status, {"x-debug-id": "dbg-7"}, body


@pytest.mark.parametrize(
    "body",
    [
        b'{"access_token": "tok", "expires_in": true}',
        b'{"access_token": "tok", "expires_in": false}',
        b'{"access_token": "tok", "expires_in": "86399"}',
        b'{"access_token": "tok", "expires_in": null}',
        b'{"access_token": "tok", "expires_in": NaN}',
        b'{"access_token": "tok", "expires_in": Infinity}',
        b'{"access_token": "tok", "expires_in": [86399]}',
        b'{"access_token": "tok", "expires_in": 0.5}',
        b'{"access_token": "tok", "expires_in": 0.01}',
        b'{"access_token": "tok", "expires_in": 1e400}',
    ],
    ids=["true", "false", "string", "null", "NaN", "Infinity", "list", "0.5s", "10ms", "1e400"],
)
def test_non_numeric_or_too_short_lifetime_is_a_bad_answer(
    scripted: ThreadingHTTPServer, harness: Harness, body: bytes
) -> None:
    """expires_in that is not a finite number, or under --min-token-lifetime (1 s), is a
    bad answer: Transient (retried like a 5xx), no token. 0.1.0 read `true` as 1 s and
    minted in a loop on 10 ms."""
    scripted.answer = (200, {}, body)  # type: ignore[attr-defined]
    with pytest.raises(ExchangeError) as info:
        client_for(url_of(scripted)).exchange(load_credentials(harness.oauth), now)
    assert isinstance(info.value, Transient)
    assert (info.value.status, info.value.exit_code) == (200, 1)


def test_min_token_lifetime_can_be_lowered(scripted: ThreadingHTTPServer, harness: Harness) -> None:
    """--min-token-lifetime 0.001 lets a 10 ms token through (back-to-back benchmarks)."""
    scripted.answer = _ok(0.01)  # type: ignore[attr-defined]
    client = client_for(url_of(scripted), min_token_lifetime="0.001")
    token = client.exchange(load_credentials(harness.oauth), now)
    assert token.lifetime.total_seconds() == pytest.approx(0.01)


@pytest.mark.parametrize(
    "value",
    ["tok\r\nX-Injected: 1", "tok\nen", "tok\x00en", "tok en", "tok\ten", "t\u00f6ken", " tok", ""],
    ids=["CRLF-header", "LF", "NUL", "space", "tab", "non-ASCII", "leading-space", "empty"],
)
def test_a_token_that_is_not_one_visible_ascii_line_is_a_bad_answer(
    scripted: ThreadingHTTPServer, harness: Harness, value: str
) -> None:
    """A token with CR, LF, NUL, spaces or non-ASCII would inject into
    `curl -H "Authorization: Bearer $(cat access_token)"`: a bad answer, never a token."""
    scripted.answer = _ok(86399, value=value)  # type: ignore[attr-defined]
    with pytest.raises(Transient):
        client_for(url_of(scripted)).exchange(load_credentials(harness.oauth), now)


def test_a_lifetime_beyond_48h_is_clamped_and_beyond_a_year_refused(
    scripted: ThreadingHTTPServer, harness: Harness
) -> None:
    """IMS issues 24 h: 72 h is held for 48 h at most (adoption accepts it back); 2 years
    is garbage."""
    scripted.answer = _ok(72 * 3600)  # type: ignore[attr-defined]
    client = client_for(url_of(scripted))
    token = client.exchange(load_credentials(harness.oauth), now)
    assert token.lifetime == timedelta(hours=48)
    assert token.is_plausible(token.issued_at)
    scripted.answer = _ok(2 * 366 * 86400)  # type: ignore[attr-defined]
    with pytest.raises(Transient):
        client.exchange(load_credentials(harness.oauth), now)


def _ims_token(created: datetime, life_ms: int) -> str:
    payload = {"created_at": str(int(created.timestamp() * 1000)), "expires_in": str(life_ms)}
    return pyjwt.encode(payload, "k" * 32, algorithm="HS256")


def test_units_guard_trusts_the_claims_and_says_so_once(
    scripted: ThreadingHTTPServer, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWT exchange answered in seconds (86399 read as 86.4 s) with a token whose claims
    say 24 h: the claims win, logged once; 0.1.0 refreshed every ~70 s forever."""
    client = client_for(url_of(scripted))
    for _ in range(2):
        scripted.answer = _ok(86399, value=_ims_token(now(), 86_400_000))  # type: ignore[attr-defined]
        token = client.exchange(load_credentials(harness.aem), now)
        assert 86_395 <= token.lifetime.total_seconds() <= 86_400
    assert sum("1000x" in r.getMessage() for r in caplog.records) == 1


# --------------------------------------------------------------- form fields and claims


def test_oauth_sends_org_id(scripted: ThreadingHTTPServer, harness: Harness) -> None:
    """OAuth credentials with an org_id send it as the form field `org_id`, as Adobe's
    libraries do."""
    scripted.answer = _ok(86399)  # type: ignore[attr-defined]
    credentials = load_credentials(harness.oauth)
    assert credentials.org_id
    client_for(url_of(scripted)).exchange(credentials, now)
    form = _form(scripted.seen[0][1])  # type: ignore[attr-defined]
    assert form["org_id"] == credentials.org_id
    assert form["grant_type"] == "client_credentials"


def test_ims_audience_overrides_aud_and_metascopes_only(
    scripted: ThreadingHTTPServer, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """--ims-audience names the base in `aud` and the metascope claims; the request still
    goes to the endpoint, and the not-an-Adobe-host warning stays quiet."""
    scripted.answer = _ok(86_399_999)  # type: ignore[attr-defined]
    audience = "https://ims-na1.adobelogin.com"
    client = client_for(url_of(scripted), ims_audience=audience + "/ignored/path")
    credentials = load_credentials(harness.aem)
    client.exchange(credentials, now)
    path, body = scripted.seen[0]  # type: ignore[attr-defined]
    assert path == "/ims/exchange/jwt"
    claims = pyjwt.decode(_form(body)["jwt_token"], options={"verify_signature": False})
    assert claims["aud"] == f"{audience}/c/{credentials.client_id}"
    assert {k for k in claims if "/s/" in k} == {
        f"{audience}/s/{m}" for m in credentials.metascopes
    }
    assert not [r for r in caplog.records if "not an Adobe IMS host" in r.getMessage()]


def test_a_non_adobe_endpoint_without_audience_warns_once(
    scripted: ThreadingHTTPServer, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The JWT flow against a host that is not *.adobelogin.com, no --ims-audience: one
    warning naming the flag, however many exchanges."""
    scripted.answer = _ok(86_399_999)  # type: ignore[attr-defined]
    client = client_for(url_of(scripted))
    for _ in range(3):
        client.exchange(load_credentials(harness.aem), now)
    warnings = [r for r in caplog.records if "not an Adobe IMS host" in r.getMessage()]
    assert len(warnings) == 1
    assert "--ims-audience" in warnings[0].getMessage()


def test_an_aud_mismatch_does_not_try_the_other_secret(
    scripted: ThreadingHTTPServer, harness: Harness
) -> None:
    """invalid_client for an `aud` mismatch says nothing about the secret: one request, not
    two; a refused secret does try the other one."""
    credentials = load_credentials(harness.oauth)
    assert len(credentials.client_secrets) == 2
    aud = _rejection(400, "invalid_client", "JWT aud does not match the client_id")
    scripted.answer = aud  # type: ignore[attr-defined]
    with pytest.raises(Rejected) as info:
        client_for(url_of(scripted)).exchange(credentials, now)
    assert info.value.hint and "--ims-audience" in info.value.hint
    assert len(scripted.seen) == 1  # type: ignore[attr-defined]
    scripted.seen.clear()  # type: ignore[attr-defined]
    scripted.answer = _rejection(401, "invalid_client", "invalid client_secret parameter")  # type: ignore[attr-defined]
    with pytest.raises(Rejected):
        client_for(url_of(scripted)).exchange(credentials, now)
    assert len(scripted.seen) == 2  # type: ignore[attr-defined]


# --------------------------------------------------------------- clock skew


def _exp_of(raw: bytes) -> int:
    claims = pyjwt.decode(_form(raw)["jwt_token"], options={"verify_signature": False})
    return int(claims["exp"])


def test_an_expired_verdict_explained_by_skew_is_re_signed_at_once(
    scripted: ThreadingHTTPServer, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """IMS 600 s ahead says "JWT token is expired": the client re-signs for IMS's clock in
    the same exchange (2 requests), and signs every later JWT that way (1 request)."""
    scripted.offset_s = 600.0  # type: ignore[attr-defined]
    scripted.script = [  # type: ignore[attr-defined]
        _rejection(400, "invalid_token", "JWT token is expired"),
        _ok(86_399_999),
    ]
    client = client_for(url_of(scripted))
    credentials = load_credentials(harness.aem)
    client.exchange(credentials, now)
    first, second = (_exp_of(body) for _, body in scripted.seen)  # type: ignore[attr-defined]
    wall = int(time.time())
    assert abs(first - (wall + 300)) <= 3
    assert abs(second - (wall + 900)) <= 3
    assert 598 <= client.clock_skew_s <= 602
    scripted.answer = _ok(86_399_999)  # type: ignore[attr-defined]
    client.exchange(credentials, now)
    assert len(scripted.seen) == 3  # type: ignore[attr-defined]
    assert abs(_exp_of(scripted.seen[2][1]) - (int(time.time()) + 900)) <= 3  # type: ignore[attr-defined]
    assert sum("off this node's" in r.getMessage() for r in caplog.records) == 1


def test_a_fixed_node_clock_is_followed_before_the_next_exchange(
    scripted: ThreadingHTTPServer, harness: Harness
) -> None:
    """The node is 600 s behind IMS; its clock is then stepped right (NTP). The gauge reads
    the fix at once (it is read at every scrape), and the next JWT is signed for the fixed
    clock, not with the stale 600 s on top (exp 900 s ahead of IMS: 0.1.0 signed so until
    the next exchange, and the alert kept firing for hours).

    Faked: the node's clock. A test may not set the machine's clock, so the client's two
    clock readings (its `now` and the skew's wall-minus-boot epoch) step together here.
    """
    scripted.offset_s = 600.0  # type: ignore[attr-defined]
    scripted.script = [  # type: ignore[attr-defined]
        _rejection(400, "invalid_token", "JWT token is expired"),
        _ok(86_399_999),
        _ok(86_399_999),
    ]
    step = {"s": 0.0}

    def node_now() -> datetime:
        return now() + timedelta(seconds=step["s"])

    client = client_for(url_of(scripted))
    client.skew = SkewEstimate(epoch=lambda: boot_epoch() + step["s"])
    credentials = load_credentials(harness.aem)
    client.exchange(credentials, node_now)
    assert 598 <= client.clock_skew_s <= 602
    step["s"] = 600.0  # the node's clock is set right: IMS's clock is now the node's
    assert client.clock_skew_s == 0.0
    client.exchange(credentials, node_now)
    ims_now = int(time.time()) + 600
    assert abs(_exp_of(scripted.seen[2][1]) - (ims_now + 300)) <= 3  # type: ignore[attr-defined]
    assert client.clock_skew_s == 0.0


def test_an_expired_verdict_no_skew_explains_is_a_rejection_with_its_hint(
    scripted: ThreadingHTTPServer, harness: Harness
) -> None:
    """ "JWT token is expired" with IMS's clock agreeing with ours: one request, Rejected
    (exit 3), with the hint to check the clock and --jwt-ttl."""
    scripted.answer = _rejection(400, "invalid_token", "JWT token is expired")  # type: ignore[attr-defined]
    client = client_for(url_of(scripted))
    with pytest.raises(Rejected) as info:
        client.exchange(load_credentials(harness.aem), now)
    assert len(scripted.seen) == 1  # type: ignore[attr-defined]
    assert info.value.exit_code == 3
    assert info.value.hint and "--jwt-ttl" in info.value.hint
    assert info.value.log_fields()["x_debug_id"] == "dbg-7"
    assert client.clock_skew_s == 0.0


def test_skew_is_measured_from_error_answers_too(
    scripted: ThreadingHTTPServer, harness: Harness
) -> None:
    """A 503 carries Date as well: the skew is measured (120 s behind) from it."""
    scripted.offset_s = -120.0  # type: ignore[attr-defined]
    scripted.answer = (503, {}, b"")  # type: ignore[attr-defined]
    client = client_for(url_of(scripted))
    with pytest.raises(Transient):
        client.exchange(load_credentials(harness.oauth), now)
    assert -122 <= client.clock_skew_s <= -118


def test_plain_http_without_the_flag_is_a_local_setup_error() -> None:
    """http:// without --allow-insecure-http: LocalSetup (exit 1, not retried), in the words
    of `config.plain_http_problem` that `check` and the loop use."""
    client = ImsClient(build_settings({"credentials": "x"}, needs_output=False).ims)
    with pytest.raises(LocalSetup, match="allow-insecure-http") as info:
        client.check_transport("http://127.0.0.1:9")
    assert (info.value.retryable, info.value.exit_code) == (False, 1)
    assert str(info.value) == (
        "the IMS endpoint in the credentials http://127.0.0.1:9 is plain HTTP: "
        "pass --allow-insecure-http to permit it"
    )
