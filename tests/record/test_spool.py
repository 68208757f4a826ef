"""The spool: records reach the disk before training goes on, are delivered once the tracking
server answers, survive restarts, torn writes and a second owner, and replaying them into a
real MLflow server never duplicates a point."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from gradwatch import ConfigError, GradwatchError, InputError
from gradwatch.record.replay import SpoolState, peek, replay, replay_all
from gradwatch.record.spool import (
    DELIVERED,
    JOURNAL,
    LOCK,
    REJECTED,
    FlushResult,
    RejectedRecord,
    Spool,
    SpoolLockedError,
)
from tests.support.mlflow_server import MlflowServer

T0 = 1_700_000_000.0  # a fixed "now" for the injected clock


class FlakyDeliver:
    """Fails the first `failures` calls, then records what it is given."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.received: list[dict[str, Any]] = []
        self.done = threading.Event()

    def __call__(self, payload: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"tracking server down (call {self.calls})")
        self.received.append(payload)
        self.done.set()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# -- the journal --------------------------------------------------------------------------------


def test_append_pending_flush_delivered_round_trip(tmp_path: Path) -> None:
    deliver = FlakyDeliver()
    with Spool(tmp_path, deliver=deliver, clock=lambda: T0) as spool:
        first = spool.append({"step": 1, "loss": math.nan, "text": "é ✓\nnewline"})
        second = spool.append({"step": 2})
        envelopes = [json.loads(line) for line in _lines(tmp_path / JOURNAL)]
        assert [e["id"] for e in envelopes] == [first, second]
        assert envelopes[1] == {"id": second, "created": T0, "payload": {"step": 2}}
        assert [(e["id"], e["attempts"]) for e in spool.pending()] == [(first, 0), (second, 0)]

        assert spool.flush(timeout=5.0) == FlushResult(delivered=2, pending=0, last_error=None)
        assert [p["step"] for p in deliver.received] == [1, 2]
        assert math.isnan(deliver.received[0]["loss"])
        assert deliver.received[0]["text"] == "é ✓\nnewline"
        assert _lines(tmp_path / DELIVERED) == [first, second]
        assert spool.pending() == []
    with Spool(tmp_path, deliver=deliver) as reopened:
        assert reopened.pending() == []


def test_torn_last_lines_are_skipped_and_later_appends_stay_intact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def deliver_step_1_only(payload: dict[str, Any]) -> None:
        if payload["step"] != 1:
            raise ConnectionError("tracking server down")

    with Spool(tmp_path, deliver=deliver_step_1_only) as spool:
        spool.append({"step": 1})
        undelivered = spool.append({"step": 2})
        assert spool.flush(timeout=5.0).delivered == 1
    with open(tmp_path / JOURNAL, "ab") as journal:
        journal.write(b'{"id":"0123456789abcdef0123456789abcdef","created":1.0,"payl')
    with open(tmp_path / DELIVERED, "ab") as marks:
        marks.write(undelivered[:10].encode())  # a torn mark: it must not count

    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        spool = Spool(tmp_path, deliver=FlakyDeliver())
    assert "torn" in caplog.text
    assert [e["id"] for e in spool.pending()] == [undelivered]
    later = spool.append({"step": 3})
    spool.close()
    with Spool(tmp_path, deliver=FlakyDeliver()) as reopened:
        assert [e["payload"]["step"] for e in reopened.pending()] == [2, 3]
        assert reopened.pending()[1]["id"] == later


def test_a_new_spool_delivers_what_the_last_one_left(tmp_path: Path) -> None:
    with Spool(tmp_path, deliver=FlakyDeliver(failures=100)) as crashed:
        ids = [crashed.append({"step": step}) for step in range(3)]
        result = crashed.flush(timeout=5.0)
    assert result == FlushResult(0, 3, "ConnectionError: tracking server down (call 1)")

    deliver = FlakyDeliver()
    with Spool(tmp_path, deliver=deliver) as spool:
        assert [e["id"] for e in spool.pending()] == ids
        assert spool.flush(timeout=5.0) == FlushResult(3, 0, None)
    assert [p["step"] for p in deliver.received] == [0, 1, 2]


