"""The loop that chains the stages: credentials → exchange → token → schedule → sinks.

`Service.run()` keeps a valid token published forever; `Service.once()` publishes
one and returns an exit code. Both are driven by an injected clock, sleeper and
random source, so tests run hours of schedule in milliseconds.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tenacity import RetryCallState, Retrying, retry_if_exception

from refresher.clock import Clock, Sleeper
from refresher.config import Settings, plain_http_problem
from refresher.credentials import Credentials, change_signature, load_credentials, load_settled
from refresher.errors import (
    EXIT_OK,
    EXIT_RUNTIME,
    CredentialsError,
    CredentialsNotReady,
    ExchangeError,
    PublishError,
    RefresherError,
)
from refresher.health import HealthState
from refresher.ims import ImsClient, RetryWait
from refresher.logs import SecretRegistry
from refresher.metrics import Metrics
from refresher.notify import Notifier
from refresher.schedule import RefreshPolicy, adoptable, backoff_s, delay_until, refresh_at
from refresher.sinks import Sink
from refresher.token import AccessToken, rfc3339

log = logging.getLogger(__name__)

CERT_WARN_DAYS = 30
CERT_ERROR_DAYS = 7


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ExchangeError):
        return exc.retryable
    return isinstance(exc, CredentialsNotReady)


class Stopped(RefresherError):
    """Shutdown was asked for before a token was obtained: no further IMS call is made."""

    exit_code = EXIT_RUNTIME


class _DeadlineReached(Exception):
    """`once`'s --retry-timeout ends the wait before the next attempt would start."""


