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

import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

from refresher.credentials.build import FlowChoice, build
from refresher.credentials.model import Credentials, Flow
from refresher.credentials.shapes import from_directory, from_json_text
from refresher.credentials.volume import (
    MAX_FILE_BYTES,
    change_signature,
    list_directory,
    read_text,
)
from refresher.errors import CredentialsError, CredentialsNotReady

__all__ = [
    "MAX_FILE_BYTES",
    "SETTLE_S",
    "Credentials",
    "Flow",
    "change_signature",
    "load_credentials",
    "load_settled",
]

# How long a not-ready read must stay unchanged to be called broken (SPEC: "a moment
# apart, at most 2 s"). Writers, kubelet's swap included, finish far sooner.
SETTLE_S: Final = 1.0


def load_credentials(path: Path, *, flow: FlowChoice = "auto") -> Credentials:
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
        raw = from_directory(list_directory(path))
    elif stat.S_ISREG(st.st_mode):
        raw = from_json_text(read_text(path, source, listed=False), source)
    else:
        raise CredentialsError("is neither a regular file nor a directory", source=source)
    return build(raw, flow)


def load_settled(
    path: Path,
    *,
    flow: FlowChoice = "auto",
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
