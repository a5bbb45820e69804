"""`AccessToken`: the value, when it was issued and when it expires."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_LIFETIME = timedelta(hours=48)
"""The longest lifetime we hold a token for; IMS issues 24 h. A published or shared token
claiming more was not written by us and is not adopted."""

# Clocks of replicas (and of whoever wrote a published token) drift a little; more than
# this in the future is a forgery or a broken clock, not skew.
_ISSUED_SLACK = timedelta(seconds=5)


def rfc3339(instant: datetime) -> str:
    """RFC 3339 UTC with a `Z`, to the second (what `expires_at` files hold)."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    """Inverse of `rfc3339`; accepts `Z` or an offset. Raises ValueError."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class AccessToken:
    """An IMS access token. `issued_at` is when the request was *sent*."""

    value: str = field(repr=False)
    issued_at: datetime
    expires_at: datetime
    flow: str
    client_id: str
    ims_endpoint: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type, not a secret

    def __repr__(self) -> str:
        return (
            f"AccessToken(flow={self.flow!r}, client_id={self.client_id!r}, "
            f"issued_at={rfc3339(self.issued_at)}, expires_at={rfc3339(self.expires_at)}, "
            "value=<redacted>)"
        )

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.issued_at

    def is_valid(self, now: datetime) -> bool:
        return now < self.expires_at

    def is_plausible(self, now: datetime) -> bool:
        """Could IMS have issued this, as we recorded it? The one adoption rule for every
        sink: issued not after `now` (give or take a few seconds of skew), expiring after
        it was issued, and living no longer than `MAX_LIFETIME`."""
        return (
            self.issued_at <= now + _ISSUED_SLACK
            and self.expires_at > self.issued_at
            and self.lifetime <= MAX_LIFETIME
        )

    # The published document: the same bytes go to the file and the Secret sink.
    def to_document(self) -> dict[str, Any]:
        return {
            "access_token": self.value,
            "token_type": self.token_type,
            "expires_at": rfc3339(self.expires_at),
            "issued_at": rfc3339(self.issued_at),
            "expires_in": int(self.lifetime.total_seconds()),
            "flow": self.flow,
            "client_id": self.client_id,
            "ims_endpoint": self.ims_endpoint,
        }

    def published_files(self) -> dict[str, bytes]:
        """File name -> content, exactly as the SPEC lists them."""
        return {
            "access_token": self.value.encode(),
            "expires_at": rfc3339(self.expires_at).encode(),
            "token.json": json.dumps(self.to_document(), sort_keys=True).encode(),
        }

    @classmethod
    def from_document(cls, document: object) -> AccessToken:
        """Rebuild a published token (adoption). Raises ValueError on anything off."""
        if not isinstance(document, dict):
            raise ValueError("token.json is not an object")
        try:
            value = document["access_token"]
            issued = parse_rfc3339(str(document["issued_at"]))
            expires = parse_rfc3339(str(document["expires_at"]))
            flow = str(document.get("flow", ""))
            client_id = str(document.get("client_id", ""))
            ims_endpoint = str(document.get("ims_endpoint", ""))
            token_type = str(document.get("token_type", "bearer"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"token.json lacks {exc}") from None
        if not isinstance(value, str) or not value:
            raise ValueError("token.json has no access_token")
        if expires <= issued:
            raise ValueError("token.json expires before it was issued")
        return cls(value, issued, expires, flow, client_id, ims_endpoint, token_type)
