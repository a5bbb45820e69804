"""The error tree. Each error knows the process exit code it maps to.

Messages are one line and never carry a secret value: they name the field and
the file, the HTTP status and IMS's error code, never the credential itself.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3


class RefresherError(Exception):
    """Base of every error the refresher raises on purpose."""

    exit_code = EXIT_RUNTIME


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


class CredentialsNotReady(CredentialsError):
    """An empty or half-written read (kubelet mid-swap): retry shortly, never use it."""


class ExchangeError(RefresherError):
    """An IMS exchange failed. `retryable` says whether backing off and retrying may help."""

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
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.error = error
        self.error_description = error_description
        self.debug_id = debug_id
        self.retry_after_s = retry_after_s
        # A permanent answer from IMS is a rejection of the credentials (exit 3);
        # a permanent local failure (TLS, plain HTTP refused) passes its own code.
        if exit_code is not None:
            self.exit_code = exit_code
        elif not retryable:
            self.exit_code = EXIT_REJECTED

    def log_fields(self) -> dict[str, object]:
        """The fields IMS gave us for support tickets (`x-debug-id` above all)."""
        return {
            "status": self.status,
            "error": self.error,
            "error_description": self.error_description,
            "x_debug_id": self.debug_id,
            "retry_after_s": self.retry_after_s,
        }


class PublishError(RefresherError):
    """A sink could not publish the token (exit 1). The last good token stays in place."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, sink: str) -> None:
        super().__init__(f"{sink} sink: {message}")
        self.sink = sink
