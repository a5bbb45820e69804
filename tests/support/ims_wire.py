"""IMS's wire protocol spoken by hand (raw requests + PyJWT, never the refresher client):
the emulator is the yardstick for the client, so its tests build and sign the JWT
assertion, post real forms on loopback and read IMS's shapes back with these."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import requests

from ims_emulator import Emulator

TIMEOUT = 5  # seconds; every request to the emulator is answered in milliseconds
DROP = object()  # marks a claim to delete from the default assertion

# IMS's error descriptions for refused assertions, verbatim.
SIGNATURE = "Could not match JWT signature to any of the bindings"
NOT_SUBSET = "The metascopes in the JWT are not a subset of the metascopes in the binding"
MALFORMED = "JWT token is incorrectly formatted, and can not be decoded."
EXPIRED = "JWT token is expired"
NOT_YET = "JWT token is not yet valid"


def aem_of(emulator: Emulator) -> dict[str, Any]:
    """The `integration` object of the emulator's AEM credentials."""
    document = json.loads(emulator.credential_files["aem"].read_text())
    integration: dict[str, Any] = document["integration"]
    return integration


def oauth_of(emulator: Emulator) -> dict[str, Any]:
    """The emulator's OAuth credentials document."""
    document: dict[str, Any] = json.loads(emulator.credential_files["oauth"].read_text())
    return document


def assertion(
    base: str, aem: dict[str, Any], key: Any = None, claims: dict[str, Any] | None = None
) -> str:
    """An RS256 JWT as Adobe's jwt-auth builds it; `claims` override defaults (DROP deletes)."""
    client_id = aem["technicalAccount"]["clientId"]
    payload: dict[str, Any] = {
        "iss": aem["org"],
        "sub": aem["id"],
        "aud": f"{base}/c/{client_id}",
        "exp": int(time.time()) + 300,
        f"{base}/s/ent_aem_cloud_api": True,
    }
    for name, value in (claims or {}).items():
        if value is DROP:
            payload.pop(name, None)
        else:
            payload[name] = value
    return jwt.encode(payload, key or aem["privateKey"], algorithm="RS256")


def post_jwt(
    base: str,
    aem: dict[str, Any],
    token: str | None = None,
    *,
    secret: str | None = None,
    client_id: str | None = None,
    path: str = "/ims/exchange/jwt",
    verify: str | bool = True,
) -> requests.Response:
    """The JWT exchange as Adobe's clients post it (a signed default assertion unless given)."""
    form = {
        "client_id": client_id or aem["technicalAccount"]["clientId"],
        "client_secret": secret or aem["technicalAccount"]["clientSecret"],
        "jwt_token": token if token is not None else assertion(base, aem),
    }
    return requests.post(base + path, data=form, timeout=TIMEOUT, verify=verify)


def post_oauth(
    emulator: Emulator,
    *,
    secret_index: int = 0,
    scope: str = "openid,AdobeID,read_organizations",
    grant_type: str = "client_credentials",
    client_id: str | None = None,
    secret: str | None = None,
    timeout: float = TIMEOUT,
) -> requests.Response:
    """The OAuth client-credentials request with the emulator's OAuth client."""
    oauth = oauth_of(emulator)
    form = {
        "grant_type": grant_type,
        "client_id": client_id or oauth["client_id"],
        "client_secret": secret or oauth["client_secrets"][secret_index],
        "scope": scope,
    }
    return requests.post(emulator.base_url + "/ims/token/v3", data=form, timeout=timeout)


def assert_ims_error(response: requests.Response, status: int, error: str) -> None:
    """The answer is IMS's error shape: JSON with exactly error and error_description."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    assert body["error_description"]
    assert response.headers.get("x-debug-id")


def token_claims(emulator: Emulator, token: str) -> dict[str, Any]:
    """The claims of an access token the emulator issued (its expiry not checked)."""
    claims: dict[str, Any] = jwt.decode(
        token, emulator.token_public_key_pem, algorithms=["RS256"], options={"verify_exp": False}
    )
    return claims