def test_a_process_that_dies_right_after_appending_loses_nothing(tmp_path: Path) -> None:
    # append() writes before it returns and leaves the fsync to the deliverer (the training
    # thread does not wait for the disk): a process killed at once still left its records
    # with the kernel. This one exits without close(), without a deliverer, without fsync.
    script = (
        "import os, sys\n"
        "from gradwatch.record.spool import Spool\n"
        "spool = Spool(sys.argv[1], deliver=lambda payload: None)\n"
        "spool.append({'step': 1})\n"
        "spool.append_many([{'step': 2}, {'step': 3}])\n"
        "spool.append({'step': 4}, sync=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60)
    assert done.returncode == 0
    deliver = FlakyDeliver()
    with Spool(tmp_path, deliver=deliver) as spool:
        assert spool.flush(timeout=5.0) == FlushResult(4, 0, None)
    assert [p["step"] for p in deliver.received] == [1, 2, 3, 4]


def test_compaction_keeps_pending_records(tmp_path: Path) -> None:
    received: list[int] = []
    server_up = True

    def deliver(payload: dict[str, Any]) -> None:
        if payload["step"] >= 3 and not server_up:
            raise ConnectionError("tracking server down")
        received.append(payload["step"])

    server_up = False
    with Spool(tmp_path, deliver=deliver) as spool:
        ids = [spool.append({"step": step}) for step in range(5)]
        assert spool.flush(timeout=5.0).delivered == 3
        spool.compact()
        assert [json.loads(line)["id"] for line in _lines(tmp_path / JOURNAL)] == ids[3:]
        assert (tmp_path / DELIVERED).read_bytes() == b""
        assert [e["payload"]["step"] for e in spool.pending()] == [3, 4]
        newest = spool.append({"step": 5})  # offsets after the rewrite are right
    server_up = True
    with Spool(tmp_path, deliver=deliver) as spool:
        assert [e["id"] for e in spool.pending()] == [*ids[3:], newest]
        assert spool.flush(timeout=5.0).delivered == 3
    assert received == [0, 1, 2, 3, 4, 5]


def test_a_full_drain_compacts_once_the_journal_is_big_enough(tmp_path: Path) -> None:
    with Spool(tmp_path, deliver=FlakyDeliver(), compact_after_bytes=100) as spool:
        spool.append({"step": 1})
        spool.flush(timeout=5.0)
        assert (tmp_path / JOURNAL).stat().st_size > 0  # under 100 bytes: left alone
        spool.append({"padding": "x" * 100})
        spool.flush(timeout=5.0)
        assert (tmp_path / JOURNAL).stat().st_size == 0
        assert (tmp_path / DELIVERED).stat().st_size == 0


# -- delivery in the background ------------------------------------------------------------------


def test_background_retries_with_exponential_backoff_and_logs_no_payload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deliver = FlakyDeliver(failures=5)
    delays: list[float] = []
    spool = Spool(
        tmp_path, deliver=deliver, sleep=delays.append, backoff_initial=1.0, backoff_max=10.0
    )
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        spool.start()
        spool.append({"secret": "hunter2"})
        assert deliver.done.wait(10.0)
        spool.close()
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0]  # 1 · 2ⁿ, capped at backoff_max
    assert deliver.received == [{"secret": "hunter2"}]
    assert "ConnectionError: tracking server down (call 1)" in caplog.text
    assert "after 5 failed attempts" in caplog.text
    assert "hunter2" not in caplog.text


def test_flush_and_background_never_deliver_a_record_twice(tmp_path: Path) -> None:
    in_flight: set[str] = set()
    overlaps: list[str] = []
    successes: Counter[str] = Counter()
    guard = threading.Lock()
    rng = random.Random(0)

    def deliver(payload: dict[str, Any]) -> None:
        with guard:
            if payload["key"] in in_flight:
                overlaps.append(payload["key"])
            in_flight.add(payload["key"])
            fail = rng.random() < 0.2
        time.sleep(0.001)
        with guard:
            in_flight.discard(payload["key"])
            if not fail:
                successes[payload["key"]] += 1
        if fail:
            raise TimeoutError("flaky")

    spool = Spool(tmp_path, deliver=deliver, backoff_initial=0.001, backoff_max=0.002)
    spool.start()
    stop = threading.Event()

    def flush_repeatedly() -> None:
        while not stop.is_set():
            spool.flush(timeout=1.0)

    flusher = threading.Thread(target=flush_repeatedly)
    flusher.start()
    keys = [f"record-{number}" for number in range(60)]
    for key in keys:
        spool.append({"key": key})
    _wait_for(lambda: sum(successes.values()) >= len(keys))
    stop.set()
    flusher.join()
    spool.close()
    assert overlaps == []
    assert successes == Counter(keys)  # every record exactly once


