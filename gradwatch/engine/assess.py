"""Turns what the engine measured into distances, verdicts and reasons (a `CheckReport`).

Turn what the engine measured into distances, verdicts and reasons (a `CheckReport`).

Per tensor, the distance comes from the best evidence available:
  all coordinates checked  → exact: ||n − a|| / (||n|| + ||a||)
  sketch directions        → estimated: E[(vᵀ(n − a))²] = ||n − a||² for ±1 directions v
  some coordinates         → the same formula on the checked coordinates (estimated)
Every distance is judged by `_numerics.judged_distance`: the textbook formula when the
discrepancy is significant, floor-protected (under warn/10) when rounding can explain it. With
the joint screen (`_screen`) the overall distance comes from the joint directions. Kinks are
counted and left out of verdicts; a check whose float64 was lost is "error".

Imports: gradwatch.common, engine.types, engine.numerics, engine.report, engine.screen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gradwatch.engine.numerics import (
    dot,
    element_floor,
    element_rel_errors,
    find_kinks,
    judged_distance,
    norm,
)
from gradwatch.engine.report import (
    CheckReport,
    ElementReport,
    LayerReport,
    Thresholds,
    Verdict,
    worst_verdict,
)
from gradwatch.engine.screen import LOCALISE_LIMIT, SIGNAL
from gradwatch.engine.types import Directional

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gradwatch.engine.core import Engine
    from gradwatch.engine.screen import JointScreen
    from gradwatch.engine.types import TensorState

Vector = NDArray[np.float64]

#: Gradients whose norms are both within this factor of the noise level are "at noise".
AT_NOISE_FACTOR = 10.0

NONDETERMINISM_HELP = (
    "error: J(θ) evaluated twice at the same parameters gave different values ({first!r} vs "
    "{second!r}), so central differences would measure randomness, not the gradient. Likely "
    "causes: dropout or another random layer left on (gradwatch evaluates in eval mode; a "
    "custom loss_fn must not switch it back), random data augmentation inside forward, or "
    "non-deterministic kernels (torch.use_deterministic_algorithms(True) fixes those)."
)


@dataclass
class _Parts:
    """Squared norms ||n − a||², ||a||², ||n||² a tensor contributes to the overall distance."""

    diff_sq: float = 0.0
    analytic_sq: float = 0.0
    numeric_sq: float = 0.0
    level_sq: float = 0.0  # squared rounding-noise level of the numeric vector

    def add(self, other: _Parts) -> None:
        self.diff_sq += other.diff_sq
        self.analytic_sq += other.analytic_sq
        self.numeric_sq += other.numeric_sq
        self.level_sq += other.level_sq


@dataclass
class _Coordinates:
    """The checked coordinates of one tensor, in parameter order."""

    indices: NDArray[np.int64]
    analytic: Vector
    numeric: Vector
    errors: Vector
    kinks: NDArray[np.bool_]

    @property
    def smooth(self) -> NDArray[np.bool_]:
        return ~self.kinks


@dataclass
class _TensorResult:
    report: LayerReport
    parts: _Parts
    smooth_parts: _Parts
    coords: _Coordinates
    reasons: list[str] = field(default_factory=list)


def assess(engine: Engine, *, seconds: float, probe: dict[str, object]) -> CheckReport:
    settings = engine.settings
    thresholds = settings.thresholds
    common = dict(
        mode=settings.mode,
        strategy=", ".join(engine.strategy),
        eps=settings.eps,
        thresholds=thresholds,
        evaluations=engine.evaluations,
        seconds=seconds,
        evaluation_seconds=engine.evaluation_seconds,
        loss=engine.loss,
        probe=probe,
    )
    if not math.isfinite(engine.loss):
        return CheckReport(
            rel_distance=math.nan, verdict="alert", coordinates=0,
            reasons=[f"non-finite: the loss J(θ) is {engine.loss!r} at the checked point"],
            layers={name: _unchecked(t, "alert", "non-finite loss") for name, t in
                    engine.tensors.items()},
            **common,  # type: ignore[arg-type]
        )
    if not engine.deterministic:
        return CheckReport(
            rel_distance=math.nan, verdict="error", coordinates=0,
            reasons=[NONDETERMINISM_HELP.format(first=engine.loss, second=engine.loss_repeat)],
            layers={name: _unchecked(t, "error", "not checked: non-deterministic loss")
                    for name, t in engine.tensors.items()},
            **common,  # type: ignore[arg-type]
        )

    common["precision"] = _precision_record(engine)
    common["coverage"] = _coverage(engine)
    # a check that could not measure says "error" and why, with every layer unjudged
    for find, note in ((_precision_problem, "float64 precision was lost"),
                       (_resolution_problem, "the loss is too flat here")):
        problem = find(engine)
        if problem is not None:
            if problem.startswith(NOT_SMOOTH):
                note = "kinks beside the checked point"
            return CheckReport(
                rel_distance=math.nan, verdict="error", coordinates=0, reasons=[problem],
                layers={name: _unchecked(t, "error", f"not judged: {note}")
                        for name, t in engine.tensors.items()},
                **common,  # type: ignore[arg-type]
            )

    noise = engine.noise()
    results = {
        name: _assess_tensor(tensor, engine, noise) for name, tensor in engine.tensors.items()
    }
    reasons: list[str] = []
    verdict: Verdict = "ok"
    screen = engine.screen if engine.joint_mode else None
    if screen is not None:
        distance, significant = _joint_distance(screen)
        smooth_distance = distance
        if not math.isfinite(distance):
            verdict = "alert"
            reasons.append("non-finite: the overall distance is not a finite number")
        elif significant:
            verdict = thresholds.classify(distance)
            if verdict != "ok":
                reasons.append(
                    f"overall rel_distance {distance:.3g} (estimated by the joint screen) ≥ "
                    f"{verdict} threshold {thresholds.level(verdict):.0e}"
                )
    else:
        distance, smooth_distance, smooth_parts = _overall(engine, results, noise)
        if not math.isfinite(smooth_distance):
            verdict = "alert"
            reasons.append("non-finite: the overall distance is not a finite number")
        elif _is_at_noise(smooth_parts):
            reasons.append(
                "the whole gradient is at the rounding-noise level: the loss barely depends "
                "on the checked parameters at this point"
            )
        else:
            verdict = thresholds.classify(smooth_distance)
            if verdict != "ok":
                reasons.append(
                    f"overall rel_distance {smooth_distance:.3g} ≥ {verdict} threshold "
                    f"{thresholds.level(verdict):.0e}"
                )
    if screen is not None and significant and math.isfinite(distance) and \
            verdict in ("warn", "alert") and _unreproduced(screen, engine, results):
        # The discrepancy was localised to tensors whose own directions and coordinates then
        # measure clean: a bug there shows in those as it did in the joint direction (the same
        # sizes, new signs), a kink crossed by the joint step need not. Not judged either way.
        verdict = "error"
        reasons = [r for r in reasons if not r.startswith("overall rel_distance")]
        reasons.insert(0,
            f"error: the joint screen's discrepancy (overall rel_distance {distance:.3g}) was "
            f"not reproduced by the tensor(s) it was localised to ("
            + ", ".join(f"'{name}' {results[name].report.rel_distance:.1e}"
                        for name in screen.culprits)
            + "): a kink crossed by the joint step, or a bug those measurements missed. Not "
            "judged; the next check draws new directions.")
        distance = smooth_distance = math.nan  # no distance is claimed (the record, the monitor)
    for result in sorted(results.values(), key=lambda r: -_rank(r.report)):
        verdict = worst_verdict(verdict, result.report.verdict)
        reasons.extend(result.reasons)
    kinks = sum(r.report.kinks for r in results.values())
    if kinks:
        reasons.append(
            f"{kinks} element(s) straddle a kink (ReLU/max/abs) within ±eps and were left out "
            f"of the verdict"
        )
    if screen is not None:
        reasons.extend(_screen_reasons(engine, screen))
    excluded = [(n, t) for n, t in engine.tensors.items() if t.n_excluded]
    for name, tensor in excluded:
        reasons.append(f"{tensor.n_excluded} element(s) of '{name}' excluded by design: "
                       f"{tensor.excluded_reason}")
    if verdict == "ok" and not any(r.startswith(("overall", "layer", "non-finite"))
                                   for r in reasons):
        reasons.insert(0, f"every distance is below the warn threshold {thresholds.warn:.0e}")
    smooth_errors = [
        float(r.coords.errors[r.coords.smooth].max())
        for r in results.values()
        if r.coords.smooth.any()
    ]
    return CheckReport(
        rel_distance=distance,
        estimated=screen is not None or any(r.report.estimated for r in results.values()),
        verdict=verdict,
        reasons=reasons,
        coordinates=sum(int(r.coords.indices.size) for r in results.values()),
        directions=engine.direction_count,
        noise_floor=noise,
        kinks=kinks,
        rel_distance_without_kinks=smooth_distance if kinks else None,
        max_element_error=max(smooth_errors, default=0.0),
        layers={name: result.report for name, result in results.items()},
        **common,  # type: ignore[arg-type]
    )


_SCREENED_NOTE = (
    "screened jointly with the other {others} tensors: no discrepancy the screen could see "
    "(it sees a relative error of ≥ {resolution:.1e} in any one tensor)"
)

#: How the error for a loss that is not smooth where it was checked begins.
NOT_SMOOTH = "error: the loss is not smooth where it was checked"

PRECISION_HELP = (
    "Central differences would measure rounding, not the gradient, so this check cannot judge "
    "the model. gradwatch keeps the model's own casts (.float(), .to(float32), dtype=) at "
    "float64; what remains is code it cannot see: a kernel with no float64 path (a C++/CUDA "
    "extension, a fused op) or a round trip through numpy/float32. Leave that module's "
    "parameters out (exclude=...) or check a configuration that runs it in float64."
)


def _joint_distance(screen: JointScreen) -> tuple[float, bool]:
    """Overall distance estimated from the joint directions, and whether any was significant:
    sqrt(mean d²) / (sqrt(mean a²) + sqrt(mean n²)), the recipe's formula in the screen's
    metric (each tensor weighted by its step); rounding alone reads ≤ 1/SIGNAL."""
    significant = screen.fired  # confirmed: a kink crossed by the joint step is not
    probes = screen.probes
    if not significant:  # a direction shown to cross a kink measures the kink: left out
        probes = [p for p in probes if not screen.significant(p.discrepancy)] or probes
    d = np.array([p.discrepancy for p in probes])
    a = np.array([p.analytic for p in probes])
    n = np.array([p.numeric for p in probes])
    diff = math.sqrt(float(np.mean(d**2)))
    if not significant:
        # every direction crossed a kink (the confirmation said so): the logged distance,
        # which the monitor and the dashboards read, stays at the rounding level where "no
        # discrepancy" reads (≤ 1/SIGNAL), not at the size of the kinks
        diff = min(diff, screen.sigma)
    denominator = math.sqrt(float(np.mean(a**2))) + math.sqrt(float(np.mean(n**2)))
    if not significant:
        denominator = max(denominator, SIGNAL * screen.sigma)
    if not math.isfinite(diff):
        return math.inf, True
    return (diff / denominator if denominator else 0.0), significant


def _screen_reasons(engine: Engine, screen: JointScreen) -> list[str]:
    count = len(screen.probes[0].steps)
    if not screen.fired:
        kinks = (" (a discrepancy that did not halve with the step was a ReLU/max-pool kink "
                 "crossed by the joint step, not a gradient error)" if screen.kinked else "")
        return [f"joint screen: all {count} tensors screened along {len(screen.probes)} "
                f"directions, no discrepancy above rounding (a relative error ≥ "
                f"{screen.resolution():.1e} in any one tensor would show){kinks}"]
    worst = max(abs(p.discrepancy) for p in screen.probes)
    reasons = [f"joint screen: a discrepancy of {worst / screen.sigma:.3g}× the rounding noise "
               f"over {count} tensors"
               + (f", localised to {', '.join(screen.culprits)}" if screen.culprits else
                  f"; not localised within {LOCALISE_LIMIT} evaluations")]
    budget = engine.settings.budget
    if budget is not None and engine.evaluations > budget:
        reasons.append(f"localisation spent {engine.evaluations - budget} evaluations over the "
                       f"budget of {budget} (at most {LOCALISE_LIMIT} in one check)")
    return reasons


def _unreproduced(screen: JointScreen, engine: Engine,
                  results: Mapping[str, _TensorResult]) -> bool:
    """Every tensor the screen localised its discrepancy to was measured, and reads ok."""
    if not screen.culprits or any(name not in results for name in screen.culprits):
        return False
    for name in screen.culprits:
        tensor = engine.tensors[name]
        report = results[name].report
        if not (tensor.indices or tensor.sketches) or report.verdict != "ok" or \
                not math.isfinite(report.rel_distance):
            return False
    return True


def _coverage(engine: Engine) -> dict[str, int]:
    screen = engine.screen if engine.joint_mode else None
    return {
        "tensors": len(engine.tensors),
        "screened": len(screen.probes[0].steps) if screen and screen.probes else 0,
        "localised": len(screen.culprits) if screen else 0,
        "measured": sum(1 for t in engine.tensors.values() if t.indices or t.sketches),
        "excluded_elements": sum(t.n_excluded for t in engine.tensors.values()),
    }


def _precision_record(engine: Engine) -> dict[str, object]:
    record: dict[str, object] = dict(engine.diagnosis)
    screen = engine.screen
    if screen is not None and engine.loss:
        record["delta_j_relative"] = screen.delta_j / abs(engine.loss)
        record["noise_relative"] = screen.sigma / abs(engine.loss)
        record["float64_bound_relative"] = screen.bound / abs(engine.loss)
        if engine.joint_mode and screen.probes:
            record["screen_resolution"] = screen.resolution()
    return record


def _precision_problem(engine: Engine) -> str | None:
    """Why float64 was lost, or None. Names the modules the probe found."""
    if not engine.precision_lost:
        return None
    lossy: list[tuple[str, str, float]] = engine.diagnosis.get("lossy_modules") or []  # type: ignore[assignment]
    escaped: dict[str, int] = engine.diagnosis.get("escaped") or {}  # type: ignore[assignment]
    kinked: list[tuple[str, str, float]] = engine.diagnosis.get("kinked_modules") or []  # type: ignore[assignment]
    screen = engine.screen
    if engine.kinks_only and screen is not None:
        # float64 held (every module answers in proportion but for a few elements): the
        # noise is the step's, kinks crossed at every step the screen tried
        return (f"{NOT_SMOOTH}: inputs of "
                + ", ".join(f"module '{name}' ({kind})" for name, kind, _ in kinked)
                + f" sit within the check's steps of their kinks (ReLU/max-pool inputs near 0),"
                f" so a loss evaluation moves by {screen.sigma / max(abs(engine.loss), 1e-300):.1e}"
                f" of |J| with the step, not by float64's rounding (≈ "
                f"{screen.bound / max(abs(engine.loss), 1e-300):.0e}), and the check would "
                f"resolve only relative errors ≥ {screen.resolution():.1e}. Float64 held; "
                "central differences would measure the kinks, not the gradient, so this check "
                "does not judge the model. Usually a model that fits its probe rows almost "
                "exactly; a later check, at another point, judges it.")
    where = ""
    if lossy:
        where = "; it loses precision in " + ", ".join(
            f"module '{name}' ({kind})" for name, kind, _ in lossy)
    elif escaped:
        where = "; ops that still produced float32/16 from float64: " + ", ".join(
            sorted(escaped))
    screen = engine.screen
    if screen is not None and not engine.vanished:
        return (f"error: float64 precision was lost: a loss evaluation is noisy at "
                f"{screen.sigma / max(abs(engine.loss), 1e-300):.1e} of |J| where float64 "
                f"rounds at ≈ {screen.bound / max(abs(engine.loss), 1e-300):.0e} (the check "
                f"would resolve only relative errors ≥ {screen.resolution():.1e}){where}. "
                + PRECISION_HELP)
    return (f"error: float64 precision was lost: the perturbations of "
            f"{', '.join(repr(n) for n in engine.vanished)} vanish in rounding "
            f"(J(θ+δ) == J(θ−δ) exactly) while a 1e4× larger step agrees with backprop"
            f"{where}. " + PRECISION_HELP)


def _resolution_problem(engine: Engine) -> str | None:
    """The screen saw nothing, but could not have seen an alert-sized error either: the loss
    is so flat at the checked rows that its rounding hides the gradient (J ≈ 0, a model that
    fits them almost exactly). Saying "ok" would be a verdict on nothing."""
    screen = engine.screen if engine.joint_mode else None
    if screen is None or screen.fired or not screen.probes:
        return None
    resolution = screen.resolution()
    # judged against the alert threshold, but never below the default's: thresholds set under
    # the rounding noise on purpose (to see every check alert) do not turn checks into errors
    limit = max(engine.settings.thresholds.alert, Thresholds().alert)
    if resolution <= limit:
        return None
    return (f"error: the check could not resolve the gradient: the loss is nearly flat at the "
            f"checked rows (J = {engine.loss:.2g}, one evaluation rounds at "
            f"{screen.sigma:.1e}), so a relative error below {resolution:.1e} in a typical "
            f"tensor would not show — above the alert threshold {limit:.0e}. The model fits "
            f"these rows almost exactly; "
            f"a check on rows it does not fit yet can judge (more probe_rows, or a batch the "
            f"model has not memorised).")


def _rank(report: LayerReport) -> float:
    order = {"ok": 0, "warn": 1, "alert": 2, "error": 3}[report.verdict]
    return order * 10.0 + (report.rel_distance if math.isfinite(report.rel_distance) else 9.0)


def _is_at_noise(parts: _Parts) -> bool:
    """Both ||dθ|| and ||dθapprox|| within AT_NOISE_FACTOR of the rounding-noise level."""
    bound = AT_NOISE_FACTOR**2 * parts.level_sq
    return parts.analytic_sq <= bound and parts.numeric_sq <= bound


def _unchecked(tensor: TensorState, verdict: Verdict, why: str) -> LayerReport:
    return LayerReport(
        rel_distance=math.nan, verdict=verdict, numel=tensor.numel, checked=0,
        estimated=False, shape=tensor.shape, notes=[why],
    )


def _coordinates(tensor: TensorState, engine: Engine, noise: float) -> _Coordinates:
    eps = engine.settings.eps
    if not tensor.indices:
        empty = np.empty(0)
        return _Coordinates(np.empty(0, dtype=np.int64), empty, empty, empty,
                            np.zeros(0, dtype=bool))
    indices = np.concatenate(tensor.indices)
    order = np.argsort(indices, kind="stable")  # parameter order, as the recipe's θ vector
    indices = indices[order]
    plus = np.concatenate(tensor.plus)[order]
    minus = np.concatenate(tensor.minus)[order]
    analytic = tensor.analytic[indices]
    numeric = (plus - minus) / (2 * eps)  # central difference
    floor = element_floor(noise, engine.settings.thresholds.alert)
    errors = element_rel_errors(numeric, analytic, floor)
    kinks = find_kinks(engine.loss, plus, minus, analytic, eps, noise)
    return _Coordinates(indices, analytic, numeric, errors, kinks)


def _assess_tensor(tensor: TensorState, engine: Engine, noise: float) -> _TensorResult:
    thresholds = engine.settings.thresholds
    eps = engine.settings.eps
    coords = _coordinates(tensor, engine, noise)
    notes = list(tensor.notes)
    reasons: list[str] = []
    smooth = coords.smooth

    def parts_of(mask: NDArray[np.bool_]) -> _Parts:
        a, n = coords.analytic[mask], coords.numeric[mask]
        return _Parts(
            diff_sq=float(np.sum((n - a) ** 2)),
            analytic_sq=float(np.sum(a**2)),
            numeric_sq=float(np.sum(n**2)),
            level_sq=noise**2 * int(mask.sum()),
        )

    everything = np.ones_like(smooth)
    parts, smooth_parts = parts_of(everything), parts_of(smooth)
    estimated = coords.indices.size < tensor.numel - tensor.n_excluded
    warn = thresholds.warn

    def judged(mask: NDArray[np.bool_]) -> float:
        a, n = coords.analytic[mask], coords.numeric[mask]
        return judged_distance(norm(n), norm(a),
                               norm(n - a),
                               noise * math.sqrt(int(mask.sum())), warn)
    sketch = Directional.join(tensor.sketches) if tensor.sketches else None
    n_directions = 0 if sketch is None else int(sketch.numeric.size)
    distance = smooth_distance = math.nan
    sample_distance = math.nan
    if coords.indices.size:
        distance, smooth_distance = judged(everything), judged(smooth)
        sample_distance = smooth_distance
    direction_kinks = 0
    if sketch is not None and estimated:
        # Sketch: with ±1 directions v, E[(vᵀx)²] = ||x||², so the mean square of the
        # projected difference estimates ||n − a||² without touching every coordinate.
        # Each projection's rounding noise is δJ/s = noise·ε/s (noise·√numel for the per-tensor
        # sketch, whose step is s = ε/√numel).
        projection_noise = noise * eps / sketch.steps
        straddles = find_kinks(
            engine.loss, sketch.plus, sketch.minus, sketch.analytic, sketch.steps,
            projection_noise,
        )
        direction_kinks = int(straddles.sum())
        keep = ~straddles if (~straddles).any() else np.ones_like(straddles)
        diff_sq = float(np.mean((sketch.numeric[keep] - sketch.analytic[keep]) ** 2))
        numeric_sq = float(np.mean(sketch.numeric[keep] ** 2))
        analytic_sq = float(np.sum(tensor.analytic**2))
        level_sq = float(np.mean(projection_noise[keep] ** 2))
        parts = smooth_parts = _Parts(diff_sq, analytic_sq, numeric_sq, level_sq)
        distance = smooth_distance = judged_distance(
            math.sqrt(numeric_sq), math.sqrt(analytic_sq), math.sqrt(diff_sq),
            math.sqrt(level_sq / keep.sum()), warn)  # the level of the mean's estimate
        notes.append(f"distance estimated from {n_directions} random ±1 directions")
    if coords.indices.size and estimated:
        notes.append(
            f"{coords.indices.size} of {tensor.numel} coordinates checked "
            f"(largest |dθ| and random ones)"
        )

    if tensor.n_excluded:
        notes.append(f"{tensor.n_excluded} element(s) excluded by design: "
                     f"{tensor.excluded_reason}")
    screened = bool(engine.joint_mode and engine.screen is not None and engine.screen.probes
                    and tensor.name in engine.screen.probes[0].steps)
    kinks = int(coords.kinks.sum()) + direction_kinks
    finite = bool(np.all(np.isfinite(tensor.analytic))) and bool(
        np.all(np.isfinite(coords.numeric))
    )
    verdict: Verdict = "ok"
    checked_anything = coords.indices.size > 0 or n_directions > 0
    if not finite:
        verdict = "alert"
        what = "dθ (backprop)" if not np.all(np.isfinite(tensor.analytic)) else "dθapprox"
        reasons.append(f"non-finite: '{tensor.name}' has non-finite values in {what}")
        notes.append(f"non-finite values in {what}")
    elif not checked_anything and screened and engine.screen is not None:
        notes.append(_SCREENED_NOTE.format(others=len(engine.screen.probes[0].steps) - 1,
                                           resolution=engine.screen.resolution()))
    elif not checked_anything:
        notes.append("not checked in this run")
    elif _is_at_noise(smooth_parts):
        notes.append(
            f"dθ and dθapprox are both at the rounding-noise level "
            f"(≤ {AT_NOISE_FACTOR:g} × {math.sqrt(smooth_parts.level_sq):.1e}): treated as ok"
        )
    else:
        verdict = thresholds.classify(smooth_distance)
        if n_directions and coords.indices.size and math.isfinite(sample_distance):
            verdict = worst_verdict(verdict, thresholds.classify(sample_distance))
        if verdict != "ok":
            reasons.append(
                f"layer '{tensor.name}' rel_distance {max(smooth_distance, 0):.3g}"
                + (" (estimated)" if estimated else "")
            )
        bad = smooth & (coords.errors >= thresholds.alert)
        if verdict != "ok" and n_directions and not bad.any():
            notes.append(
                f"the random-direction estimate is off but none of the {coords.indices.size} "
                f"coordinates checked is: the bad elements were not reached within the budget "
                f"(raise budget to localise them)"
            )
        if bad.any():
            verdict = "alert"
            # the same element the layer's worst list puts first (ties in rel_error — every
            # element of a row scaled by 1.5 has 0.2 — go to the largest |n − a|)
            worst = int(_ranking(coords)[0])
            index = _unravel(int(coords.indices[worst]), tensor.shape)
            reasons.append(
                f"{int(bad.sum())} element(s) of '{tensor.name}' have rel_error ≥ "
                f"{thresholds.alert:.0e}; worst {list(index)}: analytic "
                f"{coords.analytic[worst]:.6g} vs numeric {coords.numeric[worst]:.6g}"
            )
    worst_elements = _worst(tensor, coords, engine.settings.top_k)
    report = LayerReport(
        rel_distance=distance if checked_anything else math.nan,
        verdict=verdict,
        numel=tensor.numel,
        checked=int(coords.indices.size),
        directions=n_directions,
        estimated=estimated,
        kinks=kinks,
        rel_distance_without_kinks=smooth_distance if kinks else None,
        worst=worst_elements,
        shape=tensor.shape,
        screened=screened,
        excluded=tensor.n_excluded,
        grad_norm=tensor.analytic_norm,
        noise_floor=math.sqrt(smooth_parts.level_sq),
        notes=notes,
    )
    return _TensorResult(report, parts, smooth_parts, coords, reasons)


def _worst(tensor: TensorState, coords: _Coordinates, top_k: int) -> list[ElementReport]:
    if coords.indices.size == 0 or top_k == 0:
        return []
    abs_diff = np.abs(coords.numeric - coords.analytic)
    order = _ranking(coords)
    return [
        ElementReport(
            index=_unravel(int(coords.indices[i]), tensor.shape),
            analytic=float(coords.analytic[i]),
            numeric=float(coords.numeric[i]),
            abs_diff=float(abs_diff[i]),
            rel_error=float(coords.errors[i]),
            kink=bool(coords.kinks[i]),
        )
        for i in order[:top_k]
    ]


def _ranking(coords: _Coordinates) -> NDArray[np.int64]:
    """Checked coordinates, worst first: explained kinks last; then the largest rel_error,
    then the largest absolute difference (the order of `worst` and of the reasons)."""
    abs_diff = np.abs(coords.numeric - coords.analytic)
    errors = np.where(np.isfinite(coords.errors), coords.errors, np.inf)
    return np.lexsort((-np.nan_to_num(abs_diff, nan=np.inf), -errors, coords.kinks))


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def _overall(
    engine: Engine, results: dict[str, _TensorResult], noise: float
) -> tuple[float, float, _Parts]:
    """Overall distance over all elements, the kink-free one (for the verdict), and its parts."""
    warn = engine.settings.thresholds.warn
    if all(r.coords.indices.size + r.report.excluded == r.report.numel
           for r in results.values()):
        # The recipe itself: concatenate every tensor in parameter order, one norm each.
        numeric = np.concatenate([r.coords.numeric for r in results.values()])
        analytic = np.concatenate([r.coords.analytic for r in results.values()])
        smooth = np.concatenate([r.coords.smooth for r in results.values()])
        level = noise * math.sqrt(numeric.size)
        smooth_parts = _Parts(
            analytic_sq=dot(analytic[smooth], analytic[smooth]),
            numeric_sq=dot(numeric[smooth], numeric[smooth]),
            level_sq=level**2,
        )

        def judged(mask: NDArray[np.bool_]) -> float:
            n, a = numeric[mask], analytic[mask]
            return judged_distance(norm(n), norm(a),
                                   norm(n - a), level, warn)

        return judged(np.ones_like(smooth)), judged(smooth), smooth_parts
    total, smooth_total = _Parts(), _Parts()
    for result in results.values():
        total.add(result.parts)
        smooth_total.add(result.smooth_parts)

    def combine(parts: _Parts) -> float:
        return judged_distance(math.sqrt(parts.numeric_sq), math.sqrt(parts.analytic_sq),
                               math.sqrt(parts.diff_sq), math.sqrt(parts.level_sq), warn)

    return combine(total), combine(smooth_total), smooth_total


__all__ = ["assess"]
