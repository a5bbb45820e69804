"""The loop that chains the stages: credentials → exchange → token → schedule → sinks.

`Service.run()` keeps a valid token published forever; `Service.once()` publishes
one and returns an exit code. Both are driven by an injected clock, sleeper and
random source, so tests run hours of schedule in milliseconds. The loop decides;
what it did goes to the `Observer` (metrics, health, logs) as events.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

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
    Transient,
)
from refresher.logs import SecretRegistry
from refresher.observer import Observer
from refresher.schedule import (
    Issuer,
    RefreshPolicy,
    RetryWait,
    adoptable,
    backoff_s,
    delay_until,
    outlives,
    refresh_at,
    usable,
)
from refresher.sinks import Sink
from refresher.token import AccessToken, rfc3339

if TYPE_CHECKING:  # imported by the app only when --on-refresh is set
    from refresher.notify import Notifier


class Exchanger(Protocol):
    """The exchange stage as the loop sees it (`ImsClient`, or a test's scripted IMS)."""

    def exchange(self, credentials: Credentials, now: Callable[[], datetime]) -> AccessToken:
        """One attempt. Raises `ExchangeError` (`Transient`, `Rejected`, `LocalSetup`)."""
        ...

    def cancel(self) -> None:
        """End an exchange in flight at once and make no further one (any thread)."""
        ...

    def close(self) -> None: ...


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Transient | CredentialsNotReady)


class Stopped(RefresherError):
    """Shutdown was asked for before a token was obtained: no further IMS call is made."""

    exit_code = EXIT_RUNTIME


class _DeadlineReached(Exception):
    """`once`'s --retry-timeout ends the wait before the next attempt would start."""


