"""A static PNG of a run report (for e-mails, chat notifications and MLflow's image preview).

Drawn on a private `matplotlib.figure.Figure` with the Agg canvas: pyplot, the global backend
and the user's rcParams are not touched. The same data as the HTML charts: the overall distance
per check (log scale, warn/alert bands, alert stretches shaded, NaN/±inf as × at the top) and
the layer × step heatmap (columns grouped as in `gradwatch.dashboard.charts`, coloured by the
same threshold-anchored levels as the HTML heatmap: blue-grey below warn, amber, red, NaN/±inf
black; not checked blank), and for a run whose checks measured the training kernels, that
measurement's ratio per check (log scale, its warn/alert ratio bands, its alert stretches
shaded, a failed measurement as a square at the top).

Imports: dashboard.charts, dashboard.data (matplotlib when installed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradwatch.dashboard.charts import (
    ALERT_COLOUR,
    WARN_COLOUR,
    Bounds,
    alert_periods,
    distance_level,
    distance_levels,
    group_checks,
    heatmap_columns,
    keep_end,
    precision_checks,
    ratio_of,
    short_number,
    worst,
)
from gradwatch.dashboard.data import RunData

__all__ = ["HEATMAP_LABEL", "RATIO_LABEL", "draw_run_png", "run_figure"]

VERDICT_COLOURS = {"ok": "#2ca02c", "warn": WARN_COLOUR, "alert": ALERT_COLOUR, "error": "#6a3d9a"}
MAX_LAYER_LABELS = 40
LAYER_LABEL_CHARS = 48  # longer names keep their end (weight or bias), as in the HTML tables
DPI = 100
HEATMAP_LABEL = "layer heatmap"  # the heatmap Axes' label, to find it in the figure
RATIO_LABEL = "training kernels"  # the training-kernels ratio Axes' label
RATIO_HEIGHT = 2.8  # inches


def draw_run_png(data: RunData, path: Path) -> Path:
    """Draw `data` into a PNG at `path` (parent folders must exist); returns `path`."""
    run_figure(data).savefig(path, format="png", dpi=DPI)
    return path


def run_figure(data: RunData) -> Any:
    """The report's matplotlib `Figure` (on its own Agg canvas), as `draw_run_png` saves it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = len(data.layer_order) if data.checks else 0
    heat_height = min(max(layers, 1), 60) * 0.12 + 1.2 if layers else 0.0
    ratio_height = RATIO_HEIGHT if data.kernels is not None and precision_checks(data) else 0.0
    heights = [h for h in (3.4, heat_height, ratio_height) if h]
    figure = Figure(figsize=(11, sum(heights)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0])
    title = f"gradwatch: {data.run.name or data.run.run_id} ({data.run.run_id})"
    figure.suptitle(title, parse_math=False, fontsize=12)
    _distance(axes.pop(0), data)
    if layers:
        _heatmap(axes.pop(0), data, figure)
    if ratio_height:
        _ratio(axes.pop(0), data)
    return figure


def _distance(ax: Any, data: RunData) -> None:
    checks = data.checks
    warn, alert = data.thresholds.warn, data.thresholds.alert
    ax.set_yscale("log")
    ax.set_ylabel("relative distance")
    ax.set_xlabel("step")
    if not checks:
        ax.text(0.5, 0.5, "no checks yet", transform=ax.transAxes, ha="center", va="center")
        return
    bounds = Bounds.of([c.rel_distance for c in checks], data.thresholds)
    ax.axhspan(warn, alert, color=VERDICT_COLOURS["warn"], alpha=0.1, lw=0)
    ax.axhspan(alert, bounds.ceiling, color=VERDICT_COLOURS["alert"], alpha=0.1, lw=0)
    for level, value in (("warn", warn), ("alert", alert)):
        ax.axhline(value, color=VERDICT_COLOURS[level], ls="--", lw=1,
                   label=f"{level} {short_number(value)}")
    for period in alert_periods(checks):
        ax.axvspan(period["step_from"], period["step_to"], color=VERDICT_COLOURS["alert"],
                   alpha=0.18, lw=0)
    finite = [c for c in checks if math.isfinite(c.rel_distance)]
    ax.plot([c.step for c in finite], [max(c.rel_distance, bounds.floor) for c in finite],
            color="#4c78a8", lw=1.2)
    for verdict, colour in VERDICT_COLOURS.items():
        shown = [c for c in finite if c.verdict_word == verdict]
        if shown:
            ax.scatter([c.step for c in shown], [max(c.rel_distance, bounds.floor) for c in shown],
                       s=14, color=colour, zorder=3, label=verdict)
    bad = [c for c in checks if not math.isfinite(c.rel_distance)]
    if bad:
        ax.scatter([c.step for c in bad], [bounds.ceiling] * len(bad), marker="x", s=40,
                   color="#000", zorder=4, label="NaN / ±inf")
    ax.set_ylim(bounds.floor, bounds.ceiling * 1.5)
    ax.legend(loc="upper left", fontsize=8, ncols=4, frameon=False)


