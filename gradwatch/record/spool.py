"""The durable local journal between gradwatch and a slow or dead tracking server.

`Spool`: append, background delivery, flush, drain, close, compact.

Imports: gradwatch.common. What earlier processes left behind is replayed by
`gradwatch.record.replay`, which builds on this module.

Each check's record is appended to a journal on local disk (one JSON line, written before
training goes on, so a process that dies right after keeps it: the kernel holds it); a
background thread fsyncs the journal, hands the record to `deliver` (which logs it to MLflow)
and marks it delivered. Nothing in training waits on the network or on the disk's flush, and
nothing is lost when the process dies: what is left is delivered by the next `Spool` on the
same directory, or by hand with `gradwatch flush` (`gradwatch.record.replay`). Only an operating
system crash in the milliseconds between an append and the deliverer's fsync can lose that
record (`append(..., sync=True)` fsyncs on the caller's thread instead).

Files in the spool directory::

    journal.jsonl   one envelope per line, UTF-8, appended by `append`, fsync'd before
                    anything in it is delivered, and at close:
                    {"id": "<uuid4 hex>", "created": <unix seconds>, "payload": {...}}
    delivered       one record id per line, appended and fsync'd after `deliver` returned
    rejected.jsonl  the envelopes the receiver refused for good (`RejectedRecord`), with why
    run.json        written by the deliverer of a spool whose run was not known yet
                    (the record writer's `Deliverer`): the run its local id became
    .lock           flock'd by the one process that owns the spool; holds that process's PID

A record is pending iff its id is in the journal and not in `delivered`. A torn line (a crash
in the middle of a write) is skipped with a warning. `compact` rewrites both files (temporary
file + `os.replace`) so that only pending records remain.

Housekeeping: a spool opened with `remove_when_delivered=True` (GradWatch's own, and every
`replay`) deletes its folder when it is closed with nothing pending and nothing rejected,
holding its lock while it does; a folder with a pending or a rejected record is never deleted.
The journal goes first, so a crash halfway leaves a folder with nothing pending, which the next
replay removes.

Delivery is at least once: a crash between `deliver` returning and its mark reaching the disk
delivers that record again, so `deliver` must be idempotent. MLflow's SQL store ignores a metric
identical in key, timestamp, step and value; it accepts a param again with the same value; tags
and artifacts are overwritten with the same content.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from gradwatch.common.errors import ConfigError, InputError, SpoolLockedError
from gradwatch.common.files import (
    acquire_pid_lock,
    count_lines,
    fsync_directory,
    open_append,
    replace_file,
    truncate_quietly,
    write_all,
)

__all__ = [
    "DELIVERED",
    "JOURNAL",
    "LOCK",
    "REJECTED",
    "RUN_FILE",
    "Deliver",
    "FlushResult",
    "RejectedRecord",
    "Spool",
    "SpoolLockedError",
    "acquire_pid_lock",
    "envelope_id",
]

Payload = dict[str, Any]
"""The caller's record: any JSON-able dict (NaN and ±inf allowed, as Python's json writes)."""
Envelope = dict[str, Any]
"""A spooled record: {"id", "created", "payload"}; `Spool.pending` adds "attempts"."""
Deliver = Callable[[Payload], None]
"""Sends one payload (to MLflow, ...); returns normally once it is stored, raises otherwise."""

JOURNAL = "journal.jsonl"
DELIVERED = "delivered"
REJECTED = "rejected.jsonl"
RUN_FILE = "run.json"
LOCK = ".lock"
#: What a spool folder may hold, in the order a removal deletes it: the journal first (without
#: it nothing is pending, so a crash after it loses nothing), the lock last. `.tmp` files are
#: what a crash in `replace_file` or the deliverer's atomic write leaves.
_REMOVAL_ORDER = (JOURNAL, JOURNAL + ".tmp", DELIVERED, DELIVERED + ".tmp", RUN_FILE,
                  RUN_FILE + ".tmp", LOCK)

_ID_LENGTH = 32  # uuid4().hex
_LOGGER = logging.getLogger("gradwatch")


class RejectedRecord(Exception):
    """Raised by a `deliver` function when the receiver will never accept this record (it is
    malformed for it, or refers to something that no longer exists). The spool moves the record
    to `rejected.jsonl` — kept, not lost — instead of retrying it forever in front of the
    others."""


class FlushResult(NamedTuple):
    """What `Spool.flush` / `replay` achieved.

    `last_error` is the error of the delivery that stopped the flush ("TypeName: message"),
    None when nothing failed (`pending` > 0 then means the timeout ran out).
    """

    delivered: int
    pending: int
    last_error: str | None


class _Slot(NamedTuple):
    """Where a pending record's line lies in the journal."""

    offset: int
    length: int


