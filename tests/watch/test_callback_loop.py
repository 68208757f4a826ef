"""GradWatch in a plain PyTorch loop: the MLflow record, alerts to a real HTTP receiver,
spool/replay against a real tracking server that goes away mid-training, and schedules."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import AlertPolicy, GradWatch
from tests.support.mlflow_server import MlflowServer
from tests.support.receivers import WebhookReceiver


class SwitchableFn(torch.autograd.Function):
    """Linear layer; while `wrong` is set its weight gradient is doubled (a planted bug)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                wrong: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.wrong = wrong
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        grad_weight = grad_out.T @ x
        return grad_out @ weight, grad_weight * (2 if ctx.wrong else 1), grad_out.sum(0), None


class Switchable(nn.Linear):
    wrong = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = SwitchableFn.apply(x, self.weight, self.bias, self.wrong)
        return result


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), Switchable(16, 3))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=generator), torch.randint(0, 3, (12,),
                                                                     generator=generator))
            for _ in range(n)]


def train(watch: GradWatch | None, steps: int, *, wrong_between: tuple[int, int] = (0, 0),
          on_step: Any = None) -> tuple[nn.Module, list[Any]]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reports = []
    for step, batch in enumerate(batches(steps), start=1):
        planted: Any = model[3]
        planted.wrong = wrong_between[0] <= step < wrong_between[1]
        loss = loss_fn(model.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)
        if watch is not None:
            report = watch.step(model, batch, step=step)
            if report is not None:
                reports.append(report)
    if watch is not None:
        watch.close()
    return model, reports


def test_settings_are_validated_at_construction() -> None:
    with pytest.raises(gradwatch.ConfigError, match="every must be"):
        GradWatch(every=0)
    with pytest.raises(gradwatch.ConfigError, match="every must be"):
        GradWatch(every="sometimes")
    with pytest.raises(gradwatch.ConfigError, match="on_alert"):
        GradWatch(on_alert="panic")  # type: ignore[arg-type]
    with pytest.raises(gradwatch.ConfigError, match="overhead"):
        GradWatch(overhead=5)
    with pytest.raises(gradwatch.ConfigError, match="mode"):
        GradWatch(mode="fast")  # type: ignore[arg-type]
    assert "every='30s'" in repr(GradWatch(every="30s", mlflow=False))


def test_plain_loop_record_in_a_run_gradwatch_creates(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "plain-loop")
    watch = GradWatch(every=5, loss_fn=loss_fn, tracking_uri=mlflow_server.url,
                      spool_dir=tmp_path / "spool", budget=500)
    _, reports = train(watch, 20)
    assert [r.probe["step"] for r in reports] == [1, 5, 10, 15, 20]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(str(watch.run_id))
    assert run.info.status == "FINISHED"  # gradwatch created it, gradwatch ends it
    assert client.get_experiment(run.info.experiment_id).name == "plain-loop"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "gradwatch/verdict")]
    assert steps == [1, 5, 10, 15, 20]
    assert run.data.tags["gradwatch.last_step"] == "20"
    assert run.data.params["gradwatch.budget"] == "500"
    # measurement-time timestamps, not delivery time
    history = client.get_metric_history(run.info.run_id, "gradwatch/rel_distance")
    assert all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(history))