def test_append_never_waits_for_a_hung_delivery_and_close_keeps_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    started = threading.Event()

    def hung_deliver(payload: dict[str, Any]) -> None:
        started.set()
        release.wait(30.0)

    spool = Spool(tmp_path, deliver=hung_deliver)
    spool.start()
    spool.append({"step": 1})
    assert started.wait(5.0)
    began = time.monotonic()
    spool.append({"step": 2})
    assert time.monotonic() - began < 1.0
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        spool.close(timeout=0.1)
    assert "still running" in caplog.text
    with pytest.raises(SpoolLockedError):  # the hung delivery may still finish: no one else
        Spool(tmp_path, deliver=hung_deliver)
    release.set()
    deliver = FlakyDeliver()
    spool_after: list[Spool] = []

    def reopen() -> bool:
        try:
            spool_after.append(Spool(tmp_path, deliver=deliver))
        except SpoolLockedError:
            return False
        return True

    _wait_for(reopen)
    with spool_after[0] as reopened:  # the first record's mark made it, the second is left
        assert [e["payload"] for e in reopened.pending()] == [{"step": 2}]


# -- ownership ---------------------------------------------------------------------------------


def test_a_second_spool_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path, deliver=FlakyDeliver()):
        with pytest.raises(SpoolLockedError) as caught:
            Spool(tmp_path, deliver=FlakyDeliver())
        message = str(caught.value)
        assert str(tmp_path) in message and "this process" in message
        assert "gradwatch flush" in message
        assert isinstance(caught.value, GradwatchError)
    Spool(tmp_path, deliver=FlakyDeliver()).close()  # free again once closed


def _owner(directory: Path, *steps: int) -> subprocess.Popen[str]:
    """Another live process that owns the spool at `directory`, with `steps` appended and not
    delivered; it lets go when its stdin closes."""
    owner = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys; from gradwatch.record.spool import Spool\n"
            f"spool = Spool({str(directory)!r}, deliver=print)\n"
            f"for step in {list(steps)!r}: spool.append({{'step': step}})\n"
            "print('ready', flush=True); sys.stdin.read(); spool.close()",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
    return owner


