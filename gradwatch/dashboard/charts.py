"""The Vega-Lite charts of the dashboards, filled with a run's data.

The Vega-Lite charts of the dashboards: the specs shipped in `gradwatch.dashboards`
(`dashboards/vega-lite/*.json`, data left as named datasets) filled with a run's data.

Every value is JSON-safe: NaN and ±inf become null in the number fields (so a log scale never
sees them) and "NaN" / "+inf" / "-inf" in the text fields; the charts draw them at the top of
the distance axis with a cross / triangle (overall distance) or black (heatmap). A distance of
exactly 0 is drawn at the floor of the log axis and reads "0" in tooltips.

Colours. A distance's colour is fixed by the run's thresholds, never by the run's own range, so
a healthy run does not turn red because its largest value is 1e-8 (`distance_levels`): below
warn, blue-grey, one shade darker per decade (`CALM_COLOURS`); from warn, amber; from alert,
red; NaN/±inf, black. The heatmap, its legend and the PNG (`gradwatch.dashboard.png`) use the
same levels, and the verdict colours of the distance charts are the same amber and red. Runs in
the experiment chart get distinct hues without red (the palette in experiment-distance.json),
and its alert checks are red points.

Scale. The layer × step heatmap holds at most `HEATMAP_MAX_CELLS` cells: with more checks ×
layers than that, consecutive checks are grouped into columns of equal count (at most
`HEATMAP_MAX_COLUMNS`, at least `HEATMAP_MIN_COLUMNS`), and each cell shows the *worst* distance
of its checks (NaN > +inf > the largest value), so a single alerting check is never averaged
away; tooltips give the step range and the number of checks. The same worst-per-group rule
thins the lines: a run's distance chart keeps up to `MAX_POINTS` checks, the experiment chart
`MAX_POINTS_PER_RUN` per run.

The training-kernels ratio (`run_precision_chart`, a run whose checks measured it) is drawn as
the overall distance is, on its own log axis: bands and dashed lines at the run's ratio
thresholds (warn 12, alert 32 by default), points coloured by that measurement's own verdict,
its alert stretches shaded; a check whose measurement failed ("error", no ratio) is a square at
the top.

Imports: gradwatch.common, gradwatch.engine (thresholds), gradwatch.record (the reader),
dashboard.data.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from gradwatch.dashboard.data import ExperimentData, RunData
from gradwatch.engine.report import RatioThresholds, Thresholds
from gradwatch.record.layout import VERDICT_WORDS
from gradwatch.record.reader import CheckPoint

__all__ = [
    "SPEC_NAMES",
    "DistanceLevel",
    "HeatmapLayout",
    "distance_level",
    "distance_levels",
    "experiment_distance_chart",
    "format_distance",
    "format_ratio",
    "group_checks",
    "keep_end",
    "load_spec",
    "precision_checks",
    "ratio_of",
    "run_distance_chart",
    "run_layers_chart",
    "run_precision_chart",
    "short_number",
]

SPEC_NAMES = ("run-distance.json", "run-layers.json", "experiment-distance.json",
              "run-precision.json")
HEATMAP_MAX_CELLS = 20_000
HEATMAP_MAX_COLUMNS = 200
HEATMAP_MIN_COLUMNS = 20
MAX_POINTS = 5_000
MAX_POINTS_PER_RUN = 500
WARN_COLOUR, ALERT_COLOUR, NON_FINITE_COLOUR = "#f2a900", "#d62728", "#000000"
#: Below warn, lightest first, one per decade (the last one from warn/10 up to warn; the first
#: everything below warn/1000, 0 included). Blue-grey: calm, and apart from amber and red also
#: for red-green colour blindness; the lightest still stands out from a blank (unchecked) cell.
CALM_COLOURS = ("#dce6ee", "#b9cddc", "#93b0c6", "#6e92ad")

Dataset = list[dict[str, Any]]
#: A check's verdict code for one measurement (the check's own, or the training kernels').
VerdictOf = Callable[[CheckPoint], "int | None"]


@cache
def _spec_text(name: str) -> str:
    if name not in SPEC_NAMES:
        raise ValueError(f"no chart spec {name!r}; the specs are {', '.join(SPEC_NAMES)}")
    return (resources.files("gradwatch.dashboards") / "vega-lite" / name).read_text("utf-8")


def load_spec(name: str) -> dict[str, Any]:
    """A fresh copy of a shipped spec (its data are named datasets, not yet filled).

    Example:
        >>> load_spec("run-distance.json")["layer"][0]["data"]
        {'name': 'bands'}
    """
    spec: dict[str, Any] = json.loads(_spec_text(name))
    return spec


def _filled(name: str, datasets: Mapping[str, Dataset]) -> dict[str, Any]:
    spec = load_spec(name)
    spec["datasets"] = dict(datasets)
    return spec


# -- the run report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """The log axis: 0 is drawn at `floor`, NaN/±inf at `ceiling`."""

    floor: float
    ceiling: float

    @classmethod
    def of(cls, values: Sequence[float], thresholds: Thresholds | RatioThresholds) -> Bounds:
        positive = [v for v in values if math.isfinite(v) and v > 0]
        low = min(positive, default=thresholds.warn / 100)
        floor = 10.0 ** math.floor(math.log10(min(low, thresholds.warn / 10)))
        high = max(positive, default=1.0)
        ceiling = 10.0 ** math.ceil(math.log10(max(high, 1.0, thresholds.alert * 10)))
        return cls(floor=max(floor, 1e-300), ceiling=ceiling)


def format_distance(value: float) -> str:
    """A distance as text for tooltips and tables.

    Example:
        >>> [format_distance(v) for v in (3.21e-6, 0.0, math.nan, -math.inf)]
        ['3.21e-06', '0', 'NaN', '-inf']
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return "0" if value == 0 else f"{value:.3g}"


