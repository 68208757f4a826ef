"""What the dashboards show, read from MLflow in the record's layout.

What the dashboards show, read from MLflow in the record layout of `gradwatch.record.layout`.

    read_run(client, run_id)              one run: every check (overall, verdict, each layer;
        │                                 the training-kernels ratios when it has them) and
        │                                 the worst elements of its latest checks
        ▼
    RunData ──► gradwatch.dashboard.charts (named datasets) ──► gradwatch.dashboard.report (HTML)

    read_experiment(client, "name")       every gradwatch run of an experiment: its checks
        ▼                                 (overall only) and the layers that ever alerted
    ExperimentData

Cost. A run: one `get_run`, 3 + (layer keys) `get_metric_history` calls fetched on
`READ_THREADS` threads (2 + its precision layer keys more when its checks measured the
training kernels, `history_keys`), one `list_artifacts` of `gradwatch/checks/` and one download
per check whose worst elements are shown (the latest `worst_checks`, default 10: a run with 1,000
checks downloads 10 JSON files, not 1,000). An experiment: one paged `search_runs`, then per run the
same metric histories, and for a run with alerted layers its latest check artifact (for the
parameters' own names): "which layers ever alerted" needs every layer's history,
because a layer's logged distance can reach the alert threshold while its check's verdict does
not (elements at a kink, or a gradient at the rounding-noise level, are left out of verdicts).

Non-finite values: MLflow stores NaN as NaN and the record writes ±inf as ±DBL_MAX;
`read_new_checks` maps them back, so NaN and ±inf arrive here as floats and are kept.

Imports: gradwatch.common, gradwatch.engine (thresholds), gradwatch.record (layout and reader).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from gradwatch.common.errors import ConfigError, InputError
from gradwatch.engine.report import RatioThresholds, Thresholds
from gradwatch.record.layout import (
    CHECKS_FOLDER,
    LAYER_PREFIX,
    PRECISION_LAYER_PREFIX,
    artifact_path,
    layer_metric_keys,
    threshold_param,
)
from gradwatch.record.reader import (
    CheckPoint,
    MonitoredRun,
    bulk_histories,
    find_runs,
    history_keys,
    known_experiments,
    read_new_checks,
)

__all__ = [
    "ExperimentData",
    "KernelInfo",
    "RunData",
    "RunSummary",
    "WorstElement",
    "alerted_layers",
    "number",
    "read_experiment",
    "read_run",
    "resolve_experiment",
    "thresholds_of",
]

WORST_CHECKS = 10  # checks whose artifacts are read for the worst-elements table
WORST_ELEMENTS_PER_CHECK = 5
READ_THREADS = 8  # concurrent MLflow calls
BULK_CHUNK = 10  # runs of an experiment read together (bulk histories) and held in memory
_ARTIFACT_NAME = re.compile(r"^step-(\d+)\.json$")
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class WorstElement:
    """One element of a check's worst list: `rel_error` = |numeric − analytic| / scale."""

    step: int
    layer: str
    index: tuple[int, ...]
    analytic: float
    numeric: float
    abs_diff: float
    rel_error: float
    kink: bool


@dataclass(frozen=True)
class KernelInfo:
    """A run's training-kernels measurement, as the report shows it beside its checks'
    ratios (`CheckPoint.precision_*`).

    `thresholds` are the run's ratio thresholds (from the newest check artifact read that
    has them; the defaults, warn 12 and alert 32, otherwise); `layer_names` maps each
    `gradwatch/precision/layer/*` key to the parameter's own name (else the key without its
    prefix) and `layer_order` lists the keys in model order. `step`, `dtype`, `autocast`,
    `compiled`, `device` and `custom_ops` say how the newest measured check read ran (None
    and empty when no artifact of a measured check was read).
    """

    thresholds: RatioThresholds
    layer_names: Mapping[str, str]
    layer_order: list[str]
    step: int | None = None
    dtype: str = ""
    autocast: str | None = None
    compiled: bool = False
    device: str = ""
    custom_ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunData:
    """Everything the run report shows.

    `layer_names` maps each `gradwatch/layer/*` metric key to the parameter's own name (known
    from the check artifacts read; otherwise the key without its prefix); `layer_order` lists
    the keys in model order. `worst_steps` are the steps whose artifacts were read, of
    `artifact_steps` (every check with an artifact). `kernels` is the training-kernels
    measurement's, for a run whose checks measured it (None for one without: a float32 model
    on CPU).
    """

    run: MonitoredRun
    experiment_name: str
    thresholds: Thresholds
    checks: list[CheckPoint]
    layer_names: Mapping[str, str]
    layer_order: list[str]
    worst_elements: list[WorstElement]
    worst_steps: list[int]
    artifact_steps: list[int]
    kernels: KernelInfo | None = None


