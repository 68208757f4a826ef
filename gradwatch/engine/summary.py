"""Plain-text rendering of a `CheckReport` for terminals and test failures.

Imports: nothing at run time (the report types only for type checking).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.engine.report import CheckReport, ElementReport

__all__ = ["render_summary"]


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2e}"


def _element(element: ElementReport) -> str:
    mark = " kink" if element.kink else ""
    return (
        f"{list(element.index)} analytic {element.analytic:.6g} vs numeric "
        f"{element.numeric:.6g} (rel_error {element.rel_error:.2e}{mark})"
    )


def render_summary(report: CheckReport, *, max_layers: int = 20, max_elements: int = 3) -> str:
    """Header, reasons, then one row per layer (worst first) with its worst elements."""
    estimated = "≈" if report.estimated else ""
    lines = [
        f"gradwatch check: {report.verdict.upper()}  rel_distance {estimated}"
        f"{_number(report.rel_distance)}"
        + (f" ({_number(report.rel_distance_without_kinks)} without kinks)"
           if report.rel_distance_without_kinks is not None else "")
        + f"  (mode {report.mode}"
        + (f": {report.strategy}" if report.strategy and report.mode == "auto" else "")
        + f"; eps {report.eps:g}; {report.coordinates:,} coordinates"
        + (f", {report.directions:,} directions" if report.directions else "")
        + f"; {report.evaluations:,} loss evaluations; {report.seconds:.2f} s)",
        f"  thresholds: warn {report.thresholds.warn:.0e}, alert {report.thresholds.alert:.0e};"
        f" loss {report.loss:.6g}; noise floor {report.noise_floor:.1e} per element",
    ]
    coverage = report.coverage
    if coverage.get("screened"):
        lines.append(
            f"  coverage: {coverage['screened']} of {coverage.get('tensors', 0)} tensors "
            f"screened jointly, {coverage.get('localised', 0)} localised, "
            f"{coverage.get('measured', 0)} measured"
        )
    lines += [f"  - {reason}" for reason in report.reasons]
    ranked = report.worst_layers(len(report.layers))
    if ranked:
        width = max(len("layer"), *(len(name) for name, _ in ranked[:max_layers]))
        lines.append(f"  {'layer':<{width}}  verdict  rel_distance  checked")
        for name, layer in ranked[:max_layers]:
            checked = f"{layer.checked:,}/{layer.numel:,}"
            if layer.directions:
                checked += f" + {layer.directions} dir"
            if layer.screened and not (layer.checked or layer.directions):
                checked = "screened"
            mark = "≈" if layer.estimated else " "
            lines.append(
                f"  {name:<{width}}  {layer.verdict:<7}  {mark}{_number(layer.rel_distance):<11}"
                f"  {checked}"
                + (f"  ({layer.kinks} kinks; {_number(layer.rel_distance_without_kinks or 0.0)}"
                   f" without)" if layer.kinks else "")
            )
            if layer.verdict in ("warn", "alert"):
                lines += [f"  {'':<{width}}    {_element(e)}" for e in layer.worst[:max_elements]]
            if layer.excluded:
                lines.append(f"  {'':<{width}}    ({layer.excluded:,} elements excluded by "
                             f"design, see notes)")
        if len(ranked) > max_layers:
            lines.append(f"  ... {len(ranked) - max_layers} more layers")
    lines += _kernels(report, max_layers, max_elements)
    return "\n".join(lines)


def _kernels(report: CheckReport, max_layers: int, max_elements: int) -> list[str]:
    """The training-kernels measurement: a line when not measured, else a table by ratio."""
    kernels = report.kernels
    if kernels is None:
        return []
    if kernels.status != "measured":
        why = kernels.reasons[0] if kernels.reasons else ""
        return [f"  training kernels: {kernels.status.upper()}"
                + (f" — {why.removeprefix('training kernels: ')}" if why else "")]
    lines = [f"  training kernels: {str(kernels.verdict).upper()}  ratio {_number(kernels.ratio)}"
             f" at {kernels.dtype}" + (f" (autocast {kernels.autocast})" if kernels.autocast
                                       else "")
             + (", compiled" if kernels.compiled else "") + f" on {kernels.device}; distance "
             f"{_number(kernels.distance)} vs {_number(kernels.reference_distance)} emulated;"
             f" {kernels.seconds:.2f} s"]
    ranked = kernels.worst_layers(len(kernels.layers))[:max_layers]
    if ranked:
        width = max(len("layer"), *(len(name) for name, _ in ranked))
        lines.append(f"  {'layer':<{width}}  verdict  ratio     distance  emulated")
        for name, layer in ranked:
            lines.append(f"  {name:<{width}}  {layer.verdict:<7}  {_number(layer.ratio):<8}  "
                         f"{_number(layer.distance)}  {_number(layer.reference_distance)}")
            if layer.verdict in ("warn", "alert"):
                lines += [f"  {'':<{width}}    {list(e.index)} training {e.training:.6g} vs "
                          f"float64 {e.reference:.6g} (emulated {e.emulated:.6g})"
                          for e in layer.worst[:max_elements]]
    return lines