def format_ratio(value: float | None) -> str:
    """A training-kernels ratio as text ("error": not measured).

    Example:
        >>> [format_ratio(v) for v in (1.2345, 912.4, 12345.0, math.inf, None)]
        ['1.23', '912', '1.23e+04', '+inf', 'error']
    """
    if value is None:
        return "error"
    return format_distance(value)


def short_number(value: float) -> str:
    """A threshold as legends write it.

    Example:
        >>> [short_number(v) for v in (1e-5, 0.001, 2.5e-4, 1e-8)]
        ['1e-5', '1e-3', '2.5e-4', '1e-8']
    """
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class DistanceLevel:
    """One colour of the distance scale: distances from `low` (inclusive) below `high`."""

    label: str
    colour: str
    low: float
    high: float


def distance_levels(thresholds: Thresholds) -> list[DistanceLevel]:
    """The colour scale of layer distances, anchored at the thresholds: one calm shade per
    decade below warn, amber from warn, red from alert, black for NaN/±inf (last).

    Example:
        >>> [level.label for level in distance_levels(Thresholds())]
        ['< 1e-8', '1e-8 – 1e-7', '1e-7 – 1e-6', '1e-6 – 1e-5', 'warn 1e-5 – 1e-3',
         'alert ≥ 1e-3', 'NaN / ±inf']
    """
    warn, alert = thresholds.warn, thresholds.alert
    # one decade per calm shade, up to warn: 0, warn/1000, warn/100, warn/10, warn
    edges = [0.0, *(warn / 10**n for n in range(len(CALM_COLOURS) - 1, 0, -1)), warn]
    calm = [
        DistanceLevel(f"{short_number(low)} – {short_number(high)}" if low else
                      f"< {short_number(high)}", colour, low, high)
        for colour, low, high in zip(CALM_COLOURS, edges[:-1], edges[1:], strict=True)
    ]
    return [
        *calm,
        DistanceLevel(f"warn {short_number(warn)} – {short_number(alert)}", WARN_COLOUR,
                      warn, alert),
        DistanceLevel(f"alert ≥ {short_number(alert)}", ALERT_COLOUR, alert, math.inf),
        DistanceLevel("NaN / ±inf", NON_FINITE_COLOUR, math.nan, math.nan),
    ]


