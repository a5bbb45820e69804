"""From a `Raw` document to a validated `Credentials`: choose the flow, check that every
field it needs is there (all missing ones reported at once), parse lists of scopes and
secrets, and, for the JWT flow only, the key and the certificate."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric import rsa

from refresher.credentials.keys import certificate, private_key, same_public_key
from refresher.credentials.model import Credentials, Flow
from refresher.credentials.shapes import Raw, json_type
from refresher.errors import CredentialsError, CredentialsNotReady

FlowChoice = Literal["auto", "jwt", "oauth"]

# A host (DNS name or bracketed IPv6) with an optional port, or an http(s) URL of one: what
# IMS endpoints look like. Anything else (a pasted key, whitespace, non-ASCII) is refused
# here, so it never reaches a URL, a repr or a summary.
_ENDPOINT: Final = re.compile(
    r"(https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r"(:[0-9]{1,5})?(/[!-~]*)?"
)


def build(raw: Raw, flow_choice: FlowChoice) -> Credentials:
    client_id = raw.text("client_id")
    secrets = _secrets(raw)
    ims_endpoint = _endpoint(raw)
    org_id = raw.text("org_id")
    technical_account_id = raw.text("technical_account_id")
    flow = _flow(raw, flow_choice)
    required: list[tuple[str, object]] = [("client_id", client_id), ("client_secret", secrets)]
    if flow == "jwt":
        metascopes = _words(raw, "metascopes", metascope=True)
        scopes: tuple[str, ...] = ()
        required += [
            ("private_key", _has_key(raw)),
            ("org_id", org_id),
            ("technical_account_id", technical_account_id),
            ("metascopes", metascopes),
        ]
    else:
        metascopes = ()
        scopes = _words(raw, "scopes")
        required.append(("scopes", scopes))
    _require(raw, flow, required, auto=flow_choice == "auto")
    # OAuth ignores the key and the certificate entirely, so a stale key left in a
    # Secret cannot break an OAuth setup.
    key, not_after = _key_and_expiry(raw) if flow == "jwt" else (None, None)
    assert client_id is not None  # noqa: S101 - _require guarantees it; narrows for mypy
    return Credentials(
        source=raw.source,
        flow=flow,
        client_id=client_id,
        client_secrets=secrets,
        ims_endpoint=ims_endpoint,
        org_id=org_id,
        technical_account_id=technical_account_id,
        metascopes=metascopes,
        scopes=scopes,
        private_key=key,
        certificate_not_after=not_after,
        key_size=key.key_size if key is not None else None,
    )


def _has_key(raw: Raw) -> bool:
    value = raw.values.get("private_key")
    return value is not None and not (isinstance(value, str) and not value.strip())


def _endpoint(raw: Raw) -> str | None:
    endpoint = raw.text("ims_endpoint")
    if endpoint is not None and not _ENDPOINT.fullmatch(endpoint):
        # Never quoted: whatever was pasted here may be a secret.
        raise raw.error(
            "must be a host or an http(s) URL, like ims-na1.adobelogin.com", "ims_endpoint"
        )
    return endpoint


def _flow(raw: Raw, flow_choice: FlowChoice) -> Flow:
    if raw.from_files and raw.values.get("private_key") == "":
        # An empty key file would silently flip the flow to OAuth: wait for the writer.
        raise CredentialsNotReady(
            "is empty (half-written?)", source=raw.source, field=raw.names["private_key"]
        )
    if flow_choice != "auto":
        return flow_choice
    return "jwt" if _has_key(raw) or raw.shape == "aem" else "oauth"


def _key_and_expiry(raw: Raw) -> tuple[rsa.RSAPrivateKey, datetime | None]:
    key = private_key(raw)
    cert = certificate(raw)
    if cert is None:
        return key, None
    if not same_public_key(cert, key):
        raise raw.error("private key does not match the certificate in publicKey", "private_key")
    return key, cert.not_valid_after_utc


def _require(raw: Raw, flow: Flow, required: list[tuple[str, object]], *, auto: bool) -> None:
    """Raise for every missing required field at once; the first one is `field`."""
    missing = _missing(raw, required)
    if not missing:
        return
    first, *others = (raw.names[name] for name in missing)
    state = "is empty" if missing[0] in raw.values else "is missing"
    flow_name = "JWT" if flow == "jwt" else "OAuth Server-to-Server"
    message = f"{state}; the {flow_name} flow needs it"
    if others:
        message += f" (also missing: {', '.join(others)})"
    if auto and flow == "oauth" and "private_key" not in raw.values:
        message += "; no private key was found, so the OAuth flow was chosen"
    raise CredentialsError(message, source=raw.source, field=first)


def _missing(raw: Raw, required: list[tuple[str, object]]) -> list[str]:
    """The canonical names of the required fields without a value; an empty per-field
    file among them is a writer caught mid-write (not ready), not a missing field."""
    missing: list[str] = []
    for wanted, value in required:
        if value:
            continue
        canonical = wanted
        if wanted == "client_secret" and "client_secrets" in raw.values:
            canonical = "client_secrets"
        if raw.from_files and raw.values.get(canonical) == "":
            raise CredentialsNotReady(
                "is empty (half-written?)", source=raw.source, field=raw.names[canonical]
            )
        missing.append(canonical)
    return missing


def _strings(raw: Raw, canonical: str, items: list[object]) -> list[str]:
    """The items of a JSON list, each of which must be a string."""
    name = raw.names[canonical]
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise CredentialsError(
                f"must be a string, got {json_type(item)}",
                source=raw.source,
                field=f"{name}[{index}]",
            )
    return [str(item) for item in items]


def _secrets(raw: Raw) -> tuple[str, ...]:
    """client_secret, then client_secrets, deduplicated in order (two during a rotation)."""
    found: list[str] = []
    single = raw.text("client_secret")
    if single is not None:
        found.append(single)
    many = raw.values.get("client_secrets")
    if isinstance(many, str):
        found += many.splitlines()  # the per-file shape: one secret per line
    elif isinstance(many, list):
        found += _strings(raw, "client_secrets", many)
    elif many is not None:
        raise raw.error(f"must be a list of strings, got {json_type(many)}", "client_secrets")
    return tuple(dict.fromkeys(s.strip() for s in found if s.strip()))


_WORD_SPLIT: Final = re.compile(r"[\s,]+")
# Legacy configurations (and @adobe/jwt-auth) accept a metascope as a full URL.
_METASCOPE_URL: Final = re.compile(r"https?://[^/\s]+/s/([^/\s]+)")


def _words(raw: Raw, canonical: str, *, metascope: bool = False) -> tuple[str, ...]:
    """A list of strings or one comma/space-separated string → deduplicated tuple."""
    value = raw.values.get(canonical)
    if value is None:
        return ()
    if isinstance(value, str):
        items = _WORD_SPLIT.split(value)
    elif isinstance(value, list):
        items = [
            word for item in _strings(raw, canonical, value) for word in _WORD_SPLIT.split(item)
        ]
    else:
        raise raw.error(
            f"must be a list of strings or a comma-separated string, got {json_type(value)}",
            canonical,
        )
    if metascope:
        items = [_metascope_name(item) for item in items]
    return tuple(dict.fromkeys(item for item in items if item))


def _metascope_name(item: str) -> str:
    """`ent_analytics_bulk_ingest_sdk` from `https://ims-na1.adobelogin.com/s/ent_...`."""
    match = _METASCOPE_URL.fullmatch(item)
    return match.group(1) if match else item
