"""The IMS emulator, checked from the outside with raw requests + PyJWT, never the refresher client.

The emulator is the yardstick for the client, so these tests speak IMS's wire
protocol themselves: they build and sign the JWT assertion, post real forms on
real loopback sockets, and read IMS's shapes and units back.
"""

from __future__ import annotations

import json
import logging
import socket
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ims_emulator import (
    CA_FILE,
    Emulator,
    write_credentials,
)
from ims_emulator.control import is_loopback
from tests.support.ims_wire import (
    DROP,
    EXPIRED,
    MALFORMED,
    NOT_SUBSET,
    NOT_YET,
    SIGNATURE,
    TIMEOUT,
    aem_of,
    assert_ims_error,
    assertion,
    oauth_of,
    post_jwt,
    post_oauth,
    token_claims,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with Emulator.start(tmp_path_factory.mktemp("ims")) as emulator:
        yield emulator


@pytest.fixture
def ims(shared: Emulator) -> Iterator[Emulator]:
    """The shared emulator with faults cleared and counters zeroed around each test."""

    def clean() -> None:
        shared.up()
        shared.set_faults(queue=[], fail_rate=0.0, retry_after=1, delay_seconds=5.0)
        shared.reset_stats()

    clean()
    yield shared
    clean()


@pytest.fixture(scope="module")
def stranger_key() -> rsa.RSAPrivateKey:
    """An RSA key that matches no registered certificate."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ---------------------------------------------------------------- successful exchanges


def test_jwt_exchange_issues_token_with_expires_in_in_milliseconds(ims: Emulator) -> None:
    """A valid assertion gets 200, expires_in in ms, and an IMS-shaped access token JWT."""
    aem = aem_of(ims)
    before_ms = int(time.time() * 1000)
    response = post_jwt(ims.base_url, aem)
    after_ms = int(time.time() * 1000)

    assert response.status_code == 200, response.text
    assert response.headers["x-debug-id"]
    body = response.json()
    assert set(body) == {"token_type", "access_token", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 86_400_000
    assert type(body["expires_in"]) is int
    claims = token_claims(ims, body["access_token"])
    assert claims["type"] == "access_token"
    assert claims["client_id"] == aem["technicalAccount"]["clientId"]
    assert claims["user_id"] == aem["id"]
    assert claims["as"] == "ims-na1"
    assert claims["expires_in"] == "86400000"
    assert before_ms <= int(claims["created_at"]) <= after_ms
    assert claims["scope"] == "ent_aem_cloud_api"


def test_jwt_exchange_accepts_the_path_with_a_trailing_slash(ims: Emulator) -> None:
    """/ims/exchange/jwt/ is the same endpoint as /ims/exchange/jwt."""
    response = post_jwt(ims.base_url, aem_of(ims), path="/ims/exchange/jwt/")
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 86_400_000


@pytest.mark.parametrize("secret_index", [0, 1])
def test_oauth_issues_token_with_expires_in_in_seconds(ims: Emulator, secret_index: int) -> None:
    """client_credentials gets expires_in in seconds; either of the two secrets works."""
    response = post_oauth(ims, secret_index=secret_index)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 86_400
    assert type(body["expires_in"]) is int
    claims = token_claims(ims, body["access_token"])
    assert claims["client_id"] == oauth_of(ims)["client_id"]
    assert claims["expires_in"] == "86400000"
    assert claims["scope"] == "openid,AdobeID,read_organizations"


@pytest.mark.parametrize(
    ("ttl_s", "jwt_ms", "oauth_s"),
    [(2.7, 2700, 2), (0.4, 400, 1)],
)
def test_token_ttl_sets_lifetime_and_oauth_rounds_down_but_never_to_zero(
    shared: Emulator, ttl_s: float, jwt_ms: int, oauth_s: int
) -> None:
    """--token-ttl: JWT expires_in is ms of the ttl; OAuth's is whole seconds, at least 1."""
    assert shared.credentials_dir is not None
    with Emulator.start(shared.credentials_dir, token_ttl_s=ttl_s) as short:
        aem = aem_of(short)
        jwt_response = post_jwt(short.base_url, aem)
        oauth_response = post_oauth(short)
    assert jwt_response.json()["expires_in"] == jwt_ms
    assert token_claims(short, jwt_response.json()["access_token"])["expires_in"] == str(jwt_ms)
    assert oauth_response.json()["expires_in"] == oauth_s


# ---------------------------------------------------------------- rejections


class Ahead(float):
    """An `exp` claim this many seconds from the moment the test runs (float if is_float)."""

    is_float = False


class AheadFloat(Ahead):
    is_float = True


STRANGER = object()  # sign with a key that matches no registered certificate
OWN = "{base}/s/ent_aem_cloud_api"  # the metascope claim the client is granted
HS256_TOKEN = jwt.encode({"iss": "someone@AdobeOrg"}, "k" * 64, algorithm="HS256")


JWT_REJECTIONS: list[tuple[str, dict[str, Any], dict[str, Any], int, str, str | None]] = [
    # (case, claims to change ("{base}" is filled in), request changes, status, IMS error,
    #  IMS's exact error_description where it is one users meet and the client's hints match)
    ("wrong secret", {}, {"secret": "p8e-not-the-secret"}, 401, "invalid_client",
     "invalid client_secret parameter"),
    ("unknown client", {}, {"client_id": "no-such-client"}, 400, "invalid_client", None),
    ("key does not match the certificate", {}, {"key": STRANGER}, 400, "invalid_token",
     SIGNATURE),
    ("not a JWT", {}, {"token": "not.a.jwt"}, 400, "invalid_token", MALFORMED),
    ("HS256", {}, {"token": HS256_TOKEN}, 400, "invalid_token", MALFORMED),
    ("missing jwt_token", {}, {"token": ""}, 400, "bad_request", None),
    ("wrong aud", {"aud": "https://ims-na1.adobelogin.com/c/x"}, {}, 400, "invalid_client", None),
    ("float exp", {"exp": AheadFloat(300)}, {}, 400, "invalid_token", MALFORMED),
    ("expired exp", {"exp": Ahead(-10)}, {}, 400, "invalid_token", EXPIRED),
    ("nbf ahead", {"nbf": Ahead(600)}, {}, 400, "invalid_token", NOT_YET),
    ("iat ahead", {"iat": Ahead(600)}, {}, 400, "invalid_token", NOT_YET),
    ("exp over 24 h 10 min ahead", {"exp": Ahead(87_400)}, {}, 400, "invalid_token", None),
    ("exp - iat over 87,300 s", {"iat": Ahead(-200), "exp": Ahead(87_200)}, {}, 400,
     "invalid_token", None),
    ("no exp", {"exp": DROP}, {}, 400, "invalid_token", MALFORMED),
    ("wrong iss", {"iss": "0000@AdobeOrg"}, {}, 400, "invalid_token", None),
    ("wrong sub", {"sub": "0000@techacct.adobe.com"}, {}, 400, "invalid_token", None),
    ("no metascope", {OWN: DROP}, {}, 400, "invalid_scope", None),
    (
        "ungranted metascope",
        {OWN: DROP, "{base}/s/ent_analytics_bulk_ingest_sdk": True},
        {},
        400,
        "invalid_scope",
        NOT_SUBSET,
    ),
    (
        "metascope of another IMS host",
        {OWN: DROP, "https://ims-na1.adobelogin.com/s/ent_aem_cloud_api": True},
        {},
        400,
        "invalid_scope",
        NOT_SUBSET,
    ),
    ("metascope claim not true", {OWN: "yes"}, {}, 400, "invalid_scope", NOT_SUBSET),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", [case[1:] for case in JWT_REJECTIONS], ids=[case[0] for case in JWT_REJECTIONS]
)
def test_jwt_exchange_rejects_like_ims(
    ims: Emulator,
    stranger_key: rsa.RSAPrivateKey,
    case: tuple[dict[str, Any], dict[str, Any], int, str, str | None],
) -> None:
    """Each malformed or unauthorised JWT exchange gets IMS's status, error, text and debug id."""
    claims, request_changes, status, error, description = case
    aem = aem_of(ims)
    now = int(time.time())
    resolved: dict[str, Any] = {}
    for name, value in claims.items():
        if isinstance(value, Ahead):
            value = now + float(value) + 0.5 if value.is_float else now + int(value)
        resolved[name.replace("{base}", ims.base_url)] = value
    changes = dict(request_changes)
    key = stranger_key if changes.pop("key", None) is STRANGER else None
    token = changes.pop("token", None)
    if token is None:
        token = assertion(ims.base_url, aem, key, resolved)

    response = post_jwt(ims.base_url, aem, token, **changes)

    assert_ims_error(response, status, error)
    if description is not None:
        assert response.json()["error_description"] == description
    assert ims.stats()["rejected"] == {error: 1}


OAUTH_REJECTIONS: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown scope", {"scope": "openid,ent_admin"}, 400, "invalid_scope"),
    ("no scope", {"scope": ""}, 400, "invalid_scope"),
    ("space-separated scopes", {"scope": "openid AdobeID"}, 400, "invalid_scope"),
    ("bad grant", {"grant_type": "password"}, 400, "unsupported_grant_type"),
    ("wrong secret", {"secret": "p8e-not-the-secret"}, 401, "invalid_client"),
    ("unknown client", {"client_id": "no-such-client"}, 400, "invalid_client"),
]


