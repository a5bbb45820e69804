"""The two token exchanges: authenticate the client, check what it asks for, issue a token.

- JWT (`/ims/exchange/jwt`): `expires_in` in **milliseconds**;
- OAuth Server-to-Server (`/ims/token/v3`, `client_credentials`): `expires_in` in **seconds**.

An unknown client is 400 `invalid_client`, a wrong secret 401 `invalid_client`
("invalid client_secret parameter"), as Adobe's JWT documentation lists them.
Issued tokens are JWTs shaped like IMS's (`created_at` and `expires_in` as
strings of milliseconds), dated by the emulator's clock and signed with its
own key.
"""

from __future__ import annotations

import uuid
from typing import Any

import jwt

from ims_emulator import errors
from ims_emulator.assertion import verify_assertion
from ims_emulator.errors import ImsError, bad_request
from ims_emulator.specs import ClientSpec
from ims_emulator.state import State

__all__ = ["exchange_jwt", "exchange_oauth"]


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise bad_request(f"missing required parameter {name}")
    return value


def _authenticate(state: State, form: dict[str, str]) -> ClientSpec:
    client_id, secret = _required(form, "client_id"), _required(form, "client_secret")
    client = state.client(client_id)
    if client is None:
        raise ImsError(400, "invalid_client", errors.BAD_CLIENT_ID)
    if not client.secret_matches(secret):
        raise ImsError(401, "invalid_client", errors.BAD_CLIENT_SECRET)
    return client


def exchange_jwt(state: State, form: dict[str, str], base: str) -> dict[str, Any]:
    """The legacy JWT exchange. `base` is the IMS base URL as the client reached it."""
    assertion = _required(form, "jwt_token")
    client = _authenticate(state, form)
    if client.certificate is None:
        raise ImsError(400, "unauthorized_client", "client has no certificate binding")
    now = state.now()
    metascopes = verify_assertion(assertion, client, base, now)
    user_id = client.technical_account_id or ""
    token, ttl_ms = _issue(state, client, user_id, ",".join(metascopes), now)
    return {"token_type": "bearer", "access_token": token, "expires_in": ttl_ms}


def exchange_oauth(state: State, form: dict[str, str]) -> dict[str, Any]:
    """OAuth Server-to-Server. An `org_id` field is accepted (Adobe's libraries send it)."""
    if form.get("grant_type") != "client_credentials":
        raise ImsError(400, "unsupported_grant_type", "grant_type must be client_credentials")
    client = _authenticate(state, form)
    if not client.scopes:
        raise ImsError(400, "unauthorized_client", "client_credentials not enabled")
    if form.get("org_id"):
        state.count_org_id(form["org_id"])
    requested = [s.strip() for s in form.get("scope", "").split(",") if s.strip()]
    if not requested:
        raise ImsError(400, "invalid_scope", "no scope requested")
    ungranted = sorted(set(requested) - client.scopes)
    if ungranted:
        raise ImsError(400, "invalid_scope", f"invalid scope: {','.join(ungranted)}")
    user_id = client.technical_account_id or f"{client.client_id}@AdobeID"
    token, _ = _issue(state, client, user_id, ",".join(requested), state.now())
    # Round down, as IMS does, but never 0: a zero lifetime would be a hot loop.
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": max(1, int(state.token_ttl_s)),
    }


def _issue(
    state: State, client: ClientSpec, user_id: str, scope: str, now: float
) -> tuple[str, int]:
    now_ms = int(now * 1000)
    ttl_ms = max(1, round(state.token_ttl_s * 1000))
    payload = {
        "id": f"{now_ms}_{uuid.uuid4()}_ue1",
        "type": "access_token",
        "client_id": client.client_id,
        "user_id": user_id,
        "as": "ims-na1",
        "aa_id": user_id,
        # IMS writes both as strings of milliseconds.
        "created_at": str(now_ms),
        "expires_in": str(ttl_ms),
        "scope": scope,
    }
    headers = {"kid": "ims_na1-key-at-1", "x5u": "ims_na1-key-at-1.cer", "itt": "at"}
    token = jwt.encode(payload, state.token_key, algorithm="RS256", headers=headers)
    state.count_issued()
    return token, ttl_ms
