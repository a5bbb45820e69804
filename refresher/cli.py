"""The composition root: flags and environment in, everything built and wired, exit code out.

Only this module reads the environment, installs signal handlers and exits.
Every flag also reads `REFRESHER_<FLAG>`; the command line wins. A `REFRESHER_*`
variable that names no flag of any subcommand is an error (a typo is never ignored).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

from refresher import __version__
from refresher.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ConfigError, RefresherError

ENV_PREFIX = "REFRESHER_"
# Set by us for --on-refresh commands; a hook that itself runs `refresher` must not trip.
_ENV_WE_SET = {"REFRESHER_EXPIRES_AT"}

log = logging.getLogger("refresher")


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    metavar: str | None = None
    boolean: bool = False


_CREDENTIALS = [
    Flag("credentials", "credentials file, or a mounted Secret directory (required)", "PATH"),
    Flag(
        "flow", "auto (JWT when a private key is present, else OAuth), jwt or oauth [auto]", "FLOW"
    ),
    Flag(
        "ims-endpoint",
        "IMS host or URL [from the credentials, else ims-na1.adobelogin.com]",
        "HOST|URL",
    ),
    Flag(
        "ims-audience",
        "IMS base URL for the JWT's aud and metascope claims, when IMS is reached through "
        "a gateway under another host name [the endpoint's]",
        "URL",
    ),
]
_EXCHANGE = [
    Flag(
        "allow-insecure-http", "permit a plain http:// IMS endpoint (emulator, tests)", boolean=True
    ),
    Flag("ca-bundle", "extra CA certificates (PEM) to trust for IMS", "PATH"),
    Flag("jwt-ttl", "lifetime of the signed JWT assertion, seconds [300]", "S"),
    Flag("connect-timeout", "IMS connect timeout, seconds [5]", "S"),
    Flag(
        "read-timeout",
        "IMS read timeout, seconds [15]; connect plus read timeout bound the whole exchange",
        "S",
    ),
    Flag(
        "min-token-lifetime",
        "a token granted for less than this is a bad answer, retried, never published, seconds [1]",
        "S",
    ),
    Flag("backoff-initial", "first retry delay after a transient failure, seconds [1]", "S"),
    Flag("backoff-max", "cap of the exponential backoff, seconds [60]", "S"),
    Flag(
        "permanent-retry-interval",
        "pause after IMS rejected the credentials, seconds [300]; a credentials change ends it",
        "S",
    ),
]
_OUTPUT = [
    Flag("token-dir", "publish access_token, expires_at, token.json here (..data swap)", "DIR"),
    Flag("file-mode", "mode of the published files, octal [0440]", "MODE"),
    Flag("secret", "publish to this Kubernetes Secret", "NAME"),
    Flag("secret-namespace", "namespace of --secret [the pod's]", "NS"),
    Flag("on-refresh", "run CMD (no shell) after each publish", "CMD"),
    Flag("on-refresh-timeout", "kill --on-refresh after this many seconds [30]", "S"),
]
_SCHEDULE = [
    Flag("refresh-ratio", "refresh when this fraction of the lifetime has passed [0.8]", "R"),
    Flag("jitter", "... earlier by a random fraction of the lifetime up to this [0.1]", "J"),
    Flag("watch-interval", "stat the credentials for changes this often, seconds [5]", "S"),
]
_ONCE = [Flag("retry-timeout", "give up retrying after this many seconds [120]", "S")]
_CHECK = [
    Flag(
        "online",
        "then exchange once and report what IMS granted or why it refused (never the token)",
        boolean=True,
    )
]
_SERVER = [
    Flag(
        "listen", "HOST:PORT of /healthz, /readyz, /metrics; empty disables [0.0.0.0:9876]", "ADDR"
    )
]
_LOGGING = [
    Flag("log-format", "json or text [json]", "FORMAT"),
    Flag("log-level", "debug, info, warning or error [info]", "LEVEL"),
]

COMMANDS: dict[str, tuple[str, list[Flag]]] = {
    "run": (
        "keep a fresh token published, forever (the container's default command)",
        _CREDENTIALS + _EXCHANGE + _OUTPUT + _SCHEDULE + _SERVER + _LOGGING,
    ),
    "once": (
        "obtain and publish one token, then exit (init containers, CronJobs, scripts)",
        _CREDENTIALS + _EXCHANGE + _OUTPUT + _SCHEDULE + _ONCE + _LOGGING,
    ),
    "check": (
        "validate configuration and credentials offline and print a summary (no secrets)",
        _CREDENTIALS + _EXCHANGE + _CHECK + _LOGGING,
    ),
    "token": (
        "exchange once and print only the access token on stdout (logs on stderr)",
        _CREDENTIALS + _EXCHANGE + _LOGGING,
    ),
}

EXIT_CODES = """exit codes:
  0  success
  1  failed at run time (IMS unreachable after retries, a sink failed)
  2  bad usage, configuration or credentials
  3  IMS rejected the credentials