@pytest.mark.parametrize(
    ("spoil", "status", "error"),
    [case[1:] for case in OAUTH_REJECTIONS],
    ids=[case[0] for case in OAUTH_REJECTIONS],
)
def test_oauth_rejects_like_ims(
    ims: Emulator, spoil: dict[str, Any], status: int, error: str
) -> None:
    """Each bad client_credentials request gets IMS's status, error code and debug id."""
    assert_ims_error(post_oauth(ims, **spoil), status, error)


def test_each_flow_refuses_a_client_not_enabled_for_it(ims: Emulator) -> None:
    """An AEM client cannot do client_credentials, nor an OAuth client the JWT exchange."""
    aem, oauth = aem_of(ims), oauth_of(ims)
    response = post_oauth(
        ims,
        client_id=aem["technicalAccount"]["clientId"],
        secret=aem["technicalAccount"]["clientSecret"],
    )
    assert_ims_error(response, 400, "unauthorized_client")
    response = post_jwt(
        ims.base_url, aem, client_id=oauth["client_id"], secret=oauth["client_secrets"][0]
    )
    assert_ims_error(response, 400, "unauthorized_client")


def test_jwt_exchange_refuses_an_expired_certificate(ims: Emulator, tmp_path: Path) -> None:
    """An expired certificate binding is no binding: IMS's "Could not match JWT signature"."""
    files = write_credentials(tmp_path, ims_endpoint=ims.endpoint, cert_days=-1)
    aem = json.loads(files["aem"].read_text())["integration"]
    ims.register_client(
        aem["technicalAccount"]["clientId"],
        [aem["technicalAccount"]["clientSecret"]],
        certificate_pem=aem["publicKey"],
        org=aem["org"],
        technical_account_id=aem["id"],
        metascopes=aem["metascopes"],
    )
    response = post_jwt(ims.base_url, aem)
    assert_ims_error(response, 400, "invalid_token")
    assert response.json()["error_description"] == SIGNATURE


