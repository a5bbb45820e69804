"""HTTP/1.1 on the wire, pure: finding and parsing a request head, writing a response.

`refresher.httpserver` moves the bytes; this module decides what they mean. Parsing is
strict where leniency is what request smuggling and header injection live on: one space
between the parts of the request line, origin-form targets of visible ASCII, header names
that are tokens with no space before the colon, no folded lines, no control characters,
one Content-Length (or several that agree), no Transfer-Encoding. Anything else is a
`Refusal` with its status, never another exception.
"""

from __future__ import annotations

import http
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

SERVER = "ims-token-refresher"  # no version of Python or of us: nothing for a scanner
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")  # origin form, visible ASCII only
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_LENGTH = re.compile(r"[0-9]{1,18}")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in a header value: forbidden
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Limits:
    """Every bound one client is held to; the defaults suit probes and admission reviews."""

    max_head_bytes: int = 8192  # request line + headers together; over it: 431 and close
    head_timeout_s: float = 5.0  # whole request head must arrive within this
    body_timeout_s: float = 10.0
    max_body_bytes: int = 0  # 0: requests with a body are refused (413)
    # Bodies over 64 KiB in flight on all connections together (announced lengths; never
    # below max_body_bytes), so max_connections clients trickling bodies cannot take
    # max_connections x the cap; over it, stalled bodies make room or the new one gets 503.
    max_bodies_bytes: int = 32 << 20
    max_connections: int = 512
    idle_timeout_s: float = 5.0  # keep-alive idle
    max_headers: int = 100  # header fields per request; over it: 431
    send_timeout_s: float = 10.0  # a client that does not read its response is dropped
    linger_s: float = 1.0  # after a refusal, read and discard input this long at most...
    linger_bytes: int = 1 << 20  # ... and this much at most, then close


@dataclass(frozen=True)
class Head:
    """A parsed request head; its body, `length` bytes, follows on the wire."""

    method: str
    target: str
    headers: Mapping[str, str]
    length: int
    keep_alive: bool


class Refusal(Exception):
    """A request the server refuses itself, before any handler sees it; then it closes."""

    def __init__(self, status: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers

    def response(self) -> Response:
        body = b'{"error": "%d %s"}\n' % (self.status, phrase(self.status).encode())
        return Response(self.status, body, "application/json", self.headers)


def head_length(buf: bytearray, limit: int) -> int:
    """Drop blank lines before a request (RFC 9112, 2.2), then the length of the complete
    head at the start of `buf`, or 0 while it is incomplete. Raises Refusal (414: the
    request line alone is over `limit`; 431: the head is) once it cannot fit."""
    del buf[: len(buf) - len(buf.lstrip(b"\r\n"))]
    match = _HEAD_END.search(buf, 0, limit + 4)
    if match is not None and match.end() <= limit:
        return match.end()
    if match is None and len(buf) <= limit:
        return 0
    raise Refusal(414 if b"\n" not in buf[:limit] else 431)


def parse_head(raw: bytes, limits: Limits, methods: frozenset[str]) -> Head:
    """The request line and headers of `raw` (a complete head); raises Refusal."""
    # One CR may end a line; any other (a bare CR, RFC 9112, 2.2) fails the checks below.
    lines = [line.removesuffix("\r") for line in raw.decode("latin-1").split("\n")]
    method, target, version = _request_line(lines[0])
    headers = _parse_headers([f for f in lines[1:] if f], limits.max_headers)
    if method not in methods:
        # Unknown to HTTP: 501; known but not served here: 405 with what is.
        allow = (("Allow", ", ".join(sorted(methods))),)
        raise Refusal(405 if method in _KNOWN_METHODS else 501, allow)
    length = _body_length(headers, limits.max_body_bytes)
    expect = headers.get("expect")
    if expect is not None and expect.lower() != "100-continue":
        raise Refusal(417)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = version == "HTTP/1.1" and "close" not in tokens
    return Head(method, target, MappingProxyType(headers), length, keep_alive)


def _request_line(line: str) -> tuple[str, str, str]:
    """Method, target and version, each checked; raises Refusal."""
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise Refusal(400)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise Refusal(505 if _VERSION.fullmatch(version) else 400)
    if not _TARGET.fullmatch(target):
        raise Refusal(400)
    return method, target, version


def _body_length(headers: Mapping[str, str], max_body_bytes: int) -> int:
    """The announced length of the body (0 without one); raises Refusal."""
    if "transfer-encoding" in headers:
        raise Refusal(501)  # chunked bodies are not accepted; Content-Length is
    length_text = headers.get("content-length", "0")
    if not _LENGTH.fullmatch(length_text):
        raise Refusal(400)
    length = int(length_text)
    if length > max_body_bytes:
        raise Refusal(413)
    return length


def _parse_headers(lines: list[str], max_headers: int) -> dict[str, str]:
    if len(lines) > max_headers:
        raise Refusal(431)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        # A folded line starts with a space, so its "name" is no token: refused too.
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise Refusal(400)
        key, value = name.lower(), value.strip(" \t")
        if key not in headers:
            headers[key] = value
        elif key in ("content-length", "host"):
            if headers[key] != value:
                raise Refusal(400)
        else:
            headers[key] += ", " + value
    return headers


def serialize(response: Response, *, head_only: bool, close: bool, date: str) -> bytes:
    """Status line, headers and body as one buffer (sent in one write). Raises TypeError or
    ValueError for what is not a valid response (a header value with a line break)."""
    if not isinstance(response, Response) or not 200 <= response.status <= 599:
        raise TypeError("the handler returned no valid Response")
    status = response.status
    lines = [f"HTTP/1.1 {status} {phrase(status)}", f"Server: {SERVER}", f"Date: {date}"]
    fields = [("Content-Type", response.content_type), *response.headers]
    if status != 204:
        fields.append(("Content-Length", str(len(response.body))))
    if close:
        fields.append(("Connection", "close"))
    for name, value in fields:
        if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise ValueError("a response header would split the response")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 204 else head + response.body


def http_date(seconds: int) -> str:
    """IMF-fixdate, with fixed English names (strftime's %a and %b follow the locale)."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"  # a status this Python does not name: the code is what counts
