"""The emulator is no stricter than IMS (issue 12 item 8) and keeps a clock of its own.

What Adobe's own clients send must pass: the OAuth endpoint at /ims/token/v2,
the JWT exchange at /ims/exchange/v1/jwt, form fields in the query string, JWT
lifetimes a little over 24 h, OAuth's `org_id` field, and a Developer Console
project JSON as credentials. `--clock-offset` moves the emulator's clock: its
`Date` header, how it judges `exp`/`iat`/`nbf`, and the tokens' `created_at`.
Raw requests + PyJWT, never the refresher client.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from ims_emulator import Emulator
from tests.support.ims_wire import (
    EXPIRED,
    NOT_YET,
    TIMEOUT,
    aem_of,
    assert_ims_error,
    assertion,
    oauth_of,
    post_jwt,
    token_claims,
)

MAX_SKEW_S = 5  # a Date header and a local clock read a moment apart


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with Emulator.start(tmp_path_factory.mktemp("ims-compat")) as started:
        yield started


@pytest.fixture
def ims(emulator: Emulator) -> Iterator[Emulator]:
    """The module's emulator with a true clock and zeroed counters around each test."""
    emulator.set_clock_offset(0)
    emulator.reset_stats()
    yield emulator
    emulator.set_clock_offset(0)


def oauth_form(ims: Emulator, **changes: str) -> dict[str, str]:
    oauth = oauth_of(ims)
    form = {
        "grant_type": "client_credentials",
        "client_id": oauth["client_id"],
        "client_secret": oauth["client_secrets"][0],
        "scope": ",".join(oauth["scopes"]),
    }
    form.update(changes)
    return form


def jwt_form(ims: Emulator, claims: dict[str, Any] | None = None) -> dict[str, str]:
    aem = aem_of(ims)
    return {
        "client_id": aem["technicalAccount"]["clientId"],
        "client_secret": aem["technicalAccount"]["clientSecret"],
        "jwt_token": assertion(ims.base_url, aem, claims=claims),
    }


def date_offset(response: requests.Response) -> float:
    """How far the answer's Date header is from this machine's clock, in seconds."""
    return parsedate_to_datetime(response.headers["Date"]).timestamp() - time.time()


# ---------------------------------------------------------------- endpoints and forms


