"""JSON or text log lines on stdout, and the filter that keeps secrets out of them.

Two layers of defence: callers never pass a secret (errors carry codes, not
values), and `RedactingFilter` scrubs anything that still looks like one (a JWT,
a PEM block, a registered secret value) from the message, the extra fields and
the formatted traceback, at every level.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

REDACTED = "<redacted>"

# A JWT (three base64url parts, the first starting with `eyJ` = '{"') and PEM blocks.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_PEM = re.compile(r"-----BEGIN [A-Z ]+-----.*?(-----END [A-Z ]+-----|$)", re.DOTALL)
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})))
_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")
# Characters that every form of `_forms` leaves as they are (URL quoting's always-safe
# set, which JSON never escapes either): a value made of them only has one form.
_ONE_FORM = re.compile(r"[A-Za-z0-9_.~-]*")

# Secrets of this length or more are redacted wherever they occur, even inside a longer
# word: a long random string there is that secret, not a coincidence. Shorter ones are
# redacted too, but only where they stand alone (not inside a longer run of letters and
# digits): replacing a 1-3 character secret inside words would shred every log line, and
# the holes would spell the secret out. Standing alone is how an echo shows it anyway (a
# form field `client_secret=abc&`, a JSON string `"abc"`). The limit of that rule: a
# secret that short is guessable whatever we log, and a standalone `1` still redacts an
# exit code; real client secrets and tokens are tens of characters long.
_SUBSTRING_MIN = 8
_ALONE = "(?<![A-Za-z0-9]){}(?![A-Za-z0-9])"


class SecretRegistry:
    """The most recent secret values (client secrets, tokens), scrubbed verbatim.

    Bounded: a refresher runs for months and sees a new token every cycle, so the
    oldest values are forgotten (an LRU). Client secrets are re-added on every
    credentials read and so stay; an expired token that is long gone no longer
    needs scrubbing, and JWT-shaped text is caught by the pattern anyway.
    """

    def __init__(self, capacity: int = 16) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._recent: dict[str, None] = {}  # insertion-ordered: oldest first
        self._values: tuple[str, ...] = ()

    def add(self, *values: str) -> None:
        fresh = [v for v in values if v]  # short ones too: see _SUBSTRING_MIN
        if not fresh:
            return
        with self._lock:
            for value in fresh:
                self._recent.pop(value, None)
                self._recent[value] = None
            while len(self._recent) > self._capacity:
                del self._recent[next(iter(self._recent))]
            self._values = tuple(self._recent)

    def scrub(self, text: str) -> str:
        return redact(text, self._values)


def redact(text: str, values: Sequence[str] = ()) -> str:
    """`text` without JWTs, PEM blocks, or any of `values`, also URL-encoded or JSON-escaped
    (how a form field or a JSON body echoes it back)."""
    text = _JWT.sub(REDACTED, _PEM.sub(REDACTED, text))
    for form, alone in _matchers(tuple(values)):
        if form in text:  # the cheap test first: most lines hold no secret
            text = text.replace(form, REDACTED) if alone is None else alone.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=256)
def _forms(value: str) -> frozenset[str]:
    """`value` as it may appear in a log line: raw, percent-encoded (`quote`, `quote_plus`,
    upper- or lower-case hex) and JSON-escaped (with or without `\\/`, ASCII or not)."""
    if _ONE_FORM.fullmatch(value):
        return frozenset({value})  # a token (base64url and dots): computed every cycle
    escaped = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    escaped |= {form.replace("/", "\\/") for form in escaped}
    encoded = {quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")}
    encoded |= {_PERCENT_ESCAPE.sub(lambda m: m.group().lower(), form) for form in encoded}
    return frozenset({value, *escaped, *encoded})


@functools.lru_cache(maxsize=64)
def _matchers(values: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str] | None], ...]:
    """(form, None) for a substring match, (form, pattern) for a short secret that must
    stand alone; longest first, so a secret containing another is replaced whole."""
    alone: dict[str, bool] = {}
    for value in values:
        if not value:
            continue
        short = len(value) < _SUBSTRING_MIN
        for form in _forms(value):
            alone[form] = alone.get(form, True) and short
    ordered = sorted(alone, key=len, reverse=True)
    return tuple(
        (form, re.compile(_ALONE.format(re.escape(form))) if alone[form] else None)
        for form in ordered
    )


def _scrub_value(value: object, registry: SecretRegistry) -> object:
    if isinstance(value, str):
        return registry.scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v, registry) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v, registry) for v in value]
    return value


class RedactingFilter(logging.Filter):
    def __init__(self, registry: SecretRegistry) -> None:
        super().__init__()
        self.registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.registry.scrub(record.getMessage())
        record.args = None
        if record.exc_info:
            # Format the traceback now, scrubbed, and drop the live exception.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.registry.scrub(text)
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS:
                setattr(record, key, _scrub_value(value, self.registry))
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{when} {record.levelname:<7} {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        return f"{line}\n{record.exc_text}" if record.exc_text else line


def setup_logging(
    fmt: str, level: str, registry: SecretRegistry, stream: TextIO | None = None
) -> None:
    """Send every log record of the process to one redacting handler on `stream` (stdout).

    This replaces the root logger's handlers (anyone's, a library's or a test's), so
    call it once, from the composition root. The root logger stays at warning, so
    third parties log warnings and worse only; the `refresher` tree logs at `level`.
    Python's `warnings` are routed through logging too.
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(registry))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # urllib3 at debug would print request lines; keep third parties at warning.
    root.setLevel(logging.WARNING)
    logging.getLogger("refresher").setLevel(level.upper())
    logging.captureWarnings(True)
