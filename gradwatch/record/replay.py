"""Spool folders left behind: what they hold, delivering them now, and where they live.

`peek` reads what a folder holds without its lock; `replay` and `replay_all` (the
`gradwatch flush` command) deliver it now; `default_spool_dir` is where spools live.

Imports: gradwatch.common, gradwatch.record.spool (the journal and its file format).

A folder is replayed by opening a `Spool` on it with `remove_when_delivered=True`: it is
flushed, compacted and, when nothing is pending or rejected, deleted. `replay` only locks a
folder that has something to deliver or to remove; a folder another live process owns is left
to it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from gradwatch.common.errors import SpoolLockedError
from gradwatch.common.files import count_lines
from gradwatch.record.spool import (
    DELIVERED,
    JOURNAL,
    LOCK,
    REJECTED,
    Deliver,
    FlushResult,
    Spool,
    envelope_id,
)

__all__ = [
    "FolderResult",
    "SpoolState",
    "default_spool_dir",
    "peek",
    "replay",
    "replay_all",
]

_LOGGER = logging.getLogger("gradwatch")


class SpoolState(NamedTuple):
    """What a spool folder holds, as `peek` reads it without taking the lock."""

    pending: int
    rejected: int


class FolderResult(NamedTuple):
    """What `replay_all` did with one spool folder.

    `delivered`: records the receiver accepted now. `rejected`: records kept in rejected.jsonl,
    refused now (`rejected_now` of them) or before; `rejected_reason` is the first one's reason.
    `in_use`: another live process owns the folder (`owner_pid`, None when unknown), which was
    left alone; `pending` is then what that process still has to deliver.
    """

    directory: Path
    delivered: int
    pending: int
    rejected: int
    removed: bool
    last_error: str | None = None
    rejected_reason: str | None = None
    rejected_now: int = 0
    in_use: bool = False
    owner_pid: int | None = None


def default_spool_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$GRADWATCH_SPOOL_DIR`, else `$XDG_CACHE_HOME/gradwatch/spool`, else
    `~/.cache/gradwatch/spool` (`environ` defaults to `os.environ`).

    >>> default_spool_dir({"GRADWATCH_SPOOL_DIR": "/data/spool"}).as_posix()
    '/data/spool'
    >>> default_spool_dir({"XDG_CACHE_HOME": "/var/cache/me"}).as_posix()
    '/var/cache/me/gradwatch/spool'
    >>> default_spool_dir({"HOME": "/home/me"}).as_posix()
    '/home/me/.cache/gradwatch/spool'
    """
    env = os.environ if environ is None else environ
    explicit = env.get("GRADWATCH_SPOOL_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = env.get("XDG_CACHE_HOME")
    if cache and os.path.isabs(cache):  # the XDG spec says to ignore a relative path
        return Path(cache) / "gradwatch" / "spool"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".cache" / "gradwatch" / "spool"


def peek(directory: str | os.PathLike[str]) -> SpoolState | None:
    """How many records a spool folder has pending and rejected, read without its lock (so a
    live owner may change it meanwhile: decide nothing destructive on it). None when it holds
    no spool (no journal and no lock file)."""
    path = Path(directory)
    try:
        journal = (path / JOURNAL).read_bytes()
    except FileNotFoundError:
        if not (path / LOCK).exists():
            return None
        journal = b""
    except NotADirectoryError:
        return None
    try:
        delivered = set((path / DELIVERED).read_bytes().split())
    except FileNotFoundError:
        delivered = set()
    pending = 0
    for line in journal.splitlines():
        # The spool writes the id first: a slice, not a JSON parse, for the common case.
        fast = line[7:39] if line.startswith(b'{"id":"') and line[39:40] == b'"' else None
        record_id = fast if fast is not None else (envelope_id(line) or "").encode("ascii")
        if record_id and record_id not in delivered:
            pending += 1
    return SpoolState(pending, count_lines(path / REJECTED))


def replay(
    directory: str | os.PathLike[str],
    deliver: Deliver,
    *,
    timeout: float | None = None,
    remove_when_delivered: bool = True,
    logger: logging.Logger = _LOGGER,
) -> FlushResult:
    """Deliver what a spool holds, now, on this thread (the `gradwatch flush` command).

    Takes the spool's lock (`SpoolLockedError` if a training process still owns it), flushes,
    compacts when everything is delivered, and releases it — deleting the folder when nothing
    is pending or rejected (unless `remove_when_delivered=False`). A folder with nothing to
    deliver and something rejected, or no spool at all, is left as it is, unlocked.

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     directory = pathlib.Path(root) / "run-1"
    ...     with Spool(directory, deliver=print) as spool:  # never started nor flushed
    ...         record_id = spool.append({"step": 7})
    ...     print(replay(directory, print, timeout=5.0), directory.exists())
    {'step': 7}
    FlushResult(delivered=1, pending=0, last_error=None) False
    """
    done = _replay_folder(Path(directory), deliver, timeout, remove_when_delivered, logger)
    if done is None:
        return FlushResult(0, 0, None)
    # as Spool.flush counts: a record set aside in rejected.jsonl is done with
    return FlushResult(done.delivered + done.rejected_now, done.pending, done.last_error)


def replay_all(
    root: str | os.PathLike[str],
    deliverer: Callable[[Path], Deliver],
    *,
    timeout: float | None = None,
    skip: Path | None = None,
    logger: logging.Logger = _LOGGER,
) -> list[FolderResult]:
    """`replay` each spool folder under `root` (sorted by name; `skip` and folders holding no
    spool are left out), with `deliverer(folder)` as its `deliver`. A folder another live
    process owns is left to it (`in_use`); `timeout` is per folder."""
    try:
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and p != skip)
    except FileNotFoundError:
        return []
    results = []
    for folder in folders:
        try:
            done = _replay_folder(folder, deliverer(folder), timeout, True, logger)
        except SpoolLockedError as exc:
            state = peek(folder) or SpoolState(0, 0)
            done = FolderResult(folder, 0, state.pending, state.rejected, False, in_use=True,
                                owner_pid=exc.pid)
        if done is not None:  # None: not a spool
            results.append(done)
    return results


def _replay_folder(
    directory: Path, deliver: Deliver, timeout: float | None, remove: bool,
    logger: logging.Logger,
) -> FolderResult | None:
    state = peek(directory)
    if state is None:  # nothing there, or not a spool: never create one here
        return None
    if state.pending == 0 and state.rejected:
        # Kept for its rejected records, nothing to deliver: no lock taken, nothing opened, so
        # a GradWatch start costs one read of each such folder.
        return FolderResult(directory, 0, 0, state.rejected, False,
                            rejected_reason=_first_rejection(directory))
    with Spool(directory, deliver=deliver, logger=logger,
               remove_when_delivered=remove) as spool:
        before = count_lines(directory / REJECTED)
        result = spool.flush(timeout)
        if result.pending == 0:
            spool.compact()
    rejected = 0 if spool.removed else count_lines(directory / REJECTED)
    now = max(rejected - before, 0)  # flush counts them as done; they were not delivered
    return FolderResult(directory, result.delivered - now, result.pending, rejected,
                        spool.removed, result.last_error,
                        _first_rejection(directory) if rejected else None, now)


def _first_rejection(directory: Path) -> str | None:
    """The reason the first record in rejected.jsonl was refused."""
    try:
        with open(directory / REJECTED, encoding="utf-8") as reader:
            reason = json.loads(reader.readline()).get("rejected")
    except (OSError, ValueError, AttributeError):
        return None
    return str(reason) if reason is not None else None
