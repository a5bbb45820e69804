"""Check a JWT assertion the way IMS does, by the emulator's clock; name the metascopes it asks for.

Order and answers, as IMS gives them:

1. not a JWS, or not RS256 → 400 `invalid_token`, "JWT token is incorrectly formatted...";
2. the signature verifies against no registered certificate of the client, or
   that certificate has expired → 400 `invalid_token`, "Could not match JWT
   signature to any of the bindings";
3. `aud` is not `{IMS base}/c/{client_id}` → 400 `invalid_client`;
   `iss`/`sub` name another organization or account → 400 `invalid_token`;
4. `exp` not an integer → "incorrectly formatted"; passed → "JWT token is
   expired"; `nbf` or `iat` ahead of the clock by more than `LEEWAY_S` → "JWT
   token is not yet valid";
5. a lifetime over `MAX_LIFETIME_S` → 400 `invalid_token`;
6. metascope claims `{IMS base}/s/{name}: true`, each granted to the client,
   at least one → else 400 `invalid_scope`, "The metascopes in the JWT are not
   a subset of the metascopes in the binding".

Limits, where IMS's rule is not public and the emulator takes the lenient
reading so that it is never stricter than IMS: the lifetime cap is 87,000 s
(what older `@adobe/jwt-auth` sent, and IMS accepted) plus 300 s of slack for
rounding and skew, counted from `iat` when present, else from the clock; a
future `iat`/`nbf` gets `LEEWAY_S` of grace.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from ims_emulator import errors
from ims_emulator.errors import ImsError, invalid_token
from ims_emulator.specs import ClientSpec

__all__ = ["LEEWAY_S", "MAX_LIFETIME_S", "verify_assertion"]

MAX_LIFETIME_S = 87_000 + 300
LEEWAY_S = 60
_METASCOPE_CLAIM = re.compile(r"^https?://[^/]+/s/")


def verify_assertion(assertion: str, client: ClientSpec, base: str, now: float) -> list[str]:
    """The metascopes a valid assertion asks for, in claim order. Raises ImsError."""
    claims = _verified_claims(assertion, client, now)
    if claims.get("aud") != f"{base}/c/{client.client_id}":
        raise ImsError(400, "invalid_client", "JWT aud does not match the client_id")
    if claims.get("iss") != client.org:
        raise invalid_token("iss does not match the client's organization")
    if claims.get("sub") != client.technical_account_id:
        raise invalid_token("sub does not match the technical account")
    _check_times(claims, now)
    return _metascopes(claims, client, base)


def _verified_claims(assertion: str, client: ClientSpec, now: float) -> dict[str, Any]:
    """The payload of an RS256 JWS signed by the client's certificate key."""
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError:
        raise invalid_token(errors.JWT_MALFORMED) from None
    if header.get("alg") != "RS256":
        raise invalid_token(errors.JWT_MALFORMED)
    certificate = client.certificate
    public_key = certificate.public_key() if certificate is not None else None
    # An expired binding is no binding: IMS answers as for a key it does not know.
    if (
        certificate is None
        or not isinstance(public_key, rsa.RSAPublicKey)
        or certificate.not_valid_after_utc.timestamp() <= now
    ):
        raise invalid_token(errors.SIGNATURE_UNMATCHED)
    jws = jwt.PyJWS(options={"verify_signature": True, "enforce_minimum_key_length": True})
    try:
        raw = jws.decode(assertion, key=public_key, algorithms=["RS256"])
    except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
        raise invalid_token(errors.SIGNATURE_UNMATCHED) from None
    except jwt.InvalidTokenError:
        raise invalid_token(errors.JWT_MALFORMED) from None
    try:
        claims = json.loads(raw)
    except ValueError:
        raise invalid_token(errors.JWT_MALFORMED) from None
    if not isinstance(claims, dict):
        raise invalid_token(errors.JWT_MALFORMED)
    return claims


def _seconds(claims: dict[str, Any], name: str, *, required: bool) -> int | None:
    """An integer-seconds claim. IMS parses these as a long: 1.7e9 is malformed, not rounded."""
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_token(errors.JWT_MALFORMED)
    return value


def _check_times(claims: dict[str, Any], now: float) -> None:
    exp = _seconds(claims, "exp", required=True)
    iat = _seconds(claims, "iat", required=False)
    nbf = _seconds(claims, "nbf", required=False)
    assert exp is not None  # noqa: S101 - required above; mypy cannot tell
    if exp <= now:
        raise invalid_token(errors.JWT_EXPIRED)
    if any(t is not None and t > now + LEEWAY_S for t in (iat, nbf)):
        raise invalid_token(errors.JWT_NOT_YET_VALID)
    if exp - (now if iat is None else min(iat, now)) > MAX_LIFETIME_S:
        raise invalid_token(f"JWT token lifetime is over {MAX_LIFETIME_S} seconds")


def _metascopes(claims: dict[str, Any], client: ClientSpec, base: str) -> list[str]:
    prefix = f"{base}/s/"
    requested = []
    for name, value in claims.items():
        if not _METASCOPE_CLAIM.match(name):
            continue
        metascope = name[len(prefix) :] if name.startswith(prefix) else None
        # Another IMS host's claim, a value other than true, an ungranted name: IMS
        # answers all three alike.
        if metascope is None or value is not True or metascope not in (client.metascopes or ()):
            raise ImsError(400, "invalid_scope", errors.METASCOPES_NOT_SUBSET)
        requested.append(metascope)
    if not requested:
        raise ImsError(400, "invalid_scope", "the JWT asks for no metascope")
    return requested
