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
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from gradwatch.alerts.notify import Dispatcher, Notification, Notifier, make_notifier
from gradwatch.alerts.state import AlertPolicy, AlertTracker
from gradwatch.common.errors import (
    ConfigError,
    GradientAlertError,
    SpoolLockedError,
    UnsupportedModelError,
)
from gradwatch.common.version import __version__
from gradwatch.engine.core import make_settings
from gradwatch.engine.report import CheckReport, Mode, Thresholds
from gradwatch.record.spool import Spool, default_spool_dir, replay
from gradwatch.record.writer import (
    Deliverer,
    check_payload,
    new_local_id,
    params_payload,
    report_payload,
    resolve_tracking_uri,
    run_payload,
    terminate_payload,
)
from gradwatch.watch.budget import STEP_WINDOW, AdaptiveBudget, Rotation
from gradwatch.watch.distributed import agree, world
from gradwatch.watch.probe import ProbeCapture
from gradwatch.watch.schedule import Schedule, parse_every

__all__ = ["CheckPlan", "GradWatch"]

logger = logging.getLogger("gradwatch")

OnAlert = Literal["continue", "stop", "raise"]
ON_ALERT = ("continue", "stop", "raise")
#: How long train end waits for the spool to reach MLflow before leaving the rest on disk.
FLUSH_TIMEOUT = 30.0
#: close() at interpreter exit, when the program did not call it: bounded, the spool keeps
#: what is not delivered by then for the next start or `gradwatch flush`.
EXIT_TIMEOUT = 10.0
#: Loss evaluations of a check when `budget=` is fixed but None reaches the engine.
DEFAULT_BUDGET = 2000