def test_only_form_posts_reach_the_token_endpoints(ims: Emulator) -> None:
    """GET is 405 with Allow, a JSON body is 400, an unknown path 404: all IMS-shaped."""
    get = requests.get(ims.base_url + "/ims/token/v3", timeout=TIMEOUT)
    assert_ims_error(get, 405, "method_not_allowed")
    assert get.headers["Allow"] == "POST"
    as_json = requests.post(
        ims.base_url + "/ims/exchange/jwt", json={"client_id": "x"}, timeout=TIMEOUT
    )
    assert_ims_error(as_json, 400, "bad_request")
    assert_ims_error(requests.get(ims.base_url + "/ims/nothing", timeout=TIMEOUT), 404, "not_found")


def test_garbled_requests_still_get_an_ims_error_with_a_debug_id(ims: Emulator) -> None:
    """http.server's own rejections (bad request line, unknown method) are IMS-shaped too."""
    for request_line in (b"GARBAGE", b"BREW /ims/token/v3 HTTP/1.1"):
        with socket.create_connection(("127.0.0.1", ims.port), timeout=TIMEOUT) as raw:
            raw.sendall(request_line + b"\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := raw.recv(4096):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"501")
        assert b"\r\nx-debug-id: " in head
        assert json.loads(body)["error"] == "bad_request"


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("kind", "status", "content_type"),
    [
        ("500", 500, "application/json"),
        ("502", 502, "text/html"),
        ("503", 503, "application/json"),
        ("504", 504, "text/html"),
        ("html", 200, "text/html"),
        ("invalid_client", 401, "application/json"),
    ],
)
def test_status_faults_answer_with_their_status_and_body(
    ims: Emulator, kind: str, status: int, content_type: str
) -> None:
    """Each status fault answers its status with an IMS-like JSON or a gateway's HTML body."""
    ims.set_faults(queue=[kind])
    response = post_oauth(ims)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith(content_type)
    assert response.headers["x-debug-id"]
    if content_type == "text/html":
        assert response.text.lstrip().startswith("<html>")
    else:
        assert "error" in response.json()


