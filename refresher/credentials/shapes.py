"""The shapes credentials come in, detected from the content rather than from file names:
AEM service credentials (wrapped or bare), a Developer Console project, a top-level
`oauth_server_to_server`, flat JSON, a directory of one file per field, or a directory
holding exactly one `*.json` file. Each becomes a `Raw`: the values keyed by canonical
field name, and the name each field has in that shape (for messages).

JSON that ends early (a prefix of a valid document) is `CredentialsNotReady`; an error
before the end is permanent. Parse errors are raised `from None` and carry json's fixed
wording, never input bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from refresher.credentials.volume import Listing
from refresher.errors import CredentialsError, CredentialsNotReady

Shape = Literal["aem", "oauth", "flat"]


@dataclass
class Raw:
    """The values of one credentials document, keyed by canonical field name."""

    source: str
    shape: Shape
    names: dict[str, str]  # canonical field -> its name in this shape, for messages
    values: dict[str, object]  # canonical field -> raw value; absent when missing
    from_files: bool = False  # per-field files, each of which may be caught mid-write

    def error(self, message: str, canonical: str) -> CredentialsError:
        """A permanent error naming the field as this shape spells it."""
        return CredentialsError(message, source=self.source, field=self.names[canonical])

    def text(self, canonical: str) -> str | None:
        """The field as a stripped string; None when absent or blank."""
        value = self.values.get(canonical)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {json_type(value)}", canonical)
        return value.strip() or None


FLAT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "client_id": ("client_id",),
    "client_secret": ("client_secret",),
    "client_secrets": ("client_secrets",),
    "ims_endpoint": ("ims_endpoint",),
    "org_id": ("org_id",),
    "technical_account_id": ("technical_account_id",),
    "metascopes": ("metascopes",),
    "scopes": ("scopes", "scope"),
    "private_key": ("private_key",),
    "private_key_passphrase": ("private_key_passphrase",),
    "certificate": ("certificate",),
}

_AEM_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "client_id": ("technicalAccount.clientId",),
    "client_secret": ("technicalAccount.clientSecret",),
    "ims_endpoint": ("imsEndpoint",),
    "org_id": ("org",),
    "technical_account_id": ("id",),
    "metascopes": ("metascopes",),
    "private_key": ("privateKey",),
    "private_key_passphrase": ("privateKeyPassphrase", "private_key_passphrase"),
    "certificate": ("publicKey",),
}

_BARE_AEM_MARKERS: Final = ("technicalAccount", "privateKey", "publicKey", "imsEndpoint")

_PASSPHRASE_FILE: Final = "private_key_passphrase"  # noqa: S105 - a file name, not a password

# Any of these files makes a directory the per-field shape. The passphrase alone
# does not: it may sit beside a *.json credentials file.
_FIELD_FILES: Final = frozenset(alias for aliases in FLAT_FIELDS.values() for alias in aliases) - {
    _PASSPHRASE_FILE
}


# --- directories -----------------------------------------------------------------------------


def from_directory(listing: Listing) -> Raw:
    """Per-field files if there is any, else the one `*.json` file."""
    if (listing.names | listing.top) & _FIELD_FILES:
        return _from_field_files(listing)
    return _from_json_file(listing)


def _from_field_files(listing: Listing) -> Raw:
    values: dict[str, object] = {}
    names: dict[str, str] = {}
    for canonical, aliases in FLAT_FIELDS.items():
        names[canonical] = aliases[0]
        for alias in aliases:
            if alias in listing.names:
                values[canonical] = listing.read(alias, listing.source, field=alias).strip()
                names[canonical] = alias
                break
            if alias in listing.top:
                raise CredentialsNotReady(
                    "is a link into a snapshot that lacks it (the Secret is being swapped)",
                    source=listing.source,
                    field=alias,
                )
    return Raw(listing.source, "flat", names, values, from_files=True)


def _from_json_file(listing: Listing) -> Raw:
    source = listing.source
    json_names = sorted(n for n in listing.names if n.endswith(".json"))
    if len(json_names) > 1:
        raise CredentialsError(
            f"holds {len(json_names)} JSON files ({', '.join(json_names)}); "
            "expected exactly one credentials file",
            source=source,
        )
    if not json_names:
        if not listing.names and not listing.top and not listing.in_snapshot:
            # An empty volume is what a not-yet-populated mount looks like.
            raise CredentialsNotReady("is an empty directory", source=source)
        raise CredentialsError(
            "holds neither per-field files (client_id, client_secret, ...) "
            "nor one *.json credentials file",
            source=source,
        )
    json_source = str(listing.path / json_names[0])
    raw = from_json_text(listing.read(json_names[0], json_source), json_source)
    if "private_key_passphrase" not in raw.values and _PASSPHRASE_FILE in listing.names:
        text = listing.read(_PASSPHRASE_FILE, source, field=_PASSPHRASE_FILE)
        raw.values["private_key_passphrase"] = text.strip()
        raw.names["private_key_passphrase"] = str(listing.path / _PASSPHRASE_FILE)
    return raw


# --- JSON ------------------------------------------------------------------------------------

# A JSON error at one of these tails means the text merely stopped early.
_NUMBER_TAIL: Final = re.compile(r"-|\.|[eE][+-]?")
_UNICODE_ESCAPE_TAIL: Final = re.compile(r"u[0-9a-fA-F]{0,4}(\\(u[0-9a-fA-F]{0,3})?)?")


def _is_truncated(text: str, exc: json.JSONDecodeError) -> bool:
    """True if the decode error comes from the input ending, i.e. text is a prefix."""
    tail = text[exc.pos :]
    return (
        not tail.strip()
        or exc.msg.startswith("Unterminated string")
        or any(word.startswith(tail) and word != tail for word in ("true", "false", "null"))
        or _NUMBER_TAIL.fullmatch(tail) is not None
        or (
            exc.msg.startswith("Invalid \\uXXXX")
            and _UNICODE_ESCAPE_TAIL.fullmatch(tail) is not None
        )
    )


def from_json_text(text: str, source: str) -> Raw:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if _is_truncated(text, exc):
            raise CredentialsNotReady(
                f"JSON ends early at line {exc.lineno} column {exc.colno} (half-written?)",
                source=source,
            ) from None
        # exc.msg is json's fixed wording ("Expecting ',' delimiter"), never input text.
        raise CredentialsError(
            f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            source=source,
        ) from None
    except (ValueError, RecursionError):
        # Nesting deeper than the recursion limit, or an integer longer than
        # Python's int-conversion limit: both fixed wordings we need not relay.
        raise CredentialsError("is not valid JSON (too deep or too large)", source=source) from None
    if not isinstance(document, dict):
        raise CredentialsError(f"must be a JSON object, got {json_type(document)}", source=source)
    return _detect(document, source)


def _detect(doc: dict[str, object], source: str) -> Raw:
    if "integration" in doc:
        integration = _object_at(doc, "integration", source)
        if doc.get("ok") is False:
            raise CredentialsError(
                "the AEM Developer Console answered ok=false; download the credentials again",
                source=source,
                field="ok",
            )
        return _collect(integration, _AEM_FIELDS, "integration.", source, "aem")
    if any(marker in doc for marker in _BARE_AEM_MARKERS):
        return _collect(doc, _AEM_FIELDS, "", source, "aem")
    if "project" in doc:
        return _from_project(doc, source)
    if "oauth_server_to_server" in doc:
        inner = _object_at(doc, "oauth_server_to_server", source)
        raw = _collect(inner, FLAT_FIELDS, "oauth_server_to_server.", source, "oauth")
        if "org_id" not in raw.values and doc.get("org_id") is not None:
            raw.values["org_id"] = doc["org_id"]
            raw.names["org_id"] = "org_id"
        return raw
    return _collect(doc, FLAT_FIELDS, "", source, "flat")


def _from_project(doc: dict[str, object], source: str) -> Raw:
    where = "project.workspace.details.credentials"
    entries = _lookup(doc, where, source)
    if entries is None:
        raise CredentialsError("is missing", source=source, field=where)
    if not isinstance(entries, list):
        raise CredentialsError(
            f"must be a list, got {json_type(entries)}", source=source, field=where
        )
    found = [
        (index, entry["oauth_server_to_server"])
        for index, entry in enumerate(entries)
        if isinstance(entry, dict) and "oauth_server_to_server" in entry
    ]
    if len(found) != 1:
        raise CredentialsError(
            f"holds {len(found)} oauth_server_to_server credentials, expected exactly one",
            source=source,
            field=where,
        )
    index, inner = found[0]
    prefix = f"{where}[{index}].oauth_server_to_server"
    if not isinstance(inner, dict):
        raise CredentialsError(
            f"must be an object, got {json_type(inner)}", source=source, field=prefix
        )
    raw = _collect(inner, FLAT_FIELDS, prefix + ".", source, "oauth")
    if "org_id" not in raw.values:
        org = _lookup(doc, "project.org.ims_org_id", source)
        raw.names["org_id"] = "project.org.ims_org_id"
        if org is not None:
            raw.values["org_id"] = org
    return raw


def _collect(
    obj: dict[str, object],
    table: Mapping[str, tuple[str, ...]],
    prefix: str,
    source: str,
    shape: Shape,
) -> Raw:
    names: dict[str, str] = {}
    values: dict[str, object] = {}
    for canonical, aliases in table.items():
        names[canonical] = prefix + aliases[0]
        for alias in aliases:
            value = _lookup(obj, alias, source, prefix)
            if value is not None:  # JSON null counts as absent
                values[canonical] = value
                names[canonical] = prefix + alias
                break
    for canonical in FLAT_FIELDS:
        # Fields this shape does not define (scopes in AEM JSON, for --flow oauth)
        # are still named where the user would have to add them.
        names.setdefault(canonical, prefix + canonical)
    return Raw(source, shape, names, values)


def _lookup(obj: dict[str, object], dotted: str, source: str, prefix: str = "") -> object:
    """obj[a][b]... for "a.b"; None when absent; an error when a step is not an object."""
    current: object = obj
    walked = prefix.rstrip(".")
    for step in dotted.split("."):
        if not isinstance(current, dict):
            raise CredentialsError(
                f"must be an object, got {json_type(current)}", source=source, field=walked
            )
        walked = f"{walked}.{step}" if walked else step
        current = current.get(step)
        if current is None:
            return None
    return current


def _object_at(doc: dict[str, object], key: str, source: str) -> dict[str, object]:
    value = doc[key]
    if not isinstance(value, dict):
        raise CredentialsError(
            f"must be an object, got {json_type(value)}", source=source, field=key
        )
    return value


_JSON_TYPES: Final[tuple[tuple[type | tuple[type, ...], str], ...]] = (
    (bool, "a boolean"),  # before int: a bool is an int
    ((int, float), "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def json_type(value: object) -> str:
    """What a JSON value is, in words for a message (never the value itself)."""
    if value is None:
        return "null"
    return next((name for cls, name in _JSON_TYPES if isinstance(value, cls)), type(value).__name__)