@dataclass(frozen=True)
class Stages:
    """What the loop chains, built by the app (or a test) from `Settings`."""

    clock: Clock
    sleeper: Sleeper
    exchanger: Exchanger
    sinks: Sequence[Sink]
    secrets: SecretRegistry
    notifier: Notifier | None = None
    rng: random.Random = field(default_factory=random.Random)


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
    def __init__(self, settings: Settings, stages: Stages, observer: Observer) -> None:
        self.settings = settings
        self.clock = stages.clock
        self.sleeper = stages.sleeper
        self.exchanger = stages.exchanger
        # Shared sinks (the Secret) first: if another replica won a race there, the
        # token it holds is the one the local file must get.
        self.sinks = sorted(stages.sinks, key=lambda s: not s.shared)
        self.secrets = stages.secrets
        self.notifier = stages.notifier
        self.rng = stages.rng
        self.observer = observer
        self.policy = RefreshPolicy(settings.schedule.refresh_ratio, settings.schedule.jitter)
        self._publish_lock = threading.Lock()
        self._stopping = threading.Event()
        self._signature: tuple[object, ...] = ()
        self._credentials_changed = False
        # The last good read of the credentials, under the change signature taken before it.
        self._loaded: tuple[tuple[object, ...], Credentials, Issuer] | None = None
        self._current: _Published | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop: any sleep ends at once, an exchange in flight is cancelled;
        a publish in progress completes."""
        self._stopping.set()
        self.sleeper.wake()
        self.exchanger.cancel()

    def shutdown(self, publish_grace_s: float) -> bool:
        """After `stop()` and the loop's end (or its grace): wait up to `publish_grace_s`
        for a publish in progress, then let none start; kill a running --on-refresh hook
        and close the exchanger. False if a publish was still in progress."""
        finished = self._publish_lock.acquire(timeout=publish_grace_s)
        if self.notifier is not None:
            self.notifier.close()  # a hung --on-refresh hook must not outlive us
        self.exchanger.close()
        return finished

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
        token = self._obtain(deadline=deadline)
        self._accept(token)
        return self._settle_publication()

    def run(self) -> int:
        """Keep a valid token published until `stop()`. Returns 0 on a clean stop."""
        self._prepare()
        self._adopt_at_start()
        while not self.stopping:
            self.observer.heartbeat()
            current = self._current
            if current is None or self._credentials_changed or self._due(current):
                self._refresh()
                continue
            if current.unpublished:
                self._retry_unpublished(current)
                continue
            self._pause(self._until_due(current), until=current.due_at)
        self.observer.stopped()
        return EXIT_OK

    # ---- stages ----------------------------------------------------------------------

    def _prepare(self) -> None:
        # The starting state of the credentials, before the first read: the first
        # watch check must not take the files as they were at start for a change.
        self._signature = change_signature(self.settings.credentials)
        for sink in self.sinks:
            sink.prepare()

    def _load(self, *, settle: bool = True) -> tuple[Credentials, Issuer]:
        """Read the credentials, and whose tokens they mint. With `settle`, a not-ready
        read that reads the same a moment later is a permanent CredentialsError (broken,
        not half-written)."""
        path = self.settings.credentials
        # Every attempt notices a change: the signature (stat, links, listing; no read)
        # is taken before reading, so a change during the read is read again next time.
        # Unchanged, the files are not read and parsed again (with the key's certificate
        # check, that was most of a cycle's own work).
        signature = change_signature(path)
        loaded = self._loaded
        if loaded is None or loaded[0] != signature:
            credentials, issuer = self._read(settle=settle)
            self._loaded = loaded = (signature, credentials, issuer)
        _, credentials, issuer = loaded
        if credentials.certificate_not_after is not None:
            self.observer.certificate(credentials.certificate_not_after)
        return credentials, issuer

    def _read(self, *, settle: bool) -> tuple[Credentials, Issuer]:
        path, flow = self.settings.credentials, self.settings.flow
        if settle:
            credentials = load_settled(path, flow=flow, wait=self.sleeper.sleep)
        else:
            credentials = load_credentials(path, flow=flow)
        self.secrets.add(*credentials.client_secrets)
        base_url = self.settings.ims.base_url(credentials.ims_endpoint)
        problem = plain_http_problem(
            base_url,
            allow_insecure_http=self.settings.ims.allow_insecure_http,
            origin="the IMS endpoint in the credentials",
        )
        if problem is not None:
            # The credentials' own endpoint: the same verdict as `check` (exit 2).
            raise CredentialsError(problem, source=credentials.source)
        return credentials, Issuer(credentials.client_id, base_url)

    def _held_tokens(self, *, shared_only: bool, when: str) -> list[tuple[Sink, AccessToken]]:
        """What the sinks hold now; an unreadable sink is reported and skipped."""
        held: list[tuple[Sink, AccessToken]] = []
        for sink in self.sinks:
            if shared_only and not sink.shared:
                continue
            try:
                token = sink.read_current()
            except PublishError as exc:
                self.observer.sink_unreadable(sink.name, exc, when=when)
                continue
            if token is not None:
                held.append((sink, token))
        return held

    def _adopt_at_start(self) -> bool:
        """Adopt the newest valid published token for these credentials; True if not yet due.

        Unusable credentials fail here, at start, with exit 2; a half-written read is
        left to the retrying exchange that follows (which tells broken from half-written:
        `once` then exits 2, `run` reports it and waits for a change).
        """
        try:
            _, issuer = self._load(settle=False)
        except CredentialsNotReady:
            return False
        now = self.clock.now()
        held = self._held_tokens(shared_only=False, when="at start")
        candidates = [(s, t) for s, t in held if usable(t, issuer, now)]
        if not candidates:
            return False
        source, token = max(candidates, key=lambda pair: pair[1].expires_at)
        fresh = adoptable(token, issuer, self.policy, now)
        scheduled = refresh_at(token, self.policy, self.rng.random())
        due = scheduled if fresh else now  # still valid, so readers keep it; but due
        holders = {s.name for s, t in held if t.value == token.value}
        # Sinks that do not hold it yet (empty, older, unreadable) get it on the next turn.
        owed = [s for s in self.sinks if s.name not in holders]
        self._current = _Published(token, due, self._mono_at(due), owed)
        self.observer.serving(token)
        if fresh:
            self.observer.adopted(token, source.name, why="start")
            self.observer.scheduled(due, token)
        else:
            self.observer.found_due(token, source.name)
        return fresh

    def _refresh(self) -> None:
        """One refresh cycle in `run`: obtain (with retries) and publish."""
        try:
            token = self._obtain(deadline=None)
        except Stopped:
            return
        except (ExchangeError, CredentialsError) as exc:
            if self.stopping:
                return
            # Permanent: IMS rejected the credentials, or they are unusable. Retry
            # slowly; a credentials change ends the pause at once.
            self.observer.gave_up(exc, self.settings.schedule.permanent_retry_s)
            self._pause(self.settings.schedule.permanent_retry_s)
            return
        self._accept(token)

    def _obtain(self, *, deadline: float | None) -> AccessToken:
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
            self.observer.retrying(state.upcoming_sleep, state.attempt_number)

        def sleep(seconds: float) -> None:
            left = None if deadline is None else deadline - self.clock.monotonic()
            self._pause(seconds if left is None else min(seconds, left))
            if self.stopping:
                raise Stopped("stopped before a token was obtained")
            if left is not None and left <= seconds and not self._credentials_changed:
                raise _DeadlineReached

        schedule = self.settings.schedule
        retrying = Retrying(
            sleep=sleep,
            stop=stop,
            wait=RetryWait(schedule.backoff_initial_s, schedule.backoff_max_s, self.rng),
            retry=retry_if_exception(_is_transient),
            before_sleep=remember,
            reraise=True,
        )
        try:
            return retrying(self._attempt)
        except _DeadlineReached:
            self.observer.deadline_reached()
            raise last[0] from None

    def _attempt(self) -> AccessToken:
        if self.stopping:
            raise Stopped("stopped before a token was obtained")
        # Whatever changed so far is read now; a token minted with older credentials
        # (ours or another replica's) is not adopted after a change.
        changed, self._credentials_changed = self._credentials_changed, False
        try:
            credentials, issuer = self._load()
        except CredentialsError as exc:
            if self.stopping:  # the settle moment was cut short: no verdict
                raise Stopped("stopped before a token was obtained") from None
            self.observer.attempt_failed(exc, transient=isinstance(exc, CredentialsNotReady))
            raise
        if not changed:
            shared = self._fresh_shared_token(issuer)
            if shared is not None:
                return shared
        return self._mint(credentials)

    def _mint(self, credentials: Credentials) -> AccessToken:
        started = self.clock.monotonic()
        try:
            token = self.exchanger.exchange(credentials, self.clock.now)
            self.observer.heartbeat()  # an exchange may take its whole read timeout
        except ExchangeError as exc:
            if self.stopping:  # shutdown cancels an exchange in flight: not IMS's failure
                raise Stopped("stopped before a token was obtained") from None
            self.observer.attempt_failed(exc, transient=isinstance(exc, Transient))
            raise
        finally:
            self.observer.exchange_took(credentials.flow, self.clock.monotonic() - started)
        self.secrets.add(token.value)
        self.observer.minted(token)
        return token

    def _fresh_shared_token(self, issuer: Issuer) -> AccessToken | None:
        """Replicas share a Secret: a not-yet-due token there is adopted, not re-minted."""
        now = self.clock.now()
        current = self._current.token if self._current else None
        for sink, token in self._held_tokens(shared_only=True, when="before minting"):
            newer = current is None or token.expires_at > current.expires_at
            if newer and adoptable(token, issuer, self.policy, now):
                self.observer.adopted(token, sink.name, why="shared")
                return token
        return None

    def _accept(self, token: AccessToken) -> None:
        """Make `token` current, schedule its refresh, and publish it to every sink."""
        due = refresh_at(token, self.policy, self.rng.random())
        self._current = _Published(token, due, self._mono_at(due), list(self.sinks))
        self._publish_pending(self._current)
        self.observer.scheduled(self._current.due_at, self._current.token)

    def _publish_pending(self, current: _Published) -> None:
        """Publish to every sink still owed the token; a failing sink never blocks another.

        Readiness and the expiry gauge follow what was actually published: a token that
        no sink accepted is not reported as published.
        """
        published_any = False
        with self._publish_lock:
            owed: list[Sink] = list(current.unpublished)
            written: list[Sink] = []
            failed: list[Sink] = []
            while owed:
                sink = owed.pop(0)
                try:
                    held = self._publish_one(sink, current.token)
                except PublishError as exc:
                    self.observer.publish_failed(sink.name, exc)
                    failed.append(sink)
                    continue
                published_any = True
                if held.value != current.token.value:
                    # Another replica won the race with a newer token: adopt it, and give
                    # it to the sinks that already got ours in this round.
                    self.observer.adopted(held, sink.name, why="race")
                    current.token = held
                    current.due_at = refresh_at(held, self.policy, self.rng.random())
                    current.due_mono = self._mono_at(current.due_at)
                    owed = written + owed
                    written = []
                written.append(sink)
            current.unpublished = failed
            current.publish_attempts = current.publish_attempts + 1 if failed else 0
        if published_any:
            self.observer.serving(current.token)
            if self.notifier is not None:
                token_dir = self.settings.output.token_dir
                self.notifier.notify(str(token_dir or ""), rfc3339(current.token.expires_at))

    def _publish_one(self, sink: Sink, token: AccessToken) -> AccessToken:
        """Publish to one sink; the token it holds afterwards (ours, or a race winner's
        that passes the adoption rule). Raises PublishError."""
        held = sink.publish(token)
        if held.value != token.value and not outlives(held, token, self.clock.now()):
            # The sink kept a token the one rule would not adopt: ours is not there.
            raise PublishError("kept a token that does not outlive ours", sink=sink.name)
        self.observer.published(sink.name, held)
        return held

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
            self.observer.once_unpublished([s.name for s in current.unpublished])
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
            self.observer.heartbeat()
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0 or (until is not None and self.clock.now() >= until):
                return
            if self.sleeper.sleep(min(remaining, interval)):
                return
            signature = change_signature(self.settings.credentials)
            if signature != self._signature:
                self._signature = signature
                self._credentials_changed = True
                self.observer.credentials_changed(str(self.settings.credentials))
                return