class CheckPlan:
    """What one check should do: handed to the `run` of `GradWatch.check_with` (adapters).

    Example:
        >>> plan = CheckPlan(step=10, mode="auto", eps=1e-7, budget=30, thresholds=Thresholds(),
        ...                  seed=10, rotation=Rotation())
        >>> plan.tensors({"w": 1000, "b": 10})  # 30 evaluations cannot cover both
        ['w']
        >>> sorted(plan.check_kwargs())
        ['budget', 'eps', 'mode', 'seed', 'thresholds']
    """

    def __init__(self, *, step: int, mode: Mode, eps: float, budget: int,
                 thresholds: Thresholds, seed: int, rotation: Rotation | None) -> None:
        self.step, self.mode, self.eps, self.budget = step, mode, eps, budget
        self.thresholds, self.seed, self.rotation = thresholds, seed, rotation
        self.rotating = False
        self._chosen: tuple[list[str] | None] | None = None

    def check_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `gradwatch.check` / `check_module` / `check_jax`."""
        return {"mode": self.mode, "eps": self.eps, "budget": self.budget,
                "thresholds": self.thresholds, "seed": self.seed}

    def tensors(self, sizes: Mapping[str, int]) -> list[str] | None:
        """The tensors (name → element count, in the model's order) this check covers: None
        for all of them, or the next ones of the rotation when the budget cannot cover them
        all (the following checks cover the rest). Decided once per check."""
        if self._chosen is None:
            chosen = self.rotation.pick(sizes, self.budget) if self.rotation else None
            self._chosen = (chosen,)
            self.rotating = chosen is not None
        return self._chosen[0]


class GradWatch:
    """Numerical gradient checks during training, logged to MLflow, with alerts.

    Args:
        every: optimizer steps between checks (int), or a wall-clock schedule: a duration
            ("30min", "2h") or a cron expression ("0 * * * *").
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
        budget: loss evaluations per check. None (default) sizes each check from the measured
            cost of a training step, of a loss evaluation and of a check's fixed part, so
            checks take about `overhead` of training time, covering the tensors across
            successive checks when one check cannot cover them all.
        overhead: the share of training time the adaptive budget aims at. The default, 0.005,
            is half of gradwatch's 1% goal: the rest is margin for the record's delivery in a
            background thread and for a noisy machine.
        mode, eps, thresholds, include, exclude, seed: as in `gradwatch.check_module`.
        strict: re-raise exceptions from inside the check instead of recording an "error" check.
        on_alert: "continue", "stop" (ask the trainer to stop; HF `should_training_stop`) or
            "raise" (`GradientAlertError` out of `step()` / the HF event).
        alert_policy: pending/firing/resolved counted in checks (`AlertPolicy`).
        notify: apprise URLs ("slack://…", "mailto://…") or http(s) URLs for the built-in JSON
            webhook, or `Notifier` objects. Secrets in URLs are never logged nor sent to MLflow.
        tracking_uri, run_id, experiment_name: where to log (see the README's "MLflow record").
        spool_dir: the local journal (default `$GRADWATCH_SPOOL_DIR` or ~/.cache/gradwatch/spool).
        mlflow: False to keep checks and alerts but log nothing to MLflow.
        report: log the run report `gradwatch/report.html` (a self-contained HTML page of the
            run's checks, viewable in the MLflow UI) at train end and every `report_every`
            checks, and at train end also `gradwatch/report.png`; they are built from the
            MLflow record by the background delivery thread.
        report_every: checks between two refreshes of the report during training (default 10).
        clock: seconds since the epoch for measurement timestamps (tests pass their own).
    """

    def __init__(
        self,
        every: int | str = 1000,
        *,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        probe: Any = None,
        first_step: bool = True,
        probe_rows: int | None = 8,
        mode: Mode = "auto",
        budget: int | None = None,
        overhead: float = 0.005,
        eps: float | None = None,
        thresholds: Thresholds | Mapping[str, float] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        seed: int = 0,
        strict: bool = False,
        on_alert: OnAlert = "continue",
        alert_policy: AlertPolicy | None = None,
        notify: Sequence[str | Notifier] = (),
        tracking_uri: str | None = None,
        run_id: str | None = None,
        experiment_name: str | None = None,
        spool_dir: str | Path | None = None,
        mlflow: bool = True,
        report: bool = True,
        report_every: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.every = parse_every(every)
        self.settings = make_settings(
            eps=1e-7 if eps is None else eps, mode=mode, thresholds=thresholds, budget=budget,
            seed=seed,
        )
        if not (isinstance(overhead, (int, float)) and 0 < overhead < 1):
            raise ConfigError(
                f"overhead must be a fraction in (0, 1), e.g. 0.005, got {overhead!r}."
            )
        if on_alert not in ON_ALERT:
            raise ConfigError(f"on_alert must be one of {ON_ALERT}, got {on_alert!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable(model, batch), got {loss_fn!r}.")
        if isinstance(notify, (str, bytes)):
            notify = [notify]
        if probe_rows is not None and (isinstance(probe_rows, bool) or not isinstance(
                probe_rows, int) or probe_rows < 1):
            raise ConfigError(f"probe_rows must be an int ≥ 1 or None, got {probe_rows!r}.")
        if isinstance(report_every, bool) or not isinstance(report_every, int) \
                or report_every < 1:
            raise ConfigError(f"report_every must be an int ≥ 1 (checks between two report "
                              f"refreshes; default 10), got {report_every!r}; pass report=False "
                              f"for no report at all.")
        self.report = bool(report)
        self.report_every = report_every
        self._recorded = 0
        self.probe_rows = probe_rows
        self.loss_fn = loss_fn
        self.probe = probe
        self.include, self.exclude = include, exclude
        self.strict = strict
        self.on_alert: OnAlert = on_alert
        self.policy = alert_policy or AlertPolicy()
        self.notifiers = [make_notifier(spec) for spec in notify]
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_name = experiment_name
        self.spool_root = Path(spool_dir) if spool_dir is not None else None
        self.use_mlflow = mlflow
        self.clock = clock
        self.schedule = Schedule(self.every, first_step=first_step)
        self.tracker = AlertTracker(self.policy)
        self.capture = ProbeCapture()
        self.adaptive = AdaptiveBudget(overhead) if budget is None else None
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
        self.created_run = False
        #: The spool's key while the run is not known yet (`_record.Deliverer`).
        self.local_id: str | None = None
        self._resolved_uri: str | None = None
        self._restored_run_id: str | None = None  # from load_state_dict (a resumed training)
        self._spool: Spool | None = None
        self._replay: threading.Thread | None = None  # delivering earlier runs' leftovers
        self._dispatcher: Dispatcher | None = None
        self._ready = False

    def __repr__(self) -> str:
        return (f"GradWatch(every={self.every.describe()!r}, mode={self.settings.mode!r}, "
                f"budget={self.settings.budget if self.adaptive is None else 'adaptive'!r}, "
                f"on_alert={self.on_alert!r})")

    # ------------------------------------------------------------------ lifecycle
    def setup(self, model: Any = None, *, active_run_id: str | None = None) -> None:
        """Resolve the MLflow run, log params once, start the scheduler and the spool."""
        if self._ready:
            return
        self._ready = True
        # A plain loop may end without close(): the interpreter's exit then closes (bounded),
        # so the background delivery is not killed inside native code at finalisation (which
        # aborts the process) and what it holds reaches MLflow.
        atexit.register(self._close_at_exit)
        if model is not None and self.probe is None:
            self.capture.attach(model)
        self.schedule.start()
        if self.notifiers:
            self._dispatcher = Dispatcher(self.notifiers)
        if self.use_mlflow:
            self._setup_mlflow(active_run_id)

    def _setup_mlflow(self, active_run_id: str | None) -> None:
        try:
            self._open_record(active_run_id)
        except Exception as exc:  # never crash training over its record
            if self.strict:
                raise
            logger.error("gradwatch: cannot record to MLflow (%s: %s); checks and alerts go on "
                         "without it", type(exc).__name__, exc)
            self.use_mlflow = False
            if self._spool is not None:
                self._spool.close(timeout=1.0)
                self._spool = None

    def _open_record(self, active_run_id: str | None) -> None:
        """Open the spool; nothing here waits on the network (the run is resolved, or created,
        by the background delivery: a tracking server that is down or slow at train start
        costs training nothing, and the records wait on disk under a local id)."""
        self._resolved_uri = resolve_tracking_uri(self.tracking_uri)
        uri = self._resolved_uri
        known = (self.run_id or active_run_id or self._restored_run_id
                 or os.environ.get("MLFLOW_RUN_ID"))
        if known:
            self.run_id, self.created_run, self.local_id = known, False, None
        else:
            self.local_id, self.created_run = new_local_id(), True
        key = str(self.run_id or self.local_id)
        self.tracker.key = key
        root = self.spool_root or default_spool_dir()
        deliverer = Deliverer(root / key, on_run=self._run_created)
        # removed at close once all is delivered (run and terminate records included)
        self._spool = Spool(root / key, deliver=deliverer, remove_when_delivered=True)
        if self.local_id is not None:
            self._spool.append(run_payload(local_id=self.local_id, tracking_uri=uri,
                                           experiment_name=self.experiment_name))
        self._spool.start()
        self._replay = replay_leftovers(root, skip=root / key)
        self._spool.append(params_payload(self.params(), run_id=self.run_id, tracking_uri=uri,
                                          local_id=self.local_id))

    def _run_created(self, run_id: str) -> None:
        """The delivery thread created (or found) the run of this spool's local id."""
        self.run_id = run_id
        logger.info("gradwatch: recording into MLflow run %s", run_id)

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
        """Stop the scheduler, deliver what the spool holds (what is left stays on disk for
        `gradwatch flush`), drain notifications, end the run if gradwatch created it."""
        atexit.unregister(self._close_at_exit)
        self.schedule.shutdown()
        self.capture.detach()
        if self._spool is not None:
            if self.report and self._recorded:
                self._request_report(png=True)  # the final one also as a picture
            if self.created_run:
                self._append(terminate_payload(run_id=self.run_id, local_id=self.local_id,
                                               tracking_uri=self._resolved_uri), "end the run")
            deadline = time.monotonic() + timeout
            result = self._spool.drain(timeout=timeout)
            self._spool.close(timeout=1.0)
            if self._replay is not None:  # earlier runs' leftovers, within the same timeout
                self._replay.join(max(0.0, deadline - time.monotonic()))
                self._replay = None
            if result.pending:
                logger.warning(
                    "gradwatch: %d record(s) could not reach MLflow yet (%s); they stay in %s — "
                    "the next GradWatch start delivers them in the background, or run "
                    "`gradwatch flush` when the tracking server is back",
                    result.pending, result.last_error or "still trying", self._spool.directory,
                )
            self._spool = None
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
            if rank == 0 and self.unsupported is None:
                report = self._run(step, run)
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
        budget = self.settings.budget
        if self.adaptive is not None:
            budget = self.adaptive.next_budget(since)
        return CheckPlan(
            step=step, mode=self.settings.mode, eps=self.settings.eps,
            budget=budget or DEFAULT_BUDGET, thresholds=self.settings.thresholds,
            seed=self.settings.seed + step,
            rotation=self.rotation if self.adaptive is not None else None,
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
        # No rotation: auto mode screens every tensor jointly in every check (`_screen`).
        include, exclude = self.include, self.exclude
        report = check_module(
            model, batch, loss_fn or self.loss_fn or default_loss, include=include,
            exclude=exclude, loss_scale=self._loss_scale or None, **plan.check_kwargs(),
        )
        report.probe.update({"step": step, "from": source})
        return report

    def _record(self, report: CheckReport, step: int, timestamp_ms: int, alert: str | None) -> None:
        if self._spool is None:
            return
        try:
            payloads = [check_payload(
                report, step=step, timestamp_ms=timestamp_ms, run_id=self.run_id,
                tracking_uri=self._resolved_uri, alert=alert, local_id=self.local_id,
            )]
            if self.report and (self._recorded + 1) % self.report_every == 0:
                payloads.append(self._report_payload())
            self._spool.append_many(payloads)  # one fsync for the check and its report
            self._recorded += 1
        except Exception as exc:
            if self.strict:
                raise
            logger.error("gradwatch: could not spool the check at step %d: %s", step, exc)

    def _request_report(self, *, png: bool = False) -> None:
        self._append(self._report_payload(png=png), "ask for the run report")

    def _report_payload(self, *, png: bool = False) -> dict[str, Any]:
        return report_payload(run_id=self.run_id, tracking_uri=self._resolved_uri, png=png,
                              local_id=self.local_id)

    def _append(self, payload: dict[str, Any], what: str) -> None:
        if self._spool is None:
            return
        try:
            self._spool.append(payload)
        except Exception as exc:
            if self.strict:
                raise
            logger.error("gradwatch: could not %s: %s", what, exc)

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
        import mlflow

        active = mlflow.active_run()  # HF's MLflowCallback opened it just before us
        if _is_world_zero(state):
            self.setup(kwargs.get("model"), active_run_id=active.info.run_id if active else None)
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


def replay_leftovers(root: Path, *, skip: Path) -> threading.Thread | None:
    """Deliver, in a daemon thread, what earlier runs left in their spools (a crash, a dead
    server at train end). Spools another live process owns are left to it."""
    try:
        others = [p for p in root.iterdir() if p.is_dir() and p != skip]
    except OSError:
        return None
    if not others:
        return None

    def work() -> None:
        for directory in others:
            try:
                result = replay(directory, Deliverer(directory), timeout=FLUSH_TIMEOUT)
            except SpoolLockedError:
                continue
            except Exception as exc:
                logger.warning("gradwatch: could not replay %s: %s", directory, exc)
                continue
            if result.delivered:
                logger.info("gradwatch: delivered %d record(s) left in %s", result.delivered,
                            directory)

    thread = threading.Thread(target=work, name="gradwatch-replay", daemon=True)
    thread.start()
    return thread


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
    lines = [f"verdict {report.verdict}, rel_distance {report.rel_distance:.3g}"]
    lines += [f"- {reason}" for reason in report.reasons[:5]]
    for name, layer in report.worst_layers(3):
        if layer.verdict in ("warn", "alert"):
            element = layer.worst[0] if layer.worst else None
            where = (f"; worst element {list(element.index)}: analytic {element.analytic:.6g} "
                     f"vs numeric {element.numeric:.6g}" if element else "")
            lines.append(f"layer {name}: rel_distance {layer.rel_distance:.3g}{where}")
    return Notification.from_transition(
        transition, title=title, body="\n".join(lines), run_id=run_id,
        details={"rel_distance": report.rel_distance, "verdict": report.verdict,
                 "worst_layers": [name for name, _ in report.worst_layers(3)]},
    )
