"""Read the mounted Adobe service credentials into a frozen, redacted `Credentials`.

PATH is a file or a directory (a mounted Secret volume). Shapes, detected from
the content rather than from file names:

- AEM service credentials JSON ``{"ok": true, "integration": {...}}``, or the
  bare ``integration`` object (recognised by ``technicalAccount``,
  ``privateKey``, ``publicKey`` or ``imsEndpoint``). Always the JWT flow in
  ``auto`` mode: these credentials exist for the JWT exchange only.
- Developer Console project JSON: exactly one
  ``project.workspace.details.credentials[].oauth_server_to_server`` entry,
  org id from ``project.org.ims_org_id``; or a top-level
  ``{"oauth_server_to_server": {...}}``.
- Flat JSON with the snake_case names below (OAuth S2S, or JWT when it carries
  ``private_key``).
- A directory of one file per field, named like the flat JSON keys
  (recognised by any such file but ``private_key_passphrase``; other files
  are ignored).
- A directory holding exactly one ``*.json`` file, read as that file; a sibling
  ``private_key_passphrase`` file supplies the passphrase if the JSON has none.

Flat / per-file field names: ``client_id``, ``client_secret`` and/or
``client_secrets`` (JSON list, or one secret per line in a file), ``scopes``
(or ``scope``), ``metascopes``, ``org_id``, ``technical_account_id``,
``private_key``, ``private_key_passphrase``, ``certificate``, ``ims_endpoint``.

Not ready versus permanent. The loop retries `CredentialsNotReady` shortly and
treats every other `CredentialsError` as a configuration problem. Not ready is
anything a writer in the middle of its work can produce, and nothing else:

- a dangling symlink (PATH, a key link, or ``..data``; kubelet mid-swap), a
  snapshot directory that vanished while we read it, a key link whose target
  snapshot does not have it yet;
- an empty or whitespace-only file (the JSON file, or a required per-field file);
- JSON that ends early (a prefix of a valid document), UTF-8 cut inside a
  character at the very end, a per-field PEM with BEGIN but no END line.

Permanent: PATH missing, unreadable, not a regular file or directory (a FIFO or
device anywhere is refused, never opened for a blocking read), larger
than 1 MiB, not UTF-8, invalid JSON (the error lies before the end), a JSON
value that is not an object, wrong types, missing fields, a key that is not
RSA, a wrong or missing passphrase, a key that does not match the certificate.

Nothing here ever puts a value from the credentials into a message: errors
name the field and the file only, and parse errors are raised ``from None`` so
no library exception carrying input bytes rides along in a traceback.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Literal, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    padding,
    rsa,
    x448,
    x25519,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from refresher.errors import CredentialsError, CredentialsNotReady

__all__ = [
    "MAX_FILE_BYTES",
    "SETTLE_S",
    "Credentials",
    "change_signature",
    "load_credentials",
    "load_settled",
]

Flow = Literal["jwt", "oauth"]

# Credentials files are a few KiB; anything this large is a wrong path (a log, a
# tarball), and reading it on every attempt would not be cheap.
MAX_FILE_BYTES: Final = 1 << 20

# How long a not-ready read must stay unchanged to be called broken (SPEC: "a moment
# apart, at most 2 s"). Writers, kubelet's swap included, finish far sooner.
SETTLE_S: Final = 1.0

# kubelet's atomic-writer layout: PATH/..data -> ..<timestamp>/, PATH/<key> -> ..data/<key>.
_DATA_LINK: Final = "..data"


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
        if self.flow not in ("jwt", "oauth"):
            raise ValueError("flow must be 'jwt' or 'oauth'")
        if not self.client_id or not self.client_secrets:
            raise ValueError("client_id and at least one client secret are required")
        if self.flow == "jwt" and (
            self.private_key is None
            or not self.metascopes
            or not self.org_id
            or not self.technical_account_id
        ):
            raise ValueError(
                "the JWT flow needs private_key, metascopes, org_id and technical_account_id"
            )
        if self.flow == "oauth" and not self.scopes:
            raise ValueError("the OAuth flow needs at least one scope")

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


def load_credentials(path: Path, *, flow: Literal["auto", "jwt", "oauth"] = "auto") -> Credentials:
    """Read, detect, validate and parse the credentials at PATH (file or directory).

    Raises `CredentialsNotReady` for a half-written read (retry shortly) and
    `CredentialsError` for everything permanent. Costs a few small reads and at
    most one PEM parse (validated keys are memoised by content).
    """
    if flow not in ("auto", "jwt", "oauth"):
        raise ValueError("flow must be 'auto', 'jwt' or 'oauth'")
    path = Path(path)
    source = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CredentialsNotReady(
                "is a dangling symlink (the Secret is being swapped)", source=source
            ) from None
        raise CredentialsError("does not exist", source=source) from None
    except OSError as exc:
        raise CredentialsError(f"cannot be read: {exc.strerror}", source=source) from None
    if stat.S_ISDIR(st.st_mode):
        raw = _read_directory(path)
    elif stat.S_ISREG(st.st_mode):
        raw = _from_json_text(_read_text(path, source, listed=False), source)
    else:
        raise CredentialsError("is neither a regular file nor a directory", source=source)
    return _build(raw, flow)


def load_settled(
    path: Path,
    *,
    flow: Literal["auto", "jwt", "oauth"] = "auto",
    wait: Callable[[float], bool],
    load: Callable[..., Credentials] = load_credentials,
    settle_s: float = SETTLE_S,
) -> Credentials:
    """`load`, but a not-ready read that reads the same `settle_s` later is broken.

    A writer caught mid-write changes the files within moments (kubelet's swap takes
    milliseconds); content that stays half-written-looking, unchanged, is a truncated
    file or an empty directory that will stay so. That is raised as a permanent
    `CredentialsError` (exit 2 in `once` and `check`), not retried until a deadline.
    "The same" is the change signature (stat, links, listing) plus the same verdict.
    `wait(seconds)` returns True when interrupted (shutdown): the not-ready error is
    raised as it is then.
    """
    try:
        return load(path, flow=flow)
    except CredentialsNotReady as first:
        before = change_signature(path)
        if wait(settle_s):
            raise
        try:
            return load(path, flow=flow)
        except CredentialsNotReady as second:
            if str(second) != str(first) or change_signature(path) != before:
                raise  # still being written: retried shortly
            raise CredentialsError(
                f"{_verdict(second)}; unchanged {settle_s:g}s later, so broken, not half-written",
                source=second.source,
                field=second.field,
            ) from None


def _verdict(exc: CredentialsError) -> str:
    """The message without the `source, field:` prefix the constructor adds."""
    where = ", ".join(
        part for part in (exc.source, f"field {exc.field!r}" if exc.field else "") if part
    )
    text = str(exc)
    text = text[len(where) + 2 :] if where and text.startswith(where + ": ") else text
    return re.sub(r" \(half-written\??\)", "", text)


def change_signature(path: Path) -> tuple[object, ...]:
    """A cheap fingerprint of PATH that differs after any change kubelet or a user makes.

    Only `stat`, `readlink` and `listdir`: no reads, no parsing. Never raises
    for a filesystem state (missing, dangling, unreadable): the state is part of
    the signature, so its appearance or disappearance is itself a change.
    """
    path = Path(path)
    parts: list[object] = [str(path), _stat_part(path, follow=False), _stat_part(path)]
    if path.is_dir():
        parts.append(_readlink_part(path / _DATA_LINK))
        try:
            names = sorted(e.name for e in path.iterdir() if not e.name.startswith("."))
        except OSError as exc:
            names = []
            parts.append(("listdir", exc.errno))
        parts.extend((name, _stat_part(path / name)) for name in names)
    else:
        # A file inside a Secret volume: its stat already follows ..data, and the
        # link target names the snapshot, which kubelet never reuses.
        parts.append(_readlink_part(path.parent / _DATA_LINK))
    return tuple(parts)


# --- reading ---------------------------------------------------------------------------------


@dataclass
class _Raw:
    """The values of one credentials document, keyed by canonical field name."""

    source: str
    shape: Literal["aem", "oauth", "flat"]
    names: dict[str, str]  # canonical field -> its name in this shape, for messages
    values: dict[str, object]  # canonical field -> raw value; absent when missing
    from_files: bool = False  # per-field files, each of which may be caught mid-write


_FLAT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
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

# Any of these files makes a directory the per-field shape. The passphrase alone
# does not: it may sit beside a *.json credentials file.
_FIELD_FILES: Final = frozenset(alias for aliases in _FLAT_FIELDS.values() for alias in aliases) - {
    "private_key_passphrase"
}


def _read_directory(path: Path) -> _Raw:
    source = str(path)
    base = _snapshot(path)
    # kubelet's snapshot holds regular files only: a link there is not followed.
    in_snapshot = base != path
    names = _list_names(base, source)
    # Top-level links that exist while the snapshot lacks their target mean
    # kubelet is between swapping ..data and relinking the keys.
    top = _list_names(path, source) if base != path else names
    if (names | top) & _FIELD_FILES:
        values: dict[str, object] = {}
        names_for_msg: dict[str, str] = {}
        for canonical, aliases in _FLAT_FIELDS.items():
            names_for_msg[canonical] = aliases[0]
            for alias in aliases:
                if alias in names:
                    text = _read_text(
                        base / alias, source, listed=True, field=alias, nofollow=in_snapshot
                    ).strip()
                    values[canonical] = text
                    names_for_msg[canonical] = alias
                    break
                if alias in top:
                    raise CredentialsNotReady(
                        "is a link into a snapshot that lacks it (the Secret is being swapped)",
                        source=source,
                        field=alias,
                    )
        return _Raw(source, "flat", names_for_msg, values, from_files=True)
    json_names = sorted(n for n in names if n.endswith(".json"))
    if len(json_names) > 1:
        raise CredentialsError(
            f"holds {len(json_names)} JSON files ({', '.join(json_names)}); "
            "expected exactly one credentials file",
            source=source,
        )
    if not json_names:
        if not names and not top and base == path:
            # An empty volume is what a not-yet-populated mount looks like.
            raise CredentialsNotReady("is an empty directory", source=source)
        raise CredentialsError(
            "holds neither per-field files (client_id, client_secret, ...) "
            "nor one *.json credentials file",
            source=source,
        )
    json_source = str(path / json_names[0])
    text = _read_text(base / json_names[0], json_source, listed=True, nofollow=in_snapshot)
    raw = _from_json_text(text, json_source)
    passphrase_file = "private_key_passphrase"  # noqa: S105 - a file name, not a password
    if "private_key_passphrase" not in raw.values and passphrase_file in names:
        text = _read_text(
            base / passphrase_file,
            source,
            listed=True,
            field=passphrase_file,
            nofollow=in_snapshot,
        )
        raw.values["private_key_passphrase"] = text.strip()
        raw.names["private_key_passphrase"] = str(path / passphrase_file)
    return raw


def _snapshot(path: Path) -> Path:
    """The directory to read: kubelet's current snapshot if PATH uses ..data, else PATH.

    Reading every file through one resolved snapshot gives a consistent set even
    if kubelet swaps ..data while we read (the old snapshot then vanishes, which
    surfaces as not-ready rather than as a mix of old and new values).
    """
    link = path / _DATA_LINK
    if not (link.is_symlink() or link.exists()):
        return path
    try:
        resolved = link.resolve(strict=True)
    except (OSError, RuntimeError):
        raise CredentialsNotReady(
            "..data points to a missing snapshot (the Secret is being swapped)", source=str(path)
        ) from None
    return resolved if resolved.is_dir() else path


def _list_names(directory: Path, source: str) -> set[str]:
    try:
        return {e.name for e in directory.iterdir() if not e.name.startswith(".")}
    except FileNotFoundError:
        raise CredentialsNotReady(
            "vanished while being read (the Secret is being swapped)", source=source
        ) from None
    except OSError as exc:
        raise CredentialsError(f"cannot be listed: {exc.strerror}", source=source) from None


class _NotRegularError(Exception):
    """The name opened is a FIFO, socket or device, not a regular file."""


def _read_regular(file: Path, *, nofollow: bool) -> bytes:
    """At most MAX_FILE_BYTES + 1 bytes of a regular file; never blocks on a FIFO.

    `O_NONBLOCK` makes opening a FIFO return at once (a blocking open waits for a
    writer forever), and `fstat` on the descriptor, not a `stat` of the name, decides:
    a name swapped for a FIFO between a check and the open cannot slip through.
    `nofollow` is for names inside kubelet's resolved snapshot, which are never links.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise _NotRegularError from None  # a link where kubelet's snapshot holds files
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if not stat.S_ISREG(mode):
            raise _NotRegularError
        # A regular file: clear O_NONBLOCK so reads behave as usual.
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            return handle.read(MAX_FILE_BYTES + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def _read_text(
    file: Path, source: str, *, listed: bool, field: str = "", nofollow: bool = False
) -> str:
    """Read a small regular UTF-8 file (BOM tolerated). Empty or cut short → not ready."""
    try:
        data = _read_regular(file, nofollow=nofollow)
    except _NotRegularError:
        raise CredentialsError(
            "is not a regular file (a FIFO, socket or device?); only regular files are read",
            source=source,
            field=field,
        ) from None
    except FileNotFoundError:
        # A name we just listed, or a symlink whose target is gone: a swap in progress.
        if listed or file.is_symlink():
            raise CredentialsNotReady(
                "vanished or dangles (the Secret is being swapped)", source=source, field=field
            ) from None
        raise CredentialsError("does not exist", source=source, field=field) from None
    except IsADirectoryError:
        raise CredentialsError(
            "is a directory, expected a file", source=source, field=field
        ) from None
    except OSError as exc:
        raise CredentialsError(
            f"cannot be read: {exc.strerror}", source=source, field=field
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(
            "is larger than 1 MiB, not a credentials file", source=source, field=field
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.end == len(data) and exc.reason == "unexpected end of data":
            raise CredentialsNotReady(
                "ends inside a UTF-8 character (half-written)", source=source, field=field
            ) from None
        raise CredentialsError(
            f"is not UTF-8 text (invalid byte at offset {exc.start})", source=source, field=field
        ) from None
    if not text.strip() and not field:
        raise CredentialsNotReady("is empty (half-written?)", source=source)
    return text


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


def _from_json_text(text: str, source: str) -> _Raw:
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
        raise CredentialsError(f"must be a JSON object, got {_json_type(document)}", source=source)
    return _detect(document, source)


def _detect(doc: dict[str, object], source: str) -> _Raw:
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
        raw = _collect(inner, _FLAT_FIELDS, "oauth_server_to_server.", source, "oauth")
        if "org_id" not in raw.values and doc.get("org_id") is not None:
            raw.values["org_id"] = doc["org_id"]
            raw.names["org_id"] = "org_id"
        return raw
    return _collect(doc, _FLAT_FIELDS, "", source, "flat")


def _from_project(doc: dict[str, object], source: str) -> _Raw:
    where = "project.workspace.details.credentials"
    entries = _lookup(doc, where, source)
    if entries is None:
        raise CredentialsError("is missing", source=source, field=where)
    if not isinstance(entries, list):
        raise CredentialsError(
            f"must be a list, got {_json_type(entries)}", source=source, field=where
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
            f"must be an object, got {_json_type(inner)}", source=source, field=prefix
        )
    raw = _collect(inner, _FLAT_FIELDS, prefix + ".", source, "oauth")
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
    shape: Literal["aem", "oauth", "flat"],
) -> _Raw:
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
    for canonical in _FLAT_FIELDS:
        # Fields this shape does not define (scopes in AEM JSON, for --flow oauth)
        # are still named where the user would have to add them.
        names.setdefault(canonical, prefix + canonical)
    return _Raw(source, shape, names, values)


def _lookup(obj: dict[str, object], dotted: str, source: str, prefix: str = "") -> object:
    """obj[a][b]... for "a.b"; None when absent; an error when a step is not an object."""
    current: object = obj
    walked = prefix.rstrip(".")
    for step in dotted.split("."):
        if not isinstance(current, dict):
            raise CredentialsError(
                f"must be an object, got {_json_type(current)}", source=source, field=walked
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
            f"must be an object, got {_json_type(value)}", source=source, field=key
        )
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- validating ------------------------------------------------------------------------------


def _build(raw: _Raw, flow_choice: Literal["auto", "jwt", "oauth"]) -> Credentials:
    client_id = _text(raw, "client_id")
    secrets = _secrets(raw)
    ims_endpoint = _text(raw, "ims_endpoint")
    org_id = _text(raw, "org_id")
    technical_account_id = _text(raw, "technical_account_id")
    key_value = raw.values.get("private_key")
    has_key = key_value is not None and not (isinstance(key_value, str) and not key_value.strip())
    if raw.from_files and key_value == "":
        # An empty key file would silently flip the flow to OAuth: wait for the writer.
        raise CredentialsNotReady(
            "is empty (half-written?)", source=raw.source, field=raw.names["private_key"]
        )
    if flow_choice == "auto":
        flow: Flow = "jwt" if has_key or raw.shape == "aem" else "oauth"
    else:
        flow = flow_choice

    required: list[tuple[str, object]] = [("client_id", client_id), ("client_secret", secrets)]
    if flow == "jwt":
        metascopes = _words(raw, "metascopes", metascope=True)
        scopes: tuple[str, ...] = ()
        required += [
            ("private_key", has_key),
            ("org_id", org_id),
            ("technical_account_id", technical_account_id),
            ("metascopes", metascopes),
        ]
    else:
        metascopes = ()
        scopes = _words(raw, "scopes")
        required.append(("scopes", scopes))
    _require(raw, flow, required, auto=flow_choice == "auto")

    private_key: rsa.RSAPrivateKey | None = None
    not_after: datetime | None = None
    if flow == "jwt":
        # OAuth ignores the key and the certificate entirely, so a stale key left
        # in a Secret cannot break an OAuth setup.
        private_key = _private_key(raw)
        certificate = _certificate(raw)
        if certificate is not None:
            not_after = certificate.not_valid_after_utc
            if not _same_public_key(certificate, private_key):
                raise CredentialsError(
                    "private key does not match the certificate in publicKey",
                    source=raw.source,
                    field=raw.names["private_key"],
                )
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
        private_key=private_key,
        certificate_not_after=not_after,
        key_size=private_key.key_size if private_key is not None else None,
    )


def _require(raw: _Raw, flow: Flow, required: list[tuple[str, object]], *, auto: bool) -> None:
    """Raise for every missing required field at once; the first one is `field`."""
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


def _text(raw: _Raw, canonical: str) -> str | None:
    value = raw.values.get(canonical)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CredentialsError(
            f"must be a string, got {_json_type(value)}",
            source=raw.source,
            field=raw.names[canonical],
        )
    return value.strip() or None


def _secrets(raw: _Raw) -> tuple[str, ...]:
    """client_secret, then client_secrets, deduplicated in order (two during a rotation)."""
    found: list[str] = []
    single = _text(raw, "client_secret")
    if single is not None:
        found.append(single)
    many = raw.values.get("client_secrets")
    name = raw.names["client_secrets"]
    if isinstance(many, str):
        # The per-file shape: one secret per line.
        found += many.splitlines()
    elif isinstance(many, list):
        for index, item in enumerate(many):
            if not isinstance(item, str):
                raise CredentialsError(
                    f"must be a string, got {_json_type(item)}",
                    source=raw.source,
                    field=f"{name}[{index}]",
                )
            found.append(item)
    elif many is not None:
        raise CredentialsError(
            f"must be a list of strings, got {_json_type(many)}", source=raw.source, field=name
        )
    return tuple(dict.fromkeys(s.strip() for s in found if s.strip()))


_WORD_SPLIT: Final = re.compile(r"[\s,]+")
# Legacy configurations (and @adobe/jwt-auth) accept a metascope as a full URL.
_METASCOPE_URL: Final = re.compile(r"https?://[^/\s]+/s/([^/\s]+)")


def _words(raw: _Raw, canonical: str, *, metascope: bool = False) -> tuple[str, ...]:
    """A list of strings or one comma/space-separated string → deduplicated tuple."""
    value = raw.values.get(canonical)
    name = raw.names[canonical]
    items: list[str] = []
    if value is None:
        return ()
    if isinstance(value, str):
        items = _WORD_SPLIT.split(value)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise CredentialsError(
                    f"must be a string, got {_json_type(item)}",
                    source=raw.source,
                    field=f"{name}[{index}]",
                )
            items += _WORD_SPLIT.split(item)
    else:
        raise CredentialsError(
            f"must be a list of strings or a comma-separated string, got {_json_type(value)}",
            source=raw.source,
            field=name,
        )
    if metascope:
        items = [
            match.group(1) if (match := _METASCOPE_URL.fullmatch(item)) else item for item in items
        ]
    return tuple(dict.fromkeys(item for item in items if item))


# --- keys and certificates -------------------------------------------------------------------

_PEM_BLOCK: Final = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_LEGACY_HEADERS: Final = re.compile(r"\s*Proc-Type:\s*(\S+)\s+DEK-Info:\s*(\S+)\s+")
_KNOWN_LABELS: Final = ("CERTIFICATE", "PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE REQUEST")


def _pem_blocks(raw: _Raw, canonical: str) -> list[tuple[str, str]]:
    """Every PEM block in the field as (label, canonical PEM text).

    Undoes what copy and paste does to a PEM: CRLF, literal backslash-n escapes
    (from env vars), lost line breaks, indentation, or base64 around the whole.
    """
    value = raw.values[canonical]
    name = raw.names[canonical]
    if not isinstance(value, str):
        raise CredentialsError(
            f"must be a string, got {_json_type(value)}", source=raw.source, field=name
        )
    text = _unescape(value)
    if "-----BEGIN" not in text:
        text = _unescape(_unbase64(text))
    blocks = []
    for match in _PEM_BLOCK.finditer(text):
        label, body = match.group(1), match.group(2)
        headers = ""
        legacy = _LEGACY_HEADERS.match(body)
        if legacy:  # encrypted PKCS#1 carries RFC 1421 headers before the base64
            headers = f"Proc-Type: {legacy.group(1)}\nDEK-Info: {legacy.group(2)}\n\n"
            body = body[legacy.end() :]
        b64 = "".join(body.split())
        lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        blocks.append(
            (label, f"-----BEGIN {label}-----\n{headers}{lines}\n-----END {label}-----\n")
        )
    if not blocks:
        if "-----BEGIN" in text and raw.from_files:
            raise CredentialsNotReady(
                "has a BEGIN line but no END line (half-written?)", source=raw.source, field=name
            )
        what = "PEM" if "-----BEGIN" in text else "PEM (nor base64 of a PEM)"
        raise CredentialsError(f"is not {what}", source=raw.source, field=name)
    return blocks


def _unescape(text: str) -> str:
    text = text.strip()
    if "\\n" in text or "\\r" in text:
        text = text.replace("\\r", "").replace("\\n", "\n")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _unbase64(text: str) -> str:
    try:
        decoded = base64.b64decode("".join(text.split()), validate=True)
        return decoded.decode("ascii")
    except (binascii.Error, ValueError):
        return ""


def _private_key(raw: _Raw) -> rsa.RSAPrivateKey:
    name = raw.names["private_key"]
    blocks = [
        (label, pem) for label, pem in _pem_blocks(raw, "private_key") if "PRIVATE KEY" in label
    ]
    if not blocks:
        labels = {label for label, _ in _pem_blocks(raw, "private_key")}
        known = sorted(labels.intersection(_KNOWN_LABELS))
        what = f"a {known[0]}" if known else "no PRIVATE KEY block"
        raise CredentialsError(
            f"holds {what}, expected an RSA private key", source=raw.source, field=name
        )
    if len(blocks) > 1:
        raise CredentialsError(
            f"holds {len(blocks)} private keys, expected one", source=raw.source, field=name
        )
    label, pem = blocks[0]
    if label == "OPENSSH PRIVATE KEY":
        raise CredentialsError(
            "is in OpenSSH format; convert it to PEM (ssh-keygen -p -m PKCS8 -f FILE)",
            source=raw.source,
            field=name,
        )
    if label in ("EC PRIVATE KEY", "DSA PRIVATE KEY"):
        # Known from the label alone, so even an encrypted one gets the real reason.
        _reject_type(label.split()[0], raw)
    passphrase = _text(raw, "private_key_passphrase")
    passphrase_name = raw.names["private_key_passphrase"]
    encrypted = label == "ENCRYPTED PRIVATE KEY" or "Proc-Type: 4,ENCRYPTED" in pem
    if encrypted and passphrase is None:
        raise CredentialsError(
            "is missing; the private key is encrypted", source=raw.source, field=passphrase_name
        )
    password = passphrase.encode() if encrypted and passphrase is not None else None
    try:
        key = _load_pem_private_key(pem.encode("ascii"), password)
    except (ValueError, TypeError, UnicodeEncodeError):
        if encrypted:
            raise CredentialsError(
                "does not decrypt the private key (wrong passphrase?)",
                source=raw.source,
                field=passphrase_name,
            ) from None
        raise CredentialsError(
            "is not a valid PEM private key", source=raw.source, field=name
        ) from None
    except UnsupportedAlgorithm:
        raise CredentialsError(
            "uses an unsupported key algorithm, expected RSA", source=raw.source, field=name
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        _reject_type(_key_type(key), raw)
    return key


def _reject_type(kind: str, raw: _Raw) -> NoReturn:
    raise CredentialsError(
        f"private key is {kind}, the IMS JWT exchange needs RSA (RS256)",
        source=raw.source,
        field=raw.names["private_key"],
    )


def _key_type(key: PrivateKeyTypes) -> str:
    kinds: tuple[tuple[type, str], ...] = (
        (ec.EllipticCurvePrivateKey, "EC"),
        (ed25519.Ed25519PrivateKey, "Ed25519"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (dsa.DSAPrivateKey, "DSA"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    )
    return next((kind for cls, kind in kinds if isinstance(key, cls)), type(key).__name__)


@functools.lru_cache(maxsize=8)
def _load_pem_private_key(pem: bytes, password: bytes | None) -> PrivateKeyTypes:
    """Parse once per distinct key. The cache holds what memory already holds (the
    loaded key); exceptions are not cached, so a fixed passphrase takes effect on the
    next read.

    OpenSSL's full RSA consistency check costs ~55 ms of CPU, a sixth of the time to
    the first token (docs/benchmarks.md). It guards against keys an attacker crafted;
    this key is our own, from our own Secret. It is skipped, and replaced by what
    matters here, a sign-and-verify round trip (~1 ms): a key that cannot produce a
    signature its own public key verifies is refused now, not by IMS later.
    """
    key = serialization.load_pem_private_key(
        pem, password=password, unsafe_skip_rsa_key_validation=True
    )
    if isinstance(key, rsa.RSAPrivateKey):
        probe = b"ims-token-refresher key self-test"
        signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
        try:
            key.public_key().verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise ValueError("inconsistent RSA key") from None
    return key


def _certificate(raw: _Raw) -> x509.Certificate | None:
    if raw.values.get("certificate") in (None, ""):
        return None
    name = raw.names["certificate"]
    blocks = [pem for label, pem in _pem_blocks(raw, "certificate") if label == "CERTIFICATE"]
    if not blocks:
        raise CredentialsError(
            "holds no CERTIFICATE block, expected an X.509 certificate",
            source=raw.source,
            field=name,
        )
    try:
        # The first certificate is the integration's own; any others are a chain.
        return x509.load_pem_x509_certificate(blocks[0].encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise CredentialsError(
            "is not a valid X.509 certificate", source=raw.source, field=name
        ) from None


def _same_public_key(certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    try:
        public = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return False
    return (
        isinstance(public, rsa.RSAPublicKey)
        and public.public_numbers() == key.public_key().public_numbers()
    )


# --- change detection ------------------------------------------------------------------------


def _stat_part(path: Path, *, follow: bool = True) -> tuple[object, ...]:
    try:
        st = path.stat(follow_symlinks=follow)
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _readlink_part(link: Path) -> tuple[object, ...]:
    try:
        return ("link", str(link.readlink()))
    except OSError as exc:
        return ("error", exc.errno)
