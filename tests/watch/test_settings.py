"""Settings as objects, shorthands kept: `CheckOptions`, `RecordSettings`, `AlertSettings`
give the same checks as the keywords, a setting given both ways is refused, and a watch
records through the `Recorder` it is given (here an in-memory one)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import (
    AlertPolicy,
    AlertSettings,
    CheckOptions,
    ConfigError,
    GradientAlertError,
    GradWatch,
    MlflowRecorder,
    NullRecorder,
    Recorder,
    RecordSettings,
    Thresholds,
)
from tests.watch.test_callback_loop import loss_fn, train


def _same(first: gradwatch.CheckReport, second: gradwatch.CheckReport) -> None:
    """Two reports of the same check: everything but the timings."""
    def strip(report: gradwatch.CheckReport) -> dict[str, Any]:
        data = report.model_dump(exclude={"seconds", "evaluation_seconds"})
        data["probe"] = {k: v for k, v in data["probe"].items()
                         if "seconds" not in k and k != "batching"}
        return data

    assert strip(first) == strip(second)


def _quadratic() -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    x = np.random.default_rng(0).standard_normal((6, 4))
    params = {"W": np.random.default_rng(1).standard_normal((3, 4)),
              "b": np.zeros(3)}

    def cost(p: Mapping[str, np.ndarray]) -> float:
        return float(np.sum(np.tanh(x @ p["W"].T + p["b"]) ** 2))

    z = np.tanh(x @ params["W"].T + params["b"])
    dz = 2 * z * (1 - z**2)
    return cost, params, {"W": dz.T @ x, "b": dz.sum(0)}


# ---------------------------------------------------------------------- the same result
def test_check_options_give_what_the_shorthands_give() -> None:
    cost, params, grads = _quadratic()
    keywords = {"mode": "sample", "samples": 3, "seed": 4, "eps": 1e-6,
                "thresholds": {"warn": 1e-6, "alert": 1e-4}, "budget": 40}
    by_keywords = gradwatch.check(cost, params, grads, **keywords)
    by_object = gradwatch.check(cost, params, grads, options=CheckOptions(**keywords))
    by_dict = gradwatch.check(cost, params, grads, options=keywords)
    _same(by_keywords, by_object)
    _same(by_keywords, by_dict)
    assert by_object.mode == "sample" and by_object.eps == 1e-6
    # an object and the shorthands of other fields together
    mixed = gradwatch.check(cost, params, grads, options=CheckOptions(mode="sample", seed=4),
                            samples=3, eps=1e-6, thresholds=Thresholds(warn=1e-6, alert=1e-4),
                            budget=40)
    _same(by_keywords, mixed)


def test_numpy_check_selects_params_with_include_and_exclude() -> None:
    cost, params, grads = _quadratic()
    report = gradwatch.check(cost, params, grads, options=CheckOptions(exclude="b"))
    assert list(report.layers) == ["W"] and report.verdict == "ok"
    with pytest.raises(ConfigError, match="leave no params"):
        gradwatch.check(cost, params, grads, include="nothing*")


def test_check_module_options_give_what_the_shorthands_give() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    keywords = {"mode": "auto", "budget": 60, "eps": 1e-6, "seed": 3, "include": ["0.*"],
                "top_k": 2}
    by_keywords = gradwatch.check_module(model, batch, loss_fn, **keywords)
    by_object = gradwatch.check_module(model, batch, loss_fn, options=CheckOptions(**keywords))
    _same(by_keywords, by_object)
    assert list(by_object.layers) == ["0.weight", "0.bias"]


def test_check_jax_takes_the_same_options() -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from gradwatch.integrations.jax import check_jax

    params = {"dense": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
    x = jnp.arange(12.0).reshape(4, 3) / 10

    def loss(p: Any, x: Any) -> Any:
        return jnp.mean(jnp.tanh(x @ p["dense"]["w"] + p["dense"]["b"]) ** 2)

    by_keywords = check_jax(loss, params, x, mode="sketch", directions=2, exclude="dense/b")
    by_object = check_jax(loss, params, x,
                          options=CheckOptions(mode="sketch", directions=2, exclude="dense/b"))
    _same(by_keywords, by_object)
    assert list(by_object.layers) == ["dense/w"] and by_object.mode == "sketch"
    with pytest.raises(ConfigError, match="directions"):
        check_jax(loss, params, x, options=CheckOptions(directions=2), directions=3)


def test_each_entry_point_has_its_documented_defaults() -> None:
    options = CheckOptions()
    assert (options.settings("check").mode, options.settings("check").budget) == ("full", None)
    for entry in ("check_module", "check_jax"):
        assert (options.settings(entry).mode, options.settings(entry).budget) == ("auto", 2000)
    watch = GradWatch(mlflow=False)
    assert watch.settings.mode == "auto" and watch.adaptive is not None  # adaptive budget
    fixed = GradWatch(check=CheckOptions(budget=500), mlflow=False)
    assert fixed.adaptive is None and fixed.settings.budget == 500
    cost, params, grads = _quadratic()
    assert gradwatch.check(cost, params, grads).mode == "full"
    # None where None always meant the default
    assert CheckOptions(eps=None, thresholds=None) == CheckOptions()
    assert CheckOptions(eps=None).given == frozenset()


def test_gradwatch_objects_and_shorthands_are_the_same_watch() -> None:
    policy = AlertPolicy(fire_after=2)
    by_keywords = GradWatch(every=2, loss_fn=loss_fn, budget=300, eps=1e-6, seed=5,
                            thresholds={"warn": 1e-6, "alert": 1e-4}, include="*.weight",
                            on_alert="stop", alert_policy=policy, mlflow=False,
                            report_every=3)
    by_objects = GradWatch(
        2, loss_fn=loss_fn,
        check=CheckOptions(budget=300, eps=1e-6, seed=5,
                           thresholds={"warn": 1e-6, "alert": 1e-4}, include="*.weight"),
        alerts=AlertSettings(on_alert="stop", policy=policy),
        record=RecordSettings(enabled=False, report_every=3),
    )
    assert repr(by_keywords) == repr(by_objects)
    assert by_keywords.params() == by_objects.params()
    assert by_keywords.settings == by_objects.settings
    assert by_keywords.alerts == by_objects.alerts
    assert by_keywords.options == by_objects.options
    assert isinstance(by_keywords.recorder, NullRecorder)
    assert isinstance(by_objects.recorder, NullRecorder)
    results = []
    for watch in (by_keywords, by_objects):
        _, reports = train(watch, 12, wrong_between=(4, 12))
        results.append([(r.probe["step"], r.verdict, sorted(r.layers)) for r in reports])
        assert watch.should_stop  # on_alert="stop" after fire_after=2 alerting checks
    assert results[0] == results[1]
    assert all(layers == ["0.weight", "3.weight"] for _, _, layers in results[0])


def test_gradwatch_record_settings_build_the_mlflow_recorder(tmp_path: Any) -> None:
    watch = GradWatch(record=RecordSettings(tracking_uri="http://127.0.0.1:1",
                                            spool_dir=tmp_path), report=False)
    assert isinstance(watch.recorder, MlflowRecorder)
    assert watch.recorder.settings == RecordSettings(
        tracking_uri="http://127.0.0.1:1", spool_dir=tmp_path, report=False)
    assert watch.recorder.report_builder is not None  # the run report, handed in
    assert watch.tracking_uri == "http://127.0.0.1:1" and watch.use_mlflow
    # a ready MlflowRecorder is given the run report builder too
    given = MlflowRecorder(RecordSettings(tracking_uri="http://127.0.0.1:1"))
    assert GradWatch(recorder=given).recorder is given and given.report_builder is not None


# ---------------------------------------------------------------------- both ways
@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: GradWatch(check=CheckOptions(budget=300), budget=200),
         ["budget=", "check=CheckOptions(budget=...)"]),
        (lambda: GradWatch(check={"eps": 1e-6}, eps=1e-5), ["eps=", "check=CheckOptions"]),
        (lambda: GradWatch(record=RecordSettings(run_id="a"), run_id="b"),
         ["run_id=", "record=RecordSettings(run_id=...)"]),
        (lambda: GradWatch(record=RecordSettings(enabled=False), mlflow=False),
         ["mlflow=", "RecordSettings(enabled=...)"]),
        (lambda: GradWatch(alerts=AlertSettings(policy=AlertPolicy()), alert_policy=AlertPolicy()),
         ["alert_policy=", "AlertSettings(policy=...)"]),
        (lambda: GradWatch(alerts=AlertSettings(on_alert="raise"), on_alert="stop"),
         ["on_alert="]),
        (lambda: GradWatch(recorder=NullRecorder(), tracking_uri="http://127.0.0.1:1"),
         ["recorder=", "tracking_uri="]),
        (lambda: GradWatch(recorder=NullRecorder(), record=RecordSettings()),
         ["recorder=", "record="]),
        (lambda: gradwatch.check(*_quadratic(), options=CheckOptions(mode="sample"),
                                 mode="full"),
         ["check got", "mode=", "options=CheckOptions(mode=...)"]),
        (lambda: gradwatch.check_module(nn.Linear(2, 1), torch.ones(1, 2), None,
                                        options=CheckOptions(seed=1), seed=2),
         ["check_module got", "seed="]),
    ],
)
def test_a_setting_given_both_ways_is_refused_with_the_fix(call: Any, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        call()
    for word in words:
        assert word in str(caught.value)
    assert "once" in str(caught.value) or "not both" in str(caught.value)


def test_the_refusal_never_shows_a_secret() -> None:
    secret = "https://hooks.example.com/T0KEN-s3cr3t"
    with pytest.raises(ConfigError) as caught:
        GradWatch(alerts=AlertSettings(notify=[secret]), notify=[secret])
    assert "notify=" in str(caught.value) and "s3cr3t" not in str(caught.value)
    assert "s3cr3t" not in repr(AlertSettings(notify=secret))


def test_the_objects_validate_what_they_are_given() -> None:
    for build, match in [
        (lambda: CheckOptions(mode="fast"), "mode must be one of"),
        (lambda: CheckOptions(budget=3), "at least 4"),
        (lambda: CheckOptions(eps=0.5), "too large"),
        (lambda: CheckOptions(include=3), "include must be a glob"),
        (lambda: CheckOptions(samples=0), "samples must be an int"),
        (lambda: CheckOptions(thresholds="strict"), "thresholds must be"),
        (lambda: RecordSettings(report_every=0), "report_every must be an int ≥ 1"),
        (lambda: RecordSettings(tracking_uri=5), "tracking_uri must be a string"),
        (lambda: AlertSettings(on_alert="panic"), "on_alert must be one of"),
        (lambda: AlertSettings(notify="not a url"), "needs a scheme"),
        (lambda: AlertSettings(policy={"fire_after": 2}), "AlertPolicy"),
        (lambda: GradWatch(check=42), "check= as a gradwatch.CheckOptions"),
        (lambda: GradWatch(check={"budgett": 3}), "unknown field.*budgett"),
        (lambda: gradwatch.check(*_quadratic(), options="full"), "options= as a"),
        (lambda: GradWatch(recorder=object()), "recorder must implement gradwatch.Recorder"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build()


def test_the_objects_are_frozen_pickle_and_say_what_was_given() -> None:
    options = CheckOptions(budget=500, include=["a.*", "b.*"])
    assert repr(options) == "CheckOptions(budget=500, include=('a.*', 'b.*'))"
    copy = pickle.loads(pickle.dumps(options))
    assert copy == options and copy.given == {"budget", "include"}
    with pytest.raises(AttributeError):
        options.budget = 3  # type: ignore[misc]
    assert repr(RecordSettings(enabled=False)) == "RecordSettings(enabled=False)"


# ---------------------------------------------------------------------- a recorder of our own
class MemoryRecorder:
    """A `Recorder` that keeps everything in lists (what a test, or a user, may pass)."""

    enabled = True

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.params: dict[str, Any] = {}
        self.checks: list[tuple[int, str, str | None]] = []
        self.events: list[str] = []

    def active_run_id(self) -> str | None:
        return None

    def open(self, params: Mapping[str, Any], *, active_run_id: str | None = None,
             restored_run_id: str | None = None) -> str | None:
        self.events.append("open")
        self.params = dict(params)
        self.run_id = restored_run_id or "memory-run"
        return f"memory:{self.run_id}"

    def record_check(self, report: gradwatch.CheckReport, *, step: int, timestamp_ms: int,
                     alert: str | None) -> None:
        self.checks.append((step, report.verdict, alert))

    def close(self, timeout: float) -> None:
        self.events.append("close")


def test_a_watch_records_through_the_recorder_it_is_given() -> None:
    recorder = MemoryRecorder()
    assert isinstance(recorder, Recorder)
    watch = GradWatch(every=2, loss_fn=loss_fn, budget=300, recorder=recorder)
    assert watch.recorder is recorder and watch.use_mlflow
    _, reports = train(watch, 12, wrong_between=(5, 9))
    assert recorder.events == ["open", "close"]
    assert recorder.params["gradwatch.every"] == "2" and recorder.params["gradwatch.budget"] == 300
    assert [(step, verdict) for step, verdict, _ in recorder.checks] == [
        (r.probe["step"], r.verdict) for r in reports]
    alerts = [(step, alert) for step, _, alert in recorder.checks]
    assert alerts == [(1, None), (2, None), (4, None), (6, "firing"), (8, "firing"),
                      (10, "resolved"), (12, "resolved")]
    assert watch.run_id == "memory-run" and watch.state_dict()["run_id"] == "memory-run"
    assert watch.tracker.key == "memory:memory-run"  # the alert ids are the record's


def test_a_recorder_that_fails_never_stops_training(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(MemoryRecorder):
        def record_check(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("disk full")

    watch = GradWatch(every=2, loss_fn=loss_fn, budget=300, recorder=Broken())
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        _, reports = train(watch, 4)
    assert [r.verdict for r in reports] == ["ok", "ok", "ok"]
    assert any("could not record the check" in r.getMessage() for r in caplog.records)
    strict = GradWatch(every=2, loss_fn=loss_fn, budget=300, recorder=Broken(), strict=True)
    with pytest.raises(OSError, match="disk full"):
        train(strict, 2)
    strict.close()


def test_a_recorder_that_cannot_open_leaves_checks_and_alerts_running() -> None:
    class Closed(MemoryRecorder):
        def open(self, *args: Any, **kwargs: Any) -> str | None:
            raise ConnectionError("no store")

    watch = GradWatch(every=1, loss_fn=loss_fn, budget=300, recorder=Closed(),
                      on_alert="raise")
    with pytest.raises(GradientAlertError):
        train(watch, 4, wrong_between=(2, 4))
    assert not watch.use_mlflow and isinstance(watch.recorder, NullRecorder)
    watch.close()
