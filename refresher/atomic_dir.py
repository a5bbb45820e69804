"""kubelet's atomic-writer layout, the one definition the credentials reader and the file
sink share.

    DIR/..2026_11_26_06_30_10.1a2b3c4d/{key,...}   a snapshot: regular files only, never reused
    DIR/..data -> ..2026_11_26_06_30_10.1a2b3c4d   swapped atomically (a rename over a link)
    DIR/key -> ..data/key                          the stable names readers open

Every name starting with `.` belongs to the writer (snapshots, `..data`, temporary links);
the stable names are everything else. A snapshot holds regular files only, so a symlink,
FIFO or device inside one is refused, never followed or opened for a blocking read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

DATA_LINK: Final = "..data"
"""The symlink naming the current snapshot; swapping it is the one step of a publish."""

SNAPSHOT_PREFIX: Final = ".."
"""Snapshots and the writer's temporary links start with this."""


class NotRegularFileError(ValueError):
    """The name is a FIFO, socket, device or (where links are refused) a symlink."""


def is_writers(name: str) -> bool:
    """A name of the writer's own (a snapshot, `..data`, a temporary link), not a key."""
    return name.startswith(".")


def is_snapshot_name(name: str) -> bool:
    """A `..`-prefixed entry directly inside DIR (no `/`, not `..` itself, not `..data`)."""
    return (
        name.startswith(SNAPSHOT_PREFIX)
        and "/" not in name
        and "\0" not in name
        and name not in ("..", DATA_LINK)
    )


def key_link(name: str) -> str:
    """What the stable name `name` points at: its file in the current snapshot."""
    return f"{DATA_LINK}/{name}"


def snapshot_in(dir_fd: int) -> str:
    """The snapshot `..data` names, by a descriptor of DIR. `..data` naming anything but a
    snapshot directly inside DIR (an absolute path, `../x`) is ValueError: DIR may be
    shared, and a token is taken only from inside it. OSError when there is no `..data`."""
    target = os.readlink(DATA_LINK, dir_fd=dir_fd)
    if not is_snapshot_name(target):
        raise ValueError(f"{DATA_LINK} does not name a snapshot inside the directory")
    return target


def current_snapshot(directory: Path) -> Path | None:
    """The directory `directory/..data` resolves to; None without a `..data` directory
    (not this layout). OSError when `..data` dangles or loops: a swap in progress.

    Reading every file through the one resolved snapshot gives a consistent set even if
    the writer swaps `..data` meanwhile (the old snapshot then vanishes, which a reader
    sees as a missing file rather than as a mix of old and new values).
    """
    link = directory / DATA_LINK
    if not (link.is_symlink() or link.exists()):
        return None
    try:
        resolved = link.resolve(strict=True)
    except RuntimeError:  # a symlink loop, on Pythons that do not raise OSError for it
        raise OSError(errno.ELOOP, "Too many levels of symbolic links") from None
    return resolved if resolved.is_dir() else None


def read_regular(name: str | Path, limit: int, *, dir_fd: int | None, nofollow: bool) -> bytes:
    """At most `limit + 1` bytes of a regular file (the caller judges the size); never
    blocks on a FIFO.

    `O_NONBLOCK` makes opening a FIFO return at once (a blocking open waits for a writer
    forever), and `fstat` on the descriptor, not a `stat` of the name, decides: a name
    swapped for a FIFO between a check and the open cannot slip through. `nofollow` is
    for names inside a snapshot, which are never links. Raises NotRegularFileError,
    IsADirectoryError or another OSError.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise NotRegularFileError(f"{name} is a symlink") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{name} is not a regular file")
        os.set_blocking(fd, True)  # a regular file: reads behave as usual
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
