"""The error tree. Each error knows the process exit code it maps to.

Messages are one line and never carry a secret value: they name the field and
the file, the HTTP status and IMS's error code, never the credential itself.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3


class RefresherError(Exception):
    """Base of every error the refresher raises on purpose."""

    exit_code = EXIT_RUNTIME

    def log_fields(self) -> dict[str, object]:
        """Structured fields for the log line that reports this error (none by default)."""
        return {}


class ConfigError(RefresherError):
    """Bad flags, environment or settings (exit 2)."""

    exit_code = EXIT_USAGE


class CredentialsError(RefresherError):
    """The mounted credentials are unusable (exit 2). Names the field and the source."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, source: str = "", field: str = "") -> None:
        self.source = source
        self.field = field
        where = ", ".join(part for part in (source, f"field {field!r}" if field else "") if part)
        super().__init__(f"{where}: {message}" if where else message)

    def log_fields(self) -> dict[str, object]:
        return {"source": self.source or None, "field": self.field or None}


class CredentialsNotReady(CredentialsError):
    """An empty or half-written read (kubelet mid-swap): retry shortly, never use it."""


class ExchangeError(RefresherError):
    """An IMS exchange failed. Raise one of the kinds below; `retryable` says whether
    backing off and retrying may help.

    The base stays constructible with explicit flags for callers that predate the kinds:
    not retryable then means rejected (exit 3) unless `exit_code` says otherwise.
    """

    exit_code = EXIT_RUNTIME

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        error: str | None = None,
        error_description: str | None = None,
        debug_id: str | None = None,
        retry_after_s: float | None = None,
        hint: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.error = error
        self.error_description = error_description
        self.debug_id = debug_id
        self.retry_after_s = retry_after_s
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code
        elif not retryable:
            self.exit_code = EXIT_REJECTED

    def log_fields(self) -> dict[str, object]:
        """What IMS told us, for support tickets (`x-debug-id` above all), and our hint."""
        return {
            "status": self.status,
            "error": self.error,
            "error_description": self.error_description,
            "x_debug_id": self.debug_id,
            "retry_after_s": self.retry_after_s,
            "hint": self.hint,
        }


class Rejected(ExchangeError):
    """IMS's verdict on the credentials (400/401 ...): permanent until they change, exit 3.

    Retrying at once would only get the integration throttled.
    """

    exit_code = EXIT_REJECTED

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message, retryable=False, exit_code=EXIT_REJECTED, **fields)


class Transient(ExchangeError):
    """Network trouble, a timeout, 408/429/5xx or an unusable answer: back off and retry,
    never sooner than `retry_after_s` when IMS gave one."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message, retryable=True, exit_code=EXIT_RUNTIME, **fields)


class LocalSetup(ExchangeError):
    """Our side cannot talk to IMS as configured (TLS verification, a redirect, plain HTTP
    without the flag): retrying cannot help and IMS never judged the credentials, exit 1."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message, retryable=False, exit_code=EXIT_RUNTIME, **fields)


class PublishError(RefresherError):
    """A sink could not publish the token (exit 1). The last good token stays in place."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, sink: str) -> None:
        super().__init__(f"{sink} sink: {message}")
        self.sink = sink
