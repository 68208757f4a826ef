"""The Vega-Lite specs shipped in gradwatch.dashboards, as files and filled with data, against
the Vega-Lite v6 JSON schema that Altair bundles; and how the chart data are shaped (non-finite
values, alert periods, heatmap grouping at 200 layers × 1,000 checks). No MLflow here."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gradwatch import Thresholds
from gradwatch._dashboard_charts import (
    HEATMAP_MAX_CELLS,
    SPEC_NAMES,
    alert_periods,
    experiment_distance_chart,
    heatmap_columns,
    load_spec,
    run_distance_chart,
    run_layers_chart,
    thin,
)
from gradwatch._dashboard_data import ExperimentData, RunData, RunSummary
from gradwatch._monitor_read import CheckPoint, MonitoredRun

jsonschema = pytest.importorskip("jsonschema")
altair = pytest.importorskip("altair")


@cache
def validator() -> Any:
    path = Path(altair.__file__).parent / "vegalite" / "v6" / "schema" / "vega-lite-schema.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def schema_errors(spec: Mapping[str, Any]) -> list[str]:
    return [f"{list(error.path)}: {error.message[:200]}"
            for error in validator().iter_errors(spec)]


def no_nan(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def monitored(run_id: str = "r1", name: str = "train") -> MonitoredRun:
    return MonitoredRun(run_id, "1", name, "RUNNING", 0, None, None, "alert",
                        params={"gradwatch.every": "10"})


def run_data(checks: list[CheckPoint], layer_keys: list[str]) -> RunData:
    return RunData(
        run=monitored(), experiment_name="exp", thresholds=Thresholds(), checks=checks,
        layer_names={key: key.removeprefix("gradwatch/layer/") for key in layer_keys},
        layer_order=layer_keys, worst_elements=[], worst_steps=[], artifact_steps=[],
    )


def odd_checks() -> list[CheckPoint]:
    """Ok, alert, NaN (error), +inf, exactly 0, and a verdict that was not logged."""
    values = [(10, 1e-9, 0), (20, 0.5, 2), (30, math.nan, 3), (40, math.inf, 2), (50, 0.0, 0),
              (60, 2e-6, None)]
    return [CheckPoint(step, 0, value, verdict, None,
                       {"gradwatch/layer/a": value, "gradwatch/layer/b": 1e-9})
            for step, value, verdict in values]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_shipped_spec_is_valid_vega_lite_v6(name: str) -> None:
    text = (resources.files("gradwatch.dashboards") / "vega-lite" / name).read_text("utf-8")
    spec = json.loads(text)
    assert spec["$schema"] == "https://vega.github.io/schema/vega-lite/v6.json"
    assert schema_errors(spec) == []
    assert "datasets" not in spec  # data are named datasets, filled by the builder
    assert spec["usermeta"]["gradwatch"]["datasets"]  # and documented in the file


def test_filled_specs_are_valid_and_hold_no_nan() -> None:
    data = run_data(odd_checks(), ["gradwatch/layer/a", "gradwatch/layer/b"])
    heatmap, _ = run_layers_chart(data)
    summary = RunSummary(run=data.run, thresholds=Thresholds(), checks=data.checks,
                         alerted_layers={})
    experiment = experiment_distance_chart(ExperimentData("1", "exp", [summary]))
    for spec in (run_distance_chart(data), heatmap, experiment):
        assert schema_errors(spec) == []
        no_nan(json.dumps(spec, allow_nan=False))


def test_non_finite_and_zero_distances_are_plotted_at_the_edges_and_named() -> None:
    spec = run_distance_chart(run_data(odd_checks(), []))
    rows = {row["step"]: row for row in spec["datasets"]["checks"]}
    ceiling = spec["datasets"]["bands"][1]["high"]
    assert rows[30] | {"plotted": None} == {
        "step": 30, "verdict": "error", "distance": None, "distance_text": "NaN",
        "plotted": None, "shown_as": "NaN", "finite": False}
    assert rows[30]["plotted"] == ceiling == rows[40]["plotted"] == 1.0
    assert (rows[40]["distance_text"], rows[40]["shown_as"]) == ("+inf", "+inf")
    assert (rows[50]["distance_text"], rows[50]["shown_as"]) == ("0", "zero")
    assert 0 < rows[50]["plotted"] <= 1e-9  # the floor of the log axis, below every value
    assert rows[60]["verdict"] == "unknown"
    assert spec["datasets"]["thresholds"][0]["value"] == 1e-5
    assert spec["datasets"]["alert_periods"] == [
        {"step_from": 20, "step_to": 50, "verdict": "error", "checks": 3}]


def test_alert_periods_run_to_the_next_check() -> None:
    def check(step: int, verdict: int) -> CheckPoint:
        return CheckPoint(step, 0, 0.0, verdict, None)

    assert alert_periods([]) == []
    assert alert_periods([check(5, 2)]) == [
        {"step_from": 5, "step_to": 5.5, "verdict": "alert", "checks": 1}]
    assert alert_periods([check(0, 1), check(100, 2), check(200, 0)]) == [
        {"step_from": 100, "step_to": 200, "verdict": "alert", "checks": 1}]


def test_a_run_of_200_layers_and_1000_checks_is_grouped_keeping_the_worst() -> None:
    keys = [f"gradwatch/layer/block{i}.weight" for i in range(200)]
    checks = [CheckPoint(step, 0, 1e-9, 0, None, dict.fromkeys(keys, 1e-9))
              for step in range(10, 10_010, 10)]
    checks[437] = CheckPoint(4380, 0, 0.3, 2, None,
                             {**dict.fromkeys(keys, 1e-9), keys[17]: 0.3, keys[18]: math.nan})
    spec, layout = run_layers_chart(run_data(checks, keys))
    cells = spec["datasets"]["layer_cells"]
    assert (layout.layers, layout.checks, layout.columns) == (200, 1000, 100)
    assert layout.grouped and "grouped into 100 columns of about 10" in layout.describe()
    assert len(cells) == 200 * 100 <= HEATMAP_MAX_CELLS
    (alerting,) = [c for c in cells if c["layer_index"] == 17 and c["distance_text"] != "1e-09"]
    assert (alerting["step_from"], alerting["step_to"], alerting["step_last"]) == (4310, 4410, 4400)
    assert alerting["distance_text"] == "0.3" and alerting["checks"] == 10
    (nan_cell,) = [c for c in cells if c["layer_index"] == 18 and c["distance_text"] == "NaN"]
    assert nan_cell["plotted"] == 0.3  # in the colour range (drawn black by its text)
    assert [row["layer"] for row in spec["datasets"]["layers"]][:2] == [
        "block0.weight", "block1.weight"]
    assert spec["height"] == {"step": 9}
    sample = {**spec, "datasets": {**spec["datasets"], "layer_cells": cells[:50]}}
    assert schema_errors(sample) == []  # (all 20,000 cells would take seconds)


def test_heatmap_columns_and_thinning() -> None:
    assert heatmap_columns(0, 10) == 0
    assert heatmap_columns(30, 3) == 30  # few checks: one column each
    assert heatmap_columns(1000, 2000) == 20  # at least 20 columns, however many layers
    checks = [CheckPoint(step, 0, 1e-9 * step, 0, None) for step in range(1, 101)]
    checks[41] = CheckPoint(42, 0, math.nan, 3, None)
    thinned = thin(checks, 10)
    assert len(thinned) == 10 and thinned[4].step == 42  # the NaN wins its group
    assert thinned[0].step == 10  # else the largest distance of the group
    assert thin(checks, 500) == checks


def test_load_spec_refuses_unknown_names_and_returns_copies() -> None:
    with pytest.raises(ValueError, match=r"run-distance\.json"):
        load_spec("nope.json")
    spec = load_spec("run-layers.json")
    spec["mark"] = "changed"
    assert load_spec("run-layers.json")["mark"] == {"type": "rect"}
