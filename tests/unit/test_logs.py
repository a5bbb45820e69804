"""Logging: JSON lines by default, text on request, and the redaction filter that keeps
secrets out of messages, extra fields and tracebacks at every level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from refresher.logs import REDACTED, SecretRegistry, redact, setup_logging

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZWNoYWNjdCJ9.c2lnbmF0dXJlLXZhbHVl"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----"


@dataclass(frozen=True)
class Captured:
    """Where the JSON log lines go, and the registry of secrets they are scrubbed of."""

    stream: io.StringIO
    registry: SecretRegistry


@pytest.fixture
def capture() -> Iterator[Captured]:
    """Logging set up as the CLI does (JSON, debug) into a string."""
    stream = io.StringIO()
    registry = SecretRegistry()
    setup_logging("json", "debug", registry, stream)
    yield Captured(stream, registry)
    logging.getLogger().handlers.clear()


def test_json_lines_carry_extra_fields(capture: Captured) -> None:
    """Each record is one JSON object with level, message and the extra fields."""
    stream = capture.stream
    logging.getLogger("refresher.test").info("hello %s", "world", extra={"x_debug_id": "d-1"})
    entry = json.loads(stream.getvalue().splitlines()[-1])
    assert entry["message"] == "hello world"
    assert entry["level"] == "info"
    assert entry["x_debug_id"] == "d-1"


def test_registered_secret_is_scrubbed_everywhere(
    capture: Captured,
) -> None:
    """A registered client secret vanishes from the message, the args and the extras."""
    stream, registry = capture.stream, capture.registry
    registry.add("p8-super-secret-value")
    log = logging.getLogger("refresher.test")
    log.debug("secret is %s", "p8-super-secret-value", extra={"detail": "p8-super-secret-value"})
    text = stream.getvalue()
    assert "p8-super-secret-value" not in text
    assert REDACTED in text


def test_jwt_and_pem_are_scrubbed_even_unregistered(
    capture: Captured,
) -> None:
    """Anything shaped like a JWT or a PEM block is redacted without being registered."""
    stream = capture.stream
    logging.getLogger("refresher.test").warning("token %s key %s", JWT, PEM)
    text = stream.getvalue()
    assert "eyJhbGci" not in text
    assert "MIIEow" not in text


def test_traceback_is_scrubbed(capture: Captured) -> None:
    """A traceback that quotes a secret is redacted before it is written."""
    stream, registry = capture.stream, capture.registry
    registry.add("client-secret-in-traceback")
    try:
        raise ValueError("boom client-secret-in-traceback")
    except ValueError:
        logging.getLogger("refresher.test").exception("failed")
    text = stream.getvalue()
    assert "client-secret-in-traceback" not in text
    assert "ValueError" in text


def test_text_format(capture: Captured) -> None:
    """--log-format text writes one readable line with key=value extras."""
    stream = io.StringIO()
    setup_logging("text", "info", SecretRegistry(), stream)
    logging.getLogger("refresher.test").info("published", extra={"sink": "file"})
    line = stream.getvalue().strip()
    assert "INFO" in line
    assert line.endswith("published sink=file")


@pytest.mark.parametrize(
    "echo",
    [
        "client_secret=S3cr3t%2BVal%2Fue%3D%3D&grant_type=x",  # quote_plus (a form body)
        "client_secret=S3cr3t%2bVal%2fue%3d%3d",  # lower-case hex
        "/token?secret=S3cr3t%2BVal/ue%3D%3D",  # quote, '/' safe
        '{"client_secret": "S3cr3t+Val\\/ue=="}',  # JSON with an escaped slash
        "S3cr3t+Val/ue==",
    ],
)
def test_url_encoded_and_json_escaped_forms_are_redacted(echo: str) -> None:
    """A secret echoed back form-encoded or JSON-escaped is redacted like the raw value."""
    registry = SecretRegistry()
    registry.add("S3cr3t+Val/ue==")
    scrubbed = registry.scrub(echo)
    assert REDACTED in scrubbed
    assert "S3cr3t" not in scrubbed


def test_json_escaped_quote_and_unicode_are_redacted() -> None:
    """Characters JSON escapes (a quote, a backslash, non-ASCII) do not hide the secret."""
    secret = 'sécret"with\\escapes'
    for text in (json.dumps(secret), json.dumps(secret, ensure_ascii=False)):
        assert redact(text, [secret]) == f'"{REDACTED}"'


def test_short_secrets_are_redacted_where_they_stand_alone() -> None:
    """A secret under 8 characters is redacted as a whole field or word, raw or encoded,
    but not inside longer words or numbers (that would shred every line and spell it out)."""
    registry = SecretRegistry()
    registry.add("ab+1", "7")
    assert registry.scrub("client_secret=ab%2B1&scope=x") == f"client_secret={REDACTED}&scope=x"
    assert registry.scrub('{"secret": "ab+1"}') == f'{{"secret": "{REDACTED}"}}'
    assert registry.scrub("secret=7&exit 17 took 0.7s") == f"secret={REDACTED}&exit 17 took 0.7s"
    assert registry.scrub("xab+1y") == "xab+1y"


def test_a_long_secret_is_redacted_inside_other_text() -> None:
    """From 8 characters on, a secret is redacted wherever it occurs, even inside a word."""
    assert redact("prefixLongSecret1suffix", ["LongSecret1"]) == f"prefix{REDACTED}suffix"


def test_redaction_through_the_log_filter_covers_encoded_forms(
    capture: Captured,
) -> None:
    """The logging filter uses the same rule: a form-encoded echo never reaches a line."""
    stream, registry = capture.stream, capture.registry
    registry.add("S3cr3t+Val/ue==")
    logging.getLogger("refresher.test").warning(
        "IMS said %s",
        "client_secret=S3cr3t%2BVal%2Fue%3D%3D",
        extra={"body": "S3cr3t%2BVal%2Fue%3D%3D"},
    )
    assert "S3cr3t" not in stream.getvalue()
    assert stream.getvalue().count(REDACTED) == 2


def test_registry_is_bounded_but_keeps_what_is_re_added() -> None:
    """Months of tokens do not grow the registry; a client secret re-added each cycle stays."""
    registry = SecretRegistry(capacity=4)
    for n in range(1000):
        registry.add("client-secret-xyz", f"token-value-{n:06d}")
    assert registry.scrub("client-secret-xyz") == REDACTED
    assert registry.scrub("token-value-000999") == REDACTED
    assert registry.scrub("token-value-000001") == "token-value-000001"
