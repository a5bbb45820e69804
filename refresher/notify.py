"""`--on-refresh CMD`: tell the application a new token is published.

Run without a shell (the command was split like a shell would), with a timeout,
in a background thread so a slow or hanging command never delays refreshing.
At most one run at a time: a publish during a run is coalesced into one more run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping

from refresher.metrics import Metrics

log = logging.getLogger(__name__)


class Notifier:
    def __init__(
        self,
        command: tuple[str, ...],
        *,
        timeout_s: float,
        base_env: Mapping[str, str],
        metrics: Metrics,
    ) -> None:
        self.command = command
        self.timeout_s = timeout_s
        self.base_env = dict(base_env)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: dict[str, str] | None = None
        # Whether a drain thread owns the queue, decided under the lock: `is_alive()` would
        # still be True for a thread that has just decided to exit, losing a notification.
        self._draining = False
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    def notify(self, token_dir: str, expires_at: str) -> None:
        env = {"REFRESHER_TOKEN_DIR": token_dir, "REFRESHER_EXPIRES_AT": expires_at}
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
            _, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            self.metrics.on_refresh.labels(result="timeout").inc()
            log.warning(
                "--on-refresh %s timed out after %gs (killed)",
                program,
                self.timeout_s,
                extra=fields,
            )
            return
        finally:
            with self._lock:
                self._proc = None
        if proc.returncode == 0:
            self.metrics.on_refresh.labels(result="success").inc()
            log.info("--on-refresh %s succeeded", program, extra=fields)
            return
        self.metrics.on_refresh.labels(result="error").inc()
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        log.warning(
            "--on-refresh %s exited %d",
            program,
            proc.returncode,
            extra={**fields, "exit_code": proc.returncode, "stderr_tail": tail[0][:200]},
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group and reap it; a grandchild that left the group
    and kept stderr open is not waited for."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=1)
    except subprocess.TimeoutExpired:
        proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()
        proc.wait()
