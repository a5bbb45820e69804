"""Talking to Adobe IMS: the request, the response, the error classifier, the retry decision
(`can_retry`). How long to wait before the next attempt is the loop's (`schedule.RetryWait`).

Every failure becomes one of the `ExchangeError` kinds here, at the boundary
(`Rejected`, `Transient`, `LocalSetup`), carrying IMS's error, description, x-debug-id
and a hint; nothing above this module sees a `requests` exception. The HTTP itself,
with its per-exchange deadline, is `refresher.transport`.

IMS's clock is measured from the `Date` of every answer (`refresher.skew`); JWTs are
signed for IMS's clock once IMS has rejected one as expired (or not yet valid) and the
measured skew explains it. Expiry arithmetic stays in our own clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from refresher.assertion import build_claims, sign
from refresher.config import ImsSettings, plain_http_problem
from refresher.credentials import Credentials
from refresher.errors import ExchangeError, LocalSetup, Rejected, Transient
from refresher.hints import diagnose
from refresher.logs import redact
from refresher.skew import RESOLUTION_S, SkewEstimate
from refresher.token import MAX_LIFETIME, AccessToken
from refresher.transport import MAX_BODY_BYTES, Transport, short

log = logging.getLogger(__name__)

__all__ = ["MAX_BODY_BYTES", "ImsClient", "can_retry", "classify_response"]

MAX_RETRY_AFTER_S = 3600.0
# A lifetime beyond a year is garbage (a bad answer, retried); one between
# `token.MAX_LIFETIME` and a year is clamped to MAX_LIFETIME, so that what we publish is
# always something adoption accepts back.
GARBAGE_LIFETIME_S = 366 * 86400.0
JWT_PATH = "/ims/exchange/jwt"
OAUTH_PATH = "/ims/token/v3"
SKEW_WARN_S = 30.0
# The units guard: a response lifetime about 1000x off the token's own claims is a unit
# mix-up (seconds read as milliseconds, or the reverse), not a lie to shorten by.
UNITS_FACTOR = 1000.0
UNITS_TOLERANCE = 2.0
# OAuth error codes that say "try again" whatever the HTTP status (RFC 6749, 5.2/4.1.2.1).
TRANSIENT_ERRORS = frozenset({"server_error", "temporarily_unavailable"})
# A rejection of these kinds says nothing about the client secret: trying the other one
# would only add a request (an `aud` mismatch is `invalid_client` too).
_NOT_THE_SECRET = frozenset({"audience", "client_id"})
# The token is sent as `Authorization: Bearer <token>` and published as a file that shells
# splice into headers: one line of visible ASCII, no space, nothing else.
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")


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
    """The retry decision as one table: network trouble, 408, 429, 5xx, a garbled 2xx and
    IMS saying `server_error` / `temporarily_unavailable` are transient.

    Everything else IMS answers (400/401 `invalid_client`, `invalid_scope`,
    `invalid_token`, `bad_request`, `unauthorized_client`, ...) is a verdict on the
    credentials: retrying at once would only get the integration throttled.
    """
    if status is None:
        return True  # no HTTP answer at all: connection refused, reset, timeout
    if error is not None and error.strip().lower() in TRANSIENT_ERRORS:
        return True
    # A 200 with an unusable body, any other 1xx/2xx (a proxy's 202/204) are glitches on
    # the way, not a verdict on the credentials.
    return status < 300 or status in (408, 429) or status >= 500


def classify_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    now: datetime,
    sensitive: Sequence[str] = (),
) -> ExchangeError:
    """Turn a non-success IMS answer into `Rejected` or `Transient`, with its hint.

    What IMS says is copied into the error, so anything we sent that it might quote
    back (`sensitive`: the client secret, the signed assertion) is redacted first: the
    error reaches stderr, where the logging filter does not run. The body itself is
    never echoed wholesale.
    """

    def clean(value: object, limit: int) -> str:
        return short(redact(str(value), sensitive), limit)

    document = _json_object(body)
    raw_error = document.get("error")
    raw_desc = document.get("error_description")
    error = clean(raw_error, 80) if raw_error is not None else None
    description = clean(raw_desc, 200) if raw_desc is not None else None
    raw_debug_id = headers.get("x-debug-id")
    what = f"IMS answered HTTP {status}"
    if error:
        what += f" {error}"
    if description:
        what += f": {description}"
    elif not error:
        what += " without an IMS error body"
    diagnosis = diagnose(status, error, description)
    fields: dict[str, Any] = {
        "status": status,
        "error": error,
        "error_description": description,
        "debug_id": clean(raw_debug_id, 120) if raw_debug_id is not None else None,
        "hint": diagnosis.hint if diagnosis is not None else None,
    }
    if can_retry(status, error):
        return Transient(
            what, retry_after_s=parse_retry_after(headers.get("Retry-After"), now), **fields
        )
    return Rejected(what, **fields)


def _json_object(body: bytes) -> dict[str, object]:
    """The body as a JSON object; empty if it is anything else (HTML, garbage, a list)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return document if isinstance(document, dict) else {}


