"""The JWT assertion of the legacy exchange: claims (pure) and the RS256 signature.

Signed here rather than with PyJWT: the same bytes (its header, sorted, and payload, both
compact JSON; a test compares the two), without importing PyJWT and its algorithm table
(a few ms at start) nor its per-call dispatch on every cycle.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
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
    payload = json.dumps(claims, separators=(",", ":")).encode("utf-8")
    signing_input = _HEADER + b"." + b64url(payload)
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return (signing_input + b"." + b64url(signature)).decode("ascii")


def b64url(data: bytes) -> bytes:
    """Base64url without padding (RFC 7515)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


# PyJWT's header for RS256: compact JSON, keys sorted.
_HEADER: Final = b64url(b'{"alg":"RS256","typ":"JWT"}')