def _ratio(ax: Any, data: RunData) -> None:
    """The training-kernels ratio per check, drawn as the distance is."""
    assert data.kernels is not None  # run_figure checks
    checks = precision_checks(data)
    warn, alert = data.kernels.thresholds.warn, data.kernels.thresholds.alert
    bounds = Bounds.of([ratio_of(c) for c in checks], data.kernels.thresholds)
    ax.set_label(RATIO_LABEL)
    ax.set_yscale("log")
    ax.set_ylabel("training-kernels ratio")
    ax.set_xlabel("step")
    ax.axhspan(warn, alert, color=VERDICT_COLOURS["warn"], alpha=0.1, lw=0)
    ax.axhspan(alert, bounds.ceiling, color=VERDICT_COLOURS["alert"], alpha=0.1, lw=0)
    for level, value in (("warn", warn), ("alert", alert)):
        ax.axhline(value, color=VERDICT_COLOURS[level], ls="--", lw=1, label=f"{level} {value:g}")
    for period in alert_periods(checks, verdict_of=lambda c: c.precision_verdict):
        ax.axvspan(period["step_from"], period["step_to"], color=VERDICT_COLOURS["alert"],
                   alpha=0.18, lw=0)
    finite = [c for c in checks if math.isfinite(ratio_of(c))]
    ax.plot([c.step for c in finite], [max(ratio_of(c), bounds.floor) for c in finite],
            color="#4c78a8", lw=1.2)
    for verdict, colour in VERDICT_COLOURS.items():
        shown = [c for c in finite if c.precision_verdict_word == verdict]
        if shown:
            ax.scatter([c.step for c in shown], [max(ratio_of(c), bounds.floor) for c in shown],
                       s=14, color=colour, zorder=3, label=verdict)
    for marker, label, chosen in (
            ("x", "NaN / ±inf", [c for c in checks if c.precision_ratio is not None
                                 and not math.isfinite(c.precision_ratio)]),
            ("s", "not measured (error)", [c for c in checks if c.precision_ratio is None])):
        if chosen:
            ax.scatter([c.step for c in chosen], [bounds.ceiling] * len(chosen), marker=marker,
                       s=40, color="#000", zorder=4, label=label)
    ax.set_ylim(bounds.floor, bounds.ceiling * 1.5)
    ax.legend(loc="best", fontsize=8, ncols=4, frameon=False)  # its markers sit at the top


def _heatmap(ax: Any, data: RunData, figure: Any) -> None:
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    keys = data.layer_order
    groups = group_checks(data.checks, heatmap_columns(len(data.checks), len(keys)))
    levels = distance_levels(data.thresholds)
    # each cell holds its colour's level (as in the HTML heatmap); unchecked cells are masked
    grid = np.zeros((len(keys), len(groups)), dtype=int)
    missing = np.ones_like(grid, dtype=bool)
    for column, group in enumerate(groups):
        for row, key in enumerate(keys):
            found = [check.layers[key] for check in group if key in check.layers]
            if found:
                grid[row, column] = distance_level(worst(found), levels)
                missing[row, column] = False
    cmap = ListedColormap([level.colour for level in levels]).with_extremes(bad="#ffffff")
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
    image = ax.imshow(np.ma.masked_array(grid, missing), aspect="auto", interpolation="nearest",
                      cmap=cmap, norm=norm,
                      extent=(-0.5, len(groups) - 0.5, len(keys) - 0.5, -0.5))
    ax.set_label(HEATMAP_LABEL)
    stride = max(1, math.ceil(len(keys) / MAX_LAYER_LABELS))
    ticks = list(range(0, len(keys), stride))
    ax.set_yticks(ticks, [keep_end(data.layer_names.get(keys[i], keys[i]), LAYER_LABEL_CHARS)
                          for i in ticks], fontsize=7, parse_math=False)
    x_ticks = list(range(0, len(groups), max(1, len(groups) // 10)))
    ax.set_xticks(x_ticks, [str(groups[i][0].step) for i in x_ticks], fontsize=8)
    ax.set_xlabel("step (first check of each column)" if len(groups) < len(data.checks)
                  else "step")
    bar = figure.colorbar(image, ax=ax, label="layer distance", ticks=range(len(levels)))
    bar.ax.set_yticklabels([level.label for level in levels], fontsize=7)
