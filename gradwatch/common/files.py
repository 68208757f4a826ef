"""Crash-safe small files on local disk and PID locks (the spool, the monitor's state).

Small files on local disk written so that a crash leaves them whole, and PID locks: shared by
the spool and the monitor's state (no gradwatch imports).

Imports: nothing else of gradwatch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "acquire_pid_lock",
    "count_lines",
    "fsync_directory",
    "open_append",
    "replace_file",
    "truncate_quietly",
    "write_all",
]


def acquire_pid_lock(path: Path, locked: Callable[[int | None], Exception]) -> int:
    """flock `path` without waiting and write our PID into it; closing the returned descriptor
    releases it. When another process (or descriptor) holds it, raise `locked(its PID)`.

    Its owner may unlink the file before letting go (a spool folder removed once delivered):
    the flock we then get is on a file no one else will ever open, so we lock again whatever
    file `path` names now (FileNotFoundError when its folder is gone too).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise locked(holder) from None
            raise
        if _names(fd, path):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _names(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    except (OSError, ValueError):
        return None


def count_lines(path: Path) -> int:
    """Lines in a file, 0 when it does not exist."""
    try:
        with open(path, "rb") as reader:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: reader.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def open_append(path: Path) -> int:
    # O_RDWR so that the same descriptor serves `os.pread`; O_APPEND puts writes at the end.
    return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (one call may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def truncate_quietly(fd: int, size: int) -> None:
    """Cut a half-written line off (best effort: the disk may be what failed)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file, fsync, os.replace, fsync directory."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the names in `directory` durable (files created, replaced or unlinked)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
