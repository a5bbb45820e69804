"""One frozen, typed `Settings`, built and validated in one place.

`cli.py` turns flags and `REFRESHER_*` variables into raw strings; `build_settings`
turns those into typed values and reports every problem at once (one line, exit 2).
Units are in the field names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from refresher.errors import ConfigError

DEFAULT_IMS_HOST = "ims-na1.adobelogin.com"

# Upper bounds of the duration flags. Each is far past any sensible setting; beyond it
# a value is a typo, refused with exit 2 (see _duration).
MAX_TIMEOUT_S = 3600.0
"""Network timeouts and the --on-refresh timeout."""
MAX_BACKOFF_S = 3600.0
"""Backoff delays: as long as the longest Retry-After we honour."""
MAX_PAUSE_S = 86400.0
"""The pause after a rejection, and `once`'s whole --retry-timeout."""
MAX_WATCH_INTERVAL_S = 3600.0
"""The credentials are stat()ed at least this often; probes see a heartbeat as often."""

Flow = Literal["auto", "jwt", "oauth"]
T = TypeVar("T")


def _flag(name: str, shown: str | None = None) -> dict[str, str | None]:
    """The metadata of a setting's field: its flag, and its default as the help text and
    the README's table show it (`shown`, else the field's default as written). The
    defaults live on the fields below and nowhere else."""
    return {"flag": name, "shown": shown}


@dataclass(frozen=True)
class ImsSettings:
    endpoint: str | None = field(default=None, metadata=_flag("ims-endpoint"))
    """`--ims-endpoint` as given (host or URL); None: from the credentials, else the default."""
    allow_insecure_http: bool = field(default=False, metadata=_flag("allow-insecure-http"))
    """Plain http:// is refused unless this is set (the emulator, local tests)."""
    ca_bundle: Path | None = field(default=None, metadata=_flag("ca-bundle"))
    """Extra CA bundle (PEM) trusted in addition to nothing else: requests' `verify=`."""
    jwt_ttl_s: int = field(default=300, metadata=_flag("jwt-ttl"))
    """Lifetime of the signed JWT assertion (its `exp` claim), integer seconds."""
    connect_timeout_s: float = field(default=5.0, metadata=_flag("connect-timeout"))
    read_timeout_s: float = field(default=15.0, metadata=_flag("read-timeout"))
    audience: str | None = field(default=None, metadata=_flag("ims-audience"))
    """`--ims-audience` as a base URL: replaces the endpoint's base in `aud` and metascopes."""
    min_token_lifetime_s: float = field(default=1.0, metadata=_flag("min-token-lifetime"))
    """A token IMS grants for less than this is a bad answer (retried, never published)."""

    def base_url(self, credentials_endpoint: str | None) -> str:
        """The IMS base URL for credentials: `--ims-endpoint` wins, then the credentials'
        `imsEndpoint`, then Adobe's default host."""
        return ims_base_url(self.endpoint or credentials_endpoint)


@dataclass(frozen=True)
class ScheduleSettings:
    refresh_ratio: float = field(default=0.8, metadata=_flag("refresh-ratio"))
    """Refresh when this fraction of the token lifetime has passed."""
    jitter: float = field(default=0.1, metadata=_flag("jitter"))
    """... made earlier by a random fraction of the lifetime up to this."""
    backoff_initial_s: float = field(default=1.0, metadata=_flag("backoff-initial"))
    backoff_max_s: float = field(default=60.0, metadata=_flag("backoff-max"))
    """Cap of the exponential backoff between retryable failures."""
    permanent_retry_s: float = field(default=300.0, metadata=_flag("permanent-retry-interval"))
    """Pause after IMS rejected the credentials (a credentials change ends it at once)."""
    retry_timeout_s: float = field(default=120.0, metadata=_flag("retry-timeout"))
    """`once`: give up after this long (exit 1)."""
    watch_interval_s: float = field(default=5.0, metadata=_flag("watch-interval"))
    """How often the credentials are stat()ed for a change while sleeping."""


@dataclass(frozen=True)
class OutputSettings:
    token_dir: Path | None = field(default=None, metadata=_flag("token-dir"))
    file_mode: int = field(default=0o440, metadata=_flag("file-mode", "0440"))
    secret_name: str | None = field(default=None, metadata=_flag("secret"))
    secret_namespace: str | None = field(default=None, metadata=_flag("secret-namespace"))
    on_refresh: tuple[str, ...] = field(default=(), metadata=_flag("on-refresh"))
    on_refresh_timeout_s: float = field(default=30.0, metadata=_flag("on-refresh-timeout"))


