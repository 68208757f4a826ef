"""Runs written in gradwatch's documented MLflow layout for the dashboard tests: real
`CheckReport`s delivered by the record's own helpers (metrics, tags, the per-check artifact),
so every name and non-finite value takes the path a training run's would."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mlflow import MlflowClient

from gradwatch import CheckReport, ElementReport, LayerReport, Thresholds
from gradwatch.record.writer import check_payload, deliver_payload, params_payload
from tests.support.mlflow_runs import T0_MS, new_experiment

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


#: Real parameter names (T5, BERT, a PEFT LoRA adapter on Llama) longer than the ~32 characters
#: the worst-elements table used to leave a name before it ran into the next column.
LONG_LAYERS = (
    "model.encoder.block.11.layer.1.DenseReluDense.wo.weight",
    "bert.encoder.layer.11.attention.output.dense.weight",
    "bert.encoder.layer.11.attention.output.dense.bias",
    "base_model.model.model.layers.31.self_attn.q_proj.lora_A.default.weight",
)


def a_run_with_long_names(client: MlflowClient, experiment_id: str) -> str:
    """A run named "bert-finetune" with 10 checks at steps 10..100 of LONG_LAYERS and
    "head.bias", healthy (1e-10…1e-8) but for an alert in the BERT weight (step 60), a warn in
    the BERT bias (step 70) and a NaN in head.bias (step 80); every layer reports two worst
    elements with wide indices, so the worst-elements table fills with long names."""
    checks = []
    for step in range(10, 110, 10):
        layers = {name: 1e-10 * (i + 1) * step / 10 for i, name in enumerate(LONG_LAYERS)}
        layers["head.bias"] = 2e-10
        if step == 60:
            layers[LONG_LAYERS[1]] = 0.02
        if step == 70:
            layers[LONG_LAYERS[2]] = 3e-5
        if step == 80:
            layers["head.bias"] = math.nan
        worst = {name: [element((3071 - i, 767), 2.0, 1.0), element((i, 1023), 1.5, 1.5)]
                 for i, name in enumerate(layers)}
        checks.append((step, report(layers, worst=worst)))
    return write_run(client, experiment_id, checks, name="bert-finetune")
