"""A static PNG of a run report (for e-mails, chat notifications and MLflow's image preview).

Drawn on a private `matplotlib.figure.Figure` with the Agg canvas: pyplot, the global backend
and the user's rcParams are not touched. The same data as the HTML charts: the overall distance
per check (log scale, warn/alert bands, alert stretches shaded, NaN/±inf as × at the top) and
the layer × step heatmap (columns grouped as in `gradwatch._dashboard_charts`; NaN/±inf black,
not checked blank).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradwatch._dashboard_charts import (
    Bounds,
    alert_periods,
    group_checks,
    heatmap_columns,
    worst,
)
from gradwatch._dashboard_data import RunData

__all__ = ["draw_run_png"]

VERDICT_COLOURS = {"ok": "#2ca02c", "warn": "#f2a900", "alert": "#d62728", "error": "#6a3d9a"}
MAX_LAYER_LABELS = 40
DPI = 100


def draw_run_png(data: RunData, path: Path) -> Path:
    """Draw `data` into a PNG at `path` (parent folders must exist); returns `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = len(data.layer_order) if data.checks else 0
    heat_height = min(max(layers, 1), 60) * 0.12 + 1.2 if layers else 0.0
    figure = Figure(figsize=(11, 3.4 + heat_height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    rows = 2 if layers else 1
    axes = figure.subplots(rows, 1, squeeze=False,
                           height_ratios=[3.4, heat_height] if layers else [1])[:, 0]
    title = f"gradwatch: {data.run.name or data.run.run_id} ({data.run.run_id})"
    figure.suptitle(title, parse_math=False, fontsize=12)
    _distance(axes[0], data)
    if layers:
        _heatmap(axes[1], data, figure)
    figure.savefig(path, format="png", dpi=DPI)
    return path


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
    ax.axhline(warn, color=VERDICT_COLOURS["warn"], ls="--", lw=1, label=f"warn {warn:g}")
    ax.axhline(alert, color=VERDICT_COLOURS["alert"], ls="--", lw=1, label=f"alert {alert:g}")
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


def _heatmap(ax: Any, data: RunData, figure: Any) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm

    keys = data.layer_order
    groups = group_checks(data.checks, heatmap_columns(len(data.checks), len(keys)))
    grid = np.full((len(keys), len(groups)), np.nan)
    missing = np.ones_like(grid, dtype=bool)
    for column, group in enumerate(groups):
        for row, key in enumerate(keys):
            found = [check.layers[key] for check in group if key in check.layers]
            if found:
                grid[row, column] = worst(found)
                missing[row, column] = False
    values = grid[np.isfinite(grid)]
    bounds = Bounds.of(list(values), data.thresholds)
    top = float(values.max()) if values.size and values.max() > bounds.floor else bounds.floor * 10
    # non-finite → above the colour range (drawn in the "over" colour, black); unchecked → masked
    shown = np.where(np.isfinite(grid), np.maximum(grid, bounds.floor), top * 10)
    from matplotlib import colormaps

    cmap = colormaps["YlOrRd"].with_extremes(over="#000000", bad="#ffffff")
    image = ax.imshow(np.ma.masked_array(shown, missing), aspect="auto", interpolation="nearest",
                      cmap=cmap, norm=LogNorm(vmin=bounds.floor, vmax=top),
                      extent=(-0.5, len(groups) - 0.5, len(keys) - 0.5, -0.5))
    stride = max(1, math.ceil(len(keys) / MAX_LAYER_LABELS))
    ticks = list(range(0, len(keys), stride))
    ax.set_yticks(ticks, [data.layer_names.get(keys[i], keys[i]) for i in ticks],
                  fontsize=7, parse_math=False)
    x_ticks = list(range(0, len(groups), max(1, len(groups) // 10)))
    ax.set_xticks(x_ticks, [str(groups[i][0].step) for i in x_ticks], fontsize=8)
    ax.set_xlabel("step (first check of each column)" if len(groups) < len(data.checks)
                  else "step")
    figure.colorbar(image, ax=ax, label="layer distance", extend="max")
