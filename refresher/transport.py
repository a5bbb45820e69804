"""The HTTP under the IMS exchange: one `requests.Session`, TLS as configured, no redirects,
a capped body, and one deadline per exchange that no server can stretch.

`requests`' timeouts are per socket operation: an IMS (or a proxy) that trickles one
byte a second never trips a 15 s read timeout and can hold an exchange for minutes.
So each exchange gets a watchdog: every socket it uses (new or reused from the pool)
is registered, through urllib3 connection classes of our own, and when the deadline
passes, or `cancel()` is called (shutdown), the sockets are shut down. A blocked
connect-phase handshake, header read or body read then ends at once, wherever it is.

Limits: name resolution (getaddrinfo) cannot be interrupted and is bounded only by the
resolver's own timeouts; a SOCKS proxy's connections are not watched (per-read timeouts
only).

Everything `requests` raises becomes a `Transient` or `LocalSetup` here; nothing above
this module sees a `requests` exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_netrc_auth
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from refresher.errors import ExchangeError, LocalSetup, Transient

MAX_BODY_BYTES = 1024 * 1024
USER_AGENT = "ims-token-refresher"


def short(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]


class _Watch:
    """The sockets of one exchange, shut down together when it must end now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._dups: list[socket.socket] = []
        self._closed = False
        self.reason: str | None = None

    def add(self, sock: socket.socket) -> None:
        # A duplicate descriptor of the same socket: shutting it down ends a read blocked
        # on the original, even after TLS wrapping detached the object urllib3 created,
        # and it is ours, so its number can never be reused under us.
        with self._lock:
            if self._closed or id(sock) in self._seen:
                return
            try:
                dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
            except (OSError, ValueError):
                return  # already closed: nothing left to interrupt
            self._seen.add(id(sock))
            self._dups.append(dup)
            if self.reason is not None:
                _shut(dup)

    def fire(self, reason: str) -> None:
        with self._lock:
            if self._closed or self.reason is not None:
                return
            self.reason = reason
            for dup in self._dups:
                _shut(dup)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for dup in self._dups:
                dup.close()
            self._dups.clear()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected (yet, or any more): nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


_CURRENT: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar(
    "refresher_exchange_watch", default=None
)


def _track(sock: socket.socket | None) -> None:
    watch = _CURRENT.get()
    if watch is not None and sock is not None:
        watch.add(sock)