def test_a_second_process_is_refused_with_the_owner_pid(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    owner = _owner(directory)
    try:
        with pytest.raises(SpoolLockedError, match=rf"PID {owner.pid}\b") as caught:
            Spool(directory, deliver=FlakyDeliver())
        assert caught.value.pid == owner.pid and caught.value.directory == directory
        with pytest.raises(SpoolLockedError):
            replay(directory, FlakyDeliver(), timeout=1.0)
    finally:
        owner.communicate("", timeout=30)
    assert replay(directory, FlakyDeliver(), timeout=1.0) == FlushResult(0, 0, None)
    assert not directory.exists()  # its owner gone and nothing in it: removed


# -- housekeeping: a delivered folder goes, one with anything undelivered or rejected stays ------


class Refuse:
    """Refuses the records of `steps` for good (as MLflow refuses a changed param), takes the
    others."""

    def __init__(self, *steps: int) -> None:
        self.steps = steps
        self.received: list[dict[str, Any]] = []

    def __call__(self, payload: dict[str, Any]) -> None:
        if payload.get("step") in self.steps:
            raise RejectedRecord("MLflow refused it: INVALID_PARAMETER_VALUE: changed param")
        self.received.append(payload)


def test_a_spool_removes_its_folder_once_everything_is_delivered(tmp_path: Path) -> None:
    directory, deliver = tmp_path / "run-1", FlakyDeliver()
    with Spool(directory, deliver=deliver, remove_when_delivered=True) as spool:
        spool.append({"step": 1})
        spool.append({"step": 2})
        assert spool.flush(timeout=5.0) == FlushResult(2, 0, None)
        assert directory.is_dir()  # open: more records may come
    assert spool.removed and not directory.exists()
    assert [payload["step"] for payload in deliver.received] == [1, 2]

    kept = tmp_path / "kept"  # without remove_when_delivered, the files are the caller's
    with Spool(kept, deliver=FlakyDeliver()) as spool:
        spool.append({"step": 1})
        spool.flush(timeout=5.0)
    assert not spool.removed and len(_lines(kept / JOURNAL)) == 1


def test_a_folder_with_an_undelivered_record_is_kept_with_its_records(tmp_path: Path) -> None:
    directory = tmp_path / "run-1"

    def step_1_only(payload: dict[str, Any]) -> None:
        if payload["step"] != 1:
            raise ConnectionError("tracking server down")

    with Spool(directory, deliver=step_1_only, remove_when_delivered=True) as spool:
        ids = [spool.append({"step": step}) for step in (1, 2, 3)]
        assert spool.flush(timeout=5.0).pending == 2
    assert not spool.removed
    journal = (directory / JOURNAL).read_bytes()
    assert peek(directory) == SpoolState(pending=2, rejected=0)

    down = replay(directory, FlakyDeliver(failures=100), timeout=5.0)
    assert (down.delivered, down.pending) == (0, 2)
    assert down.last_error is not None and "ConnectionError" in down.last_error
    assert (directory / JOURNAL).read_bytes() == journal  # not even compacted
    with Spool(directory, deliver=FlakyDeliver()) as reopened:
        assert [e["id"] for e in reopened.pending()] == ids[1:]

    deliver = FlakyDeliver()
    assert replay(directory, deliver, timeout=5.0) == FlushResult(2, 0, None)
    assert [payload["step"] for payload in deliver.received] == [2, 3]
    assert not directory.exists()


def test_a_rejected_record_keeps_its_folder_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "run-1"
    with caplog.at_level(logging.WARNING, logger="gradwatch"), \
            Spool(directory, deliver=Refuse(2), remove_when_delivered=True) as spool:
        for step in (1, 2, 3):
            spool.append({"step": step})
        assert spool.flush(timeout=5.0) == FlushResult(3, 0, None)
    assert not spool.removed
    [kept] = [json.loads(line) for line in _lines(directory / REJECTED)]
    assert kept["payload"] == {"step": 2} and "INVALID_PARAMETER_VALUE" in kept["rejected"]
    assert f"kept: 1 record(s) the receiver refused are in {REJECTED}" in caplog.text
    assert peek(directory) == SpoolState(pending=0, rejected=1)

    # Nothing to deliver: replays leave it alone without taking its lock (held here).
    with Spool(directory, deliver=FlakyDeliver()):
        assert replay(directory, FlakyDeliver(), timeout=1.0) == FlushResult(0, 0, None)
        [result] = replay_all(tmp_path, lambda folder: FlakyDeliver(), timeout=1.0)
    assert not result.in_use and (result.rejected, result.removed) == (1, False)
    assert result.rejected_reason is not None and "changed param" in result.rejected_reason
    assert len(_lines(directory / REJECTED)) == 1


def test_a_folder_another_live_process_owns_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    owner = _owner(root / "theirs", 1, 2)
    try:
        files = {p.name: p.read_bytes() for p in (root / "theirs").iterdir()}
        deliver = FlakyDeliver()
        [result] = replay_all(root, lambda folder: deliver, timeout=5.0)
        assert result.in_use and result.owner_pid == owner.pid
        assert (result.delivered, result.pending, result.removed) == (0, 2, False)
        assert deliver.received == []
        assert {p.name: p.read_bytes() for p in (root / "theirs").iterdir()} == files
    finally:
        owner.communicate("", timeout=30)
    [result] = replay_all(root, lambda folder: deliver, timeout=5.0)  # its owner is gone
    assert (result.delivered, result.removed, result.in_use) == (2, True, False)
    assert list(root.iterdir()) == []


def test_replay_all_clears_an_afternoon_of_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    for index in range(12):  # delivered, never removed (as before housekeeping existed)
        with Spool(root / f"old-{index:02d}", deliver=FlakyDeliver()) as spool:
            spool.append({"step": index})
            spool.flush(timeout=5.0)
    with Spool(root / "pending", deliver=FlakyDeliver(failures=100)) as spool:
        spool.append({"step": 1})
    with Spool(root / "refused", deliver=Refuse(1)) as spool:
        spool.append({"step": 1})
        spool.flush(timeout=5.0)
    with Spool(root / "half-removed", deliver=FlakyDeliver()):  # a crash after its journal went
        pass
    (root / "half-removed" / JOURNAL).unlink()
    (root / "notes").mkdir()  # not a spool: never touched
    (root / "notes" / "mine.txt").write_text("keep me")

    deliver = FlakyDeliver()
    results = {r.directory.name: r for r in replay_all(root, lambda f: deliver, timeout=5.0)}
    assert "notes" not in results and len(results) == 15
    assert all(results[f"old-{i:02d}"][1:5] == (0, 0, 0, True) for i in range(12))
    assert results["pending"][1:5] == (1, 0, 0, True)
    assert results["half-removed"].removed
    refused = results["refused"]
    assert (refused.rejected, refused.rejected_now, refused.removed) == (1, 0, False)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "refused"]
    assert (root / "notes" / "mine.txt").read_text() == "keep me"
    assert {p.name for p in (root / "refused").iterdir()} == {DELIVERED, JOURNAL, LOCK, REJECTED}
    assert [payload["step"] for payload in deliver.received] == [1]


