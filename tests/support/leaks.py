"""The one leak scanner: whether secrets reached a text (a log, an error, a probe's answer).

It looks for three things, and reports them without repeating them (a failed
assertion is test output too):

- each known secret: a short one (a client secret, a token, one PEM line) as it
  stands or with its line breaks and `\\n` escapes removed; a long one (a PEM) by
  any 48-character run of its content, so a re-wrapped or escaped key is caught;
- any private-key header (`-----BEGIN ... PRIVATE KEY-----`), whoever's key it is;
- anything JWT-shaped (a signed assertion, an access token), whoever issued it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
PRIVATE_KEY_HEADER = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Up to this length a secret must not appear whole; beyond it, no run of _RUN characters may.
_SHORT = 64
_RUN = 48


def _flatten(text: str) -> str:
    return "".join(text.replace("\\n", "").replace("\\r", "").split())


def _found(secret: str, text: str, flat: str) -> bool:
    body = _flatten(secret)
    if not body:
        return False
    if len(body) <= _SHORT:
        return secret in text or body in flat
    content = body.replace("-----BEGIN", "").replace("-----END", "")
    runs = (content[i : i + _RUN] for i in range(40, max(41, len(content) - 88), 24))
    return any(run in flat for run in runs)


def leak_counts(text: str, secrets: Mapping[str, Iterable[str]]) -> Counter[str]:
    """Hits per kind in `text`: one per secret of each named group found, one per
    private-key header and one per JWT-shaped string."""
    flat = _flatten(text)
    hits: Counter[str] = Counter()
    for kind, values in secrets.items():
        hits[kind] += sum(1 for value in values if _found(value, text, flat))
    hits["private_key_header"] += len(PRIVATE_KEY_HEADER.findall(text))
    hits["jwt_shaped"] += len(JWT_LIKE.findall(text))
    return hits


def leaked(text: str, secrets: Iterable[str], *, shapes: bool = True) -> list[str]:
    """What leaked into `text`, named by position and length only (the report must not leak).

    `shapes=False` looks for the known secrets only: for a text that may rightly echo
    key- or JWT-shaped input that is nobody's secret (a fuzzer's planted values)."""
    flat = _flatten(text)
    found = [
        f"secret #{index} ({len(secret)} chars)"
        for index, secret in enumerate(secrets)
        if _found(secret, text, flat)
    ]
    if shapes and PRIVATE_KEY_HEADER.search(text):
        found.append("a private-key header")
    if shapes and JWT_LIKE.search(text):
        found.append("a JWT-shaped string")
    return found


def assert_no_leak(text: str, secrets: Iterable[str], *, shapes: bool = True) -> None:
    """Fail naming only which secret leaked (the assertion must not print it either)."""
    found = leaked(text, secrets, shapes=shapes)
    if found:
        raise AssertionError(f"leaked into output: {', '.join(found)}")