@dataclass(frozen=True)
class RunSummary:
    """One row of the experiment dashboard: the run's checks (overall distance and verdict
    only) and, for each layer that ever reached the alert threshold, (first step, worst value).
    `layer_names` maps those layers' metric keys to the parameters' own names (from the run's
    latest check artifact; a key missing there shows without its prefix).
    """

    run: MonitoredRun
    thresholds: Thresholds
    checks: list[CheckPoint]
    alerted_layers: Mapping[str, tuple[int, float]]
    layer_names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentData:
    """Every gradwatch run of one experiment, oldest first (`layers_read`: whether the layer
    histories were read, so that `RunSummary.alerted_layers` means anything)."""

    experiment_id: str
    name: str
    runs: list[RunSummary]
    layers_read: bool = True


# -- reading ----------------------------------------------------------------------------------


def read_run(client: Any, run_id: str, *, worst_checks: int = WORST_CHECKS) -> RunData:
    """Read one run (see the module docstring for what it costs)."""
    if isinstance(worst_checks, bool) or not isinstance(worst_checks, int) or worst_checks < 0:
        raise ConfigError(f"worst_checks must be an int ≥ 0 (default {WORST_CHECKS}), got "
                          f"{worst_checks!r}.")
    mlflow_run = _get_run(client, run_id)
    run = MonitoredRun.from_run(mlflow_run)
    experiment = client.get_experiment(run.experiment_id)
    artifacts = _Artifacts(client, run.run_id, mlflow_run.info.artifact_uri)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        checks = _read_checks(client, run, pool)
        artifact_steps = _artifact_steps(artifacts)
        worst_steps = artifact_steps[-worst_checks:] if worst_checks else []
        reports = _download_reports(artifacts, worst_steps, pool)
    names, order = _layer_names(run.layer_keys, reports.values())
    worst = [element for step, report in sorted(reports.items())
             for element in _worst_elements(step, report)]
    return RunData(
        run=run, experiment_name=str(experiment.name), thresholds=thresholds_of(run),
        checks=checks, layer_names=names, layer_order=order, worst_elements=worst,
        worst_steps=sorted(reports), artifact_steps=artifact_steps,
        kernels=_kernel_info(run, checks, reports),
    )


def read_experiment(client: Any, experiment: str, *, layers: bool = True) -> ExperimentData:
    """Read every gradwatch run of `experiment` (a name or an id); unknown → ConfigError.

    `layers=False` skips the layer histories (one call per layer per run, or per 10 runs where
    the tracking server has the bulk history endpoint): no run then has alerted layers, and
    `ExperimentData.layers_read` says so.
    """
    experiment_id = resolve_experiment(client, experiment)
    name = str(client.get_experiment(experiment_id).name)
    runs = find_runs(client, [experiment_id])
    summaries = []
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(runs), BULK_CHUNK):
            # BULK_CHUNK runs at a time: their histories in one bulk call per metric key
            # (when the tracking server has the endpoint), and only theirs in memory
            chunk = [run if layers else replace(run, layer_keys=(), precision_keys=tuple(
                         k for k in run.precision_keys if not k.startswith(PRECISION_LAYER_PREFIX)))
                     for run in runs[start:start + BULK_CHUNK]]
            bulk = bulk_histories(client, chunk) if len(chunk) > 1 else None
            for run, read in zip(runs[start:start + BULK_CHUNK], chunk):
                summaries.append(_summary(client, run, read, pool,
                                          bulk.get(run.run_id) if bulk else None))
    return ExperimentData(experiment_id=experiment_id, name=name, runs=summaries,
                          layers_read=layers)