#: Another process opening a spool, stopped (by an audit hook, which runs just before the call)
#: between opening the lock file and flock-ing it, until its stdin says "go".
PAUSED_WRITER = """
import sys
from gradwatch.record.spool import Spool

paused = []

def pause_before_the_first_flock(event, args):
    if event == "fcntl.flock" and not paused:
        paused.append(True)
        print("opened", flush=True)
        sys.stdin.readline()

sys.addaudithook(pause_before_the_first_flock)
spool = Spool(sys.argv[1], deliver=print)
spool.append({"step": 7})
print("appended", flush=True)
sys.stdin.readline()
spool.close()
"""


def test_a_spool_opened_while_its_last_owner_removes_it_gets_a_live_folder(
    tmp_path: Path,
) -> None:
    """The race of housekeeping: B opens the lock file, A (all delivered) deletes the folder
    and lets go, B's flock then succeeds — on a deleted file. B must see that and lock the
    folder anew, or it would write into a folder that is gone (or that a third process owns)."""
    directory = tmp_path / "run-1"
    first = Spool(directory, deliver=FlakyDeliver(), remove_when_delivered=True)
    first.append({"step": 1})
    first.flush(timeout=5.0)
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, str(directory)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == "opened\n"  # B holds the old lock file open
        first.close()
        assert first.removed and not directory.exists()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "appended\n", writer.communicate(timeout=30)
        with pytest.raises(SpoolLockedError, match=rf"PID {writer.pid}\b"):
            Spool(directory, deliver=FlakyDeliver())  # B owns the folder's real lock
        assert peek(directory) == SpoolState(pending=1, rejected=0)
    finally:
        writer.communicate("", timeout=30)
    assert writer.returncode == 0
    deliver = FlakyDeliver()
    assert replay(directory, deliver, timeout=5.0) == FlushResult(1, 0, None)
    assert deliver.received == [{"step": 7}]


def test_opening_and_removing_a_spool_at_once_loses_nothing(tmp_path: Path) -> None:
    """A stress test of the same race: one thread replays the folder (delivers, removes it)
    over and over while another opens it and appends, as training processes and `gradwatch
    flush` may."""
    directory, stop = tmp_path / "run-1", threading.Event()
    delivered: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def remover() -> None:
        while not stop.is_set():
            try:
                replay(directory, delivered.append, timeout=5.0)
            except SpoolLockedError:
                pass
            except BaseException as error:
                errors.append(error)
                return
            time.sleep(0.0005)  # let the writer in

    thread = threading.Thread(target=remover)
    thread.start()
    written = []
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            step = len(written)
            try:
                with Spool(directory, deliver=FlakyDeliver(failures=100)) as spool:
                    spool.append({"step": step})
            except SpoolLockedError:
                continue
            written.append(step)
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    left = FlakyDeliver()
    replay(directory, left, timeout=5.0)
    assert sorted(p["step"] for p in delivered + left.received) == written
    assert len(written) > 5  # the two really took turns


