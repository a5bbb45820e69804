"""The HTTP face: routes, IMS-shaped answers, injected faults, and one safe log line per request.

Every answer carries IMS's headers: `x-debug-id`, and a `Date` from the
emulator's clock (moved by the clock offset). Token endpoints:

- JWT exchange: `/ims/exchange/jwt`, `/ims/exchange/jwt/` (`@adobe/jwt-auth`),
  `/ims/exchange/v1/jwt` (ims-go);
- OAuth: `/ims/token/v3`, `/ims/token/v2` (aio-lib-ims, aio-lib-core-auth, ims-go).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import socket
import ssl
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ims_emulator import control, errors
from ims_emulator.errors import ImsError, bad_request
from ims_emulator.exchange import exchange_jwt, exchange_oauth
from ims_emulator.forms import body_is_a_form, request_form

if TYPE_CHECKING:
    from ims_emulator.server import Server

__all__ = ["JWT_PATHS", "OAUTH_PATHS", "Handler"]

_log = logging.getLogger("ims_emulator")

JWT_PATHS = frozenset({"/ims/exchange/jwt", "/ims/exchange/jwt/", "/ims/exchange/v1/jwt"})
OAUTH_PATHS = frozenset({"/ims/token/v3", "/ims/token/v2"})

_JSON = "application/json;charset=utf-8"  # what IMS sends: clients must not compare equality
_HTML = "text/html;charset=utf-8"
_MAX_BODY_BYTES = 64 * 1024
_HTML_PAGES = {
    200: "<html><head><title>Adobe</title></head><body><h1>Scheduled maintenance</h1>"
    "<p>We'll be back shortly.</p></body></html>",
    502: "<html><head><title>502 Bad Gateway</title></head><body><center>"
    "<h1>502 Bad Gateway</h1></center></body></html>",
    504: "<html><head><title>504 Gateway Time-out</title></head><body><center>"
    "<h1>504 Gateway Time-out</h1></center></body></html>",
}
# Status faults answered with a JSON body (IMS itself) rather than a gateway's HTML page.
_JSON_FAULTS = {
    "500": (500, "server_error", "internal error"),
    "503": (503, "temporarily_unavailable", "service unavailable"),
    "invalid_client": (401, "invalid_client", errors.BAD_CLIENT_SECRET),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like IMS: a client's pooled connection matters
    server_version = "IMS-emulator"
    timeout = 30  # an idle keep-alive connection gives its thread back after this
    server: Server
    _log_client = "-"

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header every answer carries, from the emulator's (offset) clock.
        return email.utils.formatdate(
            self.server.state.now() if timestamp is None else timestamp, usegmt=True
        )

    def setup(self) -> None:
        # Without TCP_NODELAY, a kept-alive exchange stalls ~40 ms on Nagle + delayed ACK.
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.request, ssl.SSLSocket):
            # Handshake here, in the connection's own thread, bounded by the timeout:
            # a stalled client must not block the accept loop.
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        # Silenced: the base logs the raw request line (a query may hold a secret);
        # _send logs one safe line instead.
        pass

    # Every method goes through one dispatcher so that each gets IMS's 405 and a debug id.
    def do_GET(self) -> None:
        self._dispatch()

    # http.server looks these names up: N815 does not apply to them.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (malformed request line, oversized headers)
        # get IMS's JSON shape and a debug id like everything else.
        self.close_connection = True
        self._log_client = "-"
        # A garbled request line leaves http.server assuming HTTP/0.9, which has no
        # headers at all; answer as HTTP/1.0 so even this reply carries its debug id.
        if getattr(self, "request_version", "") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"
        self._error(bad_request(message or HTTPStatus(code).phrase), status=code)

    # -- plumbing

    def _dispatch(self) -> None:
        self._log_client = "-"
        path = urlsplit(self.path).path
        body = self._read_body()
        if body is None:
            return
        if path in JWT_PATHS or path in OAUTH_PATHS:
            self._token_request("jwt" if path in JWT_PATHS else "oauth", body)
        elif path.startswith(control.PREFIX):
            route = path[len(control.PREFIX) :].rstrip("/")
            answer = control.handle(
                self.server.state, self.client_address[0], self.command, route, body
            )
            self._send_json(answer.status, answer.document, route, answer.headers)
        else:
            self._error(ImsError(404, "not_found", "no such endpoint"))

    def _read_body(self) -> bytes | None:
        """The body, or None once an error has been answered."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(bad_request("a Content-Length is required"), status=411)
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        length = int(raw) if raw.strip().isdigit() else -1
        if length < 0 or length > _MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would poison the connection
            too_big = length > _MAX_BODY_BYTES
            self._error(
                bad_request("request body too large" if too_big else "invalid Content-Length"),
                status=413 if too_big else 400,
            )
            return None
        return self.rfile.read(length)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        outcome: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        debug_id = str(uuid.uuid4())
        self.send_response(status)  # adds Date (date_time_string) and Server
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("x-debug-id", debug_id)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log_outcome(str(status), outcome, debug_id)

    def _log_outcome(self, status: str, outcome: str, debug_id: str) -> None:
        # Method, path without the query, status, outcome, client id if known, debug id:
        # nothing a client sent as a secret can reach this line.
        path = urlsplit(self.path).path if getattr(self, "path", None) else "-"
        _log.info(
            "%s %s %s %s client_id=%s debug_id=%s",
            getattr(self, "command", None) or "-",
            path,
            status,
            outcome,
            self._log_client,
            debug_id,
        )

    def _send_json(
        self,
        status: int,
        document: dict[str, Any],
        outcome: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        self._send(status, body, _JSON, outcome or str(document.get("error", "ok")), headers)

    def _error(
        self, error: ImsError, headers: Sequence[tuple[str, str]] = (), status: int | None = None
    ) -> None:
        self._send_json(status or error.status, error.document(), headers=headers)

    def _reject(self, rejection: ImsError, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.server.state.count_rejected(rejection.error)
        self._error(rejection, headers)

    def _drop(self, outcome: str) -> None:
        """Close the connection without a byte of answer (the client sees a reset/EOF)."""
        self.close_connection = True
        self._log_outcome("-", outcome, "-")
        # The plain socket's shutdown, even under TLS: the point is an abrupt end.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.request, socket.SHUT_RDWR)

    # -- token endpoints

    def _token_request(self, kind: str, body: bytes) -> None:
        state = self.server.state
        if state.count_request(kind):
            self._drop("down")
            return
        if self.command != "POST":
            self._reject(
                ImsError(405, "method_not_allowed", "only POST is accepted"), [("Allow", "POST")]
            )
            return
        content_type = self.headers.get_content_type()
        if not body_is_a_form(body, content_type):
            self._reject(bad_request(f"Content-Type {content_type} is not a form"))
            return
        fault = state.take_fault()
        if fault is not None and self._inject(fault):
            return
        try:
            form = request_form(
                urlsplit(self.path).query, body, content_type, self.headers.get("Content-Type", "")
            )
            if state.client(form.get("client_id", "")) is not None:
                self._log_client = form["client_id"]
            if kind == "jwt":
                answer = exchange_jwt(state, form, self._base_url())
            else:
                answer = exchange_oauth(state, form)
        except ImsError as rejection:
            self._reject(rejection)
            return
        self._send_json(200, answer, outcome="issued")

    def _base_url(self) -> str:
        """The IMS base as this client reached it: what `aud` and metascope claims must name."""
        scheme = "https" if self.server.state.tls else "http"
        host = self.headers.get("Host") or self.server.authority
        return f"{scheme}://{host}"

    def _inject(self, kind: str) -> bool:
        """Apply one fault; True if it answered (or dropped) the request."""
        state = self.server.state
        outcome = f"fault:{kind}"
        if kind == "delay":
            if state.stopping.wait(state.faults.delay_seconds or 0.0):
                self._drop("stopped during delay")
                return True
            return False  # then answer normally, late
        if kind == "drop":
            self._drop(outcome)
        elif kind == "429":
            document = {"error": "too_many_requests", "error_description": "rate limit exceeded"}
            retry_after = [("Retry-After", str(state.faults.retry_after or 0))]
            self._send_json(429, document, outcome, retry_after)
        elif kind in _JSON_FAULTS:
            status, error, description = _JSON_FAULTS[kind]
            self._send_json(status, ImsError(status, error, description).document(), outcome)
        elif kind == "badjson":
            self._send(200, b'{"token_type":"bearer","access_token":', _JSON, outcome)
        else:  # "502", "504" and "html": a gateway's or a maintenance page's HTML
            status = int(kind) if kind.isdigit() else 200
            self._send(status, _HTML_PAGES[status].encode(), _HTML, outcome)
        return True
