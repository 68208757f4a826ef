"""The record read back from MLflow: the runs with gradwatch data, each run's new checks.

What one monitor poll (or one dashboard) reads: the runs, and each run's checks since its cursor.

    find_runs(client, ["team-a", "17"])          one search_runs call per page of runs
        │   MonitoredRun: ids, name, status, times, gradwatch.* params, gradwatch.status,
        │                 gradwatch.last_step (tag), the run's gradwatch/layer/* keys and
        │                 its training-kernels keys (gradwatch/precision/*), if any
        ▼
    read_new_checks(client, run, cursor)         nothing, when the run's gradwatch.last_step
        │                                        is ≤ cursor.last_step (no new check);
        │                                        else one get_metric_history per key
        ▼
    [CheckPoint(step, ...), ...], new cursor     every check in (cursor.last_step, last_step]

Imports: gradwatch.common, gradwatch.record.layout (the keys, tags and params it reads).
`Cursor` (how far a run has been read) is the reader's own; the monitor stores it.

Why these choices (the layout is the contract in `gradwatch.record.layout`):

- **Selecting runs by the param `gradwatch.every`, not by a metric filter.** MLflow's
  ``metrics.`gradwatch/rel_distance` >= 0`` compares only the latest value, and a NaN latest
  value (an "error" check) fails every comparison, so exactly the runs in trouble would drop
  out. The param is logged once, when gradwatch attaches (before the first check), so it also
  finds a run that hangs before its first check — the stale-run rule needs those.
- **Metric history by step, not latest values.** An alert that fired at step 20 and resolved at
  step 30 between two polls leaves only the "ok" as the latest value; the history has both.
- **The tag `gradwatch.last_step` as the high-water mark.** The record writes a check's metrics
  before (or in the same `log_batch` transaction as) that tag, so every check at or below it is
  complete. `search_runs` already returns the tag, so a run with no new check costs no call at
  all: a poll over N idle runs is ⌈N / page_size⌉ `search_runs` calls. (`run.data.metrics` has
  only latest *values*, not their steps.) A run without the tag (written by hand, outside the
  documented layout) has no mark: its history is read at every poll, with no upper bound.
- **Non-finite values survive.** MLflow stores NaN as NaN but refuses ±inf, so the record
  writes ±DBL_MAX (`gradwatch.record.layout.encode_metric`); the reader maps it back to ±inf.

Cost of a run with new checks: 3 + (number of layer keys) `get_metric_history` calls, each
returning the key's whole history (MLflow's client has no step range for it); a run whose checks
measured the training kernels reads 2 + (number of precision layer keys) more, a run without
that measurement (float32 eager on CPU) none (`history_keys`). When many runs
have new checks at once (a monitor's first poll), `bulk_histories` reads them through the
tracking server's bulk endpoint instead: one call per metric key for up to 100 runs.

A step cursor cannot see a check logged late with a step at or below it (a training resumed
from an older checkpoint into the same run re-logs steps already read); those are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from gradwatch.common.errors import ConfigError
from gradwatch.record.layout import (
    EVERY_PARAM,
    LAST_STEP_TAG,
    LAYER_PREFIX,
    MAX_ELEMENT_ERROR,
    METRIC_PREFIX,
    PARAM_PREFIX,
    PRECISION_LAYER_PREFIX,
    PRECISION_RATIO,
    PRECISION_VERDICT,
    REL_DISTANCE,
    STATUS_TAG,
    VERDICT,
    VERDICT_WORDS,
    decode_metric,
)

__all__ = [
    "CheckPoint",
    "Cursor",
    "MlflowReader",
    "MonitoredRun",
    "bulk_histories",
    "find_runs",
    "history_keys",
    "read_new_checks",
    "resolve_experiments",
]

DEFAULT_PAGE_SIZE = 1000  # MLflow's own default for search_runs
_SHOWN_EXPERIMENTS = 10


@dataclass(frozen=True)
class Cursor:
    """How far one run has been read (`read_new_checks`); the monitor stores it.

    `metric_steps` holds the last step read per metric key (for keys read separately);
    `last_step` the last check step read overall; `last_check_at` the wall time of that check
    (for staleness); `check_interval` the observed seconds between two checks (the median
    spacing of the latest checks read, for runs whose schedule counts steps); `polled_at` when
    the monitor last wrote the cursor.
    """

    run_id: str
    last_step: int | None = None
    metric_steps: Mapping[str, int] = field(default_factory=dict)
    last_check_at: float | None = None
    check_interval: float | None = None
    polled_at: float | None = None


class MlflowReader(Protocol):
    """The part of `mlflow.MlflowClient` the reader uses (tests wrap a real client)."""

    def search_runs(
        self, experiment_ids: list[str], filter_string: str = ..., run_view_type: int = ...,
        max_results: int = ..., order_by: list[str] | None = ..., page_token: str | None = ...,
    ) -> Any: ...

    def get_metric_history(self, run_id: str, key: str) -> Any: ...

    def get_run(self, run_id: str) -> Any: ...

    def get_experiment(self, experiment_id: str) -> Any: ...

    def get_experiment_by_name(self, name: str) -> Any: ...

    def search_experiments(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class MonitoredRun:
    """A run with gradwatch data, as one `search_runs` row shows it.

    `last_step` is the tag `gradwatch.last_step` (None before the first check, or for a run
    written without it); `layer_keys` the run's `gradwatch/layer/*` metric keys; `params` its
    `gradwatch.*` params (`every`, thresholds, ...); `latest` the latest value of each
    `gradwatch/*` metric (±inf decoded) as the search row carries it. `precision_keys` are the
    training-kernels keys its checks are read with (`gradwatch/precision/verdict`, `/ratio` and
    each `gradwatch/precision/layer/*`; empty for a run whose checks never measured them).
    Times are Unix milliseconds.
    """

    run_id: str
    experiment_id: str
    name: str
    status: str  # RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    start_time_ms: int | None
    end_time_ms: int | None
    last_step: int | None
    gradwatch_status: str | None  # the tag gradwatch.status: latest verdict word
    params: Mapping[str, str] = field(default_factory=dict)
    layer_keys: tuple[str, ...] = ()
    latest: Mapping[str, float] = field(default_factory=dict)
    precision_keys: tuple[str, ...] = ()

    @property
    def every(self) -> str | None:
        """The param `gradwatch.every` ("1000", "30s", a cron expression)."""
        return self.params.get(EVERY_PARAM)

    @classmethod
    def from_run(cls, run: Any) -> MonitoredRun:
        """Build from an `mlflow.entities.Run` (a search_runs row or a get_run answer)."""
        info, data = run.info, run.data
        tags: Mapping[str, str] = data.tags
        return cls(
            run_id=info.run_id,
            experiment_id=str(info.experiment_id),
            name=info.run_name or tags.get("mlflow.runName") or "",
            status=str(info.status),
            start_time_ms=info.start_time,
            end_time_ms=info.end_time,
            last_step=_int_or_none(tags.get(LAST_STEP_TAG)),
            gradwatch_status=tags.get(STATUS_TAG),
            params={k: v for k, v in data.params.items() if k.startswith(PARAM_PREFIX)},
            layer_keys=tuple(sorted(k for k in data.metrics if k.startswith(LAYER_PREFIX))),
            latest={k: decode_metric(v) for k, v in data.metrics.items()
                    if k.startswith(METRIC_PREFIX)},
            precision_keys=_precision_keys(data.metrics),
        )


@dataclass(frozen=True)
class CheckPoint:
    """One check read back from MLflow: the values logged at `step`.

    `verdict` is the code (0 ok, 1 warn, 2 alert, 3 error; None if it was not logged), with
    the training-kernels verdict folded in; `layers` maps each `gradwatch/layer/<name>` key
    logged at this step to its distance. The training-kernels measurement, when the check ran
    it: `precision_verdict` (its own code), `precision_ratio` (the largest layer ratio) and
    `precision_layers` (each `gradwatch/precision/layer/<name>` key logged at this step → its
    ratio); None, None and {} for a check without it. NaN and ±inf are kept as such.
    """

    step: int
    timestamp_ms: int
    rel_distance: float
    verdict: int | None
    max_element_error: float | None
    layers: Mapping[str, float] = field(default_factory=dict)
    precision_verdict: int | None = None
    precision_ratio: float | None = None
    precision_layers: Mapping[str, float] = field(default_factory=dict)

    @property
    def verdict_word(self) -> str | None:
        """"ok", "warn", "alert" or "error" (None if unknown)."""
        return _word(self.verdict)

    @property
    def precision_verdict_word(self) -> str | None:
        """The training-kernels verdict as a word (None when the check did not measure it)."""
        return _word(self.precision_verdict)


def resolve_experiments(client: MlflowReader, experiments: Iterable[str]) -> list[str]:
    """Experiment names or ids → ids (a name wins over an id that looks the same).

    Raises ConfigError naming the unknown or deleted ones and the experiments that exist.
    """
    ids: list[str] = []
    unknown: list[str] = []
    for given in experiments:
        experiment = client.get_experiment_by_name(str(given))
        if experiment is None and str(given).isdigit():
            experiment = _experiment_by_id(client, str(given))
        if experiment is None or experiment.lifecycle_stage != "active":
            unknown.append(str(given))
        elif experiment.experiment_id not in ids:
            ids.append(str(experiment.experiment_id))
    if unknown:
        raise ConfigError(
            f"experiments: no active MLflow experiment with the name or id "
            f"{', '.join(map(repr, unknown))}; known: {known_experiments(client)}. "
            f"Check the monitor's `experiments` setting (names or ids)."
        )
    return ids


def find_runs(
    client: MlflowReader,
    experiments: Sequence[str],
    *,
    tag_filter: Mapping[str, str] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    where: str | None = None,
) -> list[MonitoredRun]:
    """The active (not deleted) runs with gradwatch data in `experiments` (names or ids),
    oldest first; `tag_filter` keeps runs whose tags have exactly these values; `where` is
    one more MLflow search clause ANDed to the rest (e.g. "attributes.status = 'RUNNING'").

    Follows `search_runs` page tokens to the end; a run that moves between pages while paging
    is returned once.
    """
    if isinstance(experiments, str):
        raise ConfigError(
            f"experiments must be a list of names or ids, got the str {experiments!r}; "
            f"write [{experiments!r}]."
        )
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ConfigError(f"page_size must be an int ≥ 1 (default 1000), got {page_size!r}.")
    experiment_ids = resolve_experiments(client, experiments)
    if not experiment_ids:
        return []
    filter_string = _filter_string(tag_filter or {})
    if where:
        filter_string = f"{filter_string} AND {where}"
    runs: dict[str, MonitoredRun] = {}
    page_token: str | None = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=page_size,
            # oldest first: runs created while paging land on the last page, shifting nothing
            order_by=["attributes.start_time ASC"], page_token=page_token,
        )
        for run in page:
            runs.setdefault(run.info.run_id, MonitoredRun.from_run(run))
        page_token = page.token
        if not page_token:
            return list(runs.values())


def read_new_checks(
    client: MlflowReader, run: MonitoredRun | str, cursor: Cursor | None,
    *, histories: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[list[CheckPoint], Cursor]:
    """Every check of `run` with cursor.last_step < step ≤ its `gradwatch.last_step`, sorted
    by step, and the cursor moved past them.

    `run` is a `find_runs` row (no MLflow call when there is no new check) or a run id (one
    `get_run` first). The new cursor's `last_step` is the newest step read and
    `last_check_at` that check's time in Unix seconds; `polled_at` is the caller's to set.
    `histories` (metric key → that key's history for this run, e.g. from `bulk_histories`)
    replaces the `get_metric_history` calls.
    """
    if isinstance(run, str):
        run = MonitoredRun.from_run(client.get_run(run))
    if cursor is None:
        cursor = Cursor(run_id=run.run_id)
    elif cursor.run_id != run.run_id:
        raise ConfigError(
            f"cursor is for run {cursor.run_id!r}, not {run.run_id!r}; pass "
            f"state.cursor({run.run_id!r})."
        )
    after, upto = cursor.last_step, run.last_step
    if upto is not None and after is not None and upto <= after:
        return [], cursor  # nothing new: no call at all (see the module docstring)
    if upto is None and REL_DISTANCE not in run.latest:
        return [], cursor  # no check logged yet (the search row has every latest value)

    def history(key: str) -> dict[int, tuple[int, float]]:
        if histories is not None:
            return _by_step(histories.get(key, ()), after, upto)
        return _by_step(client.get_metric_history(run.run_id, key), after, upto)

    spine = history(REL_DISTANCE)  # the steps that are checks
    if not spine:
        return [], cursor
    verdicts, element_errors = history(VERDICT), history(MAX_ELEMENT_ERROR)
    layers = {key: history(key) for key in run.layer_keys}
    precision = {key: history(key) for key in run.precision_keys}
    precision_verdicts = precision.pop(PRECISION_VERDICT, {})
    ratios = precision.pop(PRECISION_RATIO, {})
    checks = [
        CheckPoint(
            step=step, timestamp_ms=timestamp_ms, rel_distance=value,
            verdict=int(verdicts[step][1]) if _finite_at(verdicts, step) else None,
            max_element_error=element_errors[step][1] if step in element_errors else None,
            layers={key: values[step][1] for key, values in layers.items() if step in values},
            precision_verdict=(int(precision_verdicts[step][1])
                               if _finite_at(precision_verdicts, step) else None),
            precision_ratio=ratios[step][1] if step in ratios else None,
            precision_layers={key: values[step][1] for key, values in precision.items()
                              if step in values},
        )
        for step, (timestamp_ms, value) in sorted(spine.items())
    ]
    newest = checks[-1]
    return checks, replace(
        cursor, last_step=newest.step, last_check_at=newest.timestamp_ms / 1000.0
    )


class _Point(NamedTuple):
    step: int
    timestamp: int
    value: float


#: The tracking server's limits for its bulk history endpoint (mlflow/server/handlers.py).
BULK_RUNS = 100
BULK_RESULTS = 25000
_BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"


def bulk_histories(
    client: Any, runs: Sequence[MonitoredRun]
) -> dict[str, dict[str, list[Any]]] | None:
    """run id → metric key → history, for the check keys and each run's layer keys, read with
    the tracking server's bulk endpoint: one call per key for up to 100 runs (the per-run way
    is one call per key per run). None when the client does not talk to a tracking server over
    HTTP, or the server has no such endpoint: read run by run then.

    The endpoint (the one MLflow's UI uses for charts) returns at most 25,000 points per call;
    a batch that reaches that is split in two and read again, so nothing is cut off.
    """
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    get_creds = getattr(store, "get_host_creds", None)
    if get_creds is None or not runs:
        return None
    from mlflow.utils.rest_utils import http_request

    creds = get_creds()
    result: dict[str, dict[str, list[Any]]] = {run.run_id: {} for run in runs}

    def fetch(run_ids: list[str], key: str) -> None:
        params = [("run_id", run_id) for run_id in run_ids]
        params += [("metric_key", key), ("max_results", str(BULK_RESULTS))]
        response = http_request(creds, _BULK_ENDPOINT, "GET", params=params)
        response.raise_for_status()
        metrics = response.json().get("metrics", [])
        if len(metrics) >= BULK_RESULTS and len(run_ids) > 1:  # cut off: split and re-read
            half = len(run_ids) // 2
            fetch(run_ids[:half], key)
            fetch(run_ids[half:], key)
            return
        if len(metrics) >= BULK_RESULTS:  # one run with more points than a call returns
            result[run_ids[0]][key] = list(client.get_metric_history(run_ids[0], key))
            return
        for metric in metrics:
            result[metric["run_id"]].setdefault(key, []).append(_Point(
                int(metric.get("step", 0)), int(metric["timestamp"]), float(metric["value"])))

    try:
        for start in range(0, len(runs), BULK_RUNS):
            batch = runs[start:start + BULK_RUNS]
            keys = {key for run in batch for key in history_keys(run)}
            for key in sorted(keys):
                fetch([run.run_id for run in batch], key)
    except Exception:  # no endpoint (404), another server, a proxy that refuses it: per run
        return None
    return result


def history_keys(run: MonitoredRun) -> list[str]:
    """The metric keys whose histories make `run`'s checks (what `read_new_checks` reads):
    the check's own, its layers', and the training-kernels ones when the run has them."""
    return [REL_DISTANCE, VERDICT, MAX_ELEMENT_ERROR, *run.layer_keys, *run.precision_keys]


# -- helpers ----------------------------------------------------------------------------------


def _precision_keys(metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The training-kernels keys a run's checks are read with, of its metric keys."""
    own = [key for key in (PRECISION_VERDICT, PRECISION_RATIO) if key in metrics]
    layers = sorted(key for key in metrics if key.startswith(PRECISION_LAYER_PREFIX))
    return (*own, *layers)


def _word(code: int | None) -> str | None:
    if code is None or not 0 <= code < len(VERDICT_WORDS):
        return None
    return VERDICT_WORDS[code]


def _by_step(
    metrics: Iterable[Any], after: int | None, upto: int | None
) -> dict[int, tuple[int, float]]:
    """step → (timestamp ms, value) for after < step ≤ upto; of several values logged at one
    step (a retried or repeated log) the latest timestamp wins."""
    chosen: dict[int, tuple[int, float]] = {}
    for metric in metrics:
        step = int(metric.step)
        if (after is not None and step <= after) or (upto is not None and step > upto):
            continue
        if step not in chosen or metric.timestamp >= chosen[step][0]:
            chosen[step] = (int(metric.timestamp), decode_metric(metric.value))
    return chosen


def _finite_at(values: Mapping[int, tuple[int, float]], step: int) -> bool:
    return step in values and math.isfinite(values[step][1])


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None  # a hand-edited tag: treat as absent (history read, no skipping)


def _filter_string(tag_filter: Mapping[str, str]) -> str:
    """`params.`gradwatch.every` LIKE '%'` plus one `tags.`k` = 'v'` per tag (backticks: the
    keys hold dots and slashes)."""
    clauses = [f"params.`{EVERY_PARAM}` LIKE '%'"]
    for key, value in tag_filter.items():
        if not isinstance(key, str) or not key or "`" in key:
            raise ConfigError(f"tag_filter keys must be non-empty tag names without backticks, "
                              f"got {key!r}.")
        if not isinstance(value, str) or ("'" in value and '"' in value):
            raise ConfigError(f"tag_filter[{key!r}] must be a str that does not hold both ' and "
                              f"\", got {value!r}.")
        quote = '"' if "'" in value else "'"
        clauses.append(f"tags.`{key}` = {quote}{value}{quote}")
    return " AND ".join(clauses)


def _experiment_by_id(client: MlflowReader, experiment_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_experiment(experiment_id)
    except MlflowException as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def known_experiments(client: MlflowReader) -> str:
    try:
        found = client.search_experiments(max_results=_SHOWN_EXPERIMENTS + 1)
    except Exception:  # only for the error text: never hide the real problem behind this one
        return "(could not list them)"
    shown = [f"{e.name!r} (id {e.experiment_id})" for e in list(found)[:_SHOWN_EXPERIMENTS]]
    more = ", ..." if len(found) > _SHOWN_EXPERIMENTS else ""
    return (", ".join(shown) + more) if shown else "none"
