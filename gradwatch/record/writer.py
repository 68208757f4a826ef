"""How gradwatch's MLflow record is written: the payloads, and their delivery to MLflow.

A payload is the record of a check, the run's params, a request for the run report, a run to
create or to end.

Imports: gradwatch.common, gradwatch.engine (the report type), and gradwatch.record (the layout,
the spool). What is logged where is `gradwatch.record.layout`, a contract with the monitor, the
dashboards and users' own queries. The run report is built by `gradwatch.dashboard`, above this
package: whoever delivers "report" records hands the builder in (`Deliverer(report_builder=)`).

Everything goes through `MlflowClient` with an explicit run id, never the fluent API (which
silently creates runs). A record is a plain JSON-able dict (a "payload") so it can be spooled
to disk first and delivered later, by another process if need be (`gradwatch flush`).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradwatch.engine.report import CheckReport
from gradwatch.record.layout import (
    ALERT_TAG,
    COVERAGE_KINDS,
    COVERAGE_PREFIX,
    CREATED_TAG,
    DEFAULT_EXPERIMENT,
    ESTIMATED,
    EVALUATIONS,
    LAST_STEP_TAG,
    LOCAL_ID_TAG,
    MAX_ELEMENT_ERROR,
    PRECISION_DISTANCE,
    PRECISION_LAYER_PREFIX,
    PRECISION_RATIO,
    PRECISION_REFERENCE,
    PRECISION_VERDICT,
    REL_DISTANCE,
    SECONDS,
    STATUS_TAG,
    VERDICT,
    VERDICT_CODES,
    artifact_path,
    encode_metric,
    layer_metric_keys,
)
from gradwatch.record.spool import RUN_FILE  # in a local id's spool: the run it became

__all__ = [
    "RUN_FILE",
    "Deliverer",
    "ReportBuilder",
    "check_payload",
    "deliver_payload",
    "new_local_id",
    "params_payload",
    "report_payload",
    "resolve_tracking_uri",
    "run_payload",
    "terminate_payload",
]

#: MLflow's limits (mlflow.utils.validation) on the entities of one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

#: Builds and logs the run report a "report" record asks for: (MLflow client, payload) → None.
#: `gradwatch.dashboard.report.log_requested_report` is the one gradwatch has; the record
#: package cannot import it (the dashboard reads the record), so deliverers are given it.
ReportBuilder = Callable[[Any, Mapping[str, Any]], None]


def check_payload(
    report: CheckReport,
    *,
    step: int,
    timestamp_ms: int,
    run_id: str | None,
    tracking_uri: str | None,
    alert: str | None = None,
    local_id: str | None = None,
) -> dict[str, Any]:
    """The MLflow record of one check, as a JSON-able payload (the layout:
    `gradwatch.record.layout`). `run_id` None: the spool's run is not known yet, `local_id`
    names it (`Deliverer`)."""
    metrics: list[list[Any]] = [
        [REL_DISTANCE, encode_metric(report.rel_distance), timestamp_ms, step],
        [VERDICT, float(VERDICT_CODES[report.verdict]), timestamp_ms, step],
        [MAX_ELEMENT_ERROR, encode_metric(report.max_element_error), timestamp_ms, step],
        [EVALUATIONS, float(report.evaluations), timestamp_ms, step],
        [SECONDS, float(report.seconds), timestamp_ms, step],
    ]
    metrics.append([ESTIMATED, float(report.estimated), timestamp_ms, step])
    for what in COVERAGE_KINDS:
        if what in report.coverage:
            metrics.append([f"{COVERAGE_PREFIX}{what}", float(report.coverage[what]),
                            timestamp_ms, step])
    checked = {n: layer for n, layer in report.layers.items() if layer.checked or layer.directions}
    keys = layer_metric_keys(report.layers)
    for name, layer in checked.items():
        metrics.append([keys[name], encode_metric(layer.rel_distance), timestamp_ms, step])
    metrics += _kernel_metrics(report, timestamp_ms, step)
    tags = {STATUS_TAG: report.verdict, LAST_STEP_TAG: str(step)}
    if alert is not None:
        tags[ALERT_TAG] = alert
    return {
        "kind": "check",
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "local_id": local_id,
        "step": step,
        "metrics": metrics,
        "params": {},
        "tags": tags,
        "artifacts": {artifact_path(step): report.model_dump_json()},
    }


def _kernel_metrics(report: CheckReport, timestamp_ms: int, step: int) -> list[list[Any]]:
    """The training-kernels measurement's metrics (`layout`), when it ran."""
    kernels = report.kernels
    if kernels is None or kernels.verdict is None:
        return []
    values = {PRECISION_VERDICT: float(VERDICT_CODES[kernels.verdict])}
    if kernels.status == "measured":
        values.update({PRECISION_RATIO: kernels.ratio, PRECISION_DISTANCE: kernels.distance,
                       PRECISION_REFERENCE: kernels.reference_distance})
        keys = layer_metric_keys(kernels.layers, PRECISION_LAYER_PREFIX)
        values.update({keys[name]: layer.ratio for name, layer in kernels.layers.items()})
    return [[key, encode_metric(value), timestamp_ms, step] for key, value in values.items()]