def test_429_fault_carries_retry_after(ims: Emulator) -> None:
    """A 429 fault sends Retry-After with the configured number of seconds."""
    ims.set_faults(queue=["429"], retry_after=7)
    response = post_oauth(ims)
    assert_ims_error(response, 429, "too_many_requests")
    assert response.headers["Retry-After"] == "7"


def test_badjson_fault_is_a_200_that_does_not_parse(ims: Emulator) -> None:
    """badjson answers 200 with a JSON content type and a truncated body."""
    ims.set_faults(queue=["badjson"])
    response = post_oauth(ims)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        json.loads(response.text)


def test_drop_fault_closes_the_connection_without_an_answer(ims: Emulator) -> None:
    """drop ends the connection unanswered: the client sees a ConnectionError."""
    ims.set_faults(queue=["drop"])
    with pytest.raises(requests.ConnectionError):
        post_oauth(ims)


def test_delay_fault_outlasts_a_short_read_timeout(ims: Emulator) -> None:
    """delay holds the answer longer than the client's read timeout."""
    ims.set_faults(queue=["delay"], delay_seconds=3.0)
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        post_oauth(ims, timeout=0.1)
    assert time.monotonic() - started < 2.5
    assert post_oauth(ims).status_code == 200


def test_delay_fault_then_answers_normally(ims: Emulator) -> None:
    """A patient client gets the normal answer after the delay."""
    ims.set_faults(queue=["delay"], delay_seconds=0.2)
    started = time.monotonic()
    response = post_oauth(ims)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_fault_queue_applies_in_order_then_normal_service(ims: Emulator) -> None:
    """Queued faults hit the next token requests in order; afterwards IMS answers normally."""
    ims.set_faults(queue=["503", "429", "drop"])
    assert post_oauth(ims).status_code == 503
    assert post_oauth(ims).status_code == 429
    with pytest.raises(requests.ConnectionError):
        post_oauth(ims)
    assert post_jwt(ims.base_url, aem_of(ims)).status_code == 200
    stats = ims.stats()
    assert stats["faults"] == {"503": 1, "429": 1, "drop": 1}
    assert stats["queued_faults"] == 0