def distance_level(value: float, levels: Sequence[DistanceLevel]) -> int:
    """The index in `levels` (from `distance_levels`) of a distance's colour.

    Example:
        >>> levels = distance_levels(Thresholds())
        >>> [distance_level(v, levels) for v in (0.0, 3e-9, 1e-5, 9.9e-4, 1e-3, math.inf)]
        [0, 0, 4, 4, 5, 6]
    """
    if not math.isfinite(value):
        return len(levels) - 1
    return next(i for i, level in enumerate(levels[:-1]) if value < level.high)


def keep_end(name: str, limit: int) -> str:
    """`name` in at most `limit` characters: its end after "…", from a dot when one fits, so
    the kept part starts with a whole segment.

    Example:
        >>> keep_end("bert.encoder.layer.11.attention.output.dense.weight", 40)
        '…layer.11.attention.output.dense.weight'
        >>> keep_end("fc.weight", 40), keep_end("x" * 12, 8)
        ('fc.weight', '…xxxxxxx')
    """
    if len(name) <= limit:
        return name
    start = len(name) - (limit - 1)
    if name[start - 1] != ".":
        dot = name.find(".", start)
        if 0 <= dot < len(name) - 1:
            start = dot + 1
    return "…" + name[start:]


def _point(value: float, bounds: Bounds, name: str = "distance") -> dict[str, Any]:
    """The fields of one plotted distance (see `dashboards/vega-lite/run-distance.json`), or
    of another value named `name` (a ratio: `run-precision.json`)."""
    finite = math.isfinite(value)
    if not finite:
        shown_as, plotted = format_distance(value), bounds.ceiling
    elif value <= 0:
        shown_as, plotted = "zero", bounds.floor
    else:
        shown_as, plotted = "value", max(value, bounds.floor)
    return {name: value if finite else None, f"{name}_text": format_distance(value),
            "plotted": plotted, "shown_as": shown_as, "finite": finite}


def _thresholds(thresholds: Thresholds | RatioThresholds,
                label: Callable[[float], str] = short_number) -> Dataset:
    return [
        {"level": level, "value": value, "label": f"{level} ≥ {label(value)}",
         "colour": colour}
        for level, value, colour in (("warn", thresholds.warn, WARN_COLOUR),
                                     ("alert", thresholds.alert, ALERT_COLOUR))
    ]


def _bands(thresholds: Thresholds | RatioThresholds, bounds: Bounds) -> Dataset:
    return [
        {"level": "warn band", "low": thresholds.warn, "high": thresholds.alert,
         "colour": WARN_COLOUR},
        {"level": "alert band", "low": thresholds.alert, "high": bounds.ceiling,
         "colour": ALERT_COLOUR},
    ]


def _verdict(check: CheckPoint) -> str:
    return check.verdict_word or "unknown"


def _check_verdict(check: CheckPoint) -> int | None:
    return check.verdict


def _precision_verdict(check: CheckPoint) -> int | None:
    return check.precision_verdict


def _word(code: int | None) -> str:
    return VERDICT_WORDS[code] if code is not None and 0 <= code < len(VERDICT_WORDS) \
        else "unknown"


def run_distance_chart(data: RunData) -> dict[str, Any]:
    """Spec (a): the overall distance per check, bands, thresholds, alert periods."""
    checks = thin(data.checks, MAX_POINTS)
    bounds = Bounds.of([c.rel_distance for c in checks], data.thresholds)
    return _filled("run-distance.json", {
        "checks": [{"step": c.step, "verdict": _verdict(c), **_point(c.rel_distance, bounds)}
                   for c in checks],
        "bands": _bands(data.thresholds, bounds),
        "thresholds": _thresholds(data.thresholds),
        "alert_periods": alert_periods(data.checks),
    })


def precision_checks(data: RunData) -> list[CheckPoint]:
    """The run's checks that measured the training kernels (their own verdict logged)."""
    return [check for check in data.checks if check.precision_verdict is not None]


def ratio_of(check: CheckPoint) -> float:
    """A check's training-kernels ratio for ranking and scales (NaN when not measured)."""
    return math.nan if check.precision_ratio is None else check.precision_ratio


