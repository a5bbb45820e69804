"""Atomic file writes with an explicit mode, for credentials, the CA and the port file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_file"]


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with an explicit mode: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask must not widen or narrow it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
