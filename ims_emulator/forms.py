"""A token request's fields: the query string plus a urlencoded or multipart body.

IMS takes the form in the query string too (Adobe's OAuth docs show `curl -X
POST '.../ims/token/v3?grant_type=...&client_id=...'` with no body), and as
multipart/form-data (`@adobe/jwt-auth` posts with `form-data`). A field given
twice with different values is refused: the emulator cannot know which one IMS
would take. At most 50 fields.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Iterable
from urllib.parse import parse_qsl

from ims_emulator.errors import bad_request

__all__ = ["FORM", "MULTIPART", "request_form"]

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
_MAX_FIELDS = 50


def request_form(
    query: str, body: bytes, content_type: str, raw_content_type: str
) -> dict[str, str]:
    """All fields of the request. `content_type` is the bare media type. Raises ImsError."""
    pairs = _urlencoded(query.encode("latin-1"))
    if body:
        if content_type == FORM:
            pairs += _urlencoded(body)
        elif content_type == MULTIPART:
            pairs += _multipart(body, raw_content_type)
        else:
            raise bad_request(f"Content-Type must be {FORM} or {MULTIPART}")
    return _merged(pairs)


def body_is_a_form(body: bytes, content_type: str) -> bool:
    """False for a body IMS would not read as a form (JSON, text, ...)."""
    return not body or content_type in (FORM, MULTIPART)


def _merged(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in pairs:
        if fields.setdefault(name, value) != value:
            raise bad_request(f"parameter given more than once: {name}")
        if len(fields) > _MAX_FIELDS:
            raise bad_request("too many fields")
    return fields


def _urlencoded(data: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            data.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=_MAX_FIELDS,
        )
    except ValueError:
        raise bad_request("malformed form") from None


def _multipart(body: bytes, raw_content_type: str) -> list[tuple[str, str]]:
    """Text fields of a multipart/form-data body, via the stdlib's email parser (the `cgi`
    module is gone from Python 3.13)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + raw_content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise bad_request("malformed multipart body")
    pairs = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            raise bad_request("malformed multipart field")
        try:
            pairs.append((name, payload.decode("utf-8")))
        except UnicodeDecodeError:
            raise bad_request("multipart field is not UTF-8") from None
        if len(pairs) > _MAX_FIELDS:
            raise bad_request("too many fields")
    return pairs