def test_random_faults_replay_exactly_with_the_same_seed(ims: Emulator) -> None:
    """--fail-rate with --seed: the same seed gives the same sequence of outcomes."""

    def outcomes() -> list[int]:
        return [post_oauth(ims).status_code for _ in range(12)]

    ims.set_faults(fail_rate=0.5, mix=["503", "504"], seed=7)
    first = outcomes()
    ims.set_faults(seed=7)
    assert outcomes() == first
    assert 200 in first
    assert set(first) - {200}, "a rate of 0.5 over 12 requests injected no fault"
    ims.set_faults(fail_rate=1.0, mix=["502"])
    assert {post_oauth(ims).status_code for _ in range(3)} == {502}


def test_down_drops_every_token_request_until_up(ims: Emulator) -> None:
    """While down, every token request is dropped; up restores service."""
    ims.down()
    with pytest.raises(requests.ConnectionError):
        post_oauth(ims)
    with pytest.raises(requests.ConnectionError):
        post_jwt(ims.base_url, aem_of(ims))
    ims.up()
    assert post_oauth(ims).status_code == 200
    assert ims.stats()["faults"] == {"down": 2}


def test_stats_count_requests_issued_rejections_and_faults(ims: Emulator) -> None:
    """stats counts token requests per flow, issued tokens, rejections and faults; reset zeroes."""
    aem = aem_of(ims)
    post_jwt(ims.base_url, aem)
    post_jwt(ims.base_url, aem, secret="p8e-wrong")
    post_oauth(ims)
    post_oauth(ims, scope="nope")
    ims.set_faults(queue=["503"])
    post_oauth(ims)
    assert ims.stats() == {
        "requests": {"jwt": 2, "oauth": 3},
        "issued": 2,
        "rejected": {"invalid_client": 1, "invalid_scope": 1},
        "faults": {"503": 1},
        "down": False,
        "queued_faults": 0,
        "org_ids": {},
        "clock_offset_seconds": 0.0,
    }
    ims.reset_stats()
    assert ims.stats()["requests"] == {"jwt": 0, "oauth": 0}


# ---------------------------------------------------------------- control API


def test_control_api_sets_faults_outage_and_reset_over_http(ims: Emulator) -> None:
    """/__emulator/ faults, down, up, stats and reset work over HTTP for subprocess users."""
    control = ims.base_url + "/__emulator/"
    answer = requests.post(
        control + "faults", json={"queue": ["504"], "retry_after": 3}, timeout=TIMEOUT
    )
    assert answer.status_code == 200
    assert answer.json()["queue"] == ["504"]
    assert post_oauth(ims).status_code == 504

    assert requests.post(control + "down", timeout=TIMEOUT).status_code == 200
    with pytest.raises(requests.ConnectionError):
        post_oauth(ims)
    assert requests.post(control + "up", timeout=TIMEOUT).status_code == 200

    stats = requests.get(control + "stats", timeout=TIMEOUT)
    assert stats.headers["x-debug-id"]
    assert stats.json()["faults"] == {"504": 1, "down": 1}
    assert requests.post(control + "reset", timeout=TIMEOUT).status_code == 200
    assert requests.get(control + "stats", timeout=TIMEOUT).json()["faults"] == {}

    bad = requests.post(control + "faults", json={"queue": ["teapot"]}, timeout=TIMEOUT)
    assert_ims_error(bad, 400, "bad_request")
    assert_ims_error(requests.get(control + "faults", timeout=TIMEOUT), 405, "method_not_allowed")