def run_precision_chart(data: RunData) -> dict[str, Any] | None:
    """Spec (c): the training-kernels ratio per check, the run's ratio bands and thresholds,
    that measurement's alert periods; None for a run without the measurement."""
    if data.kernels is None:
        return None
    measured = precision_checks(data)
    checks = thin(measured, MAX_POINTS, key=ratio_of)
    thresholds = data.kernels.thresholds
    bounds = Bounds.of([ratio_of(c) for c in checks], thresholds)
    rows: Dataset = []
    for check in checks:
        if check.precision_ratio is None:  # the measurement failed: no ratio, drawn at the top
            point = {"ratio": None, "ratio_text": "error", "plotted": bounds.ceiling,
                     "shown_as": "error", "finite": False}
        else:
            point = _point(check.precision_ratio, bounds, "ratio")
        rows.append({"step": check.step, "verdict": _word(check.precision_verdict), **point})
    return _filled("run-precision.json", {
        "checks": rows,
        "bands": _bands(thresholds, bounds),
        "thresholds": _thresholds(thresholds, label=lambda value: f"{value:g}"),
        "alert_periods": alert_periods(measured, verdict_of=_precision_verdict),
    })


def alert_periods(
    checks: Sequence[CheckPoint], *, verdict_of: VerdictOf = _check_verdict
) -> Dataset:
    """Each stretch of consecutive alert/error checks, from its first check up to the next
    check (or half a typical interval past its last, at the end of the run). `verdict_of`
    picks the measurement (default: the check's verdict, both measurements folded).

    Example:
        >>> c = lambda step, verdict: CheckPoint(step, 0, 0.0, verdict, None)
        >>> alert_periods([c(10, 0), c(20, 2), c(30, 3), c(40, 0), c(50, 2)])
        [{'step_from': 20, 'step_to': 40, 'verdict': 'error', 'checks': 2},
         {'step_from': 50, 'step_to': 55.0, 'verdict': 'alert', 'checks': 1}]
    """
    periods: Dataset = []
    gaps = [b.step - a.step for a, b in itertools.pairwise(checks)]
    half_gap = max(statistics.median(gaps) / 2, 0.5) if gaps else 0.5
    current: dict[str, Any] | None = None
    for check in checks:
        code = verdict_of(check)
        alerting = code is not None and code >= 2
        if alerting and current is None:
            current = {"step_from": check.step, "step_to": check.step + half_gap,
                       "verdict": _word(code), "checks": 0}
            periods.append(current)
        if alerting and current is not None:
            current["checks"] += 1
            current["step_to"] = check.step + half_gap
            if code == 3:
                current["verdict"] = "error"
        elif current is not None:
            current["step_to"] = check.step
            current = None
    return periods


@dataclass(frozen=True)
class HeatmapLayout:
    """How the heatmap was drawn: `columns` of `checks` checks (grouped when they differ)."""

    layers: int
    checks: int
    columns: int

    @property
    def grouped(self) -> bool:
        return self.columns < self.checks

    def describe(self) -> str:
        if not self.grouped:
            return f"{self.layers} layers × {self.checks} checks, one column per check."
        per = self.checks / self.columns
        return (f"{self.layers} layers × {self.checks} checks, grouped into {self.columns} "
                f"columns of about {per:.3g} consecutive checks; each cell shows the worst "
                f"distance among its checks (NaN and ±inf count as worst).")


