"""The recorder a `GradWatch` is given: `RecordSettings`, the `Recorder` protocol, MLflow's.

`GradWatch` depends on the small `Recorder` protocol only, as an HTTP client depends on its
transport: `MlflowRecorder` (the default) holds everything MLflow — the tracking URI, the run
(resolved or created by the background delivery), the durable spool and its `Deliverer`, the
replay of earlier runs' leftovers, the params, the run report requests, ending the run, the
flush at close — `NullRecorder` records nothing (`mlflow=False`), and a test can pass its own.

Imports: gradwatch.common, gradwatch.engine (the report type), gradwatch.record. The run
report is built by `gradwatch.dashboard`, above this package: whoever builds an
`MlflowRecorder` hands the builder in (`report_builder=`; `GradWatch` does).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from gradwatch.common.errors import ConfigError, SpoolLockedError
from gradwatch.common.settings import Settings
from gradwatch.engine.report import CheckReport
from gradwatch.record.replay import default_spool_dir, replay
from gradwatch.record.spool import FlushResult, Spool
from gradwatch.record.writer import (
    Deliverer,
    ReportBuilder,
    check_payload,
    new_local_id,
    params_payload,
    report_payload,
    resolve_tracking_uri,
    run_payload,
    terminate_payload,
)

__all__ = [
    "FLUSH_TIMEOUT",
    "MlflowRecorder",
    "NullRecorder",
    "RecordSettings",
    "Recorder",
    "replay_leftovers",
]

logger = logging.getLogger("gradwatch")

#: How long train end waits for the spool to reach MLflow before leaving the rest on disk.
FLUSH_TIMEOUT = 30.0


@dataclass(frozen=True, kw_only=True, repr=False)
class RecordSettings(Settings):
    """Where and how a `GradWatch` records its checks in MLflow (see the README's "MLflow
    record"). `GradWatch(record=RecordSettings(...))`, or the shorthands of the same names
    (`mlflow=` for `enabled`).

    Args:
        tracking_uri: the tracking server or store (default: MLflow's own, from
            `MLFLOW_TRACKING_URI` or ./mlflow.db).
        run_id: the run to log into (default: the framework's run, a resumed checkpoint's,
            `MLFLOW_RUN_ID`, else a new run that gradwatch creates and ends).
        experiment_name: the experiment of a run gradwatch creates (default
            `MLFLOW_EXPERIMENT_NAME`, else "gradwatch").
        spool_dir: the local journal (default `$GRADWATCH_SPOOL_DIR` or
            ~/.cache/gradwatch/spool).
        enabled: False to keep checks and alerts but log nothing to MLflow (`mlflow=False`).
        report: log the run report `gradwatch/report.html` (a self-contained HTML page of the
            run's checks, viewable in the MLflow UI) at train end and every `report_every`
            checks, and at train end also `gradwatch/report.png`; they are built from the
            MLflow record by the background delivery thread.
        report_every: checks between two refreshes of the report during training.

    Example:
        >>> RecordSettings(tracking_uri="http://127.0.0.1:5000", report_every=5)
        RecordSettings(tracking_uri='http://127.0.0.1:5000', report_every=5)
        >>> RecordSettings(report_every=0)
        Traceback (most recent call last):
        ...
        gradwatch.ConfigError: report_every must be an int ≥ 1 ...
    """

    NONE_IS_DEFAULT: ClassVar[frozenset[str]] = frozenset({"tracking_uri", "run_id",
                                                           "experiment_name", "spool_dir"})

    tracking_uri: str | None = None
    run_id: str | None = None
    experiment_name: str | None = None
    spool_dir: str | os.PathLike[str] | None = None
    enabled: bool = True
    report: bool = True
    report_every: int = 10

    def __post_init__(self) -> None:
        self._fill_defaults()
        for name in ("tracking_uri", "run_id", "experiment_name"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string or None, got "
                                  f"{type(value).__name__}.")
        if self.spool_dir is not None:
            if not isinstance(self.spool_dir, (str, os.PathLike)):
                raise ConfigError(f"spool_dir must be a folder path or None, got "
                                  f"{type(self.spool_dir).__name__} {self.spool_dir!r}.")
            object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "report", bool(self.report))
        every = self.report_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"report_every must be an int ≥ 1 (checks between two report "
                              f"refreshes; default 10), got {every!r}; pass report=False "
                              f"for no report at all.")


@runtime_checkable
class Recorder(Protocol):
    """What `GradWatch` needs from its record (`MlflowRecorder`, `NullRecorder`, your own).

    The watch calls `open` once from `setup` (rank zero only), `record_check` after every
    check, and `close` at train end or interpreter exit; an exception out of `open` or
    `record_check` is logged and training goes on (`GradWatch(strict=True)` re-raises).
    `run_id` is the run being recorded into once known (it goes into notifications and the
    watch's `state_dict`); `enabled` False says that nothing is recorded.
    """

    run_id: str | None

    @property
    def enabled(self) -> bool: ...

    def active_run_id(self) -> str | None:
        """The run a framework opened in this process (HF's MLflowCallback, Keras), if any."""
        ...

    def open(self, params: Mapping[str, Any], *, active_run_id: str | None = None,
             restored_run_id: str | None = None) -> str | None:
        """Start recording: `params` once per run; the run is the one given to the recorder,
        else `active_run_id` (a framework's), else `restored_run_id` (a resumed checkpoint's).
        Returns a key unique to this record (the alert ids are derived from it), or None."""
        ...

    def record_check(self, report: CheckReport, *, step: int, timestamp_ms: int,
                     alert: str | None) -> None:
        """Record one check; `alert` is "firing"/"resolved" once an alert has fired."""
        ...

    def close(self, timeout: float) -> None:
        """Deliver what is left within `timeout` seconds and end the record (idempotent)."""
        ...


class NullRecorder:
    """Records nothing: `GradWatch(mlflow=False)`; it keeps the run id and tracking URI given.

    Example:
        >>> recorder = NullRecorder(RecordSettings(enabled=False, run_id="abc"))
        >>> recorder.enabled, recorder.run_id, recorder.open({})
        (False, 'abc', None)
    """

    enabled = False

    def __init__(self, settings: RecordSettings | None = None) -> None:
        settings = settings or RecordSettings()
        self.run_id: str | None = settings.run_id
        self.tracking_uri: str | None = settings.tracking_uri

    def __repr__(self) -> str:
        return "NullRecorder()"

    def active_run_id(self) -> str | None:
        return None

    def open(self, params: Mapping[str, Any], *, active_run_id: str | None = None,
             restored_run_id: str | None = None) -> str | None:
        return None

    def record_check(self, report: CheckReport, *, step: int, timestamp_ms: int,
                     alert: str | None) -> None:
        return None

    def close(self, timeout: float) -> None:
        return None


class MlflowRecorder:
    """The MLflow record of a `GradWatch`: spooled to disk on the training thread, delivered
    by a background thread, never waiting on the network at train start.

    `open` settles the run — the one given, a framework's, a resumed checkpoint's or
    `MLFLOW_RUN_ID`; else a local id whose run the delivery thread creates when the tracking
    server answers (`run_id` is then set from that thread) — opens the spool, starts its
    delivery and a replay of earlier runs' leftovers, and spools the params. `close` asks for
    the final report, ends a run it created and waits up to `timeout` for the delivery; what
    is left stays on disk for the next start or `gradwatch flush`.

    Args:
        settings: `RecordSettings` (the tracking URI, run, experiment, spool, report).
        report_builder: builds the run report a "report" record asks for;
            `gradwatch.dashboard.report.log_requested_report`, which `GradWatch` hands to a
            recorder that has none.
        strict: re-raise failures to spool a report request or the end of the run, instead
            of logging them (`GradWatch(strict=True)` builds its recorder so).

    Example:
        >>> recorder = MlflowRecorder(RecordSettings(tracking_uri="http://127.0.0.1:5000"))
        >>> recorder
        MlflowRecorder(RecordSettings(tracking_uri='http://127.0.0.1:5000'))
        >>> recorder.run_id is None, recorder.enabled
        (True, True)
    """

    enabled = True

    def __init__(self, settings: RecordSettings | None = None, *,
                 report_builder: ReportBuilder | None = None, strict: bool = False) -> None:
        if settings is not None and not isinstance(settings, RecordSettings):
            raise ConfigError(f"MlflowRecorder takes a gradwatch.RecordSettings, got "
                              f"{type(settings).__name__}.")
        self.settings = settings or RecordSettings()
        self.report_builder = report_builder
        self.strict = strict
        #: As given; a framework's adapter may set it before `open` (Lightning's logger).
        self.tracking_uri: str | None = self.settings.tracking_uri
        self.run_id: str | None = self.settings.run_id
        #: The run is gradwatch's: created by the delivery for `local_id`, ended at close.
        self.created_run = False
        #: The spool's key while the run is not known yet (`Deliverer`).
        self.local_id: str | None = None
        self.resolved_uri: str | None = None
        self._spool: Spool | None = None
        self._replay: threading.Thread | None = None  # delivering earlier runs' leftovers
        self._recorded = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"

    @property
    def directory(self) -> Path | None:
        """The spool folder while open."""
        return self._spool.directory if self._spool is not None else None

    def active_run_id(self) -> str | None:
        import mlflow

        active = mlflow.active_run()
        return active.info.run_id if active is not None else None

    def open(self, params: Mapping[str, Any], *, active_run_id: str | None = None,
             restored_run_id: str | None = None) -> str:
        """Open the spool; nothing here waits on the network (the run is resolved, or
        created, by the background delivery: a tracking server that is down or slow at train
        start costs training nothing, and the records wait on disk under a local id)."""
        try:
            return self._open(params, active_run_id, restored_run_id)
        except BaseException:
            if self._spool is not None:
                self._spool.close(timeout=1.0)
                self._spool = None
            raise

    def _open(self, params: Mapping[str, Any], active_run_id: str | None,
              restored_run_id: str | None) -> str:
        self.resolved_uri = uri = resolve_tracking_uri(self.tracking_uri)
        known = (self.run_id or active_run_id or restored_run_id
                 or os.environ.get("MLFLOW_RUN_ID"))
        if known:
            self.run_id, self.created_run, self.local_id = known, False, None
        else:
            self.local_id, self.created_run = new_local_id(), True
        key = str(self.run_id or self.local_id)
        root = Path(self.settings.spool_dir or default_spool_dir())
        deliverer = Deliverer(root / key, on_run=self._run_created,
                              report_builder=self.report_builder)
        # removed at close once all is delivered (run and terminate records included)
        self._spool = Spool(root / key, deliver=deliverer, remove_when_delivered=True)
        if self.local_id is not None:
            self._spool.append(run_payload(local_id=self.local_id, tracking_uri=uri,
                                           experiment_name=self.settings.experiment_name))
        self._spool.start()
        self._replay = replay_leftovers(root, skip=root / key,
                                        report_builder=self.report_builder)
        self._spool.append(params_payload(params, run_id=self.run_id, tracking_uri=uri,
                                          local_id=self.local_id))
        return key

    def _run_created(self, run_id: str) -> None:
        """The delivery thread created (or found) the run of this spool's local id."""
        self.run_id = run_id
        logger.info("gradwatch: recording into MLflow run %s", run_id)

    def record_check(self, report: CheckReport, *, step: int, timestamp_ms: int,
                     alert: str | None) -> None:
        """Spool the check, and every `report_every` checks a report refresh with it (one
        fsync for both)."""
        if self._spool is None:
            return
        payloads = [check_payload(
            report, step=step, timestamp_ms=timestamp_ms, run_id=self.run_id,
            tracking_uri=self.resolved_uri, alert=alert, local_id=self.local_id,
        )]
        if self.settings.report and (self._recorded + 1) % self.settings.report_every == 0:
            payloads.append(self._report_payload())
        self._spool.append_many(payloads)
        self._recorded += 1

    def request_report(self, *, png: bool = False) -> None:
        """Ask the delivery thread to rebuild the run report after the records spooled so far
        (`png`: also the static picture)."""
        self._append(self._report_payload(png=png), "ask for the run report")

    def _report_payload(self, *, png: bool = False) -> dict[str, Any]:
        return report_payload(run_id=self.run_id, tracking_uri=self.resolved_uri, png=png,
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

    def flush(self, timeout: float | None = None) -> FlushResult | None:
        """Deliver what the spool holds now, on this thread (None when not open)."""
        return self._spool.flush(timeout=timeout) if self._spool is not None else None

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Ask for the final report, end the run if gradwatch created it, and deliver what the
        spool holds within `timeout` (what is left stays on disk for `gradwatch flush`)."""
        if self._spool is None:
            return
        if self.settings.report and self._recorded:
            self.request_report(png=True)  # the final one also as a picture
        if self.created_run:
            self._append(terminate_payload(run_id=self.run_id, local_id=self.local_id,
                                           tracking_uri=self.resolved_uri), "end the run")
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


def replay_leftovers(root: Path, *, skip: Path,
                     report_builder: ReportBuilder | None = None) -> threading.Thread | None:
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
                deliver = Deliverer(directory, report_builder=report_builder)
                result = replay(directory, deliver, timeout=FLUSH_TIMEOUT)
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