def _summary(client: Any, run: MonitoredRun, read: MonitoredRun, pool: ThreadPoolExecutor,
             histories: Mapping[str, Any] | None) -> RunSummary:
    """One run's row; `read` is `run` without its layer keys when those are not read."""
    if histories is not None:
        checks, _ = read_new_checks(client, read, None, histories=histories)
    else:
        checks = _read_checks(client, read, pool)
    thresholds = thresholds_of(run)
    alerted = alerted_layers(checks, thresholds.alert)
    return RunSummary(
        run=run, thresholds=thresholds,
        checks=[replace(check, layers={}, precision_layers={}) for check in checks],
        alerted_layers=alerted,
        layer_names=_names_of(client, run, alerted, pool) if alerted else {},
    )


def _names_of(client: Any, run: MonitoredRun, keys: Iterable[str],
              pool: ThreadPoolExecutor) -> dict[str, str]:
    """Parameter names of `keys`, from the run's latest check artifact (one get_run and one
    download); {} when the run has no such artifact."""
    if run.last_step is None:
        return {}
    artifacts = _Artifacts(client, run.run_id, _get_run(client, run.run_id).info.artifact_uri)
    reports = _download_reports(artifacts, [run.last_step], pool)
    names, _ = _layer_names(list(keys), reports.values())
    return names


def resolve_experiment(client: Any, experiment: str) -> str:
    """The id of the active experiment named `experiment` (or with that id)."""
    if not isinstance(experiment, str) or not experiment:
        raise ConfigError(f"experiment must be an MLflow experiment name or id (a non-empty "
                          f"str), got {experiment!r}.")
    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        from mlflow.exceptions import MlflowException

        try:
            found = client.get_experiment(experiment)
        except MlflowException as error:
            if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
    if found is None or found.lifecycle_stage != "active":
        raise ConfigError(
            f"experiment: no active MLflow experiment with the name or id {experiment!r} at "
            f"{_where(client)}; known: {known_experiments(client)}. Pass one of those names "
            f"(or ids), or check the tracking URI."
        )
    return str(found.experiment_id)


def thresholds_of(run: MonitoredRun) -> Thresholds:
    """The run's `gradwatch.threshold.warn` / `.alert` params; the defaults (1e-5, 1e-3) for
    a missing or unreadable one.

    Example:
        >>> run = MonitoredRun("r", "0", "", "RUNNING", None, None, None, None,
        ...                    params={"gradwatch.threshold.alert": "0.01"})
        >>> thresholds_of(run)
        Thresholds(warn=1e-05, alert=0.01)
    """
    defaults = Thresholds()
    values = {}
    for level in ("warn", "alert"):
        try:
            values[level] = float(run.params.get(threshold_param(level), "nan"))
        except ValueError:
            values[level] = math.nan
        if not (math.isfinite(values[level]) and values[level] > 0):
            values[level] = getattr(defaults, level)
    try:
        return Thresholds(**values)
    except ConfigError:  # hand-edited params in the wrong order: show the defaults
        return defaults


# -- helpers ----------------------------------------------------------------------------------


def _read_checks(client: Any, run: MonitoredRun, pool: ThreadPoolExecutor) -> list[CheckPoint]:
    keys = history_keys(run)
    histories = dict(zip(keys, _map(pool, lambda key: client.get_metric_history(run.run_id, key),
                                    keys)))
    checks, _ = read_new_checks(client, run, None, histories=histories)
    return checks


