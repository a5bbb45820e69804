"""The frozen `Credentials` the rest of the pipeline receives, with a redacted `repr`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import rsa

Flow = Literal["jwt", "oauth"]


@dataclass(frozen=True)
class Credentials:
    """Validated credentials for one IMS integration. Secrets never reach `repr`."""

    source: str
    flow: Flow
    client_id: str
    client_secrets: tuple[str, ...]
    ims_endpoint: str | None
    org_id: str | None
    technical_account_id: str | None
    metascopes: tuple[str, ...]
    scopes: tuple[str, ...]
    private_key: rsa.RSAPrivateKey | None
    certificate_not_after: datetime | None
    key_size: int | None

    def __post_init__(self) -> None:
        # Programming errors only (load_credentials reports user errors itself):
        # a hand-built Credentials must still satisfy what the exchange relies on.
        problem = self._shape_problem()
        if problem is not None:
            raise ValueError(problem)

    def _shape_problem(self) -> str | None:
        if self.flow not in ("jwt", "oauth"):
            return "flow must be 'jwt' or 'oauth'"
        if not self.client_id or not self.client_secrets:
            return "client_id and at least one client secret are required"
        if self.flow == "jwt":
            needs = (
                self.private_key is not None,
                self.metascopes,
                self.org_id,
                self.technical_account_id,
            )
            if not all(needs):
                return "the JWT flow needs private_key, metascopes, org_id and technical_account_id"
        elif not self.scopes:
            return "the OAuth flow needs at least one scope"
        return None

    def __repr__(self) -> str:
        key = f"<RSA {self.key_size} redacted>" if self.private_key is not None else None
        return (
            f"Credentials(source={self.source!r}, flow={self.flow!r}, "
            f"client_id={self.client_id!r}, "
            f"client_secrets=<{len(self.client_secrets)} redacted>, "
            f"ims_endpoint={self.ims_endpoint!r}, org_id={self.org_id!r}, "
            f"technical_account_id={self.technical_account_id!r}, "
            f"metascopes={self.metascopes!r}, scopes={self.scopes!r}, private_key={key}, "
            f"certificate_not_after={self.certificate_not_after!r}, key_size={self.key_size!r})"
        )

    def summary(self) -> dict[str, object]:
        """What `refresher check` prints and the logs may carry: no secret, JSON-ready."""
        not_after = self.certificate_not_after
        return {
            "source": self.source,
            "flow": self.flow,
            "client_id": self.client_id,
            "client_secret_count": len(self.client_secrets),
            "ims_endpoint": self.ims_endpoint,
            "org_id": self.org_id,
            "technical_account_id": self.technical_account_id,
            "scopes": list(self.scopes),
            "metascopes": list(self.metascopes),
            "key_type": "RSA" if self.private_key is not None else None,
            "key_size": self.key_size,
            "certificate_not_after": (
                not_after.isoformat().replace("+00:00", "Z") if not_after is not None else None
            ),
        }
