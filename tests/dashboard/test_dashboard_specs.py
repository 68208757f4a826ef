"""The Vega-Lite specs shipped in gradwatch.dashboards, as files and filled with data, against
the Vega-Lite v6 JSON schema that Altair bundles; how the chart data are shaped (non-finite
values, alert periods, heatmap grouping at 200 layers × 1,000 checks); and the colours: the
heatmap's scale anchored at the run's thresholds, in the spec and in the PNG's pixels, and the
experiment chart's run colours. No MLflow here."""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gradwatch import RatioThresholds, Thresholds
from gradwatch.dashboard.charts import (
    ALERT_COLOUR,
    CALM_COLOURS,
    HEATMAP_MAX_CELLS,
    SPEC_NAMES,
    WARN_COLOUR,
    alert_periods,
    experiment_distance_chart,
    heatmap_columns,
    keep_end,
    load_spec,
    run_distance_chart,
    run_layers_chart,
    run_precision_chart,
    thin,
)
from gradwatch.dashboard.data import ExperimentData, KernelInfo, RunData, RunSummary
from gradwatch.dashboard.png import HEATMAP_LABEL, run_figure
from gradwatch.record.reader import CheckPoint, MonitoredRun

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


def run_data(checks: list[CheckPoint], layer_keys: list[str],
             thresholds: Thresholds | None = None) -> RunData:
    return RunData(
        run=monitored(), experiment_name="exp", thresholds=thresholds or Thresholds(),
        checks=checks,
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
    assert cell_colour(spec, nan_cell) == "#000000"
    assert cell_colour(spec, alerting) == ALERT_COLOUR
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


def cell_colour(spec: Mapping[str, Any], cell: Mapping[str, Any]) -> str:
    """A heatmap cell's colour as the spec draws it: its level's label (the `levels` lookup)
    through the colour scale's domain and range."""
    labels = {row["level"]: row["colour_label"] for row in spec["datasets"]["levels"]}
    scale = spec["encoding"]["color"]["scale"]
    colour: str = scale["range"][scale["domain"].index(labels[cell["level"]])]
    return colour


def hue_and_saturation(colour: str) -> tuple[float, float]:
    red, green, blue = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    hue, _, saturation = colorsys.rgb_to_hls(red, green, blue)
    return hue * 360, saturation


@pytest.mark.parametrize(("warn", "alert", "labels"), [
    (1e-5, 1e-3, ["< 1e-8", "1e-8 – 1e-7", "1e-7 – 1e-6", "1e-6 – 1e-5", "warn 1e-5 – 1e-3",
                  "alert ≥ 1e-3", "NaN / ±inf"]),
    (1e-6, 0.05, ["< 1e-9", "1e-9 – 1e-8", "1e-8 – 1e-7", "1e-7 – 1e-6", "warn 1e-6 – 5e-2",
                  "alert ≥ 5e-2", "NaN / ±inf"]),
])
def test_heatmap_colours_are_anchored_at_the_runs_thresholds(
    warn: float, alert: float, labels: list[str]
) -> None:
    expected = {  # value → colour: the calm shades by decade below warn, then amber, red, black
        0.0: CALM_COLOURS[0], warn / 1000 * 0.99: CALM_COLOURS[0], warn / 1000: CALM_COLOURS[1],
        warn / 50: CALM_COLOURS[2], warn / 10: CALM_COLOURS[3], warn * 0.999: CALM_COLOURS[3],
        warn: WARN_COLOUR, alert * 0.999: WARN_COLOUR, alert: ALERT_COLOUR, 0.7: ALERT_COLOUR,
        math.inf: "#000000", math.nan: "#000000",
    }
    keys = [f"gradwatch/layer/l{i}" for i in range(len(expected))]
    check = CheckPoint(10, 0, 1e-9, 0, None, dict(zip(keys, expected, strict=True)))
    spec, _ = run_layers_chart(run_data([check], keys, Thresholds(warn=warn, alert=alert)))
    assert schema_errors(spec) == []
    drawn = [cell_colour(spec, cell) for cell in sorted(spec["datasets"]["layer_cells"],
                                                         key=lambda cell: cell["layer_index"])]
    assert drawn == list(expected.values())
    for shade in CALM_COLOURS:  # blue-grey: nothing calm looks like amber or red
        hue, _ = hue_and_saturation(shade)
        assert 180 <= hue <= 240
    # the legend is the scale, and says where its edges are
    assert spec["encoding"]["color"]["scale"]["domain"] == labels
    assert spec["encoding"]["color"]["legend"]["orient"] == "bottom"  # inside the chart


def test_a_healthy_run_is_calm_whatever_its_range() -> None:
    """1e-10…1e-8 was deep red when the scale spanned the run's own range."""
    keys = ["gradwatch/layer/a", "gradwatch/layer/b"]
    checks = [CheckPoint(step, 0, 1e-8, 0, None, {keys[0]: 1e-10 * step, keys[1]: 1e-8})
              for step in range(1, 101)]
    spec, _ = run_layers_chart(run_data(checks, keys))
    colours = {cell_colour(spec, cell) for cell in spec["datasets"]["layer_cells"]}
    assert colours == set(CALM_COLOURS[:2])  # the two lightest calm shades, nothing else


def png_pixel(path: Path, figure: Any, column: int, row: int) -> tuple[int, ...]:
    """The PNG's pixel at the centre of heatmap cell (column, row)."""
    from PIL import Image

    (axes,) = [ax for ax in figure.axes if ax.get_label() == HEATMAP_LABEL]
    x, y = axes.transData.transform((column, row))
    with Image.open(path) as image:
        pixel: tuple[int, ...] = image.convert("RGB").getpixel(
            (round(x), image.height - round(y)))
    return pixel


def test_png_heatmap_pixels_use_the_same_threshold_colours(tmp_path: Path) -> None:
    keys = ["gradwatch/layer/encoder.weight", "gradwatch/layer/head.bias"]
    checks = [CheckPoint(step, 0, 1e-9, 0, None, {keys[0]: 1e-9, keys[1]: 2e-9})
              for step in range(10, 110, 10)]
    checks[4] = CheckPoint(50, 0, 0.2, 2, None, {keys[0]: 0.2, keys[1]: 3e-5})
    checks[7] = CheckPoint(80, 0, math.nan, 3, None, {keys[0]: math.nan, keys[1]: 2e-9})
    figure = run_figure(run_data(checks, keys))
    path = tmp_path / "report.png"
    figure.savefig(path, format="png", dpi=figure.dpi)

    def rgb(colour: str) -> tuple[int, ...]:
        return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))

    assert png_pixel(path, figure, 0, 0) == rgb(CALM_COLOURS[0])  # healthy: the lightest
    assert png_pixel(path, figure, 4, 0) == rgb(ALERT_COLOUR)  # 0.2 ≥ alert
    assert png_pixel(path, figure, 4, 1) == rgb(WARN_COLOUR)  # 3e-5: warn
    assert png_pixel(path, figure, 7, 0) == (0, 0, 0)  # NaN