def _map(pool: ThreadPoolExecutor, function: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    items = list(items)
    try:
        return list(pool.map(function, items))
    except RuntimeError as error:
        # A report built while the interpreter exits (GradWatch closed at exit): the pool
        # takes no new work then, so the reads run one after the other.
        if "interpreter shutdown" not in str(error):
            raise
        return [function(item) for item in items]


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not isinstance(run_id, str) or not run_id:
        raise InputError(f"run_id must be an MLflow run id (a non-empty str), got {run_id!r}.")
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise InputError(
            f"run_id: no MLflow run {run_id!r} at {_where(client)}. Copy the id from the run's "
            f"page (or `mlflow runs list --experiment-id ...`), and check the tracking URI."
        ) from None


def _where(client: Any) -> str:
    """The client's tracking URI for error texts, without credentials."""
    uri = str(getattr(client, "tracking_uri", None) or "")
    parts = urlsplit(uri)
    if parts.username or parts.password:
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return uri or "the tracking server"


class _Artifacts:
    """The run's artifacts, one file at a time.

    `MlflowClient.download_artifacts` draws a tqdm progress bar on stderr for every call
    (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR), and a report is often built during training; so
    files come through the artifact repository's single-file download, which draws none
    (falling back to the client where that repository cannot be built).
    """

    def __init__(self, client: Any, run_id: str, artifact_uri: str) -> None:
        self._client, self._run_id = client, run_id
        self._repository: Any = None
        try:
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            self._repository = get_artifact_repository(
                artifact_uri, tracking_uri=getattr(client, "tracking_uri", None))
        except Exception:  # an unusual store: the client's own (noisier) calls still work
            self._repository = None

    def list(self, folder: str) -> list[Any]:
        if self._repository is not None:
            return list(self._repository.list_artifacts(folder))
        return list(self._client.list_artifacts(self._run_id, folder))

    def download(self, path: str, folder: str) -> Path:
        download_file = getattr(self._repository, "_download_file", None)
        if download_file is None:
            return Path(self._client.download_artifacts(self._run_id, path, folder))
        local = Path(folder, *path.split("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        download_file(path, str(local))
        return local


def _artifact_steps(artifacts: _Artifacts) -> list[int]:
    """The steps that have a `gradwatch/checks/step-<step>.json` artifact, ascending."""
    steps = []
    for info in artifacts.list(CHECKS_FOLDER):
        match = _ARTIFACT_NAME.match(Path(info.path).name)
        if match and not info.is_dir:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _download_reports(
    artifacts: _Artifacts, steps: Sequence[int], pool: ThreadPoolExecutor
) -> dict[int, dict[str, Any]]:
    """step → the CheckReport JSON as a dict (read leniently: any schema version; an
    unreadable file is left out)."""
    if not steps:
        return {}
    with tempfile.TemporaryDirectory(prefix="gradwatch-report-") as folder:
        def fetch(step: int) -> dict[str, Any] | None:
            try:
                local = artifacts.download(artifact_path(step), folder)
                loaded = json.loads(local.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return loaded if isinstance(loaded, dict) else None

        return {step: report for step, report in zip(steps, _map(pool, fetch, steps))
                if report is not None}


def _layer_names(
    keys: Sequence[str], reports: Iterable[Mapping[str, Any]], prefix: str = LAYER_PREFIX
) -> tuple[dict[str, str], list[str]]:
    """Metric key → parameter name, and the keys in model order (the newest report's order;
    keys no report names come last, sorted). `reports` are check reports, or for `prefix`
    `PRECISION_LAYER_PREFIX` their training-kernels parts."""
    wanted = set(keys)
    names: dict[str, str] = {}
    order: list[str] = []
    for report in reports:  # ascending steps: the newest report's names and order win
        layers = report.get("layers")
        if not isinstance(layers, dict):
            continue
        key_of = layer_metric_keys(layers, prefix)
        names.update({key: name for name, key in key_of.items() if key in wanted})
        order = [key_of[name] for name in layers if key_of[name] in wanted]
    rest = sorted(wanted - set(order))
    for key in rest:
        names.setdefault(key, key[len(prefix):])
    return names, order + rest


def _kernel_info(run: MonitoredRun, checks: Sequence[CheckPoint],
                 reports: Mapping[int, Mapping[str, Any]]) -> KernelInfo | None:
    """The run's training-kernels measurement (None when no check of it measured it): the
    layer keys its checks logged, named from the check artifacts read, and how the newest
    measured one ran."""
    if not any(check.precision_verdict is not None for check in checks):
        return None
    keys = sorted({key for check in checks for key in check.precision_layers}
                  | {k for k in run.precision_keys if k.startswith(PRECISION_LAYER_PREFIX)})
    parts = {step: report["kernels"] for step, report in sorted(reports.items())
             if isinstance(report.get("kernels"), dict)}
    names, order = _layer_names(keys, parts.values(), PRECISION_LAYER_PREFIX)
    measured = [(step, part) for step, part in parts.items() if part.get("status") == "measured"]
    if not measured:
        return KernelInfo(thresholds=RatioThresholds(), layer_names=names, layer_order=order)
    step, newest = measured[-1]
    ops = newest.get("custom_ops")
    return KernelInfo(
        thresholds=_ratio_thresholds(newest.get("thresholds")), layer_names=names,
        layer_order=order, step=step, dtype=str(newest.get("dtype") or ""),
        autocast=str(newest["autocast"]) if newest.get("autocast") else None,
        compiled=bool(newest.get("compiled", False)), device=str(newest.get("device") or ""),
        custom_ops=tuple(str(op) for op in ops) if isinstance(ops, list) else (),
    )


def _ratio_thresholds(value: object) -> RatioThresholds:
    """A report's ratio thresholds, read leniently (the defaults for anything unreadable)."""
    if isinstance(value, dict):
        try:
            return RatioThresholds(**{k: number(v) for k, v in value.items()
                                      if k in ("warn", "alert")})
        except ConfigError:
            pass
    return RatioThresholds()


def _worst_elements(step: int, report: Mapping[str, Any]) -> list[WorstElement]:
    """The check's `WORST_ELEMENTS_PER_CHECK` largest element errors over all layers (NaN
    first: it is the worst outcome)."""
    elements = []
    layers = report.get("layers")
    for layer, layer_report in (layers.items() if isinstance(layers, dict) else ()):
        worst = layer_report.get("worst") if isinstance(layer_report, dict) else None
        for element in worst if isinstance(worst, list) else ():
            if not isinstance(element, dict):
                continue
            elements.append(WorstElement(
                step=step, layer=str(layer),
                index=tuple(int(i) for i in element.get("index", ()) if isinstance(i, int)),
                analytic=number(element.get("analytic")),
                numeric=number(element.get("numeric")),
                abs_diff=number(element.get("abs_diff")),
                rel_error=number(element.get("rel_error")),
                kink=bool(element.get("kink", False)),
            ))
    elements.sort(key=lambda e: math.inf if math.isnan(e.rel_error) else e.rel_error,
                  reverse=True)
    return elements[:WORST_ELEMENTS_PER_CHECK]


def number(value: object) -> float:
    """A JSON value as a float: the report writes NaN/±inf as "NaN", "Infinity", "-Infinity".

    Example:
        >>> number("Infinity"), number(2), number(None)
        (inf, 2.0, nan)
    """
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def alerted_layers(
    checks: Sequence[CheckPoint], alert: float
) -> dict[str, tuple[int, float]]:
    """Layer key → (first step, worst value) for layers with a distance ≥ `alert` or not finite
    at some check (a NaN layer distance is the worst outcome, as in `Thresholds.classify`).

    Example:
        >>> checks = [CheckPoint(10, 0, 0.1, 2, None, {"a": 0.5, "b": 1e-9}),
        ...           CheckPoint(20, 0, 0.1, 2, None, {"a": math.nan})]
        >>> alerted_layers(checks, 1e-3)
        {'a': (10, nan)}
    """
    found: dict[str, tuple[int, float]] = {}
    for check in checks:
        for key, value in check.layers.items():
            if math.isfinite(value) and value < alert:
                continue
            first, worst = found.get(key, (check.step, value))
            found[key] = (first, value if _worse(value, worst) else worst)
    return found


def _worse(value: float, than: float) -> bool:
    """NaN > +inf > finite values, as severities."""
    def rank(x: float) -> tuple[int, float]:
        return (2, 0.0) if math.isnan(x) else (1, 0.0) if math.isinf(x) else (0, x)

    return rank(value) > rank(than)
