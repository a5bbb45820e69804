"""IMS's refusals: a status, an `error` code and an `error_description`, as IMS words them.

The texts users meet in Adobe's public issue trackers are kept verbatim: the
client's hints match on them. Where IMS's own wording is not public, the text
here is ours and says so by not pretending to be quoted.
"""

from __future__ import annotations

__all__ = ["ImsError"]

# Quoted from real IMS answers (Adobe's docs and public issue threads).
SIGNATURE_UNMATCHED = "Could not match JWT signature to any of the bindings"
METASCOPES_NOT_SUBSET = (
    "The metascopes in the JWT are not a subset of the metascopes in the binding"
)
JWT_EXPIRED = "JWT token is expired"
JWT_NOT_YET_VALID = "JWT token is not yet valid"
JWT_MALFORMED = "JWT token is incorrectly formatted, and can not be decoded."
BAD_CLIENT_SECRET = "invalid client_secret parameter"  # noqa: S105 - an error text
BAD_CLIENT_ID = "invalid client_id parameter"


class ImsError(Exception):
    """IMS refused the request: the status and the error body it answers with."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.description = description

    def document(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def bad_request(description: str) -> ImsError:
    return ImsError(400, "bad_request", description)


def invalid_token(description: str) -> ImsError:
    return ImsError(400, "invalid_token", description)
