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
from gradwatch._spool import DELIVERED, JOURNAL, FlushResult, Spool, SpoolLockedError, replay
from tests.mlflow_server import MlflowServer

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


def test_a_second_process_is_refused_with_the_owner_pid(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys; from gradwatch._spool import Spool\n"
            f"spool = Spool({str(tmp_path)!r}, deliver=print)\n"
            "print('ready', flush=True); sys.stdin.read(); spool.close()",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
        with pytest.raises(SpoolLockedError, match=rf"PID {owner.pid}\b") as caught:
            Spool(tmp_path, deliver=FlakyDeliver())
        assert caught.value.pid == owner.pid and caught.value.directory == tmp_path
        with pytest.raises(SpoolLockedError):
            replay(tmp_path, FlakyDeliver(), timeout=1.0)
    finally:
        owner.communicate("", timeout=30)
    assert replay(tmp_path, FlakyDeliver(), timeout=1.0) == FlushResult(0, 0, None)


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