def test_control_api_registers_a_client_and_revokes_one_secret(
    ims: Emulator, tmp_path: Path
) -> None:
    """POST /__emulator/clients registers new credentials, and a later update revokes a secret."""
    files = write_credentials(tmp_path, ims_endpoint=ims.endpoint)
    aem = json.loads(files["aem"].read_text())["integration"]
    client_id = aem["technicalAccount"]["clientId"]
    old, new = aem["technicalAccount"]["clientSecret"], "p8e-rotated-secret"
    register = {
        "client_id": client_id,
        "client_secrets": [old, new],
        "certificate_pem": aem["publicKey"],
        "org": aem["org"],
        "technical_account_id": aem["id"],
        "metascopes": ["ent_aem_cloud_api"],
    }
    control = ims.base_url + "/__emulator/clients"
    typo = {**register, "client_secret": old}
    assert_ims_error(requests.post(control, json=typo, timeout=TIMEOUT), 400, "bad_request")
    assert_ims_error(post_jwt(ims.base_url, aem), 400, "invalid_client")  # nothing registered
    assert requests.post(control, json=register, timeout=TIMEOUT).status_code == 200
    assert post_jwt(ims.base_url, aem, secret=old).status_code == 200
    assert post_jwt(ims.base_url, aem, secret=new).status_code == 200

    revoke = {"client_id": client_id, "client_secrets": [new]}
    assert requests.post(control, json=revoke, timeout=TIMEOUT).status_code == 200
    assert_ims_error(post_jwt(ims.base_url, aem, secret=old), 401, "invalid_client")
    assert post_jwt(ims.base_url, aem, secret=new).status_code == 200


def test_control_api_answers_loopback_peers_only() -> None:
    """The control API's peer check admits 127.0.0.0/8 and ::1 (also v4-mapped), nothing else."""
    # The check itself: there is no second interface here to test it from outside.
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["10.0.0.1", "192.168.1.2", "::ffff:10.0.0.1", "fe80::1"]))


def test_stopped_emulator_stops_answering_even_on_kept_alive_connections(tmp_path: Path) -> None:
    """stop() closes pooled keep-alive connections too, so an outage is an outage."""
    emulator = Emulator.start(tmp_path)
    with requests.Session() as session:
        url = emulator.base_url + "/__emulator/stats"
        assert session.get(url, timeout=TIMEOUT).ok
        emulator.stop()
        with pytest.raises(requests.ConnectionError):
            session.get(url, timeout=TIMEOUT)
    emulator.stop()  # idempotent


# ---------------------------------------------------------------- credentials files


def test_credential_files_are_private_and_shaped_like_the_developer_console(
    shared: Emulator,
) -> None:
    """Both files are mode 0600; the AEM JSON has the SPEC's shape with CRLF PKCS#1 PEM."""
    for path in shared.credential_files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(shared.credential_files["aem"].read_text())
    assert document["ok"] is True
    assert document["statusCode"] == 200
    integration = document["integration"]
    assert integration["imsEndpoint"] == shared.endpoint
    assert "://" not in integration["imsEndpoint"]
    assert integration["metascopes"] == "ent_aem_cloud_api"
    assert set(integration["technicalAccount"]) == {"clientId", "clientSecret"}
    assert integration["id"].endswith("@techacct.adobe.com")
    assert integration["org"].endswith("@AdobeOrg")
    private_pem, public_pem = integration["privateKey"], integration["publicKey"]
    assert private_pem.startswith("-----BEGIN RSA PRIVATE KEY-----\r\n")
    assert public_pem.startswith("-----BEGIN CERTIFICATE-----\r\n")
    for pem in (private_pem, public_pem):
        assert "\n" not in pem.replace("\r\n", "")
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    certificate = x509.load_pem_x509_certificate(public_pem.encode())
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert certificate.public_key() == key.public_key()
    expiry = datetime.strptime(integration["certificateExpirationDate"], "%Y-%m-%dT%H:%M:%S.000Z")
    assert expiry.replace(tzinfo=UTC) == certificate.not_valid_after_utc
    remaining_days = (certificate.not_valid_after_utc - datetime.now(UTC)).days
    assert 363 <= remaining_days <= 365

    oauth = json.loads(shared.credential_files["oauth"].read_text())
    assert set(oauth) == {
        "client_id",
        "client_secrets",
        "scopes",
        "org_id",
        "technical_account_id",
        "ims_endpoint",
    }
    assert len(set(oauth["client_secrets"])) == 2
    assert oauth["scopes"] == ["openid", "AdobeID", "read_organizations"]


