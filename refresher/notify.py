"""`--on-refresh CMD`: tell the application a new token is published.

Run without a shell (the command was split like a shell would), with a timeout,
in a background thread so a slow or hanging command never delays refreshing.
At most one run at a time: a publish during a run is coalesced into one more run.

The command's stderr is read as it comes and only its last `TAIL_BYTES` are kept (a
chatty hook must not grow our memory), then scrubbed of secrets and logged when the
command fails or times out. Its stdout is discarded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

from refresher.logs import redact
from refresher.metrics import Metrics

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
"""How much of a hook's stderr we keep: enough for its last error lines, bounded."""
_READ_BYTES = 65536


class Notifier:
    def __init__(
        self,
        command: tuple[str, ...],
        *,
        timeout_s: float,
        base_env: Mapping[str, str],
        metrics: Metrics,
        scrub: Callable[[str], str] = redact,
    ) -> None:
        """`scrub` removes secrets from the hook's output before it is logged (pass the
        secret registry's `scrub`; the default catches JWTs and PEM blocks only)."""
        self.command = command
        self.timeout_s = timeout_s
        # Without our own REFRESHER_* settings: a hook that itself runs `refresher` would
        # read them as its settings (and trip over a flag its subcommand does not know).
        self.base_env = {k: v for k, v in base_env.items() if not k.startswith("REFRESHER_")}
        self.metrics = metrics
        self.scrub = scrub
        self._lock = threading.Lock()
        self._pending: dict[str, str] | None = None
        # Whether a drain thread owns the queue, decided under the lock: `is_alive()` would
        # still be True for a thread that has just decided to exit, losing a notification.
        self._draining = False
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    def notify(self, token_dir: str, expires_at: str) -> None:
        # Not REFRESHER_*: a hook that itself runs `refresher` would read them as settings.
        env = {"IMS_TOKEN_DIR": token_dir, "IMS_TOKEN_EXPIRES_AT": expires_at}
        with self._lock:
            if self._closed:
                return
            self._pending = env
            if not self._draining:
                self._draining = True
                self._thread = threading.Thread(target=self._drain, name="on-refresh", daemon=True)
                self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the runs asked for so far (used by `once`)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def close(self) -> None:
        """At shutdown: run nothing more, and kill a command still running (and its group)."""
        with self._lock:
            self._closed = True
            self._pending = None
            proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _drain(self) -> None:
        while True:
            with self._lock:
                env, self._pending = self._pending, None
                if env is None:
                    self._draining = False
                    return
            self._run(env)

    def _run(self, extra_env: dict[str, str]) -> None:
        env = {**self.base_env, **extra_env}
        program = self.command[0]
        fields: dict[str, object] = {"command": program, "timeout_s": self.timeout_s}
        try:
            # Its own process group, so a timeout kills what it started too (`sh -c`, a
            # script's children), not just the direct child.
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self.metrics.on_refresh.labels(result="error").inc()
            log.warning("--on-refresh %s could not start: %s", program, exc.strerror, extra=fields)
            return
        with self._lock:
            self._proc = proc
        try:
            tail, finished = _collect(proc, time.monotonic() + self.timeout_s)
            if not finished:
                _kill_group(proc)
        finally:
            if proc.stderr is not None:
                proc.stderr.close()
            with self._lock:
                self._proc = None
        self._report(proc.returncode if finished else None, tail)

    def _report(self, returncode: int | None, tail: _Tail) -> None:
        """Count and log one run; `returncode` None: it timed out and was killed."""
        program = self.command[0]
        fields: dict[str, object] = {"command": program, "timeout_s": self.timeout_s}
        if returncode == 0:
            self.metrics.on_refresh.labels(result="success").inc()
            log.info("--on-refresh %s succeeded", program, extra=fields)
            return
        # The tail was cut only between lines (no secret spans one); it is scrubbed whole
        # here and logged without a further cut, so no secret is ever cut in two where a
        # scrubber could no longer recognise it.
        output = self.scrub(tail.text())
        if output:
            fields["stderr_tail"] = output
        if returncode is None:
            self.metrics.on_refresh.labels(result="timeout").inc()
            log.warning(
                "--on-refresh %s timed out after %gs (killed)",
                program,
                self.timeout_s,
                extra=fields,
            )
            return
        self.metrics.on_refresh.labels(result="error").inc()
        log.warning(
            "--on-refresh %s exited %d",
            program,
            returncode,
            extra={**fields, "exit_code": returncode},
        )


class _Tail:
    """The last `limit` bytes of a stream, at most `limit` + one read held at a time."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self._kept = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        self._kept += chunk
        excess = len(self._kept) - self.limit
        if excess > 0:
            del self._kept[:excess]
            self.truncated = True

    def text(self) -> str:
        data = bytes(self._kept)
        if self.truncated:
            # The first kept line was cut: it may end with the rest of a secret that no
            # scrubber can recognise any more. Drop it (all, if the tail is one line).
            data = data.partition(b"\n")[2]
        return data.decode(errors="replace").strip()


def _collect(proc: subprocess.Popen[bytes], deadline: float) -> tuple[_Tail, bool]:
    """Read stderr into a bounded tail until the command exits or `deadline` (monotonic)
    passes; (tail, finished in time)."""
    tail = _Tail()
    assert proc.stderr is not None  # noqa: S101 - Popen(stderr=PIPE)
    fd = proc.stderr.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return tail, False
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, _READ_BYTES)
            if not chunk:
                break  # EOF: every writer closed stderr (normally: it exited)
            tail.feed(chunk)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return tail, False
    return tail, True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group and reap it; a grandchild that left the group
    and kept stderr open is not waited for (its pipe is closed under it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