def _claims_lifetime(access_token: str) -> tuple[float, float] | None:
    """The IMS token's own `created_at` (IMS's clock, Unix s) and `expires_in` (s), read
    unverified (we only read its lifetime); None if it is not a JWT carrying both."""
    claims = unverified_claims(access_token)
    if claims is None:
        return None
    try:
        created_s = float(claims["created_at"]) / 1000.0
        life_s = float(claims["expires_in"]) / 1000.0
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(created_s) and math.isfinite(life_s)):
        return None
    return created_s, life_s


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWS (three base64url parts, header and payload JSON
    objects), unverified; None for anything else. What PyJWT's unverified decode accepts,
    without its per-character alphabet scan of every part (most of a cycle's parsing)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, claims, _ = (_base64url(part) for part in parts)
        header_object, claims_object = json.loads(header), json.loads(claims)
    except (binascii.Error, ValueError, RecursionError):
        return None
    if not isinstance(header_object, dict) or not isinstance(claims_object, dict):
        return None
    return claims_object


def _base64url(part: str) -> bytes:
    """One part, decoded as strictly as PyJWT does: at most two `=`, only where they
    complete a quantum, and the canonical encoding of what it decodes to."""
    stripped = part.rstrip("=")
    padding = len(part) - len(stripped)
    if padding > 2 or (padding and len(part) % 4) or len(stripped) % 4 == 1:
        raise ValueError("bad padding")
    raw = base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True)
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != stripped.encode("ascii"):
        raise ValueError("not canonical base64url")
    return raw


def units_mixed_up(response_s: float, claims_life_s: float) -> bool:
    """True when the two lifetimes differ by about a factor of 1000 (either way)."""
    if not (response_s > 0 and claims_life_s > 0):
        return False
    ratio = response_s / claims_life_s
    if ratio < 1:
        ratio = 1 / ratio
    return UNITS_FACTOR / UNITS_TOLERANCE <= ratio <= UNITS_FACTOR * UNITS_TOLERANCE


def token_lifetime_s(
    access_token: str, response_s: float, sent_at: datetime, skew_s: float = 0.0
) -> tuple[float, bool]:
    """Seconds from `sent_at` (our clock) to the token's expiry, and whether the units guard
    overrode the response.

    The response's lifetime counts from `sent_at`. Where the token carries `created_at` +
    `expires_in` claims (IMS's clock: `skew_s` is IMS's clock minus ours), the earlier
    expiry wins, so a lying response can only make us refresh sooner; except when the two
    lifetimes differ by about 1000x, a unit mix-up: then the claims are trusted.
    """
    claims = _claims_lifetime(access_token)
    if claims is None:
        return response_s, False
    created_s, life_s = claims
    claimed_s = created_s - skew_s + life_s - sent_at.timestamp()
    if units_mixed_up(response_s, life_s):
        return claimed_s, True
    return min(response_s, claimed_s), False


def is_token_text(value: object) -> bool:
    """A single line of visible ASCII without spaces (what a Bearer header can carry)."""
    return isinstance(value, str) and _TOKEN_TEXT.fullmatch(value) is not None


