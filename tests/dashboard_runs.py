"""Runs written in gradwatch's documented MLflow layout for the dashboard tests: real
`CheckReport`s delivered by the record's own helpers (metrics, tags, the per-check artifact),
so every name and non-finite value takes the path a training run's would."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mlflow import MlflowClient

from gradwatch import CheckReport, ElementReport, LayerReport, Thresholds
from gradwatch._record import check_payload, deliver_payload, params_payload
from tests.mlflow_runs import T0_MS, new_experiment

#: A layer name that would run script if it reached the page unescaped.
EVIL_LAYER = "</script><img src=x onerror=alert(1)>"
#: A run name with every character HTML escaping must handle.
EVIL_RUN = "<b>&\"'"


def element(index: tuple[int, ...], analytic: float, numeric: float, *,
            kink: bool = False) -> ElementReport:
    diff = abs(numeric - analytic)
    scale = abs(analytic) + abs(numeric)
    return ElementReport(index=index, analytic=analytic, numeric=numeric, abs_diff=diff,
                         rel_error=diff / scale if scale else 0.0, kink=kink)


def report(layers: Mapping[str, float], *, overall: float | None = None,
           verdict: str | None = None,
           worst: Mapping[str, Sequence[ElementReport]] | None = None) -> CheckReport:
    """A CheckReport whose layers have these distances (verdicts by the default thresholds;
    the overall distance defaults to the largest layer distance)."""
    thresholds = Thresholds()
    finite = [v for v in layers.values() if math.isfinite(v)]
    if overall is None:
        overall = math.nan if len(finite) < len(layers) else max(finite, default=0.0)
    layer_reports = {
        name: LayerReport(
            rel_distance=value, verdict=thresholds.classify(value), numel=6, checked=6,
            estimated=False, worst=list((worst or {}).get(name, [element((0,), 1.0, 1.0)])),
            shape=(2, 3),
        )
        for name, value in layers.items()
    }
    if verdict is None:
        ranks = ["ok", "warn", "alert", "error"]
        verdict = max((r.verdict for r in layer_reports.values()), key=ranks.index,
                      default="ok")
        verdict = max(verdict, thresholds.classify(overall), key=ranks.index)
    return CheckReport(
        rel_distance=overall, verdict=verdict, mode="full", eps=1e-7,  # type: ignore[arg-type]
        coordinates=6 * len(layers), evaluations=12 * len(layers), seconds=0.01, loss=1.0,
        layers=layer_reports,
    )


def write_run(client: MlflowClient, experiment_id: str, checks: Sequence[tuple[int, CheckReport]],
              *, name: str = "train", alert_threshold: float | None = None) -> str:
    """A run with the once-per-run params and one delivered record per (step, report)."""
    run_id: str = client.create_run(experiment_id, run_name=name).info.run_id
    params: dict[str, object] = {"gradwatch.every": 10, "gradwatch.mode": "full",
                                 "gradwatch.threshold.warn": 1e-5,
                                 "gradwatch.threshold.alert": alert_threshold or 1e-3}
    deliver_payload(params_payload(params, run_id=run_id, tracking_uri=None), client)
    for step, check in checks:
        deliver_payload(check_payload(check, step=step, timestamp_ms=T0_MS + step,
                                      run_id=run_id, tracking_uri=None), client)
    return run_id


def a_run_with_everything(client: MlflowClient) -> tuple[str, str]:
    """(experiment id, run id) of a run named EVIL_RUN with 13 checks at steps 10..130: ok ones,
    an alert in EVIL_LAYER (step 40), a +inf layer (step 50), an error with NaN (step 130)."""
    _, experiment_id = new_experiment(client, "dash")
    checks = []
    for step in range(10, 130, 10):
        layers = {"encoder.weight": 1e-9, EVIL_LAYER: 1e-9, "head.bias": 2e-10}
        worst = None
        if step == 40:
            layers[EVIL_LAYER] = 0.25
            worst = {EVIL_LAYER: [element((1, 2), 2.0, 1.0), element((0, 0), 1.0, 1.0)]}
        if step == 50:
            layers["head.bias"] = math.inf
        checks.append((step, report(layers, worst=worst)))
    checks.append((130, report({"encoder.weight": math.nan, EVIL_LAYER: math.nan,
                                "head.bias": math.nan}, verdict="error")))
    return experiment_id, write_run(client, experiment_id, checks, name=EVIL_RUN)