@dataclass(frozen=True)
class Settings:
    credentials: Path = field(default=Path(), metadata=_flag("credentials"))
    flow: Flow = field(default="auto", metadata=_flag("flow"))
    ims: ImsSettings = field(default_factory=ImsSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    listen: tuple[str, int] | None = field(
        default=("0.0.0.0", 9876),  # noqa: S104 - kubelet must reach the probes
        metadata=_flag("listen", "0.0.0.0:9876"),
    )
    log_format: Literal["json", "text"] = field(default="json", metadata=_flag("log-format"))
    log_level: str = field(default="info", metadata=_flag("log-level"))


def flag_defaults() -> dict[str, str]:
    """Flag name -> its default as the help text shows it, for settings that have one."""
    shown: dict[str, str] = {}
    for settings in (Settings, ImsSettings, ScheduleSettings, OutputSettings):
        for item in fields(settings):
            flag, text = item.metadata.get("flag"), item.metadata.get("shown")
            default = item.default
            if flag is None or default in (None, False, (), Path()):
                continue
            shown[flag] = text or (f"{default:g}" if isinstance(default, float) else str(default))
    return shown


def ims_base_url(endpoint: str | None) -> str:
    """`https://host[:port]` from a host or URL: scheme and host only, as `@adobe/jwt-auth` does."""
    if not endpoint:
        return f"https://{DEFAULT_IMS_HOST}"
    text = endpoint.strip()
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"IMS endpoint {endpoint!r} is not a host or an http(s) URL")
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def plain_http_problem(base_url: str, *, allow_insecure_http: bool, origin: str) -> str | None:
    """The one rule for plain HTTP: refused unless `--allow-insecure-http`. Returns the
    problem as one line (None if fine); `origin` says where the URL came from
    ("--ims-endpoint", "imsEndpoint in the credentials"), so every subcommand gives the
    same verdict in the same words."""
    if base_url.startswith("https://") or allow_insecure_http:
        return None
    return f"{origin} {base_url} is plain HTTP: pass --allow-insecure-http to permit it"


class _Collector:
    """Collects every validation problem so the user sees them all in one line."""

    def __init__(self, raw: Mapping[str, str | None]) -> None:
        self.raw = raw
        self.problems: list[str] = []

    def get(self, name: str, parse: Callable[[str], T], default: T, check: str = "") -> T:
        text = self.raw.get(name)
        if text is None or text == "":
            return default
        try:
            return parse(text)
        except (ValueError, ConfigError) as exc:
            hint = f" ({check})" if check else ""
            self.problems.append(f"--{name.replace('_', '-')}={text!r}: {exc}{hint}")
            return default

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)


def _duration(limit_s: float) -> Callable[[str], float]:
    """Seconds in (0, limit_s]. Refused, not clamped: a value past the limit is a typo
    (ms for s), and `inf`, `nan` or 1e300 would reach `Event.wait`, `timedelta` or a
    deadline sum as an OverflowError deep in the loop."""

    def parse_duration(text: str) -> float:
        value = float(text)
        if not 0 < value <= limit_s:  # also false for NaN
            raise ValueError(f"must be a number of seconds in (0, {limit_s:g}]")
        return value

    return parse_duration


