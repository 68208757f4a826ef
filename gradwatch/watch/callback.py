"""`GradWatch`: the training-loop callback.

    trainer.add_callback(GradWatch(every=1000))          # Hugging Face Trainer
    watch = GradWatch(every=1000, loss_fn=loss_fn)       # a plain PyTorch loop:
    watch.step(model, batch, step=global_step)           #   once per optimizer step

Every `every` optimizer steps the training pauses, `check_module` runs on a float64 shadow of
the model (dropout off, loss-level regularisation on) with a probe minibatch, the result is
spooled to disk and delivered to MLflow in the background, and an alert fires when the verdict
says so. The training run is exactly what it would have been without gradwatch: the live model,
its gradients and every RNG stream are left bit-identical, and any exception inside the check is
caught, recorded as an "error" check and training goes on (`strict=True` re-raises).

Its settings come as objects — `CheckOptions` (`check=`), `RecordSettings` (`record=`),
`AlertSettings` (`alerts=`) — or as the keyword shorthands of their fields; the record is a
`Recorder` it is given (`recorder=`) or builds (`MlflowRecorder`, or `NullRecorder` for
`mlflow=False`): this module holds no MLflow client code.

Imports: gradwatch.common, engine, record, alerts, dashboard (the run report builder it hands
the recorder), gradwatch.watch.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from gradwatch.alerts.dispatch import Dispatcher
from gradwatch.alerts.notify import Notification, Notifier
from gradwatch.alerts.settings import AlertSettings, OnAlert
from gradwatch.alerts.state import AlertPolicy, AlertTracker
from gradwatch.common.errors import ConfigError, GradientAlertError, UnsupportedModelError
from gradwatch.common.settings import DEFAULT, Default, with_shorthands
from gradwatch.common.version import __version__
from gradwatch.dashboard.report import log_requested_report
from gradwatch.engine.report import CheckReport, Mode, Thresholds
from gradwatch.engine.sharded import GATHER_TIMEOUT, sharding_of
from gradwatch.engine.types import CheckOptions, check_settings
from gradwatch.record.layout import parse_every
from gradwatch.record.recorder import (
    FLUSH_TIMEOUT,
    MlflowRecorder,
    NullRecorder,
    Recorder,
    RecordSettings,
)
from gradwatch.watch.budget import STEP_WINDOW, AdaptiveBudget, Rotation
from gradwatch.watch.distributed import agree, world
from gradwatch.watch.plan import CheckPlan
from gradwatch.watch.probe import ProbeCapture
from gradwatch.watch.schedule import Schedule

__all__ = ["CheckPlan", "GradWatch"]

logger = logging.getLogger("gradwatch")

#: The values of GradWatch(autocast=) besides None and the torch dtypes.
AUTOCAST_NAMES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half")

#: close() at interpreter exit, when the program did not call it: bounded, the spool keeps
#: what is not delivered by then for the next start or `gradwatch flush`.
EXIT_TIMEOUT = 10.0


class GradWatch:
    """Numerical gradient checks during training, logged to MLflow, with alerts.

    Args:
        every: optimizer steps between checks (int), or a wall-clock schedule: a duration
            ("30min", "2h") or a cron expression ("0 * * * *").
        check: the checks' `CheckOptions` (mode, budget, eps, thresholds, include, exclude,
            seed, samples, directions, top_k); here mode "auto" and, with budget None (the
            default), an adaptive budget: each check is sized from the measured cost of a
            training step, of a loss evaluation and of a check's fixed part, so checks take
            about `overhead` of training time, covering the tensors across successive checks
            when one check cannot cover them all.
        record: the `RecordSettings` of the MLflow record (tracking URI, run, experiment,
            spool, report), for the `MlflowRecorder` the watch builds (`NullRecorder` when
            `enabled=False`).
        alerts: the `AlertSettings` (policy, notify, on_alert).
        recorder: a ready `Recorder` instead (then no `record=` nor its shorthands); the watch
            hands an `MlflowRecorder` without a report builder gradwatch's run report.
        loss_fn: `loss_fn(model, batch) -> scalar tensor`, the full objective with loss-level
            regularisation. Needed when the model's output carries no loss (e.g. the trainer pops
            `labels` for label smoothing, or a plain loop computes the loss outside the model).
        probe: a fixed batch to check on. Default: the batch given to `step()`, else the inputs
            of the most recent training forward pass (captured by a forward pre-hook).
        first_step: also check at the first step boundary (bugs are usually there from the start).
        probe_rows: check on the first `probe_rows` examples of the probe batch (every tensor
            whose first dimension is the batch size is sliced), None for the whole batch. A
            backward bug shows on a handful of examples; float64 evaluations of a full batch
            are what makes a check expensive.
        overhead: the share of training time the adaptive budget aims at. The default, 0.005,
            is half of gradwatch's 1% goal: the rest is margin for the record's delivery in a
            background thread and for a noisy machine.
        autocast: the autocast dtype training runs under, for the training-kernels
            measurement: "auto" (the one around the latest training forward, as the probe
            capture saw it; Lightning's adapter reads `trainer.precision`), None, "bfloat16"
            or "float16".
        strict: re-raise exceptions from inside the check (and from the record) instead of
            recording an "error" check (logging the failure).
        clock: seconds since the epoch for measurement timestamps (tests pass their own).
        mode, budget, eps, thresholds, include, exclude, seed: shorthands for the fields of
            `check`.
        on_alert, alert_policy, notify: shorthands for the fields of `alerts` (`policy`,
            for `alert_policy`).
        tracking_uri, run_id, experiment_name, spool_dir, mlflow, report, report_every:
            shorthands for the fields of `record` (`enabled`, for `mlflow`).

    A setting given both in an object and as its shorthand is a `ConfigError`.

    Example:
        >>> from gradwatch import AlertSettings, CheckOptions, GradWatch, RecordSettings
        >>> GradWatch(100, check=CheckOptions(budget=300), alerts=AlertSettings(on_alert="stop"),
        ...           record=RecordSettings(enabled=False))
        GradWatch(every='100', mode='auto', budget=300, on_alert='stop')
        >>> GradWatch(100, budget=300, on_alert="stop", mlflow=False)  # the same, by shorthands
        GradWatch(every='100', mode='auto', budget=300, on_alert='stop')
    """

    def __init__(
        self,
        every: int | str = 1000,
        *,
        check: CheckOptions | Mapping[str, Any] | None = None,
        record: RecordSettings | Mapping[str, Any] | None = None,
        alerts: AlertSettings | Mapping[str, Any] | None = None,
        recorder: Recorder | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        probe: Any = None,
        first_step: bool = True,
        probe_rows: int | None = 8,
        overhead: float = 0.005,
        autocast: Any = "auto",
        strict: bool = False,
        clock: Callable[[], float] = time.time,
        mode: Mode | Default = DEFAULT,
        budget: int | Default | None = DEFAULT,
        eps: float | Default | None = DEFAULT,
        thresholds: Thresholds | Mapping[str, float] | Default | None = DEFAULT,
        include: str | Sequence[str] | Default | None = DEFAULT,
        exclude: str | Sequence[str] | Default | None = DEFAULT,
        seed: int | Default = DEFAULT,
        on_alert: OnAlert | Default = DEFAULT,
        alert_policy: AlertPolicy | Default | None = DEFAULT,
        notify: str | Notifier | Sequence[str | Notifier] | Default = DEFAULT,
        tracking_uri: str | Default | None = DEFAULT,
        run_id: str | Default | None = DEFAULT,
        experiment_name: str | Default | None = DEFAULT,
        spool_dir: str | Path | Default | None = DEFAULT,
        mlflow: bool | Default = DEFAULT,
        report: bool | Default = DEFAULT,
        report_every: int | Default = DEFAULT,
    ) -> None:
        self.every = parse_every(every)
        self.options, self.settings = check_settings(
            "GradWatch", check, argument="check", mode=mode, budget=budget, eps=eps,
            thresholds=thresholds, include=include, exclude=exclude, seed=seed,
        )
        self.alerts = with_shorthands(
            AlertSettings, alerts, {"on_alert": on_alert, "alert_policy": alert_policy,
                                    "notify": notify},
            argument="alerts", entry="GradWatch", fields={"alert_policy": "policy"},
        )
        self.recorder: Recorder = _recorder(recorder, record, strict, {
            "tracking_uri": tracking_uri, "run_id": run_id, "experiment_name": experiment_name,
            "spool_dir": spool_dir, "mlflow": mlflow, "report": report,
            "report_every": report_every,
        })
        _check_watch_settings(loss_fn, probe_rows, overhead, autocast)
        self.probe_rows = probe_rows
        self.loss_fn = loss_fn
        self.probe = probe
        self.include, self.exclude = self.options.include, self.options.exclude
        self.strict = strict
        self.on_alert: OnAlert = self.alerts.on_alert
        self.policy = self.alerts.policy
        self.notifiers = list(self.alerts.notify)
        self.clock = clock
        self.schedule = Schedule(self.every, first_step=first_step)
        self.tracker = AlertTracker(self.policy)
        self.capture = ProbeCapture(keep_inputs=probe is None)
        self.autocast = autocast
        self.adaptive = AdaptiveBudget(overhead) if self.settings.budget is None else None
        self.rotation = Rotation()
        #: (time, step) where the training time being measured began: the end of the last
        #: check, or the first step seen.
        self._interval: tuple[float, int] | None = None
        #: No check can be due before this step (step schedules); 0: ask the schedule.
        self._quiet_until = 0
        self._alerting_tensors: set[str] = set()
        self.reports: list[CheckReport] = []
        self._loss_scale = 0.0  # the largest loss of the checks so far (`check_module`)
        self.last_checked: int | None = None
        self.should_stop = False
        #: Why this model cannot be checked at all (sharded); no more checks run once set.
        self.unsupported: str | None = None
        self._unsharded: Any = None  # rank 0, during a check: the gathered copy of an FSDP2 model
        self._collective_why: str | None = None  # every rank, during a collective check
        self._gather_timeout = GATHER_TIMEOUT  # seconds any collective of a check may wait
        self._restored_run_id: str | None = None  # from load_state_dict (a resumed training)
        self._recording = False  # the recorder is open
        self._dispatcher: Dispatcher | None = None
        self._ready = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run the checks are recorded into, once known (the recorder's)."""
        return self.recorder.run_id

    @run_id.setter
    def run_id(self, value: str | None) -> None:
        self.recorder.run_id = value

    @property
    def tracking_uri(self) -> str | None:
        """The tracking URI given to the recorder (None: MLflow's default)."""
        return getattr(self.recorder, "tracking_uri", None)

    @tracking_uri.setter
    def tracking_uri(self, value: str | None) -> None:
        self.recorder.tracking_uri = value  # type: ignore[attr-defined]

    @property
    def use_mlflow(self) -> bool:
        """Whether the checks are recorded (False for `mlflow=False`, or after the record
        could not be opened)."""
        return bool(self.recorder.enabled)

    def __repr__(self) -> str:
        return (f"GradWatch(every={self.every.describe()!r}, mode={self.settings.mode!r}, "
                f"budget={self.settings.budget if self.adaptive is None else 'adaptive'!r}, "
                f"on_alert={self.on_alert!r})")

    # ------------------------------------------------------------------ lifecycle
    def setup(self, model: Any = None, *, active_run_id: str | None = None) -> None:
        """Open the record (its run, params once), start the scheduler and the dispatcher."""
        if self._ready:
            return
        self._ready = True
        # A plain loop may end without close(): the interpreter's exit then closes (bounded),
        # so the background delivery is not killed inside native code at finalisation (which
        # aborts the process) and what it holds reaches MLflow.
        atexit.register(self._close_at_exit)
        if model is not None:
            self.capture.attach(model)  # the inputs (without probe=) and the autocast
        self.schedule.start()
        if self.notifiers:
            self._dispatcher = Dispatcher(self.notifiers)
        if self.recorder.enabled:
            self._open_record(active_run_id)

    def _open_record(self, active_run_id: str | None) -> None:
        try:
            key = self.recorder.open(self.params(), active_run_id=active_run_id,
                                     restored_run_id=self._restored_run_id)
        except Exception as exc:  # never crash training over its record
            if self.strict:
                raise
            logger.error("gradwatch: cannot record to %s (%s: %s); checks and alerts go on "
                         "without it", type(self.recorder).__name__, type(exc).__name__, exc)
            self.recorder = NullRecorder(RecordSettings(run_id=self.run_id,
                                                        tracking_uri=self.tracking_uri))
            return
        self._recording = True
        if key is not None:
            self.tracker.key = key

    def params(self) -> dict[str, Any]:
        """The once-per-run MLflow params (no secrets: notification URLs are not among them)."""
        return {
            "gradwatch.version": __version__,
            "gradwatch.every": self.every.describe(),
            "gradwatch.mode": self.settings.mode,
            "gradwatch.eps": self.settings.eps,
            "gradwatch.budget": (f"adaptive ({self.adaptive.overhead:g})" if self.adaptive
                                 else self.settings.budget),
            "gradwatch.threshold.warn": self.settings.thresholds.warn,
            "gradwatch.threshold.alert": self.settings.thresholds.alert,
            "gradwatch.probe_rows": self.probe_rows,
        }

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Stop the scheduler, close the record (it delivers what it holds within `timeout`;
        MLflow's leaves the rest on disk for `gradwatch flush` and ends a run it created),
        drain notifications."""
        atexit.unregister(self._close_at_exit)
        self.schedule.shutdown()
        self.capture.detach()
        if self._recording:
            self._recording = False
            try:
                self.recorder.close(timeout)
            except Exception as exc:
                if self.strict:
                    raise
                logger.error("gradwatch: could not close the record: %s", exc)
        if self._dispatcher is not None:
            self._dispatcher.close(timeout=timeout)
            self._dispatcher = None
        self._ready = False

    def _close_at_exit(self) -> None:
        try:
            self.close(timeout=EXIT_TIMEOUT)
        except Exception:  # the user's process is exiting: say so, never raise from atexit
            logger.exception("gradwatch: closing at interpreter exit failed")

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plain loop
    def step(
        self, model: Any, batch: Any = None, *, step: int, loss_fn: Callable[..., Any] | None = None
    ) -> CheckReport | None:
        """Call once per optimizer step (after `optimizer.step()`), on every rank; returns the
        report when a check ran at this step (on global rank zero), else None.

        Under torch.distributed only rank zero checks; at a checked step the ranks meet at a
        barrier that also shares rank zero's `should_stop`, so they stop together.
        """
        if step < self._quiet_until:
            return None  # the fast path of the ~999 steps in 1000 where nothing can be due
        return self._at_step(
            step, model, lambda plan: self._check(model, batch, step, loss_fn, plan)
        )

    def check_with(
        self, run: Callable[[CheckPlan], CheckReport], *, step: int, model: Any = None
    ) -> CheckReport | None:
        """`step()` for adapters that run the check themselves (Keras, JAX): call once per
        optimizer step on every rank; when a check is due, `run(plan)` must return the
        `CheckReport` of a check sized by `plan` (`plan.check_kwargs()`, `plan.tensors(...)`).
        Recording, alerts, the adaptive budget and errors are handled here as for `step()`.
        `model` is only used to capture probe batches from torch modules (None otherwise)."""
        if step < self._quiet_until:
            return None
        return self._at_step(step, model, run)

    def _at_step(
        self, step: int, model: Any, run: Callable[[CheckPlan], CheckReport]
    ) -> CheckReport | None:
        rank, size = world()
        if rank == 0:
            self.setup(model)
        else:
            self._attach_peer(model)
        due = self.schedule.due(step, self.last_checked)
        if size > 1 and self.every.steps is None:
            due = agree(due)  # only rank zero runs the wall-clock scheduler
        if not due:
            self._arm_window(step)
            return None
        if rank == 0:
            self._training_steps_until(step)
        report, failure = None, None
        try:
            gathered = self._gather_if_sharded(model, size)  # every rank: a collective
            if gathered is not None and gathered.error is not None:
                report = self._sharded_failure(step, rank, gathered)
            elif gathered is not None and gathered.strategy == "collective":
                report = self._collective(step, rank, gathered, run)
            elif rank == 0 and self.unsupported is None:
                self._unsharded = gathered.model if gathered is not None else None
                try:
                    report = self._run(step, run)
                finally:
                    self._unsharded = None
                if report is not None and gathered is not None:
                    report.probe["sharding"] = {
                        "kind": gathered.kind, "strategy": gathered.strategy,
                        "why": gathered.reason}
            else:
                self.last_checked = step
        except BaseException as exc:  # strict=True or on_alert="raise": the others must stop too
            failure = exc
        finally:
            self._interval = None  # the check itself is not training time
            self._arm_window(step)
        if size > 1:
            self.should_stop = agree(self.should_stop or failure is not None)
        if failure is not None:
            raise failure
        return report

    def _attach_peer(self, model: Any) -> None:
        """A rank other than 0, once: capture its training inputs when the model is FSDP2,
        whose collective checks run on every rank's own batch."""
        if self._ready or model is None:
            return
        self._ready = True
        from gradwatch.engine.torch_model import unwrap_model

        if sharding_of(unwrap_model(model)) == "fsdp2":
            self.capture.attach(model)

    def _gather_if_sharded(self, model: Any, size: int) -> Any:
        """Every rank, at a due step of an FSDP2 model: gather it for rank 0's check
        (`gradwatch.engine.sharded`); None for a model some rank holds whole. Decided from
        the model alone, so every rank takes the same branch."""
        if size == 1 or model is None:
            return None
        from gradwatch.engine.torch_model import unwrap_model

        live = unwrap_model(model)
        if sharding_of(live) is None:
            return None
        from gradwatch.engine.sharded import gather_unsharded

        return gather_unsharded(live, timeout=self._gather_timeout,
                                strategy=self.settings.sharded)

    def _collective(self, step: int, rank: int, gathered: Any,
                    run: Callable[[CheckPlan], CheckReport]) -> CheckReport | None:
        """Every rank, the collective strategy (`gradwatch.engine.collective`): each runs the
        check on its own shards; rank 0 records it, the others keep the same report."""
        self._collective_why = gathered.reason
        try:
            if rank == 0:
                return self._run(step, run)
            self.last_checked = step
            try:
                report = run(self._plan(step))
            except _NoProbeYet:
                return None
            except Exception as exc:
                if self.strict:
                    raise
                report = error_report(exc, self.settings, 0.0, step)
            self.reports.append(report)
            return report
        finally:
            self._collective_why = None

    def _sharded_failure(self, step: int, rank: int, gathered: Any) -> CheckReport | None:
        """A rank failed in the collective part of a check: every rank knows why; rank 0
        records an "error" check, the others keep the same report; training goes on."""
        error = RuntimeError(f"the sharded ({gathered.kind}) check could not gather the model: "
                             f"{gathered.error}")

        def fail(plan: CheckPlan) -> CheckReport:
            raise error

        if rank == 0:
            return self._run(step, fail)
        if self.strict:
            raise error
        self.last_checked = step
        logger.warning("gradwatch: %s; training goes on", error)
        report = error_report(error, self.settings, 0.0, step)
        self.reports.append(report)
        return report

    def _arm_window(self, step: int) -> None:
        """Quiet until STEP_WINDOW steps before the next due step; from there on, the steps
        are timed (`_training_steps_until`)."""
        next_due = self.schedule.next_due(self.last_checked)
        if self._interval is None and step >= next_due - STEP_WINDOW:
            self._interval = (time.perf_counter(), step)  # the window starts
        self._quiet_until = next_due if self._interval is not None else next_due - STEP_WINDOW

    def _training_steps_until(self, step: int) -> None:
        """Feed the adaptive budget the training time per step: the wall time of the loop over
        the STEP_WINDOW steps before this check (the whole interval when the schedule cannot
        tell the next due step, as with wall-clock schedules), so the steps before are not
        timed at all, and pauses of the loop (evaluation, checkpoints, other work on the
        machine) earlier in the interval do not inflate the allowance."""
        if self._interval is not None and self.adaptive is not None:
            started, first = self._interval
            if step > first:
                self.adaptive.step_finished((time.perf_counter() - started) / (step - first))

    def run_check(
        self, model: Any, batch: Any = None, *, step: int, loss_fn: Callable[..., Any] | None = None
    ) -> CheckReport:
        """Check now (whatever the schedule and the rank), record, alert. Never raises unless
        strict=True or on_alert="raise"."""
        report = self._run(step, lambda plan: self._check(model, batch, step, loss_fn, plan))
        if report is None:  # nothing captured yet: say so as a check error
            report = error_report(ConfigError(
                "gradwatch has no batch to check on: pass one to run_check(model, batch, "
                "step=...), give GradWatch(probe=batch), or let one training forward run first."
            ), self.settings, 0.0, step)
        return report

    def _plan(self, step: int) -> CheckPlan:
        since = step - self.last_checked if self.last_checked is not None else 1
        if self.adaptive is not None:
            budget = self.adaptive.next_budget(since)
        else:
            assert self.settings.budget is not None  # None is the adaptive budget
            budget = self.settings.budget
        extra = {name: getattr(self.settings, name) for name in ("samples", "directions",
                                                                 "top_k")
                 if name in self.options.given}
        return CheckPlan(
            step=step, mode=self.settings.mode, eps=self.settings.eps, budget=budget,
            thresholds=self.settings.thresholds, seed=self.settings.seed + step,
            rotation=self.rotation if self.adaptive is not None else None, **extra,
        )

    def _run(self, step: int, run: Callable[[CheckPlan], CheckReport]) -> CheckReport | None:
        plan = self._plan(step)
        self.last_checked = step
        started = time.perf_counter()
        timestamp_ms = int(self.clock() * 1000)
        try:
            report = run(plan)
            if not isinstance(report, CheckReport):
                raise TypeError(f"the check returned {type(report).__name__}, not a "
                                f"CheckReport")
            report.probe.setdefault("step", step)
            report.probe["budget"] = plan.budget
            if plan.rotating:
                report.probe["rotation"] = "this check covers part of the tensors; the next "\
                    "checks cover the rest"
        except _NoProbeYet:
            logger.info("gradwatch: no training forward captured before step %d (call "
                        "watch.setup(model) before the loop to capture from the first step); "
                        "the first check runs at the next scheduled step", step)
            return None
        except UnsupportedModelError as exc:
            if self.strict:
                raise
            self.unsupported = str(exc)
            logger.warning("gradwatch: %s gradwatch stops checking this run; training goes on.",
                           exc)
            report = error_report(exc, self.settings, time.perf_counter() - started, step)
        except Exception as exc:
            if self.strict:
                raise
            logger.exception("gradwatch: the check at step %d failed; training goes on", step)
            report = error_report(exc, self.settings, time.perf_counter() - started, step)
        self.reports.append(report)
        if math.isfinite(report.loss):  # the loss's scale: its rounding, as it falls to ~0
            self._loss_scale = max(self._loss_scale, abs(report.loss))
        transition = self._observe(report, step)
        alert_tag = None
        if transition is not None:
            alert_tag = "firing" if transition.kind in ("firing", "repeat") else "resolved"
        elif self.tracker.state.ever_fired:
            alert_tag = "firing" if self.tracker.state.state == "firing" else "resolved"
        self._record(report, step, timestamp_ms, alert_tag)
        if self.adaptive is not None:  # the check's cost includes spooling its record
            self.adaptive.check_finished(time.perf_counter() - started, report.evaluations,
                                         report.evaluation_seconds)
        if transition is not None:
            self._announce(report, transition)
            if transition.kind == "firing":
                if self.on_alert == "stop":
                    self.should_stop = True
                elif self.on_alert == "raise":
                    raise GradientAlertError(
                        f"gradwatch: gradient check alert at step {step}.\n{report.summary()}"
                    )
        return report

    def _observe(self, report: CheckReport, step: int) -> Any:
        """Feed the alert tracker. A check that errored, or that (rotating through tensors)
        did not look again at the tensors that alerted, is no evidence of resolution."""
        alerting = report.verdict == "alert"
        if report.verdict == "error":
            return None
        if not alerting and not self._alerting_tensors <= set(report.layers):
            return None
        if alerting:
            self._alerting_tensors = {
                name for name, layer in report.layers.items() if layer.verdict == "alert"
            } or set(report.layers)
        else:
            self._alerting_tensors = set()
        return self.tracker.observe(alerting, step=step)

    def _check(
        self, model: Any, batch: Any, step: int, loss_fn: Any, plan: CheckPlan
    ) -> CheckReport:
        from gradwatch.engine.torch_backend import check_module

        if self._collective_why is not None:
            return self._check_collective(model, batch, step, loss_fn, plan)
        if self._unsharded is not None:
            model = self._unsharded  # rank 0's gathered copy of an FSDP2 model
        batch, loss_fn, source = self._probe_batch(batch, loss_fn)
        # No rotation: auto mode screens every tensor jointly in every check (`_screen`).
        include, exclude = self.include, self.exclude
        autocast = self.autocast if self.autocast != "auto" else self.capture.autocast
        report = check_module(
            model, batch, loss_fn, include=include,
            exclude=exclude, loss_scale=self._loss_scale or None, autocast=autocast,
            options=CheckOptions(kernels=self.settings.kernels,
                                 kernel_thresholds=self.settings.kernel_thresholds),
            **plan.check_kwargs(),
        )
        report.probe.update({"step": step, "from": source})
        return report

    def _check_collective(
        self, model: Any, batch: Any, step: int, loss_fn: Any, plan: CheckPlan
    ) -> CheckReport:
        """Every rank: the collective check of an FSDP2 model on this rank's batch; a rank
        that has no batch takes part with its reason, so the others are not left waiting."""
        from dataclasses import replace

        from gradwatch.engine.collective import collective_check
        from gradwatch.engine.torch_model import unwrap_model

        failure, source, no_probe = None, "", False
        try:
            batch, loss_fn, source = self._probe_batch(batch, loss_fn)
        except _NoProbeYet:
            no_probe = True
        except Exception as exc:
            failure = f"rank {world()[0]}: {type(exc).__name__}: {exc}"
        if agree(no_probe):  # a rank saw no training forward yet: every rank waits for one
            raise _NoProbeYet
        kwargs = plan.check_kwargs()
        settings = replace(self.settings, seed=kwargs["seed"], budget=kwargs["budget"],
                           loss_scale=self._loss_scale)
        report = collective_check(unwrap_model(model), batch, loss_fn, settings,
                                  timeout=self._gather_timeout, failure=failure,
                                  why=str(self._collective_why))
        report.probe.update({"step": step, "from": source})
        return report

    def _probe_batch(self, batch: Any, loss_fn: Any) -> tuple[Any, Any, str]:
        """The batch a check runs on, its loss function and where the batch came from."""
        source = "batch given to step()"
        default_loss = None
        if batch is None and self.probe is not None:
            batch, source = self.probe, "probe= batch"
        if batch is None:
            batch, default_loss = self.capture.batch()
            source = "inputs of the latest training forward"
        if batch is None and not self.reports:
            raise _NoProbeYet  # set up after the first forward (plain loop): no error record
        if batch is None:
            raise ConfigError(
                "gradwatch has no batch to check on: pass one to step(model, batch, step=...), "
                "give GradWatch(probe=batch), or let one training forward run first."
            )
        if self.probe_rows is not None:
            batch = first_rows(batch, self.probe_rows)
        return batch, loss_fn or self.loss_fn or default_loss, source

    def _record(self, report: CheckReport, step: int, timestamp_ms: int, alert: str | None) -> None:
        if not self._recording:
            return
        try:
            self.recorder.record_check(report, step=step, timestamp_ms=timestamp_ms, alert=alert)
        except Exception as exc:
            if self.strict:
                raise
            logger.error("gradwatch: could not record the check at step %d: %s", step, exc)

    def _announce(self, report: CheckReport, transition: Any) -> None:
        notification = make_notification(report, transition, run_id=self.run_id)
        level = logging.INFO if transition.kind == "resolved" else logging.WARNING
        logger.log(level, "%s\n%s", notification.title, notification.body)
        if self._dispatcher is not None:
            self._dispatcher.submit(notification)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"last_checked": self.last_checked, "alert": self.tracker.state_dict(),
                "run_id": self.run_id, "rotation": self.rotation.state_dict(),
                "budget": self.adaptive.state_dict() if self.adaptive else {},
                "loss_scale": self._loss_scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_checked = state.get("last_checked", self.last_checked)
        self._quiet_until = 0  # the schedule decides again from the restored step
        if state.get("alert"):
            self.tracker.load_state_dict(state["alert"])
        self._restored_run_id = state.get("run_id") or self._restored_run_id
        self.rotation.load_state_dict(state.get("rotation", {}))
        scale = state.get("loss_scale")
        if isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0:
            self._loss_scale = float(scale)
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state.get("budget", {}))

    # ------------------------------------------------------------------ Hugging Face events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if _is_world_zero(state):
            # HF's MLflowCallback opened its run just before us
            active = self.recorder.active_run_id() if self.recorder.enabled else None
            self.setup(kwargs.get("model"), active_run_id=active)
        else:
            self._attach_peer(kwargs.get("model"))
        return None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.step(kwargs.get("model"), None, step=int(state.global_step))
        if self.should_stop:
            control.should_training_stop = True
            return control
        return None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.close()
        return None

    def __getattr__(self, name: str) -> Any:
        # Answer every other Trainer event (16 in transformers 5.x, fewer in 4.4x, and any
        # added later) with a no-op, as TrainerCallback's defaults do.
        if name.startswith("on_"):
            return _no_event
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def first_rows(batch: Any, rows: int) -> Any:
    """The first `rows` examples of a (nested) batch: every tensor whose first dimension is the
    batch size (the most common first dimension among the batch's tensors) is sliced; other
    tensors and values are kept as they are. Views, no copies."""
    sizes: dict[int, int] = {}

    def collect(value: Any) -> None:
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0 and hasattr(value, "__getitem__"):
            sizes[int(shape[0])] = sizes.get(int(shape[0]), 0) + 1
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(batch)
    if not sizes:
        return batch
    size = max(sizes, key=lambda s: (sizes[s], s))
    if size <= rows:
        return batch

    def cut(value: Any) -> Any:
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0 and int(shape[0]) == size:
            return value[:rows]
        if isinstance(value, Mapping):
            return {key: cut(item) for key, item in value.items()}
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(cut(item) for item in value))
        if isinstance(value, (list, tuple)):
            return type(value)(cut(item) for item in value)
        return value

    return cut(batch)