def heatmap_columns(checks: int, layers: int) -> int:
    """How many columns `checks` checks of `layers` layers get (see the module docstring).

    Example:
        >>> heatmap_columns(1000, 200), heatmap_columns(50, 200), heatmap_columns(1000, 5)
        (100, 50, 200)
    """
    budget = max(HEATMAP_MIN_COLUMNS, HEATMAP_MAX_CELLS // max(layers, 1))
    return min(checks, HEATMAP_MAX_COLUMNS, budget)


def run_layers_chart(data: RunData) -> tuple[dict[str, Any], HeatmapLayout]:
    """Spec (b): the layer × step heatmap, and how its columns were formed."""
    checks = data.checks
    keys = data.layer_order
    layout = HeatmapLayout(layers=len(keys), checks=len(checks),
                           columns=heatmap_columns(len(checks), len(keys)))
    groups = group_checks(checks, layout.columns)
    levels = distance_levels(data.thresholds)
    index = {key: i for i, key in enumerate(keys)}
    gaps = [b.step - a.step for a, b in itertools.pairwise(checks)]
    last_width = statistics.median(gaps) if gaps else 1
    cells: Dataset = []
    for number, group in enumerate(groups):
        step_to = groups[number + 1][0].step if number + 1 < len(groups) \
            else group[-1].step + last_width
        for key in keys:
            found = [check.layers[key] for check in group if key in check.layers]
            if not found:
                continue
            value = worst(found)
            cells.append({
                "layer_index": index[key], "step_from": group[0].step, "step_to": step_to,
                "step_last": group[-1].step, "checks": len(found),
                "distance_text": format_distance(value),
                "level": distance_level(value, levels),
            })
    spec = _filled("run-layers.json", {
        "layers": [{"layer_index": i, "layer": data.layer_names.get(key, key)}
                   for i, key in enumerate(keys)],
        "levels": [{"level": i, "colour_label": level.label} for i, level in enumerate(levels)],
        "layer_cells": cells,
    })
    # the scale is the run's: its thresholds' labels, in order, with their colours
    spec["encoding"]["color"]["scale"] = {"domain": [level.label for level in levels],
                                          "range": [level.colour for level in levels]}
    spec["height"] = {"step": 12 if len(keys) <= 100 else 9}
    return spec, layout


def group_checks(checks: Sequence[CheckPoint], columns: int) -> list[Sequence[CheckPoint]]:
    """`checks` cut into `columns` runs of consecutive checks of (nearly) equal count."""
    n = len(checks)
    return [checks[i * n // columns:(i + 1) * n // columns] for i in range(columns)] if n else []


def worst(values: Sequence[float]) -> float:
    """The most severe distance: NaN, else the largest (+inf included).

    Example:
        >>> worst([1e-9, math.inf, 0.5]), worst([1e-9, math.nan])
        (inf, nan)
    """
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def thin(checks: Sequence[CheckPoint], limit: int, *,
         key: Callable[[CheckPoint], float] | None = None) -> list[CheckPoint]:
    """At most `limit` checks: up to `limit` all of them, else the worst check (by overall
    distance, or by `key`: NaN worst, then +inf, then the largest) of each of `limit`
    consecutive groups."""
    if len(checks) <= limit:
        return list(checks)
    value = key or (lambda c: c.rel_distance)
    return [max(group, key=lambda c: _severity(value(c)))
            for group in group_checks(checks, limit)]


def _severity(value: float) -> tuple[int, float]:
    return (2, 0.0) if math.isnan(value) else (1, 0.0) if math.isinf(value) else (0, value)


# -- the experiment dashboard -----------------------------------------------------------------


def run_label(name: str, run_id: str) -> str:
    """A run's name and short id, unique in an experiment: `"train (1a2b3c4d)"`."""
    return f"{name or 'unnamed'} ({run_id[:8]})"


def experiment_distance_chart(data: ExperimentData) -> dict[str, Any]:
    """Spec (d): the overall distance over steps, one line per run."""
    counts = Counter(summary.thresholds for summary in data.runs)
    thresholds = counts.most_common(1)[0][0] if counts else Thresholds()
    every = [c.rel_distance for summary in data.runs for c in summary.checks]
    bounds = Bounds.of(every, thresholds)
    rows: Dataset = []
    for summary in data.runs:
        label = run_label(summary.run.name, summary.run.run_id)
        rows.extend(
            {"run": label, "run_id": summary.run.run_id, "step": c.step,
             "verdict": _verdict(c), **_point(c.rel_distance, bounds)}
            for c in thin(summary.checks, MAX_POINTS_PER_RUN)
        )
    return _filled("experiment-distance.json",
                   {"run_checks": rows, "thresholds": _thresholds(thresholds)})