@pytest.mark.parametrize("path", ["/ims/token/v3", "/ims/token/v2"])
def test_oauth_is_served_at_v3_and_v2(ims: Emulator, path: str) -> None:
    """aio-lib-ims, aio-lib-core-auth and ims-go use /ims/token/v2: same answer as v3."""
    response = requests.post(ims.base_url + path, data=oauth_form(ims), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 86_400


@pytest.mark.parametrize(
    "path", ["/ims/exchange/jwt", "/ims/exchange/jwt/", "/ims/exchange/v1/jwt"]
)
def test_jwt_exchange_is_served_at_each_path_adobe_clients_use(ims: Emulator, path: str) -> None:
    """ims-go posts to /ims/exchange/v1/jwt, @adobe/jwt-auth to the trailing-slash path."""
    response = requests.post(ims.base_url + path, data=jwt_form(ims), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 86_400_000


def test_form_fields_in_the_query_string_are_accepted_and_never_logged(
    ims: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """OAuth with every field in the query string and no body (Adobe's curl example) gets a
    token; the JWT exchange too; the request log keeps the path only, never the secret."""
    caplog.set_level(logging.INFO, logger="ims_emulator")
    form = oauth_form(ims)
    oauth = requests.post(ims.base_url + "/ims/token/v3", params=form, timeout=TIMEOUT)
    assert oauth.status_code == 200, oauth.text
    exchange = requests.post(
        ims.base_url + "/ims/exchange/jwt", params=jwt_form(ims), timeout=TIMEOUT
    )
    assert exchange.status_code == 200, exchange.text
    assert "POST /ims/token/v3 200 issued" in caplog.text
    assert form["client_secret"] not in caplog.text
    assert "?" not in caplog.text


def test_a_field_split_between_query_and_body_is_one_form(ims: Emulator) -> None:
    """Part of the form in the query, part in the body: one form. The same field with two
    different values is refused (which one would IMS take?), with equal values accepted."""
    form = oauth_form(ims)
    query = {"grant_type": form.pop("grant_type"), "client_id": form["client_id"]}
    split = requests.post(ims.base_url + "/ims/token/v3", params=query, data=form, timeout=TIMEOUT)
    assert split.status_code == 200, split.text
    clash = requests.post(
        ims.base_url + "/ims/token/v3",
        params={"client_id": "someone-else"},
        data=oauth_form(ims),
        timeout=TIMEOUT,
    )
    assert_ims_error(clash, 400, "bad_request")


def test_oauth_org_id_field_is_accepted_and_recorded(ims: Emulator) -> None:
    """`org_id` (sent by Adobe's libraries) is accepted and counted in stats, so a test can
    see that a client sent it."""
    org = oauth_of(ims)["org_id"]
    response = requests.post(
        ims.base_url + "/ims/token/v3", data=oauth_form(ims, org_id=org), timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    requests.post(ims.base_url + "/ims/token/v3", data=oauth_form(ims), timeout=TIMEOUT)
    assert ims.stats()["org_ids"] == {org: 1}


@pytest.mark.parametrize(
    ("claims", "case"),
    [
        ({"exp": 87_000}, "exp 87,000 s ahead, no iat (older @adobe/jwt-auth)"),
        ({"iat": 0, "exp": 87_000}, "iat now, exp 87,000 s later"),
        ({"iat": -600, "exp": 86_400}, "iat 10 min ago, exp - iat = 87,000"),
    ],
)
def test_jwt_lifetimes_a_little_over_24_hours_are_accepted(
    ims: Emulator, claims: dict[str, int], case: str
) -> None:
    """IMS accepted the 87,000 s assertions older @adobe/jwt-auth sent: so does the emulator."""
    now = int(time.time())
    form = jwt_form(ims, {name: now + value for name, value in claims.items()})
    response = requests.post(ims.base_url + "/ims/exchange/jwt", data=form, timeout=TIMEOUT)
    assert response.status_code == 200, (case, response.text)


# ---------------------------------------------------------------- Developer Console project JSON


def console_project(org: str, client_id: str, client_secrets: list[str]) -> dict[str, Any]:
    """The Developer Console project download with one OAuth Server-to-Server credential."""
    return {
        "project": {
            "id": "4566206088345000000",
            "name": "refresher",
            "org": {"id": "1234", "name": "Example", "ims_org_id": org},
            "workspace": {
                "id": "4566206088345000001",
                "name": "Production",
                "details": {
                    "credentials": [
                        {"id": "1", "name": "API key", "integration_type": "apikey"},
                        {
                            "id": "123",
                            "name": "Credential",
                            "integration_type": "oauth_server_to_server",
                            "oauth_server_to_server": {
                                "client_id": client_id,
                                "client_secrets": client_secrets,
                                "technical_account_email": "x@techacct.adobe.com",
                                "technical_account_id": "ABC@techacct.adobe.com",
                                "scopes": ["openid", "AdobeID", "read_organizations"],
                            },
                        },
                    ],
                },
            },
        }
    }


@pytest.mark.parametrize("generate", [False, True])
def test_a_developer_console_project_json_in_the_credentials_dir_is_a_client(
    tmp_path: Path, generate: bool
) -> None:
    """`--credentials-dir` (or a generating start) registers each OAuth Server-to-Server
    credential of a project JSON found there; a JSON of no known shape is skipped."""
    client_id, secret = secrets.token_hex(16), f"p8e-{secrets.token_urlsafe(24)}"
    project = console_project("ORG@AdobeOrg", client_id, [secret])
    (tmp_path / "project-4566206088345000000-Production.json").write_text(json.dumps(project))
    (tmp_path / "notes.json").write_text('{"hello": "world"}')
    with Emulator.start(tmp_path, generate=generate) as started:
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret,
            "scope": "openid,AdobeID",
        }
        response = requests.post(started.base_url + "/ims/token/v3", data=form, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        assert token_claims(started, response.json()["access_token"])["client_id"] == client_id
        assert bool(started.credential_files) is generate


# ---------------------------------------------------------------- the clock offset


def test_clock_offset_moves_the_date_header_and_created_at(tmp_path: Path) -> None:
    """With --clock-offset 600 every answer's Date runs 10 minutes ahead, and issued tokens'
    created_at is dated by that clock."""
    with Emulator.start(tmp_path, clock_offset_s=600) as ahead:
        response = requests.post(
            ahead.base_url + "/ims/token/v3", data=oauth_form(ahead), timeout=TIMEOUT
        )
        assert response.status_code == 200, response.text
        assert abs(date_offset(response) - 600) <= MAX_SKEW_S
        created_s = int(token_claims(ahead, response.json()["access_token"])["created_at"]) / 1000
        assert abs(created_s - time.time() - 600) <= MAX_SKEW_S
        assert ahead.stats()["clock_offset_seconds"] == 600


def test_a_client_clock_10_minutes_behind_signs_an_expired_jwt(ims: Emulator) -> None:
    """The emulator 10 min ahead judges a JWT with exp = client now + 300 s as IMS does:
    400 invalid_token "JWT token is expired"; with a true clock the same JWT passes."""
    ims.set_clock_offset(600)
    aem = aem_of(ims)
    token = assertion(ims.base_url, aem)
    rejected = post_jwt(ims.base_url, aem, token)
    assert_ims_error(rejected, 400, "invalid_token")
    assert rejected.json()["error_description"] == EXPIRED
    assert abs(date_offset(rejected) - 600) <= MAX_SKEW_S
    ims.set_clock_offset(0)
    assert post_jwt(ims.base_url, aem, token).status_code == 200


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_client_clock_10_minutes_ahead_is_not_yet_valid(ims: Emulator, claim: str) -> None:
    """The emulator 10 min behind: an assertion issued or valid from the client's "now" is
    400 invalid_token "JWT token is not yet valid"."""
    ims.set_clock_offset(-600)
    now = int(time.time())
    response = requests.post(
        ims.base_url + "/ims/exchange/jwt",
        data=jwt_form(ims, {claim: now, "exp": now + 300}),
        timeout=TIMEOUT,
    )
    assert_ims_error(response, 400, "invalid_token")
    assert response.json()["error_description"] == NOT_YET


def test_control_api_reads_and_moves_the_clock(ims: Emulator) -> None:
    """GET/POST /__emulator/clock read and change the offset of a running emulator; a bad
    offset is refused without changing it."""
    clock = ims.base_url + "/__emulator/clock"
    moved = requests.post(clock, json={"offset_seconds": -120}, timeout=TIMEOUT)
    assert moved.status_code == 200
    assert moved.json() == {"offset_seconds": -120}
    assert requests.get(clock, timeout=TIMEOUT).json() == {"offset_seconds": -120}
    assert abs(date_offset(requests.get(clock, timeout=TIMEOUT)) + 120) <= MAX_SKEW_S
    for bad in ({"offset_seconds": "soon"}, {"offset_seconds": 1e12}, {"offset": 5}, {}):
        assert_ims_error(requests.post(clock, json=bad, timeout=TIMEOUT), 400, "bad_request")
    assert ims.clock_offset_s == -120


def test_every_answer_carries_a_date_and_every_error_a_debug_id(ims: Emulator) -> None:
    """IMS answers always carry Date; errors carry x-debug-id: a 404, a 405, a garbled
    request line (http.server's own error path) alike, all on the emulator's clock."""
    ims.set_clock_offset(3600)
    for response in (
        requests.get(ims.base_url + "/nowhere", timeout=TIMEOUT),
        requests.get(ims.base_url + "/ims/token/v3", timeout=TIMEOUT),
    ):
        assert response.headers["x-debug-id"]
        assert abs(date_offset(response) - 3600) <= MAX_SKEW_S
    with socket.create_connection(("127.0.0.1", ims.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
    head = reply.partition(b"\r\n\r\n")[0].decode()
    assert "\r\nx-debug-id: " in head
    date = next(line for line in head.split("\r\n") if line.startswith("Date: "))
    assert abs(parsedate_to_datetime(date[6:]).timestamp() - time.time() - 3600) <= MAX_SKEW_S


def test_clock_offset_is_bounded() -> None:
    """An offset past ten years either way is refused at start (ValueError), not overflowed."""
    with pytest.raises(ValueError, match="clock offset"):
        Emulator.start(None, clock_offset_s=1e12)


def test_jwt_of_an_unregistered_key_is_no_binding_even_with_a_skewed_clock(ims: Emulator) -> None:
    """The signature is checked before the times: a stranger's key gets "Could not match JWT
    signature" whatever its exp, so the client's hint names the key, not the clock."""
    ims.set_clock_offset(600)
    aem = aem_of(ims)
    stranger = jwt.encode(
        {"exp": int(time.time()) - 100},
        _stranger_key_pem(),
        algorithm="RS256",
    )
    response = post_jwt(ims.base_url, aem, stranger)
    assert_ims_error(response, 400, "invalid_token")
    assert "Could not match JWT signature" in response.json()["error_description"]


def _stranger_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


# ---------------------------------------------------------------- attacks on the new surfaces


def test_a_fifo_or_a_huge_json_among_the_credentials_is_skipped_not_a_hang(tmp_path: Path) -> None:
    """Scanning the credentials dir for project JSON opens regular files only (a planted FIFO
    named *.json would block forever) and reads at most 1 MiB of each."""
    os.mkfifo(tmp_path / "planted.json")
    (tmp_path / "huge.json").write_bytes(b'{"project": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    started_at = time.monotonic()
    with Emulator.start(tmp_path) as started:
        assert time.monotonic() - started_at < 10
        response = requests.post(
            started.base_url + "/ims/token/v3", data=oauth_form(started), timeout=TIMEOUT
        )
        assert response.status_code == 200, response.text


def test_a_query_string_of_too_many_fields_is_a_bad_request(ims: Emulator) -> None:
    """More than 50 fields (query and body together) is 400 bad_request, not a crash."""
    params = {f"field{i}": "x" for i in range(60)}
    response = requests.post(ims.base_url + "/ims/token/v3", params=params, timeout=TIMEOUT)
    assert_ims_error(response, 400, "bad_request")
    assert requests.post(ims.base_url + "/ims/token/v3", data=oauth_form(ims), timeout=TIMEOUT).ok
