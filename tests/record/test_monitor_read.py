"""The monitor's MLflow reader against a real `mlflow server`: runs found across pages and
experiments (error checks with a NaN distance included), every check since the cursor read by
step (an alert that fired and resolved between two polls is seen), and idle runs cost no call."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

import gradwatch
from gradwatch import ConfigError
from gradwatch.record.layout import layer_metric_keys
from gradwatch.record.reader import (
    CheckPoint,
    Cursor,
    MonitoredRun,
    bulk_histories,
    find_runs,
    read_new_checks,
)
from gradwatch.record.writer import check_payload, deliver_payload, params_payload
from tests.support.classic_net import backward, forward, make_problem
from tests.support.mlflow_runs import T0_MS, CountingClient, log_check, new_experiment, new_run
from tests.support.mlflow_server import MlflowServer


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


def the_run(runs: list[MonitoredRun], run_id: str) -> MonitoredRun:
    (found,) = [run for run in runs if run.run_id == run_id]
    return found


# -- find_runs ----------------------------------------------------------------------------------


def test_pages_are_followed_to_the_end_and_each_run_comes_once(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_ids = [new_run(client, experiment_id, name=f"run-{i}") for i in range(7)]
    new_run(client, experiment_id, name="no-gradwatch", every=None)  # not ours: left out
    counting = CountingClient(client)
    runs = find_runs(counting, [experiment_id], page_size=3)
    assert [run.run_id for run in runs] == run_ids  # oldest first
    assert counting.calls["search_runs"] == 3  # 3 + 3 + 1
    assert runs[0].name == "run-0" and runs[0].every == "10"
    assert runs[0].params["gradwatch.threshold.alert"] == "0.001"
    assert runs[0].status == "RUNNING" and runs[0].start_time_ms is not None
    assert runs[0].last_step is None and runs[0].gradwatch_status is None  # no check yet


def test_experiments_by_name_and_by_id_together(client: MlflowClient) -> None:
    name_a, id_a = new_experiment(client)
    _, id_b = new_experiment(client)
    run_a, run_b = new_run(client, id_a), new_run(client, id_b)
    runs = find_runs(client, [name_a, id_b, id_a])  # id_a twice: still once
    assert sorted(run.run_id for run in runs) == sorted([run_a, run_b])
    assert the_run(runs, run_a).experiment_id == id_a


def test_an_unknown_experiment_is_named_in_the_error(client: MlflowClient) -> None:
    name, _ = new_experiment(client)
    with pytest.raises(ConfigError, match=r"'no-such-experiment', '987654321'.*known: "):
        find_runs(client, [name, "no-such-experiment", "987654321"])
    with pytest.raises(ConfigError, match="list of names or ids"):
        find_runs(client, name)


def test_tag_filter_keeps_only_matching_runs(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    ours = new_run(client, experiment_id, tags={"team": "vision", "owner": "o'brien"})
    new_run(client, experiment_id, tags={"team": "nlp"})
    new_run(client, experiment_id)
    runs = find_runs(client, [experiment_id], tag_filter={"team": "vision", "owner": "o'brien"})
    assert [run.run_id for run in runs] == [ours]


def test_a_run_whose_latest_check_is_an_error_is_found_and_read(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_id = new_run(client, experiment_id)
    log_check(client, run_id, 10, 1e-9, "ok", layers={"w": 1e-9})
    log_check(client, run_id, 20, math.nan, "error", layers={"w": math.nan},
              max_element_error=1.7976931348623157e308)  # the record's ±inf
    # the metric filter the issue warns about drops exactly this run: NaN fails `>= 0`
    assert not client.search_runs([experiment_id], "metrics.`gradwatch/rel_distance` >= 0")
    (run,) = find_runs(client, [experiment_id])
    assert (run.run_id, run.last_step, run.gradwatch_status) == (run_id, 20, "error")
    assert run.layer_keys == ("gradwatch/layer/w",)
    checks, cursor = read_new_checks(client, run, None)
    assert [check.step for check in checks] == [10, 20]
    error = checks[1]
    assert math.isnan(error.rel_distance) and math.isnan(error.layers["gradwatch/layer/w"])
    assert error.verdict == 3 and error.verdict_word == "error"
    assert error.max_element_error == math.inf
    assert (cursor.run_id, cursor.last_step, cursor.last_check_at) == (
        run_id, 20, (T0_MS + 20_000) / 1000)


# -- read_new_checks ----------------------------------------------------------------------------


def test_an_alert_that_fired_and_resolved_between_polls_is_seen(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_id = new_run(client, experiment_id)
    log_check(client, run_id, 10, 1e-9, "ok", layers={"a": 1e-9, "b": 1e-9})
    (run,) = find_runs(client, [experiment_id])
    checks, cursor = read_new_checks(client, run, None)
    assert [check.step for check in checks] == [10]

    log_check(client, run_id, 20, 0.5, "alert", layers={"a": 1e-9, "b": 0.5})
    log_check(client, run_id, 30, 1e-9, "ok", layers={"a": 1e-9})  # b not checked this time
    (run,) = find_runs(client, [experiment_id])
    assert run.gradwatch_status == "ok"  # the latest values alone would show nothing
    checks, cursor = read_new_checks(client, run, cursor)
    assert checks == [
        CheckPoint(20, T0_MS + 20_000, 0.5, 2, 1e-9,
                   {"gradwatch/layer/a": 1e-9, "gradwatch/layer/b": 0.5}),
        CheckPoint(30, T0_MS + 30_000, 1e-9, 0, 1e-9, {"gradwatch/layer/a": 1e-9}),
    ]
    assert cursor.last_step == 30


def test_the_cursor_skips_checks_already_read(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_id = new_run(client, experiment_id)
    for step in (10, 20, 30, 40):
        log_check(client, run_id, step, step * 1e-9, "ok")
    (run,) = find_runs(client, [experiment_id])
    checks, cursor = read_new_checks(client, run, Cursor(run_id, last_step=20, polled_at=5.0))
    assert [check.step for check in checks] == [30, 40]
    assert (cursor.last_step, cursor.polled_at) == (40, 5.0)  # polled_at is the caller's
    # by run id (one get_run first), from a cursor in between
    checks, _ = read_new_checks(client, run_id, Cursor(run_id, last_step=35))
    assert [check.step for check in checks] == [40]
    with pytest.raises(ConfigError, match="cursor is for run"):
        read_new_checks(client, run, Cursor("another-run"))


def test_a_run_with_no_new_check_costs_no_call(client: MlflowClient) -> None:
    _, experiment_id = new_experiment(client)
    run_id = new_run(client, experiment_id)
    log_check(client, run_id, 10, 1e-9, "ok", layers={"a": 1e-9, "b": 1e-9})
    (run,) = find_runs(client, [experiment_id])
    counting = CountingClient(client)
    checks, cursor = read_new_checks(counting, run, None)
    assert len(checks) == 1
    assert counting.calls == {"get_metric_history": 5}  # rel_distance, verdict, max, 2 layers

    counting.calls.clear()
    (run,) = find_runs(counting, [experiment_id])
    assert read_new_checks(counting, run, cursor) == ([], cursor)
    assert "get_metric_history" not in counting.calls and "get_run" not in counting.calls
    assert counting.calls["search_runs"] == 1


def test_checks_above_the_last_step_tag_wait_for_it(client: MlflowClient) -> None:
    """The tag is the record's high-water mark: a check whose tag has not landed is read at
    the next poll, whole. A run written without the tag at all is read without a bound."""
    _, experiment_id = new_experiment(client)
    run_id = new_run(client, experiment_id)
    log_check(client, run_id, 10, 1e-9, "ok")
    (run,) = find_runs(client, [experiment_id])
    log_check(client, run_id, 20, 0.5, "alert", last_step_tag=False)  # after the search
    checks, cursor = read_new_checks(client, run, None)
    assert [check.step for check in checks] == [10]

    _, other = new_experiment(client)
    untagged = new_run(client, other)
    log_check(client, untagged, 10, 1e-9, "ok", last_step_tag=False)
    (run,) = find_runs(client, [other])
    assert run.last_step is None
    checks, cursor = read_new_checks(client, run, None)
    assert [check.step for check in checks] == [10]
    assert read_new_checks(client, run, cursor)[0] == []


def test_the_records_gradwatch_writes_read_back_exactly(client: MlflowClient) -> None:
    """Written by the real record helpers from a real CheckReport (an alerting one)."""
    _, experiment_id = new_experiment(client)
    run_id = new_run(client, experiment_id, every=None)
    deliver_payload(params_payload({"gradwatch.every": 100}, run_id=run_id, tracking_uri=None),
                    client)
    params, x, y = make_problem()
    _, cache = forward(x, y, params)
    grads = backward(x, y, params, cache, buggy=True)
    report = gradwatch.check(lambda p: forward(x, y, p)[0], params, grads)
    assert report.verdict == "alert"
    deliver_payload(check_payload(report, step=100, timestamp_ms=T0_MS, run_id=run_id,
                                  tracking_uri=None, alert="firing"), client)
    (run,) = find_runs(client, [experiment_id])
    keys = layer_metric_keys(report.layers)
    assert set(run.layer_keys) == set(keys.values())
    (check,), _ = read_new_checks(client, run, None)
    assert (check.step, check.timestamp_ms, check.verdict_word) == (100, T0_MS, "alert")
    assert check.rel_distance == report.rel_distance
    assert check.layers == {keys[name]: layer.rel_distance for name, layer in report.layers.items()}


# -- bulk reads -------------------------------------------------------------------------------


def write_varied_runs(client: MlflowClient, experiment_id: str, count: int) -> list[str]:
    """Runs with different layers, values (NaN, ±inf, an error check) and numbers of checks."""
    run_ids = []
    for i in range(count):
        run_id = new_run(client, experiment_id, name=f"bulk-{i}")
        for step in range(10, 10 * (2 + i % 3) + 1, 10):
            layers = {"shared.w": 1e-9 * step, f"own{i}.w": 1e-8}
            if i == 1 and step == 20:
                layers["shared.w"] = math.inf
            verdict, distance = ("error", math.nan) if i == 2 and step == 10 else ("ok", 1e-9)
            log_check(client, run_id, step, distance, verdict, layers=layers)
        run_ids.append(run_id)
    new_run(client, experiment_id, name="no-check-yet")  # no history to read: no call
    return run_ids


def test_bulk_reads_give_the_same_checks_with_one_call_per_key(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradwatch.record import reader as _monitor_read

    _, experiment_id = new_experiment(client)
    write_varied_runs(client, experiment_id, 6)
    runs = find_runs(client, [experiment_id])
    one_by_one = {run.run_id: read_new_checks(client, run, None) for run in runs}
    counting = CountingClient(client)
    histories = bulk_histories(counting, runs)
    assert histories is not None and counting.calls["get_metric_history"] == 0
    bulk = {run.run_id: read_new_checks(counting, run, None, histories=histories[run.run_id])
            for run in runs}
    assert counting.calls["get_metric_history"] == 0
    assert repr(bulk) == repr(one_by_one)  # NaN != NaN: compare the text
    assert any(math.isinf(v) for checks, _ in bulk.values() for c in checks
               for v in c.layers.values())
    # batches of 2 runs, and answers cut at 5 points: split until nothing is cut off
    monkeypatch.setattr(_monitor_read, "BULK_RUNS", 2)
    monkeypatch.setattr(_monitor_read, "BULK_RESULTS", 5)
    small = bulk_histories(client, runs)
    assert small is not None
    assert repr({run.run_id: read_new_checks(client, run, None, histories=small[run.run_id])
                 for run in runs}) == repr(one_by_one)


def test_a_run_without_any_check_costs_no_call_and_a_local_store_has_no_bulk(
    client: MlflowClient, tmp_path: Path
) -> None:
    _, experiment_id = new_experiment(client)
    new_run(client, experiment_id)
    (run,) = find_runs(client, [experiment_id])
    counting = CountingClient(client)
    assert read_new_checks(counting, run, None)[0] == []
    assert counting.calls["get_metric_history"] == 0
    local = MlflowClient(f"sqlite:///{tmp_path / 'local.db'}")
    assert bulk_histories(local, [run]) is None


# -- the training-kernels measurement -----------------------------------------------------------


def test_the_training_kernels_measurement_reads_back_per_check(client: MlflowClient) -> None:
    """Real reports by the real writer: a check whose custom op is wrong outside float64, a
    clean one, one whose kernels measurement failed; a run without the measurement reads as
    before (no precision key, no extra call)."""
    from gradwatch.record.layout import PRECISION_LAYER_PREFIX, PRECISION_RATIO, PRECISION_VERDICT
    from tests.record.kernel_runs import BEFORE_OP, kernel_error_report, kernel_report
    from tests.support.dashboard_runs import write_run

    _, experiment_id = new_experiment(client)
    faulty, clean, failed = (kernel_report(faulty=True), kernel_report(faulty=False),
                             kernel_error_report())
    run_id = write_run(client, experiment_id, [(10, faulty), (20, clean), (30, failed)])
    plain = new_run(client, experiment_id)
    log_check(client, plain, 10, 1e-9, "ok", layers={"w": 1e-9})
    runs = find_runs(client, [experiment_id])
    run = the_run(runs, run_id)
    assert faulty.kernels is not None
    keys = layer_metric_keys(faulty.kernels.layers, PRECISION_LAYER_PREFIX)
    assert run.precision_keys == (PRECISION_VERDICT, PRECISION_RATIO, *sorted(keys.values()))
    assert the_run(runs, plain).precision_keys == ()

    counting = CountingClient(client)
    checks, _ = read_new_checks(counting, run, None)
    # 3 + 4 layers, and 2 + 4 precision layers
    assert counting.calls == {"get_metric_history": 3 + 4 + 2 + 4}
    first, second, third = checks
    assert (first.verdict_word, first.precision_verdict_word) == ("alert", "alert")
    assert first.precision_ratio == faulty.kernels.ratio
    assert first.precision_layers == {keys[name]: layer.ratio
                                      for name, layer in faulty.kernels.layers.items()}
    assert {key for key, ratio in first.precision_layers.items() if ratio >= 32} == {
        keys[name] for name in BEFORE_OP}
    assert max(first.layers.values()) < 1e-6  # the definition is clean: the kernels alerted
    assert (second.verdict_word, second.precision_verdict_word) == ("ok", "ok")
    assert second.precision_ratio is not None and second.precision_ratio < 8
    # the failed measurement: its own "error", folded into the verdict; no ratio logged
    assert (third.verdict_word, third.precision_verdict_word) == ("error", "error")
    assert (third.precision_ratio, third.precision_layers) == (None, {})
    assert math.isfinite(third.rel_distance)  # the central differences ran

    counting.calls.clear()
    (plain_check,), _ = read_new_checks(counting, the_run(runs, plain), None)
    assert counting.calls == {"get_metric_history": 4}
    assert (plain_check.precision_verdict, plain_check.precision_ratio,
            plain_check.precision_layers) == (None, None, {})

    # in bulk: the same checks, the precision keys included, no call per run
    counting.calls.clear()
    histories = bulk_histories(counting, runs)
    assert histories is not None and counting.calls["get_metric_history"] == 0
    bulk = read_new_checks(counting, run, None, histories=histories[run_id])[0]
    assert repr(bulk) == repr(checks) and counting.calls["get_metric_history"] == 0