# -- settings and inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backoff_initial": 0.0}, ["backoff_initial", "> 0"]),
        ({"backoff_initial": math.inf}, ["backoff_initial", "finite"]),
        ({"backoff_initial": 2.0, "backoff_max": 1.0}, ["backoff_max", "≥ backoff_initial"]),
        ({"compact_after_bytes": -1}, ["compact_after_bytes", "≥ 0"]),
        ({"deliver": "mlflow"}, ["deliver", "callable", "str"]),
    ],
)
def test_bad_settings_name_the_argument(
    tmp_path: Path, kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        Spool(tmp_path, **{"deliver": FlakyDeliver(), **kwargs})
    for word in words:
        assert word in str(caught.value)


def test_bad_payloads_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with Spool(tmp_path, deliver=FlakyDeliver()) as spool:
        with pytest.raises(InputError, match=r"JSON-serialisable.*set"):
            spool.append({"values": {1, 2}})
        with pytest.raises(InputError, match="payload must be a dict"):
            spool.append([1, 2])  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="timeout"):
            spool.flush(timeout=-1.0)
        assert (tmp_path / JOURNAL).read_bytes() == b""
    with pytest.raises(InputError, match="after close"):
        spool.append({"step": 1})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="which is a file"):
        Spool(tmp_path / "file", deliver=FlakyDeliver())


def test_replay_of_a_missing_directory_has_nothing_to_do(tmp_path: Path) -> None:
    assert replay(tmp_path / "never-created", FlakyDeliver()) == FlushResult(0, 0, None)
    assert not (tmp_path / "never-created").exists()


# -- a real MLflow server ------------------------------------------------------------------------

METRIC_KEYS = ("gradwatch/rel_error/encoder", "gradwatch/rel_error/head", "gradwatch/worst")


def deliver_to_mlflow(payload: dict[str, Any]) -> None:
    """The MLflow side of a record, as gradwatch's MLflow record module will send it."""
    client = mlflow.MlflowClient(payload["tracking_uri"])
    run_id = payload["run_id"]
    metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step
               in payload["metrics"]]  # fmt: skip
    for start in range(0, len(metrics), 1000):  # log_batch takes ≤ 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    params = [Param(key, str(value)) for key, value in payload["params"].items()]
    tags = [RunTag(key, str(value)) for key, value in payload["tags"].items()]
    for start in range(0, max(len(params), len(tags)), 100):  # ≤ 100 params and 100 tags
        client.log_batch(
            run_id, params=params[start : start + 100], tags=tags[start : start + 100]
        )
    for artifact_file, text in payload["artifacts"].items():
        client.log_text(run_id, text, artifact_file)


def _check_record(tracking_uri: str, run_id: str, step: int) -> dict[str, Any]:
    measured_ms = int(T0 * 1000) + step * 1000  # measurement time, not delivery time
    return {
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "metrics": [
            [key, step + index / 10, measured_ms, step] for index, key in enumerate(METRIC_KEYS)
        ],
        "params": {"gradwatch.mode": "auto", "gradwatch.eps": 1e-7},
        "tags": {"gradwatch.last_step": step},
        "artifacts": {f"gradwatch/checks/step-{step:09d}.json": json.dumps({"step": step})},
    }


def _assert_exactly_once(client: mlflow.MlflowClient, run_id: str, steps: range) -> None:
    for index, key in enumerate(METRIC_KEYS):
        points = client.get_metric_history(run_id, key)
        history = sorted((m.step, m.value, m.timestamp) for m in points)
        assert history == [(s, s + index / 10, int(T0 * 1000) + s * 1000) for s in steps], key
    artifacts = [a.path for a in client.list_artifacts(run_id, "gradwatch/checks")]
    assert artifacts == [f"gradwatch/checks/step-{s:09d}.json" for s in steps]
    run = client.get_run(run_id)
    assert run.data.params == {"gradwatch.mode": "auto", "gradwatch.eps": "1e-07"}
    assert run.data.tags["gradwatch.last_step"] == str(steps[-1])  # replayed in order