Every flag also reads REFRESHER_<FLAG> (e.g. REFRESHER_TOKEN_DIR); the command line wins."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 2, like every other configuration problem.
        self.exit(EXIT_USAGE, f"refresher: error: {message} (see --help)\n")


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI. `emulator` is only listed here: run_cli hands its arguments to the
    `ims_emulator` package, which has its own flags and reads IMS_EMULATOR_*."""
    parser = _Parser(
        prog="refresher",
        description="Keeps an Adobe IMS access token fresh for the application next to it.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (summary, flags) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for flag in flags:
            help_text = f"{flag.help} (env {_env_name(flag.name)})"
            if flag.boolean:
                sub.add_argument(
                    f"--{flag.name}", action="store_true", default=None, help=help_text
                )
            else:
                sub.add_argument(f"--{flag.name}", metavar=flag.metavar, help=help_text)
    from refresher import inject_cli  # noqa: PLC0415 - argparse only; YAML and TLS load on use

    inject_cli.add_commands(commands)
    commands.add_parser(
        "emulator",
        add_help=False,
        help="a local Adobe IMS emulator for demos and tests (see `refresher emulator --help`)",
    )
    return parser


def _known_env(parser: argparse.ArgumentParser) -> set[str]:
    names = set(_ENV_WE_SET)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= {
                    _env_name(o.lstrip("-"))
                    for a in sub._actions
                    for o in a.option_strings
                    if o.startswith("--")
                }
    return names


def _apply_env(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: dict[str, str]
) -> None:
    """Flags missing from argv take their `REFRESHER_*` value (argparse defaults)."""
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in _known_env(parser))
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {', '.join(unknown)}: no such flag")
    command = next((a for a in argv if not a.startswith("-")), None)
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        sub = action.choices.get(command or "")
        if sub is None:
            return
        for sub_action in sub._actions:
            long_names = [o for o in sub_action.option_strings if o.startswith("--")]
            if not long_names or sub_action.dest == "help":
                continue
            value = environ.get(_env_name(long_names[0].lstrip("-")))
            if value is None:
                continue
            if isinstance(sub_action, argparse._StoreTrueAction):
                sub_action.default = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                sub_action.default = sub_action.type(value) if callable(sub_action.type) else value


def _raw(args: argparse.Namespace, flags: list[Flag]) -> dict[str, str | None]:
    raw: dict[str, str | None] = {}
    for flag in flags:
        value = getattr(args, flag.name.replace("-", "_"), None)
        if flag.boolean:
            raw[flag.name.replace("-", "_")] = "true" if value else None
        else:
            raw[flag.name.replace("-", "_")] = value
    return raw


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(list(sys.argv[1:] if argv is None else argv), dict(os.environ)))


def run_cli(argv: list[str], environ: dict[str, str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "emulator":
        # A program of its own (it shares no code with the client): imported only here.
        from ims_emulator.cli import main as emulator_main  # noqa: PLC0415

        rest = argv[argv.index("emulator") + 1 :]
        return emulator_main(rest, environ, prog="refresher emulator")
    parser = build_parser()
    try:
        _apply_env(parser, argv, environ)
    except ConfigError as exc:
        print(f"refresher: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args, environ)
    except RefresherError as exc:
        hint = getattr(exc, "hint", None)  # IMS's rejections say what to fix
        print(f"refresher: error: {exc}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback, no secret
        # Only the type: an unexpected exception's message could quote a secret.
        print(
            f"refresher: internal error ({type(exc).__name__}); please report it", file=sys.stderr
        )
        return EXIT_RUNTIME


def _dispatch(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from refresher.config import build_settings  # noqa: PLC0415 - keep --help fast

    command: str = args.command
    if command in ("inject", "injector"):
        from refresher import inject_cli  # noqa: PLC0415

        return inject_cli.run(args)
    settings = build_settings(
        _raw(args, COMMANDS[command][1]), needs_output=command not in ("check", "token")
    )
    if command in ("check", "token"):
        return _check(
            settings, online=bool(getattr(args, "online", False)), token=command == "token"
        )
    return _serve(command, settings, environ)


def _check(settings: object, *, online: bool = False, token: bool = False) -> int:
    """`check` (offline, then `--online` one exchange); `token`: the same checks, then the
    token alone on stdout."""
    from refresher.clock import EventSleeper, SystemClock  # noqa: PLC0415
    from refresher.config import Settings, ims_base_url, plain_http_problem  # noqa: PLC0415
    from refresher.credentials import load_settled  # noqa: PLC0415
    from refresher.errors import CredentialsError  # noqa: PLC0415

    assert isinstance(settings, Settings)  # noqa: S101
    # Settled: content that stays half-written-looking is broken (exit 2 within ~1 s).
    credentials = load_settled(settings.credentials, flow=settings.flow, wait=EventSleeper().sleep)
    summary = credentials.summary()
    base = ims_base_url(settings.ims.endpoint or credentials.ims_endpoint)
    problem = plain_http_problem(
        base,
        allow_insecure_http=settings.ims.allow_insecure_http,
        origin="the IMS endpoint in the credentials",
    )
    if problem is not None:  # the same words and exit code as `once` and `run`
        raise CredentialsError(problem, source=credentials.source)
    if token:
        from refresher import online as exchange  # noqa: PLC0415

        return exchange.print_token(
            settings, credentials, exchange.start_logging(settings, credentials)
        )
    lines: list[tuple[str, object]] = [("flow", credentials.flow), ("ims", base)]
    lines += [
        (k, v)
        for k, v in summary.items()
        if k not in ("flow", "ims_endpoint") and v not in (None, "", (), [])
    ]
    not_after = credentials.certificate_not_after
    if not_after is not None:
        days = (not_after - SystemClock().now()).total_seconds() / 86400
        lines.append(("certificate_days_left", f"{days:.1f}"))
    for key, value in lines:
        text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
        print(f"{key}: {text}")
    if not_after is not None and (not_after - SystemClock().now()).total_seconds() <= 0:
        print("refresher: error: the credentials' certificate has expired", file=sys.stderr)
        return EXIT_USAGE
    if online:
        from refresher import online as exchange  # noqa: PLC0415

        secrets = exchange.start_logging(settings, credentials)
        return exchange.check_online(
            settings, credentials, secrets, lambda k, v: print(f"{k}: {v}")
        )
    return EXIT_OK


def _serve(command: str, settings: object, environ: dict[str, str]) -> int:
    from prometheus_client import CollectorRegistry, disable_created_metrics  # noqa: PLC0415

    from refresher.clock import EventSleeper, SystemClock  # noqa: PLC0415
    from refresher.config import Settings  # noqa: PLC0415
    from refresher.health import HealthState  # noqa: PLC0415
    from refresher.ims import ImsClient  # noqa: PLC0415
    from refresher.logs import SecretRegistry, setup_logging  # noqa: PLC0415
    from refresher.metrics import Metrics  # noqa: PLC0415
    from refresher.notify import Notifier  # noqa: PLC0415
    from refresher.server import ProbeServer  # noqa: PLC0415
    from refresher.service import Service  # noqa: PLC0415
    from refresher.sinks import Sink  # noqa: PLC0415
    from refresher.sinks.file import FileSink  # noqa: PLC0415

    assert isinstance(settings, Settings)  # noqa: S101
    secrets = SecretRegistry()
    setup_logging(settings.log_format, settings.log_level, secrets)
    clock, sleeper = SystemClock(), EventSleeper()
    # No `*_created` series: half the scrape size, and no use here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    ims = settings.ims
    stall_after_s = max(60.0, 3 * (ims.connect_timeout_s + ims.read_timeout_s))
    health = HealthState(
        clock, stall_after_s=stall_after_s + 3 * settings.schedule.watch_interval_s
    )
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
    notifier = (
        Notifier(
            out.on_refresh, timeout_s=out.on_refresh_timeout_s, base_env=environ, metrics=metrics
        )
        if out.on_refresh
        else None
    )
    client = ImsClient(ims)
    metrics.follow_clock_skew(lambda: client.clock_skew_s)
    service = Service(
        settings,
        clock=clock,
        sleeper=sleeper,
        client=client,
        sinks=sinks,
        metrics=metrics,
        health=health,
        secrets=secrets,
        notifier=notifier,
    )
    log.info(
        "starting",
        extra={
            "command": command,
            "version": __version__,
            "sinks": [s.name for s in sinks],
            "credentials": str(settings.credentials),
        },
    )

    wake_main = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        service.stop()
        client.cancel()  # an exchange in flight ends now, not at its deadline
        wake_main.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if command == "once":
        try:
            return _run_loop(service, None, wake_main, once=True)
        finally:
            client.close()
    server = None
    if settings.listen is not None:
        try:
            server = ProbeServer(*settings.listen, health, metrics)
        except OSError as exc:
            raise ConfigError(
                f"--listen {settings.listen[0]}:{settings.listen[1]}: {exc.strerror}"
            ) from None
        server.start()
        log.info(
            "serving probes and metrics", extra={"listen": f"{settings.listen[0]}:{server.port}"}
        )
    return _run_loop(service, server, wake_main)


# After a signal: how long the main thread waits for the worker, then for a publish in
# progress; together well inside 2 s and Kubernetes' default 30 s grace period.
_JOIN_GRACE_S = 1.0
_PUBLISH_GRACE_S = 0.8


def _run_loop(
    service: object, server: object, wake_main: threading.Event, *, once: bool = False
) -> int:
    """Run `run` (or `once`) in a worker thread; the main thread waits for it or a signal.

    On a signal the loop's sleep ends at once; an exchange in flight may take up to its
    deadline, so the main thread waits at most ~1 s for the worker, then for a publish
    in progress (the publish lock, which it then keeps, so that no publish starts after
    it) and exits, leaving the token in place. `once` runs the same way, so an exchange
    stuck on a trickling IMS cannot delay SIGTERM either; it exits 0 only if its token
    is published. Its --retry-timeout is enforced here too, as a backstop: past it
    (plus the settle moment and the grace), with no token published, it stops, exit 1.
    """
    from refresher.server import ProbeServer  # noqa: PLC0415
    from refresher.service import Service  # noqa: PLC0415

    assert isinstance(service, Service)  # noqa: S101
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
    if service.notifier is not None:
        service.notifier.close()  # a hung --on-refresh hook must not outlive us
    if isinstance(server, ProbeServer):
        server.close()
    if not outcome and once:
        return EXIT_OK if service.published else EXIT_RUNTIME
    result = outcome[0] if outcome else EXIT_OK
    if once and isinstance(result, RefresherError):
        raise result  # reported by run_cli as one line, like every other error
    if isinstance(result, RefresherError):
        log.error("%s", result)
        return result.exit_code
    if isinstance(result, BaseException):
        log.critical("refresh loop crashed: %s", type(result).__name__, exc_info=result)
        return EXIT_RUNTIME
    return result


def _await_worker(
    service: object, worker: threading.Thread, wake_main: threading.Event, *, once: bool
) -> None:
    """Wait until the worker ends, or a signal (or `once`'s backstop) stops the service;
    then give the worker ~1 s and a publish in progress a little more."""
    from refresher.service import Service  # noqa: PLC0415

    assert isinstance(service, Service)  # noqa: S101
    # No polling: the main thread sleeps until the loop ends or a signal handler (which
    # runs in this thread, interrupting the wait) sets the event. Idle costs nothing.
    backstop = service.settings.schedule.retry_timeout_s + 2 * _JOIN_GRACE_S if once else None
    if not wake_main.wait(backstop) and not service.published:
        log.error("--retry-timeout passed without a published token: stopping")
        service.stop()
    wake_main.wait()
    if service.stopping:
        worker.join(_JOIN_GRACE_S)
        if not service.publish_lock.acquire(timeout=_PUBLISH_GRACE_S):
            log.warning("a publish is still in progress; exiting (each sink swaps atomically)")