def test_experiment_runs_get_distinct_hues_and_alert_checks_red() -> None:
    spec = load_spec("experiment-distance.json")
    lines, points = spec["layer"][1], spec["layer"][2]
    palette = lines["encoding"]["color"]["scale"]["range"]
    hues = [hue_and_saturation(colour) for colour in palette]
    first = [hue for hue, _ in hues[:4]]
    for i, a in enumerate(first):  # the first runs: hues at least 60° apart
        for b in first[i + 1:]:
            assert min(abs(a - b), 360 - abs(a - b)) >= 60, palette
    for hue, saturation in hues:  # no run looks like an alert
        assert saturation < 0.2 or min(hue, 360 - hue) >= 20, palette
    assert spec["resolve"] == {"scale": {"color": "independent"}}  # points have their own
    scale = points["encoding"]["color"]["scale"]
    assert dict(zip(scale["domain"], scale["range"], strict=True))["alert"] == ALERT_COLOUR


def test_keep_end_keeps_what_tells_weight_from_bias() -> None:
    name = "base_model.model.model.layers.31.self_attn.q_proj.lora_A.default.weight"
    assert keep_end(name, 60) == "…model.layers.31.self_attn.q_proj.lora_A.default.weight"
    assert keep_end(name, 30) == "…q_proj.lora_A.default.weight"
    assert len(keep_end(name, 30)) <= 30 and keep_end(name, 71) == name
    assert keep_end("a." + "b" * 40, 10) == "…bbbbbbbbb"  # no dot to start at: a hard cut


