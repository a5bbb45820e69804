"""Logging: JSON lines by default, text on request, and the redaction filter that keeps
secrets out of messages, extra fields and tracebacks at every level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from refresher.logs import REDACTED, SecretRegistry, setup_logging

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZWNoYWNjdCJ9.c2lnbmF0dXJlLXZhbHVl"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----"


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, SecretRegistry]]:
    stream = io.StringIO()
    registry = SecretRegistry()
    setup_logging("json", "debug", registry, stream)
    yield stream, registry
    logging.getLogger().handlers.clear()


def test_json_lines_carry_extra_fields(capture: tuple[io.StringIO, SecretRegistry]) -> None:
    """Each record is one JSON object with level, message and the extra fields."""
    stream, _ = capture
    logging.getLogger("refresher.test").info("hello %s", "world", extra={"x_debug_id": "d-1"})
    entry = json.loads(stream.getvalue().splitlines()[-1])
    assert entry["message"] == "hello world"
    assert entry["level"] == "info"
    assert entry["x_debug_id"] == "d-1"


def test_registered_secret_is_scrubbed_everywhere(
    capture: tuple[io.StringIO, SecretRegistry],
) -> None:
    """A registered client secret vanishes from the message, the args and the extras."""
    stream, registry = capture
    registry.add("p8-super-secret-value")
    log = logging.getLogger("refresher.test")
    log.debug("secret is %s", "p8-super-secret-value", extra={"detail": "p8-super-secret-value"})
    text = stream.getvalue()
    assert "p8-super-secret-value" not in text
    assert REDACTED in text


def test_jwt_and_pem_are_scrubbed_even_unregistered(
    capture: tuple[io.StringIO, SecretRegistry],
) -> None:
    """Anything shaped like a JWT or a PEM block is redacted without being registered."""
    stream, _ = capture
    logging.getLogger("refresher.test").warning("token %s key %s", JWT, PEM)
    text = stream.getvalue()
    assert "eyJhbGci" not in text
    assert "MIIEow" not in text


def test_traceback_is_scrubbed(capture: tuple[io.StringIO, SecretRegistry]) -> None:
    """A traceback that quotes a secret is redacted before it is written."""
    stream, registry = capture
    registry.add("client-secret-in-traceback")
    try:
        raise ValueError("boom client-secret-in-traceback")
    except ValueError:
        logging.getLogger("refresher.test").exception("failed")
    text = stream.getvalue()
    assert "client-secret-in-traceback" not in text
    assert "ValueError" in text


def test_text_format(capture: tuple[io.StringIO, SecretRegistry]) -> None:
    """--log-format text writes one readable line with key=value extras."""
    stream = io.StringIO()
    setup_logging("text", "info", SecretRegistry(), stream)
    logging.getLogger("refresher.test").info("published", extra={"sink": "file"})
    line = stream.getvalue().strip()
    assert "INFO" in line
    assert line.endswith("published sink=file")


def test_short_values_are_not_registered() -> None:
    """Values under 8 characters are not treated as secrets (they would redact words)."""
    registry = SecretRegistry()
    registry.add("abc")
    assert registry.scrub("abc def") == "abc def"


def test_registry_is_bounded_but_keeps_what_is_re_added() -> None:
    """Months of tokens do not grow the registry; a client secret re-added each cycle stays."""
    registry = SecretRegistry(capacity=4)
    for n in range(1000):
        registry.add("client-secret-xyz", f"token-value-{n:06d}")
    assert registry.scrub("client-secret-xyz") == REDACTED
    assert registry.scrub("token-value-000999") == REDACTED
    assert registry.scrub("token-value-000001") == "token-value-000001"
