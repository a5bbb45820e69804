"""The hint table: each IMS error text users meet gets the hint that says what to fix; a
text no rule knows gets none (never a wrong one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from refresher.hints import RULES, diagnose, hint_for

# (status, error, error_description, expected kind or None)
TABLE = [
    # The texts quoted from real IMS answers (Adobe's docs and public issue threads).
    (400, "invalid_token", "Could not match JWT signature to any of the bindings", "signature"),
    (
        400,
        "invalid_scope",
        "The metascopes in the JWT are not a subset of the metascopes in the binding",
        "metascopes",
    ),
    (400, "invalid_token", "JWT token is expired", "jwt_expired"),
    (400, "invalid_token", "JWT token has expired", "jwt_expired"),
    (400, "invalid_token", "JWT token is not yet valid", "jwt_not_yet_valid"),
    (401, "invalid_client", "invalid client_secret parameter", "client_secret"),
    (400, "invalid_client", "invalid client_id parameter", "client_id"),
    (400, "invalid_client", "JWT aud does not match the client_id", "audience"),
    (400, "invalid_scope", "invalid scope: openid,AdobeID", "scope"),
    (400, "invalid_scope", "Invalid scope(s)", "scope"),
    (429, None, None, "throttled"),
    (429, "too_many_requests", "Too many requests", "throttled"),
    # Variants in case and punctuation still match on whole words.
    (400, "INVALID_TOKEN", "could not match jwt SIGNATURE to any of the BINDINGS.", "signature"),
    (400, "invalid_token", "the certificate binding has expired", "certificate_expired"),
    (400, "invalid_scope", "metascope claim names another IMS host", "audience"),
    # Unknown texts, and known words under the wrong error code: no hint.
    (400, "invalid_token", "JWT token is incorrectly formatted, and can not be decoded.", None),
    (400, "invalid_token", "JWT token lifetime is over 87300 seconds", None),
    (400, "invalid_scope", "the JWT asks for no metascope", None),
    (400, "invalid_client", "something new went wrong", None),
    (400, "bad_request", "missing required parameter client_secret", None),
    (400, "unauthorized_client", "client_credentials not enabled", None),
    (400, "invalid_request", "JWT token is expired", None),
    (400, None, "Could not match JWT signature to any of the bindings", None),
    (400, "invalid_token", None, None),
    (400, "invalid_token", "", None),
    (500, "server_error", "internal failure", None),
    (503, None, None, None),
    (None, None, None, None),
    # Words inside other words do not count ("fraud" is not "aud", "expiredness" ...).
    (400, "invalid_client", "fraud suspected", None),
    (400, "invalid_token", "jwt expiredness", None),
    # An expired *access token* is not our JWT: the clock hint would mislead.
    (400, "invalid_token", "The access token provided is expired", None),
]


@pytest.mark.parametrize(("status", "error", "description", "kind"), TABLE)
def test_hint_table(
    status: int | None, error: str | None, description: str | None, kind: str | None
) -> None:
    """Each IMS answer maps to exactly the expected diagnosis (or none)."""
    diagnosis = diagnose(status, error, description)
    assert (diagnosis.kind if diagnosis is not None else None) == kind
    hint = hint_for(status, error, description)
    assert (hint is None) is (kind is None)


def test_every_rule_is_reachable_and_one_line() -> None:
    """Each rule is matched by some text of the table, and each hint is one line with no
    unfilled placeholder."""
    matched = {kind for *_, kind in TABLE if kind is not None}
    assert matched == {rule.kind for rule in RULES}
    for rule in RULES:
        assert "\n" not in rule.hint and "{" not in rule.hint
        assert 40 < len(rule.hint) < 260


def test_the_hints_name_what_to_fix() -> None:
    """The hints for the common errors point at the thing to change."""
    assert "certificate" in (hint_for(400, "invalid_token", TABLE[0][2]) or "")
    assert "product profile" in (hint_for(400, "invalid_scope", TABLE[1][2]) or "")
    assert "clock" in (hint_for(400, "invalid_token", "JWT token is expired") or "")
    assert "secret" in (hint_for(401, "invalid_client", "invalid client_secret parameter") or "")
    assert "--ims-audience" in (
        hint_for(400, "invalid_client", "JWT aud does not match the client_id") or ""
    )


def test_the_readme_troubleshooting_table_lists_every_hint() -> None:
    """README's troubleshooting section carries each hint verbatim, beside the IMS text."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Troubleshooting") :]
    for rule in RULES:
        assert f"| {rule.hint} |" in section, rule.kind