def adapter_watch(
    every: int | str | None,
    watch: GradWatch | None,
    settings: dict[str, Any],
    *,
    excluded: tuple[str, ...] = (),
    also: str = "",
) -> GradWatch:
    """The `GradWatch` a framework callback drives: `watch=` as given, or one built from
    `every` and GradWatch's keyword `settings` (minus `excluded`, which the adapter supplies);
    a clear ConfigError for both at once, a non-GradWatch, or an unknown setting."""
    if watch is not None:
        if every is not None or settings:
            given = ["every"] * (every is not None) + sorted(settings)
            raise ConfigError(
                f"GradWatchCallback takes either a GradWatch (watch=) or GradWatch's "
                f"settings, not both; got watch= and {', '.join(given)}. Put the settings "
                f"in the GradWatch you pass."
            )
        if not isinstance(watch, GradWatch):
            raise ConfigError(f"watch must be a gradwatch.GradWatch, got {watch!r}.")
        return watch
    if every is not None:
        settings = {"every": every, **settings}
    try:
        return GradWatch(**settings)
    except TypeError as exc:
        valid = [name for name in inspect.signature(GradWatch).parameters
                 if name != "self" and name not in excluded]
        unknown = sorted(set(settings) - set(valid))
        if not unknown:
            raise
        raise ConfigError(
            f"GradWatchCallback got unknown setting(s) {', '.join(unknown)}; it takes {also}"
            f"GradWatch's settings: {', '.join(valid)}, or watch=GradWatch(...)."
        ) from exc