class _Attempt(NamedTuple):
    """One go at the oldest pending record. No id and no error: nothing was pending, the
    spool is closing, or the wait for the delivery lock ran out."""

    record_id: str | None
    error: Exception | None = None


class Spool:
    """A journal of records on local disk, delivered in order, oldest first.

    `append` returns once the record is on disk; `start` delivers in a daemon thread with
    exponential backoff (`backoff_initial` · 2ⁿ seconds, at most `backoff_max`); `flush`
    delivers on the caller's thread; `close` stops the thread and leaves what is pending on disk.
    Opening a spool takes `<directory>/.lock`; a second owner gets `SpoolLockedError`.
    With `remove_when_delivered`, `close` deletes the folder when nothing in it is pending or
    rejected (`removed` says whether it did).

    >>> import tempfile
    >>> received = []
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     with Spool(directory, deliver=received.append) as spool:
    ...         record_id = spool.append({"run_id": "abc", "metrics": [["loss", 0.5, 0, 1]]})
    ...         spool.flush(timeout=5.0)
    FlushResult(delivered=1, pending=0, last_error=None)
    >>> received
    [{'run_id': 'abc', 'metrics': [['loss', 0.5, 0, 1]]}]
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        deliver: Deliver,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        compact_after_bytes: int = 1 << 20,
        remove_when_delivered: bool = False,
        logger: logging.Logger = _LOGGER,
    ) -> None:
        _validate_settings(deliver, backoff_initial, backoff_max, compact_after_bytes)
        self.directory = Path(directory)
        self._deliver = deliver
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._interrupt = threading.Event()  # set by close() and drain(): retry now
        # `sleep` waits between retries; by default a wait that `close`/`drain` interrupt.
        self._sleep = sleep if sleep is not None else self._interrupt.wait
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._compact_after_bytes = compact_after_bytes
        self._logger = logger
        # Lock order: _delivery_lock, then _lock. _lock guards the files and the fields below;
        # _delivery_lock is held around "deliver one record and mark it", so that `flush` and
        # the background thread never deliver the same record at once.
        self._lock = threading.Lock()
        self._delivery_lock = threading.Lock()
        self._pending: dict[str, _Slot] = {}
        self._attempts: dict[str, int] = {}
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = False  # no new work; whoever ends the last delivery closes the files
        self._unsynced = False  # the journal has appends not fsync'd yet
        self._released = False  # files closed, lock released
        self._remove_when_delivered = remove_when_delivered
        self._removed = False
        self._lock_fd = _lock_folder(self.directory)
        self._journal_fd = self._delivered_fd = -1
        self._journal_size = self._delivered_size = 0  # bytes; the next append's offset
        try:
            self._journal_fd = open_append(self.directory / JOURNAL)
            self._delivered_fd = open_append(self.directory / DELIVERED)
            fsync_directory(self.directory)  # the files' names are durable too
            self._load()
        except BaseException:
            for fd in (self._journal_fd, self._delivered_fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            raise

    @property
    def removed(self) -> bool:
        """True once `close` deleted the folder (all delivered, nothing rejected)."""
        return self._removed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._thread else "idle"
        return f"Spool({str(self.directory)!r}, pending={len(self._pending)}, {state})"

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------

    def append(self, payload: Payload, *, sync: bool = False) -> str:
        """Write one record (one JSON line) and return its id; wakes the deliverer, which
        fsyncs the journal before delivering (`sync=True`: fsync'd here, before returning).

        Thread-safe; costs one small write, never a scan of the journal.
        """
        return self.append_many([payload], sync=sync)[0]

    def append_many(self, payloads: Sequence[Payload], *, sync: bool = False) -> list[str]:
        """Write several records with one write (all or none of them) and return their ids,
        in order; fsync'd as `append` says."""
        for payload in payloads:
            if not isinstance(payload, dict):
                raise InputError(
                    f"payload must be a dict (the record to deliver), got "
                    f"{type(payload).__name__}."
                )
        ids = [uuid.uuid4().hex for _ in payloads]  # os.urandom: the user's RNG stays untouched
        lines = [_encode({"id": record_id, "created": self._clock(), "payload": payload})
                 for record_id, payload in zip(ids, payloads, strict=True)]
        with self._lock:
            self._check_open("append")
            offset = self._journal_size
            try:
                write_all(self._journal_fd, b"".join(lines))
                if sync:
                    os.fsync(self._journal_fd)
            except OSError:
                # Never leave half a line for the next append to be glued onto.
                truncate_quietly(self._journal_fd, offset)
                raise
            for record_id, line in zip(ids, lines, strict=True):
                self._pending[record_id] = _Slot(offset, len(line))
                offset += len(line)
            self._journal_size = offset
            self._unsynced = not sync
        self._wake.set()
        return ids

    def pending(self) -> list[Envelope]:
        """The undelivered records, oldest first, each with "attempts" (failed deliveries
        by this `Spool` object; not stored on disk)."""
        with self._lock:
            self._check_open("pending")
            envelopes = [self._read(slot) for slot in self._pending.values()]
            for envelope in envelopes:
                envelope["attempts"] = self._attempts.get(envelope["id"], 0)
        return envelopes

    # -- delivering --------------------------------------------------------------------------

    def start(self) -> None:
        """Deliver in a daemon thread from now on (idempotent). Failures are logged and
        retried with backoff; nothing is raised into the caller."""
        with self._lock:
            self._check_open("start")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"gradwatch-spool:{self.directory.name}", daemon=True
            )
            self._thread.start()

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Deliver pending records on this thread, oldest first, until none is left, one
        fails, or `timeout` seconds have passed (None: no limit).

        A delivery already running (in the background thread) is waited for, not repeated;
        a single `deliver` call is never interrupted, so bound it in `deliver` itself.
        """
        if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a number of seconds ≥ 0 or None, got {timeout!r}.")
        self._check_open("flush")
        deadline = None if timeout is None else time.monotonic() + timeout
        delivered, last_error = 0, None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            attempt = self._deliver_oldest(remaining)
            if attempt.error is not None:
                last_error = _describe(attempt.error)
            if attempt.record_id is None or attempt.error is not None:
                break
            delivered += 1
            if deadline is not None and time.monotonic() >= deadline:
                break
        if delivered:
            self._compact_if_due()
        with self._lock:
            return FlushResult(delivered, len(self._pending), last_error)

    def drain(self, timeout: float) -> FlushResult:
        """Wait up to `timeout` seconds for the background thread to deliver what is pending
        (cutting its current backoff short), without delivering anything on this thread: the
        caller waits at most `timeout`, however long one delivery takes. Without a background
        thread, the same as `flush(timeout)`."""
        if not (timeout >= 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a number of seconds ≥ 0, got {timeout!r}.")
        if self._thread is None:
            return self.flush(timeout)
        self._check_open("drain")
        with self._lock:
            before = len(self._pending)
        deadline = time.monotonic() + timeout
        self._interrupt.set()
        self._wake.set()
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    break
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        with self._lock:
            pending = len(self._pending)
            error = max(self._attempts.values(), default=0)
        return FlushResult(max(before - pending, 0), pending,
                           self._last_error if error else None)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the background thread, waiting up to `timeout` seconds for a delivery in
        flight, and release the spool; pending records stay on disk for the next owner. With
        `remove_when_delivered`, a folder with nothing pending nor rejected is deleted.

        If the delivery outlasts `timeout`, the lock stays held until it returns (or the
        process exits), so that no other process delivers the same record meanwhile.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from now on, a delivery in flight releases when it ends
        self._stop.set()
        self._wake.set()
        self._interrupt.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if self._delivery_lock.acquire(timeout=remaining):
            try:
                self._release()
            finally:
                self._delivery_lock.release()
        else:
            self._logger.warning(
                "gradwatch spool %s: a delivery is still running after %s s; the spool stays "
                "locked until it returns. Pending records stay on disk.",
                self.directory, timeout,
            )

    def compact(self) -> None:
        """Rewrite the journal with only the pending records and empty `delivered`, so the
        spool does not grow forever. Crash-safe: each file is replaced whole (journal first),
        and any moment's pair of files means the same pending set. Waits for a running
        delivery."""
        with self._delivery_lock, self._lock:
            self._check_open("compact")
            lines = [os.pread(self._journal_fd, s.length, s.offset) for s in self._pending.values()]
            replace_file(self.directory / JOURNAL, b"".join(lines))  # fsync'd whole
            self._unsynced = False
            os.close(self._journal_fd)
            self._journal_fd = open_append(self.directory / JOURNAL)
            offset = 0
            for record_id, line in zip(self._pending, lines):
                self._pending[record_id] = _Slot(offset, len(line))
                offset += len(line)
            self._journal_size = offset
            replace_file(self.directory / DELIVERED, b"")
            os.close(self._delivered_fd)
            self._delivered_fd = open_append(self.directory / DELIVERED)
            self._delivered_size = 0

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise InputError(
                f"{action}() was called on the spool {self.directory} after close(). "
                f"Open a new Spool on that directory (pending records are still there)."
            )

    def _run(self) -> None:
        """The background loop: deliver, back off after failures, sleep when drained."""
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()  # before looking, so that an append from now on wakes us
            try:
                attempt = self._deliver_oldest(None)
            except Exception as error:  # never let the thread die
                attempt = _Attempt(None, error)
            if attempt.error is None:
                if failures:
                    self._logger.info(
                        "gradwatch spool %s: delivering again after %d failed attempts",
                        self.directory, failures,
                    )
                failures = 0
                if attempt.record_id is None:
                    self._compact_if_due()
                    self._wake.wait()
                continue
            failures += 1
            delay = self._backoff(failures)
            self._log_failure(attempt, failures, delay)
            self._sleep(delay)
            if not self._stop.is_set():
                self._interrupt.clear()  # a drain() cuts one wait short, not every one

    def _deliver_oldest(self, timeout: float | None) -> _Attempt:
        """Deliver the oldest pending record and mark it, holding the delivery lock."""
        if not self._delivery_lock.acquire(timeout=-1 if timeout is None else timeout):
            return _Attempt(None)
        try:
            with self._lock:
                if self._closed or not self._pending:
                    return _Attempt(None)
                record_id, slot = next(iter(self._pending.items()))
                payload = self._read(slot)["payload"]
            self._sync_journal()  # a record reaches the disk before it reaches the receiver
            try:
                self._deliver(payload)
            except RejectedRecord as error:
                self._reject(record_id, slot, error)
            except Exception as error:
                with self._lock:
                    self._attempts[record_id] = self._attempts.get(record_id, 0) + 1
                    self._last_error = _describe(error)
                return _Attempt(record_id, error)
            with self._lock:
                mark = f"{record_id}\n".encode("ascii")
                try:
                    write_all(self._delivered_fd, mark)
                    os.fsync(self._delivered_fd)
                except OSError as error:  # delivered, but it will be delivered again
                    truncate_quietly(self._delivered_fd, self._delivered_size)
                    return _Attempt(record_id, error)
                self._delivered_size += len(mark)
                del self._pending[record_id]
                self._attempts.pop(record_id, None)
            return _Attempt(record_id)
        finally:
            if self._closed:  # close() gave up waiting for this delivery, or is waiting
                self._release()
            self._delivery_lock.release()

    def _sync_journal(self) -> None:
        """fsync what `append` wrote (called holding the delivery lock, which keeps the
        journal's descriptor open: compact and release take that lock too). The append lock is
        not held meanwhile, so the training thread's next append does not wait for the disk."""
        with self._lock:
            if not self._unsynced or self._released:
                return
            self._unsynced = False
        try:
            os.fsync(self._journal_fd)
        except OSError as error:  # the record is still readable: delivering it is its best chance
            with self._lock:
                self._unsynced = True
            self._logger.warning("gradwatch spool %s: could not fsync the journal: %s",
                                 self.directory, error)

    def _reject(self, record_id: str, slot: _Slot, error: RejectedRecord) -> None:
        """Keep a record the receiver refuses for good in rejected.jsonl; it then counts as
        handled, so the records behind it are delivered."""
        with self._lock:
            envelope = self._read(slot)
        line = json.dumps({**envelope, "rejected": str(error)}, separators=(",", ":")) + "\n"
        with open(self.directory / REJECTED, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._logger.error(
            "gradwatch spool %s: the receiver refuses record %s for good (%s); it is kept in %s "
            "and the records after it go on", self.directory, record_id, error, REJECTED,
        )

    def _backoff(self, failures: int) -> float:
        # delay = initial · 2^(failures − 1), capped; the exponent cap keeps floats finite.
        return min(self._backoff_max, self._backoff_initial * 2.0 ** min(failures - 1, 62))

    def _log_failure(self, attempt: _Attempt, failures: int, delay: float) -> None:
        # The payload is never logged: it can be large and hold the user's params.
        level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
        self._logger.log(
            level,
            "gradwatch spool %s: delivery of record %s failed (%d in a row; next try in "
            "%g s; the record stays on disk): %s",
            self.directory, attempt.record_id or "(unknown)", failures, delay,
            _describe(attempt.error) if attempt.error is not None else "",
        )

    def _compact_if_due(self) -> None:
        with self._lock:
            due = not self._pending and self._journal_size >= self._compact_after_bytes
            due = due and not self._closed
        if due:
            try:
                self.compact()
            except Exception as error:  # opportunistic (closing? disk full?): next drain
                self._logger.warning(
                    "gradwatch spool %s: compaction failed: %s", self.directory, _describe(error)
                )

    def _read(self, slot: _Slot) -> Envelope:
        envelope: Envelope = json.loads(os.pread(self._journal_fd, slot.length, slot.offset))
        return envelope

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            try:
                if self._unsynced:
                    with contextlib.suppress(OSError):
                        os.fsync(self._journal_fd)
                    self._unsynced = False
                if self._remove_when_delivered and not self._pending:
                    self._remove_folder()  # while the flock is still ours
            finally:
                for fd in (self._journal_fd, self._delivered_fd, self._lock_fd):
                    os.close(fd)

    def _remove_folder(self) -> None:
        """Delete the spool's folder: called under `_lock`, with the flock held and nothing
        pending. Anything rejected, or a file the spool did not write, keeps it."""
        try:
            rejected = count_lines(self.directory / REJECTED)
            if rejected:
                self._logger.warning(
                    "gradwatch spool %s: kept: %d record(s) the receiver refused are in %s; "
                    "inspect them, then delete the folder", self.directory, rejected, REJECTED,
                )
                return
            unknown = set(os.listdir(self.directory)) - set(_REMOVAL_ORDER)
            if unknown:
                self._logger.info("gradwatch spool %s: kept: it holds files gradwatch did not "
                                  "write (%s)", self.directory, ", ".join(sorted(unknown)))
                return
            for name in _REMOVAL_ORDER:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                if name == JOURNAL:  # the journal's removal is durable before the rest goes
                    fsync_directory(self.directory)
        except OSError as error:  # nothing pending: whatever is left loses nothing
            self._logger.warning("gradwatch spool %s: could not remove the delivered spool: %s",
                                 self.directory, _describe(error))
            return
        try:
            os.rmdir(self.directory)
            self._removed = True
        except OSError:
            # Another process made a new lock here the moment ours was unlinked (the folder is
            # its spool from then on), or the folder is gone already: either way, not ours.
            self._logger.debug("gradwatch spool %s: not removed, in use again", self.directory)

    def _load(self) -> None:
        """Read both files once: the pending ids and where their lines lie."""
        delivered = {
            line.decode("ascii")
            for _, line in self._scan(DELIVERED, self._delivered_fd)
            if _is_record_id(line)
        }
        for offset, line in self._scan(JOURNAL, self._journal_fd):
            record_id = envelope_id(line)
            if record_id is None:
                self._logger.warning(
                    "gradwatch spool %s: skipped a torn or corrupt line at byte %d of %s",
                    self.directory, offset, JOURNAL,
                )
            elif record_id not in delivered and record_id not in self._pending:
                self._pending[record_id] = _Slot(offset, len(line) + 1)
        self._journal_size = os.fstat(self._journal_fd).st_size
        self._delivered_size = os.fstat(self._delivered_fd).st_size

    def _scan(self, name: str, fd: int) -> Iterator[tuple[int, bytes]]:
        """(offset, line without its newline) for each non-empty line of a file. A torn last
        line gets its newline, so that the next append starts on a line of its own."""
        offset = 0
        with open(self.directory / name, "rb") as reader:
            for line in reader:
                if not line.endswith(b"\n"):
                    self._logger.warning(
                        "gradwatch spool %s: the last line of %s is torn (a crash mid-write?)",
                        self.directory, name,
                    )
                    write_all(fd, b"\n")
                    os.fsync(fd)
                    line += b"\n"
                if len(line) > 1:
                    yield offset, line[:-1]
                offset += len(line)


# -- files -----------------------------------------------------------------------------------


def _validate_settings(
    deliver: object, backoff_initial: float, backoff_max: float, compact_after_bytes: int
) -> None:
    if not callable(deliver):
        raise ConfigError(
            f"deliver must be a callable taking one payload dict, got {type(deliver).__name__}."
        )
    if not (isinstance(backoff_initial, (int, float)) and 0 < backoff_initial < math.inf):
        raise ConfigError(
            f"backoff_initial must be a finite number of seconds > 0 (default 1.0), "
            f"got {backoff_initial!r}."
        )
    if not (isinstance(backoff_max, (int, float)) and backoff_initial <= backoff_max < math.inf):
        raise ConfigError(
            f"backoff_max must be finite and ≥ backoff_initial={backoff_initial!r} "
            f"(default 60.0), got {backoff_max!r}."
        )
    if isinstance(compact_after_bytes, bool) or not isinstance(compact_after_bytes, int) or (
        compact_after_bytes < 0
    ):
        raise ConfigError(
            f"compact_after_bytes must be an int ≥ 0 (default 1 MiB), got {compact_after_bytes!r}."
        )


def _lock_folder(directory: Path) -> int:
    """Make the spool's folder and take its lock. The folder's last owner may delete it (all
    delivered) between our mkdir and our open of the lock: then make it again."""
    attempts = 3
    for attempt in range(attempts):
        try:
            _make_directory(directory)
            return acquire_pid_lock(directory / LOCK,
                                    lambda pid: SpoolLockedError(directory, pid))
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _make_directory(directory: Path) -> Path:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:  # what is there is not a directory, or no longer there at all
        if os.path.lexists(directory) and not directory.is_dir():
            raise ConfigError(
                f"directory must be a directory for the spool, got {directory}, which is a "
                f"file. Pass another path or set GRADWATCH_SPOOL_DIR."
            ) from None
        if not directory.is_dir():  # a folder, removed the moment after: `_lock_folder` retries
            raise FileNotFoundError(errno.ENOENT, "spool folder removed meanwhile",
                                    str(directory)) from None
    return directory


def _encode(envelope: Envelope) -> bytes:
    try:
        line = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as error:  # UnicodeEncodeError (lone surrogates) included
        raise InputError(
            f"payload must be JSON-serialisable (dicts with str keys, lists, str, int, float, "
            f"bool, None), got {type(error).__name__}: {error}. Convert numpy values with "
            f"float() or .tolist()."
        ) from error
    return line + b"\n"


def _is_record_id(token: bytes) -> bool:
    return len(token) == _ID_LENGTH and all(c in b"0123456789abcdef" for c in token)


def envelope_id(line: bytes) -> str | None:
    """The id of a well-formed envelope line, None for a torn or corrupt one."""
    try:
        envelope = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), dict):
        return None
    record_id = envelope.get("id")
    if not isinstance(record_id, str) or not _is_record_id(record_id.encode("ascii", "replace")):
        return None
    return record_id


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."