def test_restarted_emulator_keeps_and_accepts_existing_credentials(tmp_path: Path) -> None:
    """Starting on a directory that holds credentials loads them instead of regenerating."""
    first = write_credentials(tmp_path, ims_endpoint="127.0.0.1:1")
    before = {name: path.read_bytes() for name, path in first.items()}
    with Emulator.start(tmp_path) as again:
        after = {name: path.read_bytes() for name, path in again.credential_files.items()}
        assert after == before
        aem = aem_of(again)
        assert post_jwt(again.base_url, aem).status_code == 200
        assert post_oauth(again).status_code == 200


# ---------------------------------------------------------------- TLS


def test_tls_verifies_with_the_written_ca_and_fails_without(tmp_path: Path) -> None:
    """--tls serves HTTPS trusted through ca.pem only; aud then names the https base."""
    with Emulator.start(tmp_path, tls=True) as secure:
        assert secure.base_url.startswith("https://127.0.0.1:")
        assert secure.ca_path == tmp_path / CA_FILE
        assert (
            post_jwt(secure.base_url, aem_of(secure), verify=str(secure.ca_path)).status_code == 200
        )
        for host in ("127.0.0.1", "localhost"):
            url = f"https://{host}:{secure.port}/__emulator/stats"
            assert requests.get(url, verify=str(secure.ca_path), timeout=TIMEOUT).ok
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(secure.base_url + "/__emulator/stats", timeout=TIMEOUT)


# ---------------------------------------------------------------- secrets stay out of logs


def test_request_log_lines_carry_outcome_and_debug_id_but_no_secret(
    ims: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """One log line per request with method, path, outcome and debug id; never a secret."""
    caplog.set_level(logging.DEBUG, logger="ims_emulator")
    aem = aem_of(ims)
    token = assertion(ims.base_url, aem)
    good = post_jwt(ims.base_url, aem, token)
    bad = post_jwt(ims.base_url, aem, token, secret="p8e-a-wrong-secret-value")
    oauth = post_oauth(ims, secret_index=1)
    text = caplog.text
    assert (
        f"POST /ims/exchange/jwt 200 issued client_id={aem['technicalAccount']['clientId']}" in text
    )
    assert good.headers["x-debug-id"] in text
    assert bad.headers["x-debug-id"] in text
    assert "401 invalid_client" in text
    for secret in (
        aem["technicalAccount"]["clientSecret"],
        "p8e-a-wrong-secret-value",
        token,
        good.json()["access_token"],
        oauth.json()["access_token"],
        *oauth_of(ims)["client_secrets"],
        aem["privateKey"].split("\r\n")[1],
    ):
        assert secret not in text


def test_multipart_form_is_accepted_like_ims(tmp_path: Path) -> None:
    """IMS takes multipart/form-data too (Adobe's @adobe/jwt-auth sends it): OAuth works."""
    with Emulator.start(tmp_path / "creds") as emulator:
        oauth = json.loads(emulator.credential_files["oauth"].read_text())
        response = requests.post(
            emulator.base_url + "/ims/token/v3",
            files={
                "grant_type": (None, "client_credentials"),
                "client_id": (None, oauth["client_id"]),
                "client_secret": (None, oauth["client_secrets"][0]),
                "scope": (None, ",".join(oauth["scopes"])),
            },
            timeout=10,
        )
        assert response.status_code == 200
        assert response.json()["token_type"] == "bearer"
