"""Talking to Adobe IMS: the request, the response, the error classifier, the retry policy.

Everything `requests` raises and every IMS error body becomes one `ExchangeError`
here, at the boundary, that knows whether retrying can help. Nothing above this
module sees a `requests` exception.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import jwt
import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState

from refresher.assertion import build_claims, sign
from refresher.config import ImsSettings, ims_base_url
from refresher.credentials import Credentials
from refresher.errors import EXIT_RUNTIME, ExchangeError
from refresher.logs import redact
from refresher.schedule import backoff_s
from refresher.token import AccessToken

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_RETRY_AFTER_S = 3600.0
# IMS tokens live 24 h; a lifetime beyond a year is garbage, and beyond datetime's range
# (year 9999) it would raise OverflowError instead of a classified ExchangeError.
MAX_LIFETIME_S = 366 * 86400.0
JWT_PATH = "/ims/exchange/jwt"
OAUTH_PATH = "/ims/token/v3"
USER_AGENT = "ims-token-refresher"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds from `now` (delta-seconds or HTTP date); None if absent/garbled."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def can_retry(status: int | None, error: str | None) -> bool:
    """The retry decision as one table: network trouble, 408, 429 and 5xx are transient.

    Everything else IMS answers (400/401 `invalid_client`, `invalid_scope`,
    `invalid_token`, `bad_request`, `unauthorized_client`, ...) is a verdict on the
    credentials: retrying at once would only get the integration throttled.
    """
    if status is None:
        return True  # no HTTP answer at all: connection refused, reset, timeout
    # A 200 with an unusable body, any other 1xx/2xx (a proxy's 202/204) are glitches on
    # the way, not a verdict on the credentials.
    return status < 300 or status in (408, 429) or status >= 500


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def classify_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    now: datetime,
    sensitive: Sequence[str] = (),
) -> ExchangeError:
    """Turn a non-success IMS answer into an ExchangeError (never echoes the body wholesale).

    What IMS says is copied into the error, so anything we sent that it might quote
    back (`sensitive`: the client secret, the signed assertion) is redacted first: the
    error reaches stderr, where the logging filter does not run.
    """
    error: str | None = None
    description: str | None = None

    def clean(value: object, limit: int) -> str:
        return _short(redact(str(value), sensitive), limit)

    try:
        document = json.loads(body)
        if isinstance(document, dict):
            raw_error = document.get("error")
            raw_desc = document.get("error_description")
            error = clean(raw_error, 80) if raw_error is not None else None
            description = clean(raw_desc, 200) if raw_desc is not None else None
    except (ValueError, UnicodeDecodeError):
        pass
    raw_debug_id = headers.get("x-debug-id")
    debug_id = clean(raw_debug_id, 120) if raw_debug_id is not None else None
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    retryable = can_retry(status, error)
    what = f"IMS answered HTTP {status}"
    if error:
        what += f" {error}"
    if description:
        what += f": {description}"
    elif not error:
        what += " without an IMS error body"
    return ExchangeError(
        what,
        retryable=retryable,
        status=status,
        error=error,
        error_description=description,
        debug_id=debug_id,
        retry_after_s=retry_after,
    )


def _decode_claims(access_token: str) -> dict[str, Any] | None:
    """The IMS token's own payload, unverified (we only read its lifetime); None if not a JWT."""
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(
    access_token: str, expires_in: float, unit_s: float, sent_at: datetime
) -> datetime:
    """Expiry from the response's `expires_in` (in `unit_s` seconds) counted from `sent_at`,
    cross-checked with the token's `created_at` + `expires_in` claims (milliseconds):
    the earlier of the two wins, so a lying response can only make us refresh sooner.
    """
    expires_at = sent_at + timedelta(seconds=expires_in * unit_s)
    claims = _decode_claims(access_token)
    if claims is not None:
        try:
            created_ms = float(claims["created_at"])
            life_ms = float(claims["expires_in"])
            claimed = datetime.fromtimestamp((created_ms + life_ms) / 1000.0, UTC)
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            claimed = None
        if claimed is not None and claimed < expires_at:
            expires_at = claimed
    return expires_at