# -- the training-kernels ratio -----------------------------------------------------------------


def kernel_checks() -> list[CheckPoint]:
    """Ok, alert (a wrong custom op), a failed measurement (no ratio), +inf, NaN, exactly 0,
    and a check without the measurement (left out of the ratio chart)."""
    key = "gradwatch/precision/layer/first.weight"
    values = [(10, 0, 1.4), (20, 2, 8.3e4), (30, 3, None), (40, 2, math.inf), (50, 2, math.nan),
              (60, 0, 0.0), (70, None, None)]
    return [CheckPoint(step, 0, 1e-9, verdict, None, {"gradwatch/layer/w": 1e-9},
                       precision_verdict=verdict, precision_ratio=ratio,
                       precision_layers={} if ratio is None else {key: ratio})
            for step, verdict, ratio in values]


def with_kernels(data: RunData, thresholds: RatioThresholds | None = None) -> RunData:
    key = "gradwatch/precision/layer/first.weight"
    return replace(data, kernels=KernelInfo(thresholds=thresholds or RatioThresholds(),
                                            layer_names={key: "first.weight"},
                                            layer_order=[key]))


def test_the_ratio_chart_is_valid_log_scaled_and_names_what_it_cannot_plot() -> None:
    data = with_kernels(run_data(kernel_checks(), ["gradwatch/layer/w"]))
    spec = run_precision_chart(data)
    assert spec is not None and schema_errors(spec) == []
    no_nan(json.dumps(spec, allow_nan=False))
    assert spec["layer"][0]["encoding"]["y"]["scale"] == {"type": "log"}
    rows = {row["step"]: row for row in spec["datasets"]["checks"]}
    assert sorted(rows) == [10, 20, 30, 40, 50, 60]  # 70 did not measure the kernels
    assert (rows[10]["ratio"], rows[10]["verdict"], rows[10]["shown_as"]) == (1.4, "ok", "value")
    assert (rows[20]["ratio"], rows[20]["verdict"]) == (8.3e4, "alert")
    ceiling = rows[40]["plotted"]
    assert ceiling >= 1e5
    assert (rows[30]["ratio"], rows[30]["ratio_text"], rows[30]["shown_as"],
            rows[30]["verdict"], rows[30]["plotted"]) == (None, "error", "error", "error", ceiling)
    assert (rows[40]["shown_as"], rows[50]["shown_as"], rows[50]["plotted"]) == (
        "+inf", "NaN", ceiling)
    assert rows[60]["shown_as"] == "zero" and rows[60]["plotted"] < rows[10]["plotted"]
    # the warn 12 / alert 32 lines and bands, and this measurement's own alert stretch
    assert [(t["value"], t["label"]) for t in spec["datasets"]["thresholds"]] == [
        (12.0, "warn ≥ 12"), (32.0, "alert ≥ 32")]
    assert [(b["low"], b["high"]) for b in spec["datasets"]["bands"]] == [
        (12.0, 32.0), (32.0, ceiling)]
    assert spec["datasets"]["alert_periods"] == [
        {"step_from": 20, "step_to": 60, "verdict": "error", "checks": 4}]
    # the run's own ratio thresholds when its reports carry others
    custom = run_precision_chart(with_kernels(data, RatioThresholds(warn=4, alert=16)))
    assert custom is not None
    assert [t["value"] for t in custom["datasets"]["thresholds"]] == [4.0, 16.0]


def test_no_ratio_chart_or_png_axes_without_the_measurement(tmp_path: Path) -> None:
    from gradwatch.dashboard.png import RATIO_LABEL

    plain = run_data(odd_checks(), ["gradwatch/layer/a"])
    assert plain.kernels is None and run_precision_chart(plain) is None
    labels = [ax.get_label() for ax in run_figure(plain).axes]
    assert RATIO_LABEL not in labels
    figure = run_figure(with_kernels(replace(plain, checks=kernel_checks())))
    (ratio_axes,) = [ax for ax in figure.axes if ax.get_label() == RATIO_LABEL]
    assert ratio_axes.get_yscale() == "log"
    assert {text.get_text() for text in ratio_axes.get_legend().get_texts()} >= {
        "warn 12", "alert 32", "NaN / ±inf", "not measured (error)"}
    figure.savefig(tmp_path / "report.png", format="png", dpi=figure.dpi)