class _Watched(HTTPConnection):
    """Registers every socket an exchange uses with its watch, new or reused from the pool."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _track(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _track(self.sock)  # a connection reused from the pool
        super().request(*args, **kwargs)


class _WatchedHTTPConnection(_Watched):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _Adapter(HTTPAdapter):
    """Watched connections; with `--ca-bundle`, a TLS context trusting the system CAs *and*
    the bundle (`requests`' own `verify=path` would replace the default trust store)."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self._ssl_context = ssl_context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


class _Watchdog:
    """One thread per transport that fires the armed watch at its deadline.

    Cheaper than a timer thread per exchange (starting a thread costs about as much as a
    loopback exchange); it sleeps on a condition and wakes only to re-arm or to fire.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[_Watch, float] | None = None
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the thread's current wait ends by itself

    def arm(self, watch: _Watch, deadline: float) -> None:
        with self._cond:
            self._armed = (watch, deadline)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ims-exchange-deadline", daemon=True
                )
                self._thread.start()
            # A thread that wakes before this deadline re-arms itself then: back-to-back
            # exchanges do not wake it every time (a thread switch per cycle).
            if deadline < self._wakes_at:
                self._cond.notify()

    def disarm(self, watch: _Watch) -> None:
        # No notify: the thread wakes at the old deadline, finds nothing, sleeps again.
        with self._cond:
            if self._armed is not None and self._armed[0] is watch:
                self._armed = None

    def _run(self) -> None:
        with self._cond:
            while True:
                armed = self._armed
                if armed is None:
                    self._wakes_at = math.inf
                    self._cond.wait()
                    continue
                remaining = armed[1] - time.monotonic()
                if remaining > 0:
                    self._wakes_at = armed[1]
                    self._cond.wait(remaining)
                    continue
                self._armed = None
                armed[0].fire("deadline")


class Transport:
    """POSTs a form and returns the whole answer within `connect + read` timeout, or raises."""

    def __init__(
        self, *, ca_bundle: Path | None, connect_timeout_s: float, read_timeout_s: float
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.deadline_s = connect_timeout_s + read_timeout_s
        context = None
        if ca_bundle is not None:
            context = ssl.create_default_context()
            context.load_verify_locations(cafile=str(ca_bundle))
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # Every request is a form, encoded by `_post` as requests would encode a dict
        # (UTF-8, `+` for spaces) and passed as bytes: requests' own encoding of a dict
        # runs runtime Protocol checks on every call.
        self.session.headers["Content-Type"] = "application/x-www-form-urlencoded"
        # What requests reads from the environment (proxies and NO_PROXY, the CA bundle
        # variables, ~/.netrc) is read once per URL by `_environment`, not on every
        # request: with trust_env, requests scans the whole environment twice and stats
        # the netrc files per request, and a pod's environment holds a pair of variables
        # per Service of its namespace. A process's environment does not change under it.
        self.session.trust_env = False
        self._environments: dict[str, dict[str, Any]] = {}
        # TLS verification is always on: requests' default, never switched off here.
        adapter = _Adapter(context)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._lock = threading.Lock()
        self._watch: _Watch | None = None
        self._cancelled = False
        self._watchdog = _Watchdog()

    def close(self) -> None:
        self.session.close()

    def cancel(self) -> None:
        """End the exchange in flight at once, and refuse new ones (shutdown; any thread)."""
        with self._lock:
            self._cancelled = True
            watch = self._watch
        if watch is not None:
            watch.fire("cancelled")

    def post(self, url: str, form: Mapping[str, str]) -> Answer:
        watch = _Watch()
        with self._lock:
            if self._cancelled:
                raise Transient("not contacting IMS: stopping")
            self._watch = watch
        token = _CURRENT.set(watch)
        self._watchdog.arm(watch, time.monotonic() + self.deadline_s)
        try:
            answer = self._post(url, form)
            if watch.reason is None:
                return answer
        except ExchangeError:
            if watch.reason is None:
                raise
        finally:
            self._watchdog.disarm(watch)
            _CURRENT.reset(token)
            watch.close()
            with self._lock:
                self._watch = None
        # The watchdog ended it: whatever requests made of the shut socket, say why.
        self.session.close()  # drop the pooled connections it shut; new ones on next use
        if watch.reason == "cancelled":
            raise Transient(f"the exchange with {url} was cancelled: stopping")
        raise Transient(
            f"IMS at {url} did not answer in full within the exchange deadline of "
            f"{self.deadline_s:g}s (--connect-timeout + --read-timeout)"
        )

    def _environment(self, url: str) -> dict[str, Any]:
        found = self._environments.get(url)
        if found is None:
            if len(self._environments) >= 8:  # a few IMS URLs in a process's life
                self._environments.clear()
            found = self._environments[url] = _environment_for(url)
        return {**found, "proxies": dict(found["proxies"])}

    def _post(self, url: str, form: Mapping[str, str]) -> Answer:
        timeout = (self.connect_timeout_s, self.read_timeout_s)
        try:
            # No redirects: a token endpoint never redirects, and following one could
            # carry the client secret to another host.
            with self.session.post(
                url,
                data=urlencode(list(form.items())).encode("ascii"),
                timeout=timeout,
                stream=True,
                allow_redirects=False,
                **self._environment(url),
            ) as response:
                debug_id = response.headers.get("x-debug-id")
                body = bytearray()
                for chunk in response.iter_content(chunk_size=65536):
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise Transient(
                            f"IMS response from {url} exceeds {MAX_BODY_BYTES} bytes",
                            status=response.status_code,
                            debug_id=debug_id,
                        )
                if 300 <= response.status_code < 400:
                    raise LocalSetup(
                        f"IMS answered HTTP {response.status_code} (a redirect) from {url}; "
                        "redirects are not followed: check --ims-endpoint",
                        status=response.status_code,
                        debug_id=debug_id,
                    )
                return Answer(response.status_code, bytes(body), response.headers)
        except requests.exceptions.SSLError as exc:
            raise LocalSetup(
                f"TLS verification of {url} failed (pass the issuing CA with --ca-bundle): "
                f"{_tls_reason(exc)}"
            ) from None
        except requests.exceptions.Timeout:
            raise Transient(
                f"IMS at {url} did not answer within {timeout[0]:g}s connect / {timeout[1]:g}s read"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise Transient(f"could not reach IMS at {url}: {type(exc).__name__}") from None
        except OSError as exc:
            # requests raises a bare OSError when REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE names
            # a missing file: a local setup problem, not IMS's verdict (exit 1, not 3).
            raise LocalSetup(
                f"cannot set up TLS for {url}: {exc.strerror or type(exc).__name__} "
                "(check REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE and --ca-bundle)"
            ) from None


def _environment_for(url: str) -> dict[str, Any]:
    """The proxies, TLS verification and netrc auth that a `requests.Session` trusting
    the environment (requests' default) would use for `url`."""
    settings = requests.Session().merge_environment_settings(url, {}, None, None, None)
    return {
        "proxies": settings["proxies"],
        "verify": settings["verify"],
        "auth": get_netrc_auth(url),
    }


def _tls_reason(exc: Exception) -> str:
    """OpenSSL's reason, without urllib3's wrapping: `certificate verify failed: <why>`."""
    text = str(exc)
    marker = "certificate verify failed"
    if marker not in text:
        return type(exc).__name__
    reason = text[text.find(marker) :].split(" (_ssl.c", 1)[0]
    return short(reason.rstrip(")'\" "), 160)