def _recorder(
    recorder: Recorder | None,
    record: RecordSettings | Mapping[str, Any] | None,
    strict: bool,
    shorthands: Mapping[str, Any],
) -> Recorder:
    """The watch's recorder: `recorder=` as given, or one built from `record=` and its
    shorthands; a clear ConfigError for both at once or a recorder that is not one."""
    settings = with_shorthands(RecordSettings, record, shorthands, argument="record",
                               entry="GradWatch", fields={"mlflow": "enabled"})
    if recorder is None:
        if not settings.enabled:
            return NullRecorder(settings)
        return MlflowRecorder(settings, report_builder=log_requested_report, strict=strict)
    if record is not None or settings.given:
        given = ["record="] * (record is not None) + [
            f"{key}=" for key, value in shorthands.items() if key in settings.given
            or (key == "mlflow" and "enabled" in settings.given)]
        raise ConfigError(
            f"GradWatch takes either a recorder (recorder=) or the settings of the one it "
            f"builds, not both; got recorder= and {', '.join(dict.fromkeys(given))}. Give "
            f"the settings to your recorder, e.g. recorder=MlflowRecorder(RecordSettings(...))."
        )
    if not isinstance(recorder, Recorder):
        raise ConfigError(
            f"recorder must implement gradwatch.Recorder (run_id, enabled, active_run_id(), "
            f"open(), record_check(), close()), e.g. gradwatch.MlflowRecorder(...), got "
            f"{type(recorder).__name__}."
        )
    if isinstance(recorder, MlflowRecorder) and recorder.report_builder is None:
        recorder.report_builder = log_requested_report
    return recorder