def params_payload(
    params: Mapping[str, Any], *, run_id: str | None, tracking_uri: str | None,
    local_id: str | None = None,
) -> dict[str, Any]:
    """The once-per-run params record (`gradwatch.every`, `gradwatch.mode`, ...)."""
    return {
        "kind": "params",
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "local_id": local_id,
        "metrics": [],
        "params": {key: str(value) for key, value in params.items()},
        "tags": {},
        "artifacts": {},
    }


def report_payload(
    *, run_id: str | None, tracking_uri: str | None, png: bool = False,
    local_id: str | None = None,
) -> dict[str, Any]:
    """A request to rebuild and log the run report (`gradwatch/report.html`) from the record.

    It travels through the spool like the checks, after them, so the report it builds sees
    every check logged before it was asked for. `png`: also `gradwatch/report.png`, the static
    picture for places that run no scripts (matplotlib; left out when it is not installed).
    """
    return {"kind": "report", "tracking_uri": tracking_uri, "run_id": run_id, "png": png,
            "local_id": local_id}


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI to log to, made absolute for local stores so replays land in the same
    place from any working directory. Without one: MLflow's own default (env, or ./mlflow.db).

    MLflow is only imported when it must be asked (no URI given, none in the environment):
    importing it takes a second or more, which the training thread should not pay at its
    first step for a URI it already has.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None or "mlflow" in sys.modules:
        import mlflow  # the user may have called mlflow.set_tracking_uri()

        uri = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = str(Path(uri).resolve())
    return uri