@pytest.mark.slow
def test_mlflow_ignores_replayed_metrics_and_refuses_changed_params(
    mlflow_server: MlflowServer,
) -> None:
    """The store facts the spool's at-least-once delivery relies on (MLflow 3.x, SQL store)."""
    client = mlflow.MlflowClient(mlflow_server.url)
    assert client.get_experiment("0").artifact_location.startswith("mlflow-artifacts:")
    run_id = client.create_run("0").info.run_id
    point = Metric("loss", 0.5, 1_000, 1)
    for tag in ("first", "second"):
        client.log_batch(run_id, metrics=[point], params=[Param("eps", "1e-07")],
                         tags=[RunTag("note", tag)])  # fmt: skip
        client.log_text(run_id, tag, "report.json")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5)]
    run = client.get_run(run_id)
    assert run.data.params == {"eps": "1e-07"} and run.data.tags["note"] == "second"
    assert Path(client.download_artifacts(run_id, "report.json")).read_text() == "second"
    client.log_batch(run_id, metrics=[Metric("loss", 0.5, 2_000, 1)])  # another timestamp
    assert len(client.get_metric_history(run_id, "loss")) == 2  # is another point
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        client.log_batch(run_id, params=[Param("eps", "1e-06")])


@pytest.mark.slow
def test_records_survive_a_server_outage_and_replays_add_no_duplicates(
    restartable_mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = restartable_mlflow_server
    client = mlflow.MlflowClient(server.url)
    run_id = client.create_run("0").info.run_id
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, deliver=deliver_to_mlflow, backoff_initial=0.2, backoff_max=0.5)
    spool.start()
    for step in range(1, 6):
        spool.append(_check_record(server.url, run_id, step))
    _wait_for(lambda: not spool.pending(), timeout=30.0)

    server.stop()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for step in range(6, 11):
            began = time.monotonic()
            spool.append(_check_record(server.url, run_id, step))
            assert time.monotonic() - began < 1.0  # training never waits on the server
        _wait_for(lambda: spool.pending()[0]["attempts"] >= 2, timeout=10.0)
    assert "delivery of record" in caplog.text and "Connection" in caplog.text
    assert len(spool.pending()) == 5

    server.start()
    result = spool.flush(timeout=60.0)
    assert (result.pending, result.last_error) == (0, None)
    spool.close()
    _assert_exactly_once(client, run_id, range(1, 11))

    # A crash lost every delivered mark: everything is delivered again, nothing doubles.
    (spool_dir / DELIVERED).unlink()
    assert replay(spool_dir, deliver_to_mlflow, timeout=60.0) == FlushResult(10, 0, None)
    _assert_exactly_once(client, run_id, range(1, 11))
    print(f"mlflow server start-up: {', '.join(f'{s:.1f} s' for s in server.startup_seconds)}")


@pytest.mark.slow
def test_a_spool_whose_run_is_not_ended_yet_is_kept_until_it_is(
    restartable_mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """A spool keyed by a local id is all delivered only once its run exists and is ended:
    the "run" record creates it, the "terminate" record, last, ends it."""
    from gradwatch.record.writer import (
        RUN_FILE,
        Deliverer,
        new_local_id,
        params_payload,
        run_payload,
        terminate_payload,
    )

    server, local_id = restartable_mlflow_server, new_local_id()
    directory = tmp_path / "spool" / local_id
    with Spool(directory, deliver=Deliverer(directory), remove_when_delivered=True) as spool:
        spool.append(run_payload(local_id=local_id, tracking_uri=server.url,
                                 experiment_name=f"housekeeping-{tmp_path.name}"))
        spool.append(params_payload({"gradwatch.every": 5}, run_id=None,
                                    tracking_uri=server.url, local_id=local_id))
        assert spool.flush(timeout=60.0) == FlushResult(2, 0, None)
        server.stop()
        spool.append(terminate_payload(run_id=None, local_id=local_id, tracking_uri=server.url))
        assert spool.flush(timeout=30.0).pending == 1
    assert not spool.removed and peek(directory) == SpoolState(pending=1, rejected=0)
    run_id = json.loads((directory / RUN_FILE).read_text())["run_id"]
    server.start()
    assert replay(directory, Deliverer(directory), timeout=60.0) == FlushResult(1, 0, None)
    assert not directory.exists()
    run = mlflow.MlflowClient(server.url).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["gradwatch.every"] == "5"
