"""The MLflow record of gradwatch: what is logged where (a contract with the monitor, the
dashboards and users' own queries), and how it is delivered.

Per check, at step = the training global step:
  metrics  gradwatch/rel_distance, gradwatch/verdict (0 ok, 1 warn, 2 alert, 3 error),
           gradwatch/max_element_error, gradwatch/evaluations, gradwatch/seconds,
           gradwatch/layer/<parameter name>  (sanitised to MLflow's key rules, ≤ 250 chars;
           only the tensors measured on their own in this check — a tensor that was only
           screened jointly has no distance of its own),
           gradwatch/coverage/screened, /localised, /measured (tensor counts),
           gradwatch/estimated (1 when rel_distance is an estimate)
  tags     gradwatch.status (latest verdict word), gradwatch.last_step,
           gradwatch.alert ("firing" / "resolved", once an alert ever fired)
  artifact gradwatch/checks/step-<9-digit step>.json  (the CheckReport JSON)
Every `report_every` checks and at train end: artifact gradwatch/report.html, the run report
(one self-contained HTML file, `gradwatch.dashboard.report`), built from this record.
Once per run, params: gradwatch.version, .every, .mode, .eps, .budget, .threshold.warn,
.threshold.alert.

Everything goes through `MlflowClient` with an explicit run id, never the fluent API (which
silently creates runs). A record is a plain JSON-able dict (a "payload") so it can be spooled
to disk first and delivered later, by another process if need be (`gradwatch flush`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradwatch.engine.report import CheckReport
from gradwatch.record.spool import RUN_FILE  # in a local id's spool: the run it became

__all__ = [
    "COVERAGE_PREFIX",
    "LAYER_PREFIX",
    "METRIC_PREFIX",
    "RUN_FILE",
    "VERDICT_CODES",
    "Deliverer",
    "artifact_path",
    "check_payload",
    "deliver_payload",
    "layer_metric_keys",
    "new_local_id",
    "params_payload",
    "report_payload",
    "resolve_tracking_uri",
    "run_payload",
    "terminate_payload",
]

METRIC_PREFIX = "gradwatch/"
LAYER_PREFIX = "gradwatch/layer/"
#: Tensors a check screened jointly / localised / measured on their own (auto mode).
COVERAGE_PREFIX = "gradwatch/coverage/"
VERDICT_CODES = {"ok": 0, "warn": 1, "alert": 2, "error": 3}
DEFAULT_EXPERIMENT = "gradwatch"

#: MLflow's limits (mlflow.utils.validation): key length and entities per log_batch call.
MAX_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

_BAD_KEY_CHARACTERS = re.compile(r"[^\w.\- /]")  # MLflow allows alnum _ - . space / (and :)


def artifact_path(step: int) -> str:
    """`gradwatch/checks/step-000001000.json` for step 1000."""
    return f"gradwatch/checks/step-{step:09d}.json"


def _sanitise(name: str) -> str:
    cleaned = _BAD_KEY_CHARACTERS.sub("_", name).replace("/", "_").strip()
    if cleaned in ("", ".", ".."):
        cleaned = "_" + cleaned
    return cleaned


def layer_metric_keys(names: Iterable[str]) -> dict[str, str]:
    """Parameter name → metric key `gradwatch/layer/<sanitised name>`, unique and ≤ 250 chars.

    Characters MLflow refuses become "_"; names that collide after that, or that are too long,
    get "-" + the first 8 hex digits of sha1(original name), so the key of a name never depends
    on which other names are present.

    Example:
        >>> layer_metric_keys(["encoder.layer.0.weight", "a:b", "a_b"])["a:b"]
        'gradwatch/layer/a_b-...'
    """
    names = list(names)
    room = MAX_KEY_LENGTH - len(LAYER_PREFIX)
    cleaned = {name: _sanitise(name) for name in names}
    counts: dict[str, int] = {}
    for value in cleaned.values():
        counts[value] = counts.get(value, 0) + 1
    keys = {}
    for name, value in cleaned.items():
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        changed = value != name
        if (counts[value] > 1 and changed) or len(value) > room:
            value = f"{value[: room - 9]}-{digest}"
        keys[name] = LAYER_PREFIX + value
    return keys


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
    """The MLflow record of one check, as a JSON-able payload (see the module docstring).
    `run_id` None: the spool's run is not known yet, `local_id` names it (`Deliverer`)."""
    metrics: list[list[Any]] = [
        [METRIC_PREFIX + "rel_distance", _metric_value(report.rel_distance), timestamp_ms, step],
        [METRIC_PREFIX + "verdict", float(VERDICT_CODES[report.verdict]), timestamp_ms, step],
        [METRIC_PREFIX + "max_element_error", _metric_value(report.max_element_error),
         timestamp_ms, step],
        [METRIC_PREFIX + "evaluations", float(report.evaluations), timestamp_ms, step],
        [METRIC_PREFIX + "seconds", float(report.seconds), timestamp_ms, step],
    ]
    metrics.append([METRIC_PREFIX + "estimated", float(report.estimated), timestamp_ms, step])
    for what in ("screened", "localised", "measured"):
        if what in report.coverage:
            metrics.append([f"{COVERAGE_PREFIX}{what}", float(report.coverage[what]),
                            timestamp_ms, step])
    checked = {n: layer for n, layer in report.layers.items() if layer.checked or layer.directions}
    keys = layer_metric_keys(report.layers)
    for name, layer in checked.items():
        metrics.append([keys[name], _metric_value(layer.rel_distance), timestamp_ms, step])
    tags = {"gradwatch.status": report.verdict, "gradwatch.last_step": str(step)}
    if alert is not None:
        tags["gradwatch.alert"] = alert
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


def _metric_value(value: float) -> float:
    # MLflow stores NaN (is_nan) and clamps ±inf; keep NaN as NaN, it is a real outcome
    return float(value) if not math.isinf(value) else math.copysign(1.7976931348623157e308, value)


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
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 on_run: Any = None, clients: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.on_run = on_run
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
        deliver_payload(payload, self.client(payload))

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
                                       filter_string=f"tags.`gradwatch.local_id` = '{local_id}'",
                                       max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {**payload.get("tags", {}), "gradwatch.created": "true",
                        "gradwatch.local_id": local_id}
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


def deliver_payload(payload: Mapping[str, Any], client: Any | None = None) -> None:
    """Write one payload to MLflow: metrics in log_batch chunks of 1000, then params/tags,
    then artifacts. Safe to repeat: MLflow's SQL store drops a metric identical in key,
    timestamp, step and value; a param logged again with the same value is accepted; tags and
    artifacts are overwritten with the same content.
    """
    from mlflow.exceptions import MlflowException

    from gradwatch.record.spool import RejectedRecord

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=payload.get("tracking_uri"))
    try:
        if payload.get("kind") == "report":
            _write_report(client, payload)
        else:
            _write(client, payload)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) in PERMANENT_ERRORS:
            raise RejectedRecord(f"MLflow refused it: {exc.error_code}: {exc.message}") from exc
        raise


#: MLflow error codes that no retry can fix (a changed param value, a deleted run, ...).
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def _write_report(client: Any, payload: Mapping[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    from gradwatch.dashboard.report import log_run_report
    from gradwatch.record.spool import RejectedRecord

    try:
        try:
            log_run_report(client, payload["run_id"], png=bool(payload.get("png")))
        except ImportError:  # no matplotlib (mlflow-skinny): the HTML report alone
            log_run_report(client, payload["run_id"])
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