def _number(value: object) -> float | None:
    """A finite JSON number as a float; None for `true`, "86399", null, NaN and the like."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        return None
    return number if math.isfinite(number) else None


def is_adobe_ims_host(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    return host == "adobelogin.com" or host.endswith(".adobelogin.com")


class ImsClient:
    """One HTTP session for the life of the process (connection reuse, proxies from env).

    `clock_skew_s` is IMS's clock minus ours as measured so far (0 until measured, and
    within the `Date` header's noise); the composition root exports it as a gauge.
    """

    def __init__(self, settings: ImsSettings) -> None:
        self.settings = settings
        self.transport = Transport(
            ca_bundle=settings.ca_bundle,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
        )
        self.skew = SkewEstimate()
        self._sign_for_ims_clock = False
        self._signed_with_s = 0.0  # the offset the last JWT was signed with
        self._last_good_secret: str | None = None
        self._said: set[str] = set()

    @property
    def clock_skew_s(self) -> float:
        return self.skew.offset_s

    def close(self) -> None:
        self.transport.close()

    def cancel(self) -> None:
        """Stop: end the exchange in flight at once and make no further one (any thread)."""
        self.transport.cancel()

    def base_url(self, credentials: Credentials) -> str:
        """IMS for these credentials (`ImsSettings.base_url`: the flag, the credentials,
        Adobe's default)."""
        return self.settings.base_url(credentials.ims_endpoint)

    def check_transport(self, base_url: str) -> None:
        """`config.plain_http_problem`, raised as `LocalSetup`: the last guard before a
        request (the loop and `check` refuse the same URL earlier, in the same words)."""
        origin = (
            "--ims-endpoint" if self.settings.endpoint else "the IMS endpoint in the credentials"
        )
        problem = plain_http_problem(
            base_url, allow_insecure_http=self.settings.allow_insecure_http, origin=origin
        )
        if problem is not None:
            raise LocalSetup(problem)

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
            except Rejected as exc:
                diagnosis = diagnose(exc.status, exc.error, exc.error_description)
                if (
                    exc.error == "invalid_client"
                    and index + 1 < len(secrets)
                    and (diagnosis is None or diagnosis.kind not in _NOT_THE_SECRET)
                ):
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
        """One request, and at once a second when IMS's clock explains a JWT time verdict."""
        if credentials.flow != "jwt":
            return self._request(credentials, secret, base, now)
        self._warn_about_audience(base)
        try:
            return self._request(credentials, secret, base, now)
        except Rejected as exc:
            if not self._skew_explains(exc):
                raise
            self._sign_for_ims_clock = True
            log.warning(
                "IMS judged the JWT by its own clock, %+.1fs off ours (its Date header): "
                "signing for IMS's clock from now on",
                self.skew.offset_s,
                extra={**exc.log_fields(), "clock_skew_s": self.skew.offset_s},
            )
        return self._request(credentials, secret, base, now)

    def _skew_explains(self, exc: Rejected) -> bool:
        """Does the skew measured from this very answer explain IMS's time verdict?"""
        diagnosis = diagnose(exc.status, exc.error, exc.error_description)
        if diagnosis is None or not self.skew.measured:
            return False
        signed_with = self._signed_with_s
        drift = self.skew.offset_s - signed_with
        if diagnosis.kind == "jwt_expired":
            return drift >= self.settings.jwt_ttl_s - RESOLUTION_S
        if diagnosis.kind == "jwt_not_yet_valid":
            return drift <= -RESOLUTION_S
        return False

    def _request(
        self, credentials: Credentials, secret: str, base: str, now: Callable[[], datetime]
    ) -> AccessToken:
        epoch_sent = self.skew.epoch()  # before `sent_at`: see SkewEstimate.observe
        sent_at = now()
        if credentials.flow == "jwt":
            self._signed_with_s = self.skew.offset_s if self._sign_for_ims_clock else 0.0
            audience = self.settings.audience or base
            ims_now = sent_at + timedelta(seconds=self._signed_with_s)
            claims = build_claims(credentials, audience, ims_now, self.settings.jwt_ttl_s)
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
            if credentials.org_id:
                form["org_id"] = credentials.org_id  # as Adobe's own libraries send it
            url, unit_s = base + OAUTH_PATH, 1.0  # ... and seconds on OAuth
        sensitive = [secret, form.get("jwt_token", "")]
        try:
            answer = self.transport.post(url, form)
            received_at = now()
            self._observe_skew(answer.headers.get("Date"), sent_at, received_at, epoch_sent)
            if answer.status != 200:
                raise classify_response(
                    answer.status, answer.body, answer.headers, received_at, sensitive=sensitive
                )
            return self._parse_success(
                answer.body, answer.headers, credentials, base, unit_s, sent_at
            )
        except ExchangeError as exc:
            # Every path copies IMS's x-debug-id header: never let it carry what we sent.
            if exc.debug_id is not None:
                exc.debug_id = short(redact(exc.debug_id, sensitive), 120)
            raise

    def _observe_skew(
        self, date: str | None, sent_at: datetime, received_at: datetime, epoch_sent: float
    ) -> None:
        self.skew.observe(date, sent_at, received_at, epoch_sent)
        skew_s = self.skew.offset_s
        if abs(skew_s) > SKEW_WARN_S:
            self._once(
                "skew",
                "IMS's clock is %+.0fs off this node's (from its Date header): JWTs are signed "
                "for IMS's clock, but fix the node's time sync (NTP)",
                skew_s,
                clock_skew_s=skew_s,
            )

    def _warn_about_audience(self, base: str) -> None:
        if self.settings.audience is None and not is_adobe_ims_host(base):
            self._once(
                "audience",
                "IMS endpoint %s is not an Adobe IMS host (*.adobelogin.com): the JWT's aud "
                "and metascopes name it; if it is a gateway to Adobe IMS, pass --ims-audience "
                "with the IMS URL the integration belongs to",
                base,
            )

    def _once(self, key: str, message: str, *args: object, **fields: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args, extra=fields)

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

        def bad(what: str) -> Transient:
            # Retried like a 5xx: a glitch on the way, not a verdict on the credentials.
            return Transient(f"IMS answered HTTP 200 {what}", status=200, debug_id=debug_id)

        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise bad("without a token document")
        access_token = document.get("access_token")
        expires_in = _number(document.get("expires_in"))
        if not is_token_text(access_token):
            raise bad("without a usable access_token (one line of visible ASCII, no spaces)")
        if expires_in is None:
            raise bad("without a numeric expires_in")
        assert isinstance(access_token, str)  # noqa: S101 - is_token_text said so
        lifetime_s = self._lifetime_s(access_token, expires_in * unit_s, sent_at)
        if lifetime_s <= 0:
            raise bad("with a token that is already expired (check the clock)")
        if lifetime_s > GARBAGE_LIFETIME_S:
            raise bad(f"with an implausible lifetime of {lifetime_s:g}s")
        if lifetime_s < self.settings.min_token_lifetime_s:
            raise bad(
                f"with a lifetime of {lifetime_s:g}s, under --min-token-lifetime "
                f"{self.settings.min_token_lifetime_s:g}s"
            )
        longest_s = MAX_LIFETIME.total_seconds()
        if lifetime_s > longest_s:
            self._once(
                "clamp",
                "IMS granted a lifetime of %gs: holding the token for at most %gs",
                lifetime_s,
                longest_s,
            )
            lifetime_s = longest_s
        return AccessToken(
            value=access_token,
            issued_at=sent_at,
            expires_at=sent_at + timedelta(seconds=lifetime_s),
            flow=credentials.flow,
            client_id=credentials.client_id,
            ims_endpoint=base,
            token_type=short(str(document.get("token_type", "bearer")), 40),
        )

    def _lifetime_s(self, access_token: str, response_s: float, sent_at: datetime) -> float:
        lifetime_s, units_guard = token_lifetime_s(
            access_token, response_s, sent_at, self.skew.offset_s
        )
        if units_guard:
            self._once(
                "units",
                "IMS's expires_in (%gs as read) and the token's own claims (%gs) differ by "
                "about 1000x, a unit mix-up: trusting the token's claims",
                response_s,
                lifetime_s,
            )
        return lifetime_s
