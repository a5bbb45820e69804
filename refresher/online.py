"""`refresher check` and `refresher token`: for a person at a shell, no loop, no sinks.

`check` validates the credentials offline and prints a summary; with `--online`, and
for `token`, one exchange follows.

One attempt, no retry loop, no sinks: all client secrets in turn during a rotation, and a
JWT re-signed at once when IMS's clock explains a rejection, as in `once`; then the exit
code `once` would give (0, 1 failed at run time, 3 rejected). Logs go to stderr, so that
stdout carries only what was asked for: the token, or the report (never the token).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

from refresher.clock import EventSleeper, SystemClock
from refresher.config import Settings, plain_http_problem
from refresher.credentials import Credentials, load_settled
from refresher.errors import EXIT_OK, CredentialsError, ExchangeError, Rejected
from refresher.ims import ImsClient, unverified_claims
from refresher.logs import SecretRegistry, setup_logging
from refresher.token import AccessToken, rfc3339

log = logging.getLogger(__name__)


def start_logging(settings: Settings, credentials: Credentials | None = None) -> SecretRegistry:
    """Log lines on stderr, with the credentials' secrets registered for scrubbing."""
    secrets = SecretRegistry()
    setup_logging(settings.log_format, settings.log_level, secrets, stream=sys.stderr)
    if credentials is not None:
        secrets.add(*credentials.client_secrets)
    return secrets


def _exchange(client: ImsClient, credentials: Credentials, secrets: SecretRegistry) -> AccessToken:
    try:
        token = client.exchange(credentials, SystemClock().now)
    except ExchangeError as exc:
        log.error(
            "IMS exchange failed: %s", exc, extra={"event": "refresh_failed", **exc.log_fields()}
        )
        raise
    finally:
        client.close()
    secrets.add(token.value)
    return token


def print_token(
    settings: Settings,
    credentials: Credentials,
    secrets: SecretRegistry,
    out: TextIO | None = None,
) -> int:
    """The token alone on stdout (a newline only for a terminal: `$(...)` and files get
    the bare value, like the published `access_token`). Raises ExchangeError."""
    stream = out or sys.stdout
    token = _exchange(ImsClient(settings.ims), credentials, secrets)
    stream.write(token.value + ("\n" if stream.isatty() else ""))
    stream.flush()
    log.info(
        "obtained a new access token",
        extra={
            "event": "token_minted",
            "flow": token.flow,
            "expires_at": rfc3339(token.expires_at),
        },
    )
    return EXIT_OK


def granted_scopes(access_token: str) -> list[str] | None:
    """The `scope` claim of an IMS token (read unverified, as IMS's own clients do)."""
    claims = unverified_claims(access_token)
    scope = claims.get("scope") if claims is not None else None
    if not isinstance(scope, str):
        return None
    return [s for s in (part.strip() for part in scope.split(",")) if s]


def check_online(
    settings: Settings,
    credentials: Credentials,
    secrets: SecretRegistry,
    say: Callable[[str, object], None],
) -> int:
    """Exchange once and `say` what IMS granted, or its rejection with the hint."""
    client = ImsClient(settings.ims)
    try:
        token = _exchange(client, credentials, secrets)
    except ExchangeError as exc:
        say("online", "rejected" if isinstance(exc, Rejected) else "failed")
        say("reason", exc)
        for key, value in exc.log_fields().items():
            if value is not None and key != "retry_after_s":
                say(key, value)
        say("clock_skew_s", client.clock_skew_s)
        return exc.exit_code
    scopes = granted_scopes(token.value)
    say("online", "ok")
    if scopes is not None:
        say("granted_scopes", ", ".join(scopes))
    else:
        say("requested_scopes", ", ".join(credentials.metascopes or credentials.scopes))
    say("lifetime_s", int(token.lifetime.total_seconds()))
    say("expires_at", rfc3339(token.expires_at))
    say("clock_skew_s", client.clock_skew_s)
    return EXIT_OK


def check(settings: Settings, say: Callable[[str, object], None], *, online: bool = False) -> int:
    """`check`: the credentials validated offline and summarised (no secrets); with
    `online`, then one exchange and what IMS granted or why it refused."""
    credentials, base = checked_credentials(settings)
    lines: list[tuple[str, object]] = [("flow", credentials.flow), ("ims", base)]
    lines += [
        (k, v)
        for k, v in credentials.summary().items()
        if k not in ("flow", "ims_endpoint") and v not in (None, "", (), [])
    ]
    not_after = credentials.certificate_not_after
    days = None
    if not_after is not None:
        days = (not_after - SystemClock().now()).total_seconds() / 86400
        lines.append(("certificate_days_left", f"{days:.1f}"))
    for key, value in lines:
        say(key, ", ".join(map(str, value)) if isinstance(value, list | tuple) else value)
    if days is not None and days <= 0:
        raise CredentialsError("the credentials' certificate has expired")  # exit 2
    if online:
        return check_online(settings, credentials, start_logging(settings, credentials), say)
    return EXIT_OK


def token(settings: Settings) -> int:
    """`token`: the same checks as `check`, one exchange, the token alone on stdout."""
    credentials, _ = checked_credentials(settings)
    return print_token(settings, credentials, start_logging(settings, credentials))


def checked_credentials(settings: Settings) -> tuple[Credentials, str]:
    """The credentials, settled (content that stays half-written-looking is broken: exit 2
    within ~1 s), and their IMS base URL, refused as plain HTTP in the words and with the
    exit code of `once` and `run`."""
    credentials = load_settled(settings.credentials, flow=settings.flow, wait=EventSleeper().sleep)
    base = settings.ims.base_url(credentials.ims_endpoint)
    problem = plain_http_problem(
        base,
        allow_insecure_http=settings.ims.allow_insecure_http,
        origin="the IMS endpoint in the credentials",
    )
    if problem is not None:
        raise CredentialsError(problem, source=credentials.source)
    return credentials, base
