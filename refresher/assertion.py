"""The JWT assertion of the legacy exchange: claims (pure) and the RS256 signature."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from refresher.credentials import Credentials
from refresher.errors import CredentialsError


def build_claims(
    credentials: Credentials, base_url: str, now: datetime, ttl_s: int
) -> dict[str, Any]:
    """The claims IMS checks, exactly as Adobe's `@adobe/jwt-auth` builds them.

    `exp` is an integer (IMS rejects a float); one `{base}/s/{metascope}: true`
    claim per metascope; `aud` names the client on the same IMS base URL.
    """
    claims: dict[str, Any] = {
        "iss": credentials.org_id,
        "sub": credentials.technical_account_id,
        "aud": f"{base_url}/c/{credentials.client_id}",
        "exp": int(now.timestamp()) + int(ttl_s),
    }
    for metascope in credentials.metascopes:
        claims[f"{base_url}/s/{metascope}"] = True
    return claims


def sign(claims: dict[str, Any], key: RSAPrivateKey | None) -> str:
    if key is None:
        raise CredentialsError("the JWT exchange needs a private key", field="private_key")
    return jwt.encode(claims, key, algorithm="RS256")