@dataclass
class _Published:
    """The token we stand behind, when we mean to refresh it, and sinks still owed a copy.

    The refresh is due at `due_at` on the wall clock or at `due_mono` on the monotonic
    clock, whichever comes first: a wall-clock step forward makes the token look older
    (refresh now, it may have expired), a step back makes it look younger, and the
    monotonic clock keeps the refresh on time (the token lives by IMS's clock, not ours).
    """

    token: AccessToken
    due_at: datetime
    due_mono: float
    unpublished: list[Sink] = field(default_factory=list)
    publish_attempts: int = 0


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        sleeper: Sleeper,
        client: ImsClient,
        sinks: Sequence[Sink],
        metrics: Metrics,
        health: HealthState,
        secrets: SecretRegistry,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        load: Callable[..., Credentials] = load_credentials,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.sleeper = sleeper
        self.client = client
        # Shared sinks (the Secret) first: if another replica won a race there, the
        # token it holds is the one the local file must get.
        self.sinks = sorted(sinks, key=lambda s: not s.shared)
        self.metrics = metrics
        self.health = health
        self.secrets = secrets
        self.notifier = notifier
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.load = load
        self.policy = RefreshPolicy(settings.schedule.refresh_ratio, settings.schedule.jitter)
        self.publish_lock = threading.Lock()
        self._stopping = threading.Event()
        self._signature: tuple[object, ...] | None = None
        self._credentials_changed = False
        self._current: _Published | None = None
        self._certificate_reported: tuple[datetime, int] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop: any sleep ends at once; a publish in progress completes."""
        self._stopping.set()
        self.sleeper.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def published(self) -> bool:
        """A token is current and every sink holds it."""
        current = self._current
        return current is not None and not current.unpublished

    # ---- the two commands --------------------------------------------------------------

    def once(self) -> int:
        """Publish one valid token (adopting a fresh published one), then return the exit code."""
        deadline = self.clock.monotonic() + self.settings.schedule.retry_timeout_s
        self._prepare()
        if self._adopt_at_start():
            return self._settle_publication()
        token = self._obtain(deadline=deadline, allow_adopt=True)
        self._accept(token)
        return self._settle_publication()

    def run(self) -> int:
        """Keep a valid token published until `stop()`. Returns 0 on a clean stop."""
        self._prepare()
        self._adopt_at_start()
        while not self.stopping:
            self.health.heartbeat()
            current = self._current
            if current is None or self._credentials_changed or self._due(current):
                self._refresh()
                continue
            if current.unpublished:
                self._retry_unpublished(current)
                continue
            self._pause(self._until_due(current), until=current.due_at)
        self.health.stopped()
        return EXIT_OK

    # ---- stages ----------------------------------------------------------------------

    def _prepare(self) -> None:
        # The starting state of the credentials, before the first read: the first
        # watch check must not take the files as they were at start for a change.
        self._signature = self._stat_credentials()
        for sink in self.sinks:
            sink.prepare()

    def _load(self, *, settle: bool = True) -> Credentials:
        """Read the credentials. With `settle`, a not-ready read that reads the same a
        moment later is a permanent CredentialsError (broken, not half-written)."""
        if settle:
            credentials = load_settled(
                self.settings.credentials,
                flow=self.settings.flow,
                wait=self.sleeper.sleep,
                load=self.load,
            )
        else:
            credentials = self.load(self.settings.credentials, flow=self.settings.flow)
        self.secrets.add(*credentials.client_secrets)
        problem = plain_http_problem(
            self.client.base_url(credentials),
            allow_insecure_http=self.settings.ims.allow_insecure_http,
            origin="the IMS endpoint in the credentials",
        )
        if problem is not None:
            # The credentials' own endpoint: the same verdict as `check` (exit 2).
            raise CredentialsError(problem, source=credentials.source)
        self._report_certificate(credentials)
        return credentials

    def _report_certificate(self, credentials: Credentials) -> None:
        not_after = credentials.certificate_not_after
        if not_after is None:
            return
        self.metrics.certificate_expiry.set(not_after.timestamp())
        days_left = (not_after - self.clock.now()).total_seconds() / 86400
        # Credentials are re-read on every attempt; say it at start, then once a day
        # (or when the certificate changes), not on every retry of an outage.
        key = (not_after, int(days_left))
        if key == self._certificate_reported:
            return
        self._certificate_reported = key
        fields = {"certificate_expires_at": rfc3339(not_after), "days_left": round(days_left, 1)}
        if days_left < CERT_ERROR_DAYS:
            log.error(
                "the credentials' certificate expires in %.1f days: create a new one in the AEM "
                "Developer Console now",
                days_left,
                extra=fields,
            )
        elif days_left < CERT_WARN_DAYS:
            log.warning(
                "the credentials' certificate expires in %.1f days: plan its renewal",
                days_left,
                extra=fields,
            )

    def _adopt_at_start(self) -> bool:
        """Adopt the newest valid published token for these credentials; True if not yet due.

        Unusable credentials fail here, at start, with exit 2; a half-written read is
        left to the retrying exchange that follows (which tells broken from half-written:
        `once` then exits 2, `run` reports it and waits for a change).
        """
        try:
            credentials = self._load(settle=False)
        except CredentialsNotReady:
            return False
        now = self.clock.now()
        held: dict[str, AccessToken | None] = {}
        best: tuple[AccessToken, Sink] | None = None
        for sink in self.sinks:
            try:
                token = held[sink.name] = sink.read_current()
            except PublishError as exc:
                log.warning("cannot read the %s sink at start: %s", sink.name, exc)
                continue
            if token is None or not self._usable(token, credentials, now):
                continue
            if best is None or token.expires_at > best[0].expires_at:
                best = (token, sink)
        if best is None:
            return False
        token, source = best
        fresh = adoptable(token, self.policy, now)
        self._accept(token, adopted_from=source.name if fresh else None, publish=False)
        assert self._current is not None  # noqa: S101 - _accept just set it
        # Sinks that do not hold it yet (empty, older, unreadable) get it on the next turn.
        self._current.unpublished = [
            s for s in self.sinks if getattr(held.get(s.name), "value", None) != token.value
        ]
        if not fresh:
            # Still valid, so readers keep it; but due: refresh at once.
            self._current.due_at = now
            self._current.due_mono = self.clock.monotonic()
        log.info(
            "found a published token (%s) from the %s sink",
            "adopted" if fresh else "valid but due for refresh",
            source.name,
            extra={"expires_at": rfc3339(token.expires_at)},
        )
        return fresh

    def _usable(self, token: AccessToken, credentials: Credentials, now: datetime) -> bool:
        """A held token we may stand behind: ours, still valid, and plausible (sinks check
        plausibility too; a sink that forgot must not make a forged expiry current)."""
        return self._matches(token, credentials) and token.is_valid(now) and token.is_plausible(now)

    def _matches(self, token: AccessToken, credentials: Credentials) -> bool:
        return token.client_id == credentials.client_id and token.ims_endpoint == (
            self.client.base_url(credentials)
        )

    def _refresh(self) -> None:
        """One refresh cycle in `run`: obtain (with retries) and publish."""
        try:
            token = self._obtain(deadline=None, allow_adopt=True)
        except Stopped:
            return
        except (ExchangeError, CredentialsError) as exc:
            if self.stopping:
                return
            # Permanent: IMS rejected the credentials, or they are unusable. Retry
            # slowly; a credentials change ends the pause at once.
            log.error(
                "giving up for %gs: %s",
                self.settings.schedule.permanent_retry_s,
                exc,
                extra=exc.log_fields() if isinstance(exc, ExchangeError) else {},
            )
            self._pause(self.settings.schedule.permanent_retry_s)
            return
        self._accept(token)

    def _obtain(self, *, deadline: float | None, allow_adopt: bool) -> AccessToken:
        """Adopt a fresh token another replica published, or mint one; retry transient failures.

        With a `deadline` (monotonic, `once`), no wait runs past it: a wait longer than
        what is left (a long backoff, Retry-After up to an hour) sleeps until the
        deadline and then gives up with the last error, unless the credentials changed
        meanwhile (that retries at once). Shutdown ends any wait, and no attempt follows.
        """
        last: list[BaseException] = []

        def stop(_: RetryCallState) -> bool:
            return self.stopping or (deadline is not None and self.clock.monotonic() >= deadline)

        def remember(state: RetryCallState) -> None:
            if state.outcome is not None and state.outcome.failed:
                last[:] = [state.outcome.exception()]  # type: ignore[list-item]
            self._log_retry(state)

        def sleep(seconds: float) -> None:
            left = None if deadline is None else deadline - self.clock.monotonic()
            self._pause(seconds if left is None else min(seconds, left))
            if self.stopping:
                raise Stopped("stopped before a token was obtained")
            if left is not None and left <= seconds and not self._credentials_changed:
                raise _DeadlineReached

        retrying = Retrying(
            sleep=sleep,
            stop=stop,
            wait=RetryWait(
                self.settings.schedule.backoff_initial_s,
                self.settings.schedule.backoff_max_s,
                self.rng,
            ),
            retry=retry_if_exception(_is_transient),
            before_sleep=remember,
            reraise=True,
        )
        try:
            return retrying(self._attempt, allow_adopt)
        except _DeadlineReached:
            log.error("--retry-timeout reached: giving up")
            raise last[0] from None

    def _attempt(self, allow_adopt: bool) -> AccessToken:
        if self.stopping:
            raise Stopped("stopped before a token was obtained")
        # Whatever changed so far is read now; a token minted with older credentials
        # (ours or another replica's) is not adopted after a change.
        changed, self._credentials_changed = self._credentials_changed, False
        try:
            credentials = self._load()
        except CredentialsError as exc:
            if self.stopping:  # the settle moment was cut short: no verdict
                raise Stopped("stopped before a token was obtained") from None
            self._count_failure(exc, retryable=isinstance(exc, CredentialsNotReady))
            raise
        if allow_adopt and not changed:
            shared = self._fresh_shared_token(credentials)
            if shared is not None:
                return shared
        started = self.clock.monotonic()
        try:
            token = self.client.exchange(credentials, self.clock.now)
            self.health.heartbeat()  # an exchange may take its whole read timeout
        except ExchangeError as exc:
            if self.stopping:  # shutdown cancels an exchange in flight: not IMS's failure
                raise Stopped("stopped before a token was obtained") from None
            self._count_failure(exc, retryable=exc.retryable)
            raise
        finally:
            self.metrics.exchange_duration.labels(flow=credentials.flow).observe(
                self.clock.monotonic() - started
            )
        self.secrets.add(token.value)
        self.metrics.refresh.labels(result="success").inc()
        self.health.succeeded()
        self.metrics.consecutive_failures.set(0)
        log.info(
            "obtained a new access token",
            extra={
                "flow": token.flow,
                "client_id": token.client_id,
                "ims_endpoint": token.ims_endpoint,
                "expires_at": rfc3339(token.expires_at),
                "lifetime_s": round(token.lifetime.total_seconds(), 3),
            },
        )
        return token

    def _fresh_shared_token(self, credentials: Credentials) -> AccessToken | None:
        """Replicas share a Secret: a not-yet-due token there is adopted, not re-minted."""
        now = self.clock.now()
        current = self._current.token if self._current else None
        for sink in self.sinks:
            if not sink.shared:
                continue
            try:
                token = sink.read_current()
            except PublishError as exc:
                log.warning("cannot read the %s sink before minting: %s", sink.name, exc)
                continue
            if (
                token is not None
                and self._matches(token, credentials)
                and adoptable(token, self.policy, now)
                and (current is None or token.expires_at > current.expires_at)
            ):
                self.metrics.adopted.labels(source=sink.name).inc()
                self.metrics.refresh.labels(result="success").inc()
                self.health.succeeded()
                self.metrics.consecutive_failures.set(0)
                log.info(
                    "adopted the token another replica published",
                    extra={"sink": sink.name, "expires_at": rfc3339(token.expires_at)},
                )
                return token
        return None

    def _count_failure(self, exc: RefresherError, *, retryable: bool) -> None:
        result = "retryable_error" if retryable else "permanent_error"
        self.metrics.refresh.labels(result=result).inc()
        failures = self.health.failed(str(exc))
        self.metrics.consecutive_failures.set(failures)
        fields = exc.log_fields() if isinstance(exc, ExchangeError) else {}
        log.warning("refresh attempt failed: %s", exc, extra={"result": result, **fields})

    def _log_retry(self, state: RetryCallState) -> None:
        delay = state.upcoming_sleep
        log.info("retrying in %.2fs (attempt %d)", delay, state.attempt_number)

    def _accept(
        self, token: AccessToken, *, adopted_from: str | None = None, publish: bool = True
    ) -> None:
        """Make `token` current, schedule its refresh, and publish it to every sink."""
        if adopted_from is not None:
            self.metrics.adopted.labels(source=adopted_from).inc()
        due = refresh_at(token, self.policy, self.rng.random())
        self._current = _Published(
            token, due, self._mono_at(due), list(self.sinks) if publish else []
        )
        if publish:
            self._publish_pending(self._current)
        else:
            self._expose(token)  # adopted: it is already published
        log.info(
            "next refresh scheduled",
            extra={"refresh_at": rfc3339(due), "expires_at": rfc3339(token.expires_at)},
        )

    def _expose(self, token: AccessToken) -> None:
        self.health.published(token.expires_at)
        self.metrics.token_expiry.set(token.expires_at.timestamp())
        self.metrics.last_success.set(self.clock.now().timestamp())

    def _publish_pending(self, current: _Published) -> None:
        """Publish to every sink still owed the token; a failing sink never blocks another.

        Readiness and the expiry gauge follow what was actually published: a token that
        no sink accepted is not reported as published.
        """
        published_any = False
        with self.publish_lock:
            owed: list[Sink] = list(current.unpublished)
            written: list[Sink] = []
            failed: list[Sink] = []
            while owed:
                sink = owed.pop(0)
                try:
                    held = sink.publish(current.token)
                    self.health.heartbeat()  # a slow API server must not look like a stall
                except PublishError as exc:
                    self.metrics.sink_write.labels(sink=sink.name, result="error").inc()
                    log.error("publishing failed: %s", exc, extra={"sink": sink.name})
                    failed.append(sink)
                    continue
                self.metrics.sink_write.labels(sink=sink.name, result="success").inc()
                published_any = True
                if held.value != current.token.value:
                    # Another replica won the race with a newer token: adopt it, and give
                    # it to the sinks that already got ours in this round.
                    self.metrics.adopted.labels(source=sink.name).inc()
                    log.info(
                        "adopted the newer token another replica wrote", extra={"sink": sink.name}
                    )
                    current.token = held
                    current.due_at = refresh_at(held, self.policy, self.rng.random())
                    current.due_mono = self._mono_at(current.due_at)
                    owed = written + owed
                    written = []
                written.append(sink)
            current.unpublished = failed
            current.publish_attempts = current.publish_attempts + 1 if failed else 0
        if published_any:
            self._expose(current.token)
            if self.notifier is not None:
                token_dir = self.settings.output.token_dir
                self.notifier.notify(str(token_dir or ""), rfc3339(current.token.expires_at))

    def _retry_unpublished(self, current: _Published) -> None:
        """A sink failed: retry it with backoff (the token is not re-minted for that)."""
        delay = backoff_s(
            max(1, current.publish_attempts),
            self.settings.schedule.backoff_initial_s,
            self.settings.schedule.backoff_max_s,
            self.rng.random(),
        )
        wake_at = min(current.due_at, self.clock.now() + timedelta(seconds=delay))
        self._pause(min(delay_until(wake_at, self.clock.now()), self._until_due(current)))
        if not self.stopping and not self._credentials_changed and current.unpublished:
            self._publish_pending(current)

    def _settle_publication(self) -> int:
        current = self._current
        if current is None:
            return EXIT_RUNTIME
        if current.unpublished:
            self._publish_pending(current)
        if current.unpublished:
            names = ", ".join(s.name for s in current.unpublished)
            log.error("one-shot publish failed for the %s sink", names)
            return EXIT_RUNTIME
        if self.notifier is not None:
            self.notifier.join(self.settings.output.on_refresh_timeout_s + 1)
        return EXIT_OK

    # ---- waiting ------------------------------------------------------------------------

    def _mono_at(self, instant: datetime) -> float:
        """The monotonic reading at which the wall clock, as it reads now, shows `instant`."""
        return self.clock.monotonic() + (instant - self.clock.now()).total_seconds()

    def _due(self, current: _Published) -> bool:
        return self.clock.now() >= current.due_at or self.clock.monotonic() >= current.due_mono

    def _until_due(self, current: _Published) -> float:
        """Seconds until the refresh is due by either clock (see `_Published`)."""
        by_wall = delay_until(current.due_at, self.clock.now())
        return max(0.0, min(by_wall, current.due_mono - self.clock.monotonic()))

    def _stat_credentials(self) -> tuple[object, ...] | None:
        try:
            return change_signature(self.settings.credentials)
        except (OSError, CredentialsError):
            return None

    def _pause(self, seconds: float, *, until: datetime | None = None) -> None:
        """Sleep up to `seconds`, waking early for shutdown or a credentials change.

        The sleep follows the monotonic clock; `until` (a wall-clock instant) also ends
        it, checked at every slice, so a wall-clock step forward past it is noticed
        within `--watch-interval`. The credentials are stat()ed every `--watch-interval`
        (a cheap syscall, no read): kubelet swaps a mounted Secret's `..data` symlink,
        which changes the signature.
        """
        deadline = self.clock.monotonic() + max(0.0, seconds)
        interval = self.settings.schedule.watch_interval_s
        while not self.stopping:
            self.health.heartbeat()
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0 or (until is not None and self.clock.now() >= until):
                return
            if self.sleeper.sleep(min(remaining, interval)):
                return
            signature = self._stat_credentials()
            if signature != self._signature:
                self._signature = signature
                self._credentials_changed = True
                self.metrics.credentials_reload.inc()
                log.info(
                    "credentials changed: refreshing now",
                    extra={"path": str(self.settings.credentials)},
                )
                return