def _whole_seconds(limit_s: int) -> Callable[[str], int]:
    """Integer seconds in [1, limit_s] (`--jwt-ttl`: the JWT's `exp` is whole seconds)."""

    def parse_whole(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("must be a whole number of seconds") from None
        if not 1 <= value <= limit_s:
            raise ValueError(f"must be between 1 and {limit_s} seconds")
        return value

    return parse_whole


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be in [0, 1)")
    return value


def _seconds_up_to(limit_s: float) -> Callable[[str], float]:
    def parse_seconds(text: str) -> float:
        value = float(text)
        if not 0 <= value <= limit_s:  # also false for NaN
            raise ValueError(f"must be between 0 and {limit_s:g} seconds")
        return value

    return parse_seconds


def _mode(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError("must be an octal file mode like 0440")
    if not value & 0o400:
        raise ValueError("the owner must be able to read the files (it re-reads them at start)")
    if value & 0o022:
        # DIR is shared with other containers: a token file they may write is a token they
        # may replace under the application's feet.
        raise ValueError("the files must not be writable by group or others (e.g. 0440)")
    return value


def parse_bool(text: str) -> bool:
    """The one boolean parser, for flags and `REFRESHER_*` values alike."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError("must be HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - a probe endpoint must be reachable by kubelet
    if host != "localhost":
        ipaddress.ip_address(host)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    return host, port


def _command(text: str) -> tuple[str, ...]:
    import shlex  # noqa: PLC0415 - only needed when --on-refresh is set

    parts = tuple(shlex.split(text))
    if not parts:
        raise ValueError("empty command")
    return parts


def _choice(*choices: str) -> Callable[[str], str]:
    def parse_choice(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse_choice


def build_settings(raw: Mapping[str, str | None], *, needs_output: bool) -> Settings:
    """Typed settings from raw option strings (flag names with `_`). Raises ConfigError
    with every problem found, in one line."""
    c = _Collector(raw)
    default = Settings()
    credentials = c.get("credentials", Path, default.credentials)
    c.require(str(credentials) not in ("", "."), "--credentials is required")
    flow = c.get("flow", _choice("auto", "jwt", "oauth"), str(default.flow))
    ims = _ims_settings(c)
    schedule = _schedule_settings(c)
    output = _output_settings(c)
    if needs_output:
        c.require(
            output.token_dir is not None or output.secret_name is not None,
            "no output: give --token-dir and/or --secret",
        )
    listen = None if raw.get("listen") == "" else c.get("listen", _listen, default.listen)
    log_format = c.get("log_format", _choice("json", "text"), str(default.log_format))
    log_level = c.get("log_level", _choice("debug", "info", "warning", "error"), default.log_level)
    if c.problems:
        raise ConfigError("; ".join(c.problems))
    return Settings(
        credentials=credentials,
        flow=flow,  # type: ignore[arg-type]  # validated by _choice above
        ims=ims,
        schedule=schedule,
        output=output,
        listen=listen,
        log_format=log_format,  # type: ignore[arg-type]
        log_level=log_level,
    )


def _ims_settings(c: _Collector) -> ImsSettings:
    default = ImsSettings()
    endpoint = c.raw.get("ims_endpoint") or None
    allow_http = c.get("allow_insecure_http", parse_bool, default.allow_insecure_http)
    if endpoint:
        try:
            problem = plain_http_problem(
                ims_base_url(endpoint), allow_insecure_http=allow_http, origin="--ims-endpoint"
            )
            c.require(problem is None, problem or "")
        except ConfigError as exc:
            c.problems.append(str(exc))
    ca_bundle = c.get("ca_bundle", Path, default.ca_bundle)
    if ca_bundle is not None:
        c.require(ca_bundle.is_file(), f"--ca-bundle {ca_bundle} is not a readable file")
    return ImsSettings(
        endpoint=endpoint,
        allow_insecure_http=allow_http,
        ca_bundle=ca_bundle,
        # IMS rejects JWTs that live longer than a day.
        jwt_ttl_s=c.get("jwt_ttl", _whole_seconds(86400), default.jwt_ttl_s),
        connect_timeout_s=c.get(
            "connect_timeout", _duration(MAX_TIMEOUT_S), default.connect_timeout_s
        ),
        read_timeout_s=c.get("read_timeout", _duration(MAX_TIMEOUT_S), default.read_timeout_s),
        audience=c.get("ims_audience", ims_base_url, default.audience),
        min_token_lifetime_s=c.get(
            "min_token_lifetime", _seconds_up_to(86400.0), default.min_token_lifetime_s
        ),
    )


def _schedule_settings(c: _Collector) -> ScheduleSettings:
    default = ScheduleSettings()
    ratio = c.get("refresh_ratio", _fraction, default.refresh_ratio)
    c.require(ratio > 0, "--refresh-ratio must be > 0")
    jitter = c.get("jitter", _fraction, default.jitter)
    c.require(jitter < ratio or ratio == 0, "--jitter must be smaller than --refresh-ratio")
    return ScheduleSettings(
        refresh_ratio=ratio,
        jitter=jitter,
        backoff_initial_s=c.get(
            "backoff_initial", _duration(MAX_BACKOFF_S), default.backoff_initial_s
        ),
        backoff_max_s=c.get("backoff_max", _duration(MAX_BACKOFF_S), default.backoff_max_s),
        permanent_retry_s=c.get(
            "permanent_retry_interval", _duration(MAX_PAUSE_S), default.permanent_retry_s
        ),
        retry_timeout_s=c.get("retry_timeout", _duration(MAX_PAUSE_S), default.retry_timeout_s),
        watch_interval_s=c.get(
            "watch_interval", _duration(MAX_WATCH_INTERVAL_S), default.watch_interval_s
        ),
    )


def _output_settings(c: _Collector) -> OutputSettings:
    default = OutputSettings()
    return OutputSettings(
        token_dir=c.get("token_dir", Path, default.token_dir),
        file_mode=c.get("file_mode", _mode, default.file_mode),
        secret_name=c.raw.get("secret") or default.secret_name,
        secret_namespace=c.raw.get("secret_namespace") or default.secret_namespace,
        on_refresh=c.get("on_refresh", _command, default.on_refresh),
        on_refresh_timeout_s=c.get(
            "on_refresh_timeout", _duration(MAX_TIMEOUT_S), default.on_refresh_timeout_s
        ),
    )
