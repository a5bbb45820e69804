"""The wiring: build every stage from `Settings`, run `run` or `once`, shut down.

`cli.py` parses flags and environment and installs the signal handlers; this module
builds and runs. It reads no environment of its own: what it needs of it (the
cluster's address, `KUBECONFIG`, the base environment of `--on-refresh`) is passed in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refresher import __version__
from refresher.clock import Clock, EventSleeper, SystemClock
from refresher.config import Settings
from refresher.errors import EXIT_OK, EXIT_RUNTIME, ConfigError, RefresherError
from refresher.health import HealthState
from refresher.ims import ImsClient
from refresher.logs import SecretRegistry, setup_logging
from refresher.observer import Observer
from refresher.service import Service, Stages
from refresher.sinks import Sink
from refresher.sinks.file import FileSink

if TYPE_CHECKING:
    # Imported on use: a process that serves no metrics (`once`, `run` without --listen)
    # never loads prometheus_client (~30 ms and ~1.5 MiB) nor the probe server.
    from refresher.metrics import Metrics
    from refresher.server import ProbeServer

log = logging.getLogger("refresher")

# After a signal: how long the main thread waits for the worker, then for a publish in
# progress; together well inside 2 s and Kubernetes' default 30 s grace period.
_JOIN_GRACE_S = 1.0
_PUBLISH_GRACE_S = 0.8


def _metrics() -> Metrics:
    from prometheus_client import CollectorRegistry, disable_created_metrics  # noqa: PLC0415

    from refresher.metrics import Metrics  # noqa: PLC0415 - see the imports

    # No `*_created` series: half the scrape size, and no use here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return Metrics(CollectorRegistry(auto_describe=True))


def _sinks(settings: Settings, clock: Clock, environ: Mapping[str, str]) -> list[Sink]:
    sinks: list[Sink] = []
    out = settings.output
    if out.secret_name:
        from refresher.sinks.secret import SecretSink  # noqa: PLC0415 - imports kubernetes

        sinks.append(
            SecretSink(
                out.secret_name,
                out.secret_namespace,
                clock=clock,
                in_cluster="KUBERNETES_SERVICE_HOST" in environ,
                kubeconfig=environ.get("KUBECONFIG") or None,
            )
        )
    if out.token_dir is not None:
        sinks.append(FileSink(out.token_dir, clock=clock, file_mode=out.file_mode))
    return sinks


@dataclass
class App:
    """`run` or `once`, built; `stop()` is what a signal does."""

    command: str
    settings: Settings
    service: Service
    health: HealthState
    metrics: Metrics | None
    wake_main: threading.Event

    @classmethod
    def build(cls, command: str, settings: Settings, environ: Mapping[str, str]) -> App:
        secrets = SecretRegistry()
        setup_logging(settings.log_format, settings.log_level, secrets)
        clock = SystemClock()
        out = settings.output
        serves = command == "run" and settings.listen is not None
        metrics = _metrics() if serves or out.on_refresh else None
        ims = settings.ims
        stall_after_s = max(60.0, 3 * (ims.connect_timeout_s + ims.read_timeout_s))
        health = HealthState(
            clock, stall_after_s=stall_after_s + 3 * settings.schedule.watch_interval_s
        )
        sinks = _sinks(settings, clock, environ)
        notifier = None
        if out.on_refresh:
            from refresher.notify import Notifier  # noqa: PLC0415 - only with --on-refresh

            assert metrics is not None  # noqa: S101 - built above for --on-refresh
            notifier = Notifier(
                out.on_refresh,
                timeout_s=out.on_refresh_timeout_s,
                base_env=environ,
                metrics=metrics,
            )
        client = ImsClient(ims)
        if metrics is not None:
            metrics.follow_clock_skew(lambda: client.clock_skew_s)
        stages = Stages(clock, EventSleeper(), client, sinks, secrets, notifier)
        service = Service(settings, stages, Observer(clock, metrics, health))
        log.info(
            "starting",
            extra={
                "event": "starting",
                "command": command,
                "version": __version__,
                "sinks": [s.name for s in sinks],
                "credentials": str(settings.credentials),
            },
        )
        return cls(command, settings, service, health, metrics, threading.Event())

    def stop(self, reason: str) -> None:
        """Stop at once (a signal handler calls this): sleeps end, an exchange in flight
        is cancelled, a publish in progress completes."""
        log.info("received %s: stopping", reason, extra={"event": "stopping", "reason": reason})
        self.service.stop()
        self.wake_main.set()

    def run(self) -> int:
        if self.command == "once":
            return run_loop(self.service, None, self.wake_main, once=True)
        return run_loop(self.service, self._start_server(), self.wake_main)

    def _start_server(self) -> ProbeServer | None:
        listen = self.settings.listen
        if listen is None or self.metrics is None:
            return None
        from refresher.server import ProbeServer  # noqa: PLC0415 - see the imports

        try:
            server = ProbeServer(*listen, self.health, self.metrics)
        except OSError as exc:
            raise ConfigError(f"--listen {listen[0]}:{listen[1]}: {exc.strerror}") from None
        server.start()
        log.info(
            "serving probes and metrics",
            extra={"event": "serving", "listen": f"{listen[0]}:{server.port}"},
        )
        return server


def run_loop(
    service: Service,
    server: ProbeServer | None,
    wake_main: threading.Event,
    *,
    once: bool = False,
) -> int:
    """Run `run` (or `once`) in a worker thread; the main thread waits for it or a signal.

    On a signal the loop's sleep ends at once; an exchange in flight is cancelled, so
    the main thread waits at most ~1 s for the worker, then for a publish in progress
    (after which no publish starts) and exits, leaving the token in place. `once` runs
    the same way, so an exchange stuck on a trickling IMS cannot delay SIGTERM either;
    it exits 0 only if its token is published. Its --retry-timeout is enforced here
    too, as a backstop: past it (plus the settle moment and the grace), with no token
    published, it stops, exit 1.
    """
    outcome: list[int | BaseException] = []

    def target() -> None:
        try:
            outcome.append(service.once() if once else service.run())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome.append(exc)
        finally:
            wake_main.set()

    worker = threading.Thread(target=target, name="refresh-loop", daemon=True)
    worker.start()
    _await_worker(service, worker, wake_main, once=once)
    if not service.shutdown(_PUBLISH_GRACE_S if service.stopping else 0.0):
        log.warning(
            "a publish is still in progress; exiting (each sink swaps atomically)",
            extra={"event": "publish_abandoned"},
        )
    if server is not None:
        server.close()
    return _result(outcome, service, once=once)


def _await_worker(
    service: Service, worker: threading.Thread, wake_main: threading.Event, *, once: bool
) -> None:
    """Wait until the worker ends, or a signal (or `once`'s backstop) stops the service;
    then give the worker ~1 s."""
    # No polling: the main thread sleeps until the loop ends or a signal handler (which
    # runs in this thread, interrupting the wait) sets the event. Idle costs nothing.
    backstop = service.settings.schedule.retry_timeout_s + 2 * _JOIN_GRACE_S if once else None
    if not wake_main.wait(backstop) and not service.published:
        log.error(
            "--retry-timeout passed without a published token: stopping",
            extra={"event": "retry_timeout"},
        )
        service.stop()
    wake_main.wait()
    if service.stopping:
        worker.join(_JOIN_GRACE_S)


def _result(outcome: list[int | BaseException], service: Service, *, once: bool) -> int:
    if not outcome and once:
        return EXIT_OK if service.published else EXIT_RUNTIME
    result = outcome[0] if outcome else EXIT_OK
    if once and isinstance(result, RefresherError):
        raise result  # reported by the CLI as one line, like every other error
    if isinstance(result, RefresherError):
        log.error("%s", result, extra={"event": "refresh_loop_failed"})
        return result.exit_code
    if isinstance(result, BaseException):
        log.critical(
            "refresh loop crashed: %s",
            type(result).__name__,
            exc_info=result,
            extra={"event": "refresh_loop_crashed"},
        )
        return EXIT_RUNTIME
    return result
