"""The MLflow record of gradwatch: what is logged where (a contract with the monitor, the
dashboards and users' own queries), and how it is delivered.

Per check, at step = the training global step:
  metrics  gradwatch/rel_distance, gradwatch/verdict (0 ok, 1 warn, 2 alert, 3 error),
           gradwatch/max_element_error, gradwatch/evaluations, gradwatch/seconds,
           gradwatch/layer/<parameter name>  (sanitised to MLflow's key rules, ≤ 250 chars;
           only the tensors measured on their own in this check — a tensor that was only
           screened jointly has no distance of its own),
           gradwatch/coverage/screened, /localised, /measured (tensor counts)
  tags     gradwatch.status (latest verdict word), gradwatch.last_step,
           gradwatch.alert ("firing" / "resolved", once an alert ever fired)
  artifact gradwatch/checks/step-<9-digit step>.json  (the CheckReport JSON)
Every `report_every` checks and at train end: artifact gradwatch/report.html, the run report
(one self-contained HTML file, `gradwatch._dashboard`), built from this record.
Once per run, params: gradwatch.version, .every, .mode, .eps, .budget, .threshold.warn,
.threshold.alert.

Everything goes through `MlflowClient` with an explicit run id, never the fluent API (which
silently creates runs). A record is a plain JSON-able dict (a "payload") so it can be spooled
to disk first and delivered later, by another process if need be (`gradwatch flush`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradwatch._report import CheckReport

__all__ = [
    "COVERAGE_PREFIX",
    "LAYER_PREFIX",
    "METRIC_PREFIX",
    "VERDICT_CODES",
    "artifact_path",
    "check_payload",
    "deliver_payload",
    "layer_metric_keys",
    "params_payload",
    "report_payload",
    "resolve_run",
    "resolve_tracking_uri",
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
    run_id: str,
    tracking_uri: str | None,
    alert: str | None = None,
) -> dict[str, Any]:
    """The MLflow record of one check, as a JSON-able payload (see the module docstring)."""
    metrics: list[list[Any]] = [
        [METRIC_PREFIX + "rel_distance", _metric_value(report.rel_distance), timestamp_ms, step],
        [METRIC_PREFIX + "verdict", float(VERDICT_CODES[report.verdict]), timestamp_ms, step],
        [METRIC_PREFIX + "max_element_error", _metric_value(report.max_element_error),
         timestamp_ms, step],
        [METRIC_PREFIX + "evaluations", float(report.evaluations), timestamp_ms, step],
        [METRIC_PREFIX + "seconds", float(report.seconds), timestamp_ms, step],
    ]
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
        "step": step,
        "metrics": metrics,
        "params": {},
        "tags": tags,
        "artifacts": {artifact_path(step): report.model_dump_json()},
    }


def params_payload(
    params: Mapping[str, Any], *, run_id: str, tracking_uri: str | None
) -> dict[str, Any]:
    """The once-per-run params record (`gradwatch.every`, `gradwatch.mode`, ...)."""
    return {
        "kind": "params",
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "metrics": [],
        "params": {key: str(value) for key, value in params.items()},
        "tags": {},
        "artifacts": {},
    }


def report_payload(
    *, run_id: str, tracking_uri: str | None, png: bool = False
) -> dict[str, Any]:
    """A request to rebuild and log the run report (`gradwatch/report.html`) from the record.

    It travels through the spool like the checks, after them, so the report it builds sees
    every check logged before it was asked for. `png`: also `gradwatch/report.png`, the static
    picture for places that run no scripts (matplotlib; left out when it is not installed).
    """
    return {"kind": "report", "tracking_uri": tracking_uri, "run_id": run_id, "png": png}


def _metric_value(value: float) -> float:
    # MLflow stores NaN (is_nan) and clamps ±inf; keep NaN as NaN, it is a real outcome
    return float(value) if not math.isinf(value) else math.copysign(1.7976931348623157e308, value)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI to log to, made absolute for local stores so replays land in the same
    place from any working directory. Without one: MLflow's own default (env, or ./mlflow.db).
    """
    import mlflow

    uri = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = str(Path(uri).resolve())
    return uri


def resolve_run(
    client: Any,
    *,
    run_id: str | None,
    active_run_id: str | None,
    experiment_name: str | None,
    run_name: str | None = None,
    restored_run_id: str | None = None,
) -> tuple[str, bool]:
    """Which run to log into, and whether gradwatch created it.

    Order: an explicit `run_id`; the run already active when training began (HF's
    MLflowCallback opens one when `report_to` includes mlflow); the run of a checkpoint this
    training resumed from; `MLFLOW_RUN_ID`; else a new run in `experiment_name`,
    `MLFLOW_EXPERIMENT_NAME` or "gradwatch". (A resumed training whose framework logs into a
    new run gets gradwatch's record in that run too.)
    """
    candidates = (run_id, active_run_id, restored_run_id, os.environ.get("MLFLOW_RUN_ID"))
    for candidate in candidates:
        if candidate:
            client.get_run(candidate)  # fails loudly on a wrong id, before training starts
            return candidate, False
    name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(name)
    )
    run = client.create_run(experiment_id, run_name=run_name, tags={"gradwatch.created": "true"})
    return run.info.run_id, True


def deliver_payload(payload: Mapping[str, Any], client: Any | None = None) -> None:
    """Write one payload to MLflow: metrics in log_batch chunks of 1000, then params/tags,
    then artifacts. Safe to repeat: MLflow's SQL store drops a metric identical in key,
    timestamp, step and value; a param logged again with the same value is accepted; tags and
    artifacts are overwritten with the same content.
    """
    from mlflow.exceptions import MlflowException

    from gradwatch._spool import RejectedRecord

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

    from gradwatch._dashboard import log_run_report
    from gradwatch._spool import RejectedRecord

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