def _extra_ca_adapter(ca_bundle: Path) -> HTTPAdapter:
    """An adapter whose TLS context trusts the system CAs *and* `ca_bundle`.

    `requests`' own `verify=path` would replace the default trust store; `--ca-bundle`
    adds a CA (a corporate proxy, the emulator) without dropping the public ones.
    """
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(ca_bundle))

    class ExtraCAAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = context
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = context
            return super().proxy_manager_for(proxy, **kwargs)

    return ExtraCAAdapter()


@dataclass(frozen=True)
class ExchangeResult:
    token: AccessToken
    duration_s: float


class ImsClient:
    """One `requests.Session` for the life of the process (connection reuse, proxies from env)."""

    def __init__(self, settings: ImsSettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # TLS verification is always on: requests' default, never switched off here.
        if settings.ca_bundle is not None:
            self.session.mount("https://", _extra_ca_adapter(settings.ca_bundle))
        self._last_good_secret: str | None = None

    def close(self) -> None:
        self.session.close()

    def base_url(self, credentials: Credentials) -> str:
        """Flag wins, then the credentials' `imsEndpoint`, then Adobe's default host."""
        return ims_base_url(self.settings.endpoint or credentials.ims_endpoint)

    def check_transport(self, base_url: str) -> None:
        if base_url.startswith("http://") and not self.settings.allow_insecure_http:
            raise ExchangeError(
                f"refusing plain HTTP to {base_url}: pass --allow-insecure-http to permit it",
                retryable=False,
                exit_code=EXIT_RUNTIME,
            )

    def exchange(self, credentials: Credentials, now: Callable[[], datetime]) -> AccessToken:
        """One attempt (all client secrets in turn on `invalid_client`). Raises ExchangeError."""
        base = self.base_url(credentials)
        self.check_transport(base)
        secrets = list(credentials.client_secrets)
        if self._last_good_secret in secrets:
            # After a rotation, start with the secret that worked last time.
            secrets.remove(self._last_good_secret)
            secrets.insert(0, self._last_good_secret)
        for index, secret in enumerate(secrets):
            try:
                token = self._exchange_once(credentials, secret, base, now)
            except ExchangeError as exc:
                if exc.error == "invalid_client" and index + 1 < len(secrets):
                    log.warning(
                        "IMS rejected client secret #%d of %d, trying the next one",
                        index + 1,
                        len(secrets),
                        extra=exc.log_fields(),
                    )
                    continue
                raise
            self._last_good_secret = secret
            return token
        raise AssertionError("unreachable: client_secrets is never empty")

    def _exchange_once(
        self, credentials: Credentials, secret: str, base: str, now: Callable[[], datetime]
    ) -> AccessToken:
        sent_at = now()
        if credentials.flow == "jwt":
            claims = build_claims(credentials, base, sent_at, self.settings.jwt_ttl_s)
            form = {
                "client_id": credentials.client_id,
                "client_secret": secret,
                "jwt_token": sign(claims, credentials.private_key),
            }
            url, unit_s = base + JWT_PATH, 0.001  # IMS: milliseconds on the JWT exchange
        else:
            form = {
                "grant_type": "client_credentials",
                "client_id": credentials.client_id,
                "client_secret": secret,
                "scope": ",".join(credentials.scopes),
            }
            url, unit_s = base + OAUTH_PATH, 1.0  # ... and seconds on OAuth
        sensitive = list(form.values())
        try:
            status, body, headers = self._post(url, form)
            if status != 200:
                raise classify_response(status, body, headers, now(), sensitive=sensitive)
            return self._parse_success(body, headers, credentials, base, unit_s, sent_at)
        except ExchangeError as exc:
            # Every path copies IMS's x-debug-id header: never let it carry what we sent.
            if exc.debug_id is not None:
                exc.debug_id = _short(redact(exc.debug_id, sensitive), 120)
            raise

    def _post(self, url: str, form: dict[str, str]) -> tuple[int, bytes, Mapping[str, str]]:
        timeout = (self.settings.connect_timeout_s, self.settings.read_timeout_s)
        try:
            # No redirects: a token endpoint never redirects, and following one could
            # carry the client secret to another host.
            with self.session.post(
                url, data=form, timeout=timeout, stream=True, allow_redirects=False
            ) as response:
                body = bytearray()
                for chunk in response.iter_content(chunk_size=65536):
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise ExchangeError(
                            f"IMS response from {url} exceeds {MAX_BODY_BYTES} bytes",
                            retryable=True,
                            status=response.status_code,
                            debug_id=response.headers.get("x-debug-id"),
                        )
                if 300 <= response.status_code < 400:
                    raise ExchangeError(
                        f"IMS answered HTTP {response.status_code} (a redirect) from {url}; "
                        "redirects are not followed: check --ims-endpoint",
                        retryable=False,
                        status=response.status_code,
                        debug_id=response.headers.get("x-debug-id"),
                        exit_code=EXIT_RUNTIME,
                    )
                return response.status_code, bytes(body), response.headers
        except requests.exceptions.SSLError as exc:
            raise ExchangeError(
                f"TLS verification of {url} failed (pass the issuing CA with --ca-bundle): "
                f"{_tls_reason(exc)}",
                retryable=False,
                exit_code=EXIT_RUNTIME,
            ) from None
        except requests.exceptions.Timeout:
            raise ExchangeError(
                f"IMS at {url} did not answer within {timeout[0]:g}s connect / "
                f"{timeout[1]:g}s read",
                retryable=True,
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ExchangeError(
                f"could not reach IMS at {url}: {type(exc).__name__}", retryable=True
            ) from None
        except OSError as exc:
            # requests raises a bare OSError when REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE names
            # a missing file: a local setup problem, not IMS's verdict (exit 1, not 3).
            raise ExchangeError(
                f"cannot set up TLS for {url}: {exc.strerror or type(exc).__name__} "
                "(check REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE and --ca-bundle)",
                retryable=False,
                exit_code=EXIT_RUNTIME,
            ) from None

    def _parse_success(
        self,
        body: bytes,
        headers: Mapping[str, str],
        credentials: Credentials,
        base: str,
        unit_s: float,
        sent_at: datetime,
    ) -> AccessToken:
        debug_id = headers.get("x-debug-id")
        try:
            document = json.loads(body)
            access_token = document["access_token"]
            expires_in = float(document["expires_in"])
            token_type = str(document.get("token_type", "bearer"))
        except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: 1e400-ish ints
            raise ExchangeError(
                "IMS answered HTTP 200 without a usable token document",
                retryable=True,
                status=200,
                debug_id=debug_id,
            ) from None
        if (
            not isinstance(access_token, str)
            or not access_token
            or not 0 < expires_in * unit_s <= MAX_LIFETIME_S  # also false for NaN
        ):
            raise ExchangeError(
                "IMS answered HTTP 200 with an empty token or an implausible expires_in",
                retryable=True,
                status=200,
                debug_id=debug_id,
            )
        expires_at = token_expiry(access_token, expires_in, unit_s, sent_at)
        if expires_at <= sent_at:
            raise ExchangeError(
                "IMS issued a token that is already expired (check the clock)",
                retryable=True,
                status=200,
                debug_id=debug_id,
            )
        return AccessToken(
            value=access_token,
            issued_at=sent_at,
            expires_at=expires_at,
            flow=credentials.flow,
            client_id=credentials.client_id,
            ims_endpoint=base,
            token_type=token_type,
        )


def _tls_reason(exc: Exception) -> str:
    """OpenSSL's reason, without urllib3's wrapping: `certificate verify failed: <why>`."""
    text = str(exc)
    marker = "certificate verify failed"
    if marker not in text:
        return type(exc).__name__
    reason = text[text.find(marker) :].split(" (_ssl.c", 1)[0]
    return _short(reason.rstrip(")'\" "), 160)


class RetryWait:
    """tenacity wait: exponential backoff with full jitter, but never sooner than Retry-After."""

    def __init__(self, initial_s: float, cap_s: float, rng: random.Random) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = backoff_s(retry_state.attempt_number, self.initial_s, self.cap_s, self.rng.random())
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, ExchangeError) and exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        return delay
