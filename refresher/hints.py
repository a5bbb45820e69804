"""What an IMS rejection means for the user: IMS's terse error → one line saying what to fix.

Pure: a table of rules matched on IMS's `error` code plus a few robust words of its
`error_description` (whole words, any case, any punctuation), first match wins. A text
no rule knows gets no hint: a wrong hint sends people to fix the wrong thing, so every
rule asks for the words that make its diagnosis certain, not merely likely.

The texts matched are the ones users meet in Adobe's public issue trackers and docs
(README, "Troubleshooting", lists them beside each hint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal[
    "signature",
    "certificate_expired",
    "jwt_expired",
    "jwt_not_yet_valid",
    "metascopes",
    "scope",
    "audience",
    "client_id",
    "client_secret",
    "throttled",
]

GATEWAY_AUDIENCE = (
    "pass --ims-audience with the IMS URL the integration belongs to "
    "(e.g. https://ims-na1.adobelogin.com)"
)


@dataclass(frozen=True)
class Diagnosis:
    kind: Kind
    hint: str


@dataclass(frozen=True)
class _Rule:
    kind: Kind
    errors: frozenset[str]
    """IMS `error` codes this rule applies to (empty: any, e.g. a bare 429)."""
    words: tuple[tuple[str, ...], ...]
    """Each group must match by at least one of its phrases (whole words)."""
    hint: str
    status: int | None = None
    without: tuple[str, ...] = ()
    """Phrases that rule this diagnosis out."""

    def matches(self, status: int | None, code: str, text: str) -> bool:
        """`code` lower-case, `text` as `_normalized` makes it."""
        if self.status is not None and self.status != status:
            return False
        if self.errors and code not in self.errors:
            return False
        if any(_has(text, phrase) for phrase in self.without):
            return False
        return all(any(_has(text, phrase) for phrase in group) for group in self.words)


def _rule(
    kind: Kind,
    errors: str,
    words: str,
    hint: str,
    *,
    status: int | None = None,
    without: str = "",
) -> _Rule:
    """`words`: groups separated by `;`, alternatives inside a group by `|`."""
    groups = tuple(tuple(p.strip() for p in g.split("|")) for g in words.split(";") if g.strip())
    return _Rule(
        kind,
        frozenset(errors.split()),
        groups,
        hint,
        status,
        tuple(p.strip() for p in without.split("|") if p.strip()),
    )


# Order matters: the more specific rule first (a certificate that "expired" is not a JWT
# that expired; a metascope is also a scope).
RULES: tuple[_Rule, ...] = (
    _rule(
        "signature",
        "invalid_token",
        "signature; binding | bindings",
        "the certificate registered for this integration does not match this private key: "
        "the credentials were regenerated in the Developer Console or the certificate was "
        "replaced or expired; mount the current credentials (key and certificate together)",
    ),
    _rule(
        "certificate_expired",
        "invalid_token",
        "certificate | binding; expired",
        "the certificate registered for this integration has expired: create a new one in "
        "the Developer Console and mount the new credentials",
    ),
    _rule(
        "jwt_expired",
        "invalid_token",
        "jwt; expired",
        "IMS judged the signed JWT expired and IMS's clock (its Date header) does not explain "
        "it: check this node's clock (NTP), and that --jwt-ttl is not shorter than the "
        "network delay",
        without="certificate",
    ),
    _rule(
        "jwt_not_yet_valid",
        "invalid_token",
        "jwt; not yet valid",
        "IMS judged the signed JWT not yet valid and IMS's clock (its Date header) does not "
        "explain it: check this node's clock (NTP)",
    ),
    _rule(
        "audience",
        "invalid_client invalid_token invalid_scope",
        "aud | audience | another ims host",
        "the JWT names another IMS host than the one IMS expects: behind a gateway or proxy "
        f"under another host name, {GATEWAY_AUDIENCE}",
    ),
    _rule(
        "metascopes",
        "invalid_scope",
        "metascope | metascopes; subset | not granted | not allowed",
        "a metascope in the credentials is not granted to this integration: add the API or "
        "product profile to the integration in the Developer Console, or remove the "
        "metascope from the credentials",
    ),
    _rule(
        "scope",
        "invalid_scope",
        "scope | scopes",
        "a requested scope is not granted to this credential (or is misspelt): add the API "
        "or product profile to the project in the Developer Console, or correct the "
        "credentials' scopes",
        without="metascope | metascopes",
    ),
    _rule(
        "client_secret",
        "invalid_client",
        "client_secret | client secret",
        "IMS refused the client secret: it was rotated or mistyped; copy the current one "
        "from the Developer Console (during a rotation, give both in client_secrets)",
    ),
    _rule(
        "client_id",
        "invalid_client",
        "client_id | client id; invalid | unknown | not found",
        "IMS does not know this client id: check the credentials' client id, and that the "
        "IMS endpoint is the one the integration belongs to",
    ),
    _rule(
        "throttled",
        "",
        "",
        "IMS is throttling this integration (too many token requests): the refresher waits "
        "as Retry-After says; if it recurs, let replicas share one token (--secret) instead "
        "of each minting its own",
        status=429,
    ),
)


def _normalized(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9_]+", text.lower())) + " "


def _has(text: str, phrase: str) -> bool:
    return _normalized(phrase) in text


def diagnose(status: int | None, error: str | None, description: str | None) -> Diagnosis | None:
    """The first rule that matches IMS's answer, or None: no hint rather than a wrong one."""
    code = (error or "").strip().lower()
    text = _normalized(description or "")
    rule = next((rule for rule in RULES if rule.matches(status, code, text)), None)
    return Diagnosis(rule.kind, rule.hint) if rule is not None else None


def hint_for(status: int | None, error: str | None, description: str | None) -> str | None:
    """The one-line hint for IMS's answer, or None when the text is not one we know."""
    diagnosis = diagnose(status, error, description)
    return diagnosis.hint if diagnosis is not None else None