def run_payload(
    *, local_id: str, tracking_uri: str | None, experiment_name: str | None,
    run_name: str | None = None, tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The first record of a spool whose run is not known yet: which run to create (or find,
    by its `gradwatch.local_id` tag) when the tracking server answers. The experiment is
    settled now from `MLFLOW_EXPERIMENT_NAME` if need be, so a later replay from another
    process lands in the same place."""
    name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    return {"kind": "run", "tracking_uri": tracking_uri, "run_id": None, "local_id": local_id,
            "experiment_name": name, "run_name": run_name, "tags": dict(tags or {})}


def terminate_payload(*, run_id: str | None, local_id: str | None,
                      tracking_uri: str | None) -> dict[str, Any]:
    """End a run gradwatch created (FINISHED), after every record before it."""
    return {"kind": "terminate", "tracking_uri": tracking_uri, "run_id": run_id,
            "local_id": local_id}


def new_local_id() -> str:
    """A spool key for a run that is not known yet (`local-` + 32 hex digits)."""
    return "local-" + uuid.uuid4().hex


class Deliverer:
    """The spool's `deliver`: one MLflow client per tracking URI, and the run of a local id.

    A spool opened before its run was known (the tracking server was down at train start) holds
    a "run" record first; delivering it finds the run tagged `gradwatch.local_id=<id>` or
    creates it (so a crash after the creation, or another process replaying the spool, never
    creates a second one; the spool's lock keeps two processes off one spool), and writes the
    answer to `<spool>/run.json`, from which the records behind it — and any later replay — take
    their run id. `on_run(run_id)` is told when a local id gets its run.

    `report_builder` builds the run report a "report" record asks for (`deliver_payload`);
    without one such a record is rejected, so every deliverer of a spool that may hold them —
    the watch, `gradwatch flush`, replays of leftover spools — passes
    `gradwatch.dashboard.report.log_requested_report`.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 on_run: Any = None, clients: dict[str, Any] | None = None,
                 report_builder: ReportBuilder | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.on_run = on_run
        self.report_builder = report_builder
        self.clients: dict[str, Any] = clients if clients is not None else {}
        self.runs: dict[str, str] = {}
        if self.directory is not None and (self.directory / RUN_FILE).is_file():
            try:
                known = json.loads((self.directory / RUN_FILE).read_text(encoding="utf-8"))
                self.runs[str(known["local_id"])] = str(known["run_id"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: the "run" record (still in the journal) is found again

    def client(self, payload: Mapping[str, Any]) -> Any:
        from mlflow import MlflowClient

        uri = payload.get("tracking_uri")
        key = str(uri)
        if key not in self.clients:
            self.clients[key] = MlflowClient(tracking_uri=uri)
        return self.clients[key]

    def __call__(self, payload: Mapping[str, Any]) -> None:
        from gradwatch.record.spool import RejectedRecord

        local_id = payload.get("local_id")
        if payload.get("kind") == "run":
            self._resolve(payload)
            return
        if payload.get("run_id") is None and local_id is not None:
            run_id = self.runs.get(str(local_id))
            if run_id is None:
                raise RejectedRecord(f"the run of {local_id} was never created (its 'run' "
                                     f"record was refused; see rejected.jsonl)")
            payload = {**payload, "run_id": run_id}
        if payload.get("kind") == "terminate":
            self.client(payload).set_terminated(payload["run_id"])
            return
        deliver_payload(payload, self.client(payload), report_builder=self.report_builder)

    def _resolve(self, payload: Mapping[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        from gradwatch.record.spool import RejectedRecord

        local_id = str(payload["local_id"])
        if local_id in self.runs:
            return
        client = self.client(payload)
        name = str(payload["experiment_name"])
        try:
            experiment = client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(name))
            found = client.search_runs([experiment_id],
                                       filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local_id}'",
                                       max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {**payload.get("tags", {}), CREATED_TAG: "true", LOCAL_ID_TAG: local_id}
                run_id = client.create_run(experiment_id, run_name=payload.get("run_name"),
                                           tags=tags).info.run_id
        except MlflowException as exc:
            if getattr(exc, "error_code", None) in PERMANENT_ERRORS:
                raise RejectedRecord(f"MLflow refused the run: {exc.error_code}: "
                                     f"{exc.message}") from exc
            raise
        self.runs[local_id] = run_id
        if self.directory is not None:
            _write_atomically(self.directory / RUN_FILE, json.dumps(
                {"local_id": local_id, "run_id": run_id,
                 "tracking_uri": payload.get("tracking_uri")}))
        if self.on_run is not None:
            self.on_run(run_id)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def deliver_payload(payload: Mapping[str, Any], client: Any | None = None, *,
                    report_builder: ReportBuilder | None = None) -> None:
    """Write one payload to MLflow: metrics in log_batch chunks of 1000, then params/tags,
    then artifacts. Safe to repeat: MLflow's SQL store drops a metric identical in key,
    timestamp, step and value; a param logged again with the same value is accepted; tags and
    artifacts are overwritten with the same content.

    A "report" payload is handed to `report_builder(client, payload)`; without one it is a
    `RejectedRecord` (the run report needs gradwatch.dashboard, which this package cannot
    import). A builder that fails on MLflow or the disk is retried; any other failure rejects
    the record (a report that cannot be built now will not be built on retry).
    """
    from mlflow.exceptions import MlflowException

    from gradwatch.record.spool import RejectedRecord

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=payload.get("tracking_uri"))
    try:
        if payload.get("kind") == "report":
            _write_report(client, payload, report_builder)
        else:
            _write(client, payload)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) in PERMANENT_ERRORS:
            raise RejectedRecord(f"MLflow refused it: {exc.error_code}: {exc.message}") from exc
        raise


#: MLflow error codes that no retry can fix (a changed param value, a deleted run, ...).
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def _write_report(client: Any, payload: Mapping[str, Any],
                  report_builder: ReportBuilder | None) -> None:
    from mlflow.exceptions import MlflowException

    from gradwatch.record.spool import RejectedRecord

    if report_builder is None:
        raise RejectedRecord(
            "the run report was asked for, but this delivery has no report builder: the run "
            "report needs gradwatch.dashboard (deliver with report_builder="
            "gradwatch.dashboard.report.log_requested_report, as `gradwatch flush` does)")
    try:
        report_builder(client, payload)
    except (MlflowException, OSError):
        raise  # the server is away: retried, like a check
    except Exception as exc:  # a report that cannot be built now will not be built on retry
        raise RejectedRecord(f"the run report could not be built: "
                             f"{type(exc).__name__}: {exc}") from exc


def _write(client: Any, payload: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    run_id = payload["run_id"]
    metrics = [Metric(key, float(value), int(ts), int(step))
               for key, value, ts, step in payload.get("metrics", [])]
    params = [Param(k, str(v)) for k, v in payload.get("params", {}).items()]
    tags = [RunTag(k, str(v)) for k, v in payload.get("tags", {}).items()]
    # Metrics first, params and tags after (a reader who sees gradwatch.last_step finds its
    # metrics); a typical check is one log_batch, which MLflow applies as one transaction.
    batches: list[dict[str, list[Any]]] = [
        {"metrics": metrics[start:start + MAX_METRICS_PER_BATCH], "params": [], "tags": []}
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH)
    ]
    for start in range(0, max(len(params), len(tags)), MAX_PARAMS_TAGS_PER_BATCH):
        chunk = slice(start, start + MAX_PARAMS_TAGS_PER_BATCH)
        last = batches[-1] if batches else None
        extra = len(params[chunk]) + len(tags[chunk])
        if last is not None and not last["params"] and not last["tags"] \
                and len(last["metrics"]) + extra <= MAX_METRICS_PER_BATCH:
            last["params"], last["tags"] = params[chunk], tags[chunk]
        else:
            batches.append({"metrics": [], "params": params[chunk], "tags": tags[chunk]})
    for batch in batches:
        client.log_batch(run_id, **batch)
    for path, text in payload.get("artifacts", {}).items():
        client.log_text(run_id, text, path)