def _check_watch_settings(loss_fn: Any, probe_rows: Any, overhead: Any, autocast: Any) -> None:
    """The settings that belong to the watch itself (the others are validated by their
    objects)."""
    dtype = type(autocast).__name__ == "dtype" and str(autocast) in ("torch.bfloat16",
                                                                      "torch.float16")
    if not (autocast is None or dtype or autocast in AUTOCAST_NAMES):
        raise ConfigError(
            f"autocast must be 'auto' (detected from the training forward), None, 'bfloat16' "
            f"or 'float16' (the dtype training's autocast uses), got {autocast!r}."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable(model, batch), got {loss_fn!r}.")
    if probe_rows is not None and (isinstance(probe_rows, bool) or not isinstance(
            probe_rows, int) or probe_rows < 1):
        raise ConfigError(f"probe_rows must be an int ≥ 1 or None, got {probe_rows!r}.")
    if isinstance(overhead, bool) or not (isinstance(overhead, (int, float))
                                          and 0 < overhead < 1):
        raise ConfigError(
            f"overhead must be a fraction in (0, 1), e.g. 0.005, got {overhead!r}."
        )


class _NoProbeYet(Exception):
    """No probe batch at the first check: the capture hook was attached after the forward."""


def _no_event(*args: Any, **kwargs: Any) -> None:
    return None


def _is_world_zero(state: Any) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


def error_report(exc: BaseException, settings: Any, seconds: float, step: int) -> CheckReport:
    """The record of a check that could not run: verdict "error" with the reason."""
    return CheckReport(
        rel_distance=math.nan, verdict="error", mode=settings.mode, eps=settings.eps,
        thresholds=settings.thresholds, coordinates=0, evaluations=0, seconds=seconds,
        loss=math.nan, reasons=[f"error: the check failed: {type(exc).__name__}: {exc}"],
        probe={"step": step},
    )


def make_notification(report: CheckReport, transition: Any, *, run_id: str | None) -> Notification:
    """Title and body naming the worst layers and elements."""
    word = {"firing": "ALERT", "repeat": "ALERT (still firing)", "resolved": "resolved"}
    title = (f"gradwatch {word[transition.kind]}: gradient check at step {transition.step}"
             + (f" in run {run_id}" if run_id else ""))
    fired = report.fired_by()
    ranked = (report.kernels.worst_layers(3) if report.kernels is not None
              and fired == ["training kernels"] else report.worst_layers(3))
    worst = list[JsonValue](name for name, _ in ranked)
    lines = [f"verdict {report.verdict} by {' and '.join(fired)}, rel_distance "
             f"{report.rel_distance:.3g}"]
    lines += [f"- {reason}" for reason in report.reasons[:5]]
    if "backprop definition" in fired:
        for name, layer in report.worst_layers(3):
            if layer.verdict in ("warn", "alert"):
                element = layer.worst[0] if layer.worst else None
                where = (f"; worst element {list(element.index)}: analytic "
                         f"{element.analytic:.6g} vs numeric {element.numeric:.6g}"
                         if element else "")
                lines.append(f"layer {name}: rel_distance {layer.rel_distance:.3g}{where}")
    if "training kernels" in fired and report.kernels is not None:
        for name, kernel in report.kernels.worst_layers(3):
            if kernel.verdict in ("warn", "alert"):
                top = kernel.worst[0] if kernel.worst else None
                where = (f"; worst element {list(top.index)}: training {top.training:.6g} vs "
                         f"float64 {top.reference:.6g}" if top else "")
                lines.append(f"layer {name} (training kernels, {report.kernels.dtype}): ratio "
                             f"{kernel.ratio:.3g}{where}")
    return Notification.from_transition(
        transition, title=title, body="\n".join(lines), run_id=run_id,
        details={"rel_distance": report.rel_distance, "verdict": report.verdict,
                 "measurements": list[JsonValue](fired), "worst_layers": worst},
    )
