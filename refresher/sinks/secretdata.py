"""What the Secret holds: the object we write (our keys, label and annotations, everything
else another writer put there kept) and the token we accept back from it. Pure: no client,
no I/O; `refresher.sinks.secret` talks to the API server."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from refresher.token import AccessToken, rfc3339

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "ims-token-refresher"
EXPIRES_AT_ANNOTATION = "ims-token-refresher/expires-at"
REFRESHED_AT_ANNOTATION = "ims-token-refresher/refreshed-at"
# token.json is a few hundred bytes; its base64 is decoded and parsed only below this cap.
MAX_TOKEN_JSON_B64 = 16 * 1024

JsonObj = dict[str, Any]


def new_secret(name: str, namespace: str, token: AccessToken, now: datetime) -> JsonObj:
    """A Secret `name` in `namespace` holding `token`, to create."""
    metadata = {"name": name, "namespace": namespace}
    return with_token({"metadata": metadata, "type": "Opaque"}, token, now)


def with_token(current: JsonObj, token: AccessToken, now: datetime) -> JsonObj:
    """`current` with our keys, label and annotations set and everything else kept."""
    obj = dict(current)
    obj["apiVersion"] = "v1"
    obj["kind"] = "Secret"
    # stringData would override data on the server; a read never has it, but a
    # hand-made Secret replayed here must not shadow the token.
    obj.pop("stringData", None)
    meta = _object(obj.get("metadata"))
    # Omitted managedFields are kept by the server; sending them back is only bytes.
    meta.pop("managedFields", None)
    # Another writer may have left anything here; only string maps travel back (the
    # apiserver would refuse the rest, and we must not crash on it).
    meta["labels"] = {**_strings(meta.get("labels")), MANAGED_BY_LABEL: MANAGER}
    meta["annotations"] = {
        **_strings(meta.get("annotations")),
        EXPIRES_AT_ANNOTATION: rfc3339(token.expires_at),
        REFRESHED_AT_ANNOTATION: rfc3339(now),
    }
    obj["metadata"] = meta
    published = {
        key: base64.b64encode(content).decode("ascii")
        for key, content in token.published_files().items()
    }
    obj["data"] = {**_strings(obj.get("data")), **published}
    return obj


def held_token(obj: JsonObj, now: datetime) -> AccessToken | None:
    """The token in a Secret we manage; None if it is not ours, garbled or implausible.

    Anyone allowed to write the Secret can plant anything in it, so nothing is assumed:
    every level is type-checked, token.json is parsed only below a small cap, its
    `access_token` must be the `access_token` key's bytes (one complete set, as we
    write it), and the token must be plausible (`AccessToken.is_plausible`: issued not
    in the future, no longer-lived than IMS grants), so a year-9999 expiry is never
    adopted. A token that passes all this is one a replica of ours could have written.
    """
    stored = _stored_token(obj)
    if stored is None:
        return None
    encoded, raw_value = stored
    try:
        token = AccessToken.from_document(json.loads(base64.b64decode(encoded, validate=True)))
        value = base64.b64decode(raw_value, validate=True).decode("ascii")
    except (binascii.Error, ValueError, RecursionError):  # JSON and Unicode errors: ValueError
        return None
    if value != token.value or not token.is_plausible(now):
        return None
    return token


def _stored_token(obj: JsonObj) -> tuple[str, str] | None:
    """token.json and access_token, base64 as stored, from a Secret labelled as ours; None
    when it is not labelled so, or either is missing, no string, or over the cap."""
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    data = obj.get("data")
    if not isinstance(labels, dict) or labels.get(MANAGED_BY_LABEL) != MANAGER:
        return None
    if not isinstance(data, dict):
        return None
    encoded, raw_value = data.get("token.json"), data.get("access_token")
    if not isinstance(encoded, str) or not isinstance(raw_value, str):
        return None
    if len(encoded) > MAX_TOKEN_JSON_B64 or len(raw_value) > MAX_TOKEN_JSON_B64:
        return None
    return encoded, raw_value


def same_token(held: AccessToken, token: AccessToken) -> bool:
    # Compared as published: token.json carries whole seconds, memory carries microseconds.
    return held.value == token.value and held.expires_at == _as_published(token.expires_at)


def _as_published(instant: datetime) -> datetime:
    return instant.replace(microsecond=0)


def _object(value: object) -> JsonObj:
    return dict(value) if isinstance(value, dict) else {}


def _strings(value: object) -> dict[str, str]:
    """The string-to-string entries of a map another writer left (anything else dropped)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