def test_the_training_is_bit_identical_with_and_without_gradwatch() -> None:
    with_watch, reports = train(GradWatch(every=2, loss_fn=loss_fn, mlflow=False), 12)
    without, _ = train(None, 12)
    assert len(reports) == 7
    for (name, a), (_, b) in zip(with_watch.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name


def test_alert_fires_once_stays_quiet_then_resolves_to_a_webhook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_url_token = "s3cr3t-T0KEN"
    with WebhookReceiver() as receiver:
        hook = receiver.url(f"/hooks/{secret_url_token}?token={secret_url_token}")
        watch = GradWatch(every=2, loss_fn=loss_fn, mlflow=False, notify=[hook], budget=400)
        with caplog.at_level(logging.INFO, logger="gradwatch"):
            _, reports = train(watch, 16, wrong_between=(5, 11))
        verdicts = [(r.probe["step"], r.verdict) for r in reports]
        assert verdicts == [(1, "ok"), (2, "ok"), (4, "ok"), (6, "alert"), (8, "alert"),
                            (10, "alert"), (12, "ok"), (14, "ok"), (16, "ok")]
        assert receiver.wait_for(2)
        time.sleep(0.2)  # nothing else may arrive
        sent = [request.json() for request in receiver.requests]
    assert [(n["kind"], n["step"]) for n in sent] == [("firing", 6), ("resolved", 12)]
    assert receiver.requests[0].header("Idempotency-Key") == sent[0]["id"]
    assert "3.weight" in sent[0]["body"] and "worst element" in sent[0]["body"]
    assert "ALERT" in sent[0]["title"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("3.weight" in r.getMessage() for r in warnings)  # the log names the layer
    assert all(secret_url_token not in r.getMessage() for r in caplog.records)
    assert secret_url_token not in str(watch.params())


def test_repeat_interval_and_pending_are_counted_in_checks() -> None:
    with WebhookReceiver() as receiver:
        policy = AlertPolicy(fire_after=2, repeat_every=2)
        watch = GradWatch(every=1, loss_fn=loss_fn, mlflow=False, notify=[receiver.url()],
                          alert_policy=policy, budget=400)
        train(watch, 9, wrong_between=(3, 9))
        assert receiver.wait_for(3)
        time.sleep(0.2)
        kinds = [(r.json()["kind"], r.json()["step"]) for r in receiver.requests]
    # alerting checks at 3..8: pending at 3, firing at 4, repeats at 6 and 8; resolved at 9
    assert kinds == [("firing", 4), ("repeat", 6), ("repeat", 8), ("resolved", 9)]


def test_on_alert_raise_and_stop() -> None:
    watch = GradWatch(every=1, loss_fn=loss_fn, mlflow=False, on_alert="raise", budget=300)
    with pytest.raises(gradwatch.GradientAlertError, match=r"(?s)step 2.*3\.weight"):
        train(watch, 4, wrong_between=(2, 4))
    stopper = GradWatch(every=1, loss_fn=loss_fn, mlflow=False, on_alert="stop", budget=300)
    train(stopper, 4, wrong_between=(3, 4))
    assert stopper.should_stop


def test_a_failing_check_is_recorded_and_training_goes_on() -> None:
    def broken(model: nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError("the loss exploded on purpose")

    watch = GradWatch(every=2, loss_fn=broken, mlflow=False)
    model, reports = train(watch, 6)
    reference, _ = train(None, 6)
    assert [r.verdict for r in reports] == ["error"] * 4
    assert "the loss exploded on purpose" in reports[0].reasons[0]
    assert torch.equal(model[0].weight, reference[0].weight)
    strict = GradWatch(every=2, loss_fn=broken, mlflow=False, strict=True)
    with pytest.raises(gradwatch.LossError, match="exploded") as caught:  # explained, wrapped
        train(strict, 2)
    assert isinstance(caught.value.__cause__, RuntimeError)


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "APScheduler" in t.name or
            "apscheduler" in type(t).__module__]


def test_wall_clock_schedule_marks_checks_due_and_shuts_down() -> None:
    watch = GradWatch(every="1s", loss_fn=loss_fn, mlflow=False, first_step=False, budget=200)
    model = make_model()
    batch = batches(1)[0]
    deadline = time.monotonic() + 20
    report = None
    step = 0
    while report is None and time.monotonic() < deadline:  # the job fires after ~1 s
        step += 1
        report = watch.step(model, batch, step=step)
        time.sleep(0.02)
    assert report is not None and report.probe["step"] == step
    assert watch.schedule.running
    watch.close()
    assert not watch.schedule.running
    assert watch.step(model, batch, step=step + 1) is None  # not due again at once
    watch.close()


def test_spooled_checks_survive_a_tracking_server_that_goes_away(
    restartable_mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    server = restartable_mlflow_server
    watch = GradWatch(every=3, loss_fn=loss_fn, tracking_uri=server.url,
                      spool_dir=tmp_path / "spool", budget=300)
    step_seconds: list[float] = []
    last = [time.perf_counter()]

    def outage(step: int) -> None:
        now = time.perf_counter()
        step_seconds.append(now - last[0])
        last[0] = now
        if step == 8:
            server.stop()
        if step == 20:
            server.start()

    _, reports = train(watch, 27, on_step=outage)
    assert max(step_seconds) < 30  # the dead server never blocked the loop for long
    client = MlflowClient(server.url)
    history = client.get_metric_history(str(watch.run_id), "gradwatch/rel_distance")
    expected = [1, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert sorted(m.step for m in history) == expected  # nothing lost, nothing twice
    artifacts = client.list_artifacts(str(watch.run_id), "gradwatch/checks")
    assert len(artifacts) == len(expected)
    # all delivered at close: its spool folder is gone (replays adding no duplicates is
    # test_spool's test_records_survive_a_server_outage_and_replays_add_no_duplicates)
    assert list((tmp_path / "spool").iterdir()) == []
    assert len(reports) == len(expected)


def test_state_dict_round_trip_keeps_the_schedule_and_the_alert() -> None:
    watch = GradWatch(every=2, loss_fn=loss_fn, mlflow=False, budget=300)
    train(watch, 7, wrong_between=(5, 8))
    state = watch.state_dict()
    assert state["last_checked"] == 6 and state["alert"]["state"] == "firing"
    resumed = GradWatch(every=2, loss_fn=loss_fn, mlflow=False, budget=300)
    resumed.load_state_dict(state)
    assert resumed.tracker.state.state == "firing"
    model = make_model()
    assert resumed.step(model, batches(1)[0], step=6) is None  # step 6 was checked already
    assert resumed.step(model, batches(1)[0], step=7) is None  # not due
    assert resumed.step(model, batches(1)[0], step=8) is not None
    resumed.load_state_dict({})  # an old checkpoint without gradwatch state still loads
    resumed.close()


def test_a_record_mlflow_refuses_for_good_is_set_aside_not_retried_forever(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from gradwatch.record.spool import REJECTED, Spool
    from gradwatch.record.writer import deliver_payload, params_payload

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(f"refused-{tmp_path.name}")).info.run_id
    client.log_param(run_id, "gradwatch.every", "5")
    with Spool(tmp_path / "spool", deliver=deliver_payload) as spool:
        # a changed param value: MLflow answers INVALID_PARAMETER_VALUE, whatever the retries
        spool.append(params_payload({"gradwatch.every": 7}, run_id=run_id,
                                    tracking_uri=mlflow_server.url))
        spool.append(params_payload({"gradwatch.mode": "auto"}, run_id=run_id,
                                    tracking_uri=mlflow_server.url))
        result = spool.flush(timeout=30)
    assert result.pending == 0, result
    params = client.get_run(run_id).data.params
    assert params["gradwatch.every"] == "5" and params["gradwatch.mode"] == "auto"
    rejected = (tmp_path / "spool" / REJECTED).read_text().splitlines()
    assert len(rejected) == 1 and "INVALID_PARAMETER_VALUE" in rejected[0]
    assert '"gradwatch.every":"7"' in rejected[0]  # kept, not lost


def test_a_spool_another_process_owns_does_not_stop_training(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    from gradwatch.record.spool import Spool

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(f"locked-{tmp_path.name}")).info.run_id
    with Spool(tmp_path / "spool" / run_id, deliver=lambda payload: None):  # holds the lock
        watch = GradWatch(every=2, loss_fn=loss_fn, tracking_uri=mlflow_server.url,
                          run_id=run_id, spool_dir=tmp_path / "spool", budget=200)
        with caplog.at_level(logging.ERROR, logger="gradwatch"):
            _, reports = train(watch, 4)
    assert [r.verdict for r in reports] == ["ok", "ok", "ok"]
    assert not watch.use_mlflow
    assert any("in use by" in r.getMessage() for r in caplog.records)


def test_an_unstarted_gradwatch_pickles_with_its_schedule() -> None:
    # Lightning's ddp_spawn and notebooks pickle callbacks before training starts.
    import pickle

    watch = GradWatch(every="30min", loss_fn=loss_fn, mlflow=False)
    watch.schedule.mark_due()
    copy = pickle.loads(pickle.dumps(watch))
    assert copy.schedule.due(5, 1)  # the pending mark travelled
    assert not copy.schedule.due(6, 5)
    assert repr(copy) == repr(watch) and "'adaptive'" in repr(watch)


def test_a_step_count_that_jumps_over_a_multiple_still_checks() -> None:
    # e.g. two optimizers stepping per batch: global steps 2, 4, 6, ... with every=3
    watch = GradWatch(every=3, loss_fn=loss_fn, mlflow=False, first_step=False, budget=300)
    model = make_model()
    checked = [s for s in range(2, 20, 2)
               if watch.step(model, batches(1)[0], step=s) is not None]
    watch.close()
    assert checked == [4, 6, 10, 12, 16, 18]  # once per multiple of 3 reached or passed


def test_a_resumed_training_records_into_the_framework_run_not_the_checkpoint_run(
    mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"resume-{tmp_path.name}")
    old_run, new_run = (client.create_run(experiment).info.run_id for _ in range(2))
    watch = GradWatch(every=2, loss_fn=loss_fn, tracking_uri=mlflow_server.url,
                      spool_dir=tmp_path / "spool", budget=300)
    watch.load_state_dict({"run_id": old_run, "last_checked": 4})
    watch.setup(make_model(), active_run_id=new_run)  # e.g. HF's or Lightning's new run
    assert watch.run_id == new_run
    watch.close()
    alone = GradWatch(every=2, loss_fn=loss_fn, tracking_uri=mlflow_server.url,
                      spool_dir=tmp_path / "spool2", budget=300)
    alone.load_state_dict({"run_id": old_run})
    alone.setup(make_model())  # no framework run: continue the checkpoint's run
    assert alone.run_id == old_run and not alone.recorder.created_run
    alone.close()


def test_the_allowance_is_sized_from_the_steps_before_a_check_not_from_pauses() -> None:
    """The adaptive budget's seconds per step come from the STEP_WINDOW steps before each
    check: an evaluation-like pause earlier in the interval (0.4 s at step 105, against
    steps of about a millisecond) must not inflate what the next check may spend; with the
    whole interval timed, one step would read ≥ 4 ms."""
    from gradwatch.watch.budget import STEP_WINDOW

    def pause(step: int) -> None:
        if step == 105:
            time.sleep(0.4)

    watch = GradWatch(every=100, loss_fn=loss_fn, mlflow=False)
    train(watch, 300, on_step=pause)
    assert watch.adaptive is not None
    seconds = list(watch.adaptive.step_seconds)  # one per check after the first
    assert len(seconds) == 3  # checks at 1, 100, 200, 300
    assert max(seconds) < 0.4 / 100, seconds  # the pause (in 100..200) is outside the window
    assert STEP_WINDOW < 100
