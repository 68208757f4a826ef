"""The joint screen: every tensor looked at in every check, for a few loss evaluations.

A per-tensor screen costs 2 evaluations per tensor and direction. The joint screen perturbs
all tensors at once, tensor t by s_t·v_t with v_t an independent ±1 vector, so one pair
J(θ ± δ) costs 2 evaluations whatever the number of tensors:

    n = (J(θ + δ) − J(θ − δ)) / 2          (central difference, in loss units)
    a = Σ_t s_t · dθ_tᵀ v_t                 (what backprop predicts for it)
    d = n − a = Σ_t s_t · e_tᵀ v_t + rounding + truncation,   e_t = dθapprox_t − dθ_t

E[(e_tᵀv_t)²] = ||e_t||², so a tensor with relative distance r_t contributes ≈ 2·r_t·s_t·||dθ_t||
to d. The steps are equalised, s_t = c / ||dθ_t|| (capped), so every tensor contributes about
c to a and a relative error r in any tensor shows as ≈ 2·r·c, whatever the size of its
gradient. c = SIGNAL · δJ, with δJ the rounding of one loss evaluation; the discrepancy is
judged against the measured noise of d — a significance test — so that a screen "fires" only
when |d| > SIGNIFICANCE · σ_d. A relative error r is then seen when 2·r·SIGNAL > SIGNIFICANCE:
r ≥ 5e-6 with the constants below, under the warn threshold.

The noise σ_d is measured, not assumed: the first direction is evaluated again at r = 0.6 of
its step. With D(s) = J(θ+sv) + J(θ−sv) − 2J(θ) = s²·vᵀHv + rounding, the combination
D(r·s) − r²·D(s) cancels the curvature and leaves rounding only (≈ 2·δJ); and
n(s) − n(r·s)/r = (1 − r²) × the truncation error of n(s). (Not r = ½: a loss rounded to a
coarse grid — J near 0 made of larger terms, as a confident cross-entropy — doubles exactly
on that grid and would read as noiseless.) A δJ far above float64's own rounding at the
loss's scale — max(|J|, the caller's `loss_scale`: GradWatch passes the largest loss of its
checks, since a loss driven towards 0 is still computed from terms of its initial size) —
means float64 was not kept end to end (see `_precision`).

When the screen fires, group testing localises: the firing direction restricted to half of the
tensors gives d_left; d_right = d − d_left by linearity (2 evaluations per level, O(log K)
levels for K tensors); then the same inside the tensor over rows and over the elements of a
row. What was found is then measured (tensor-restricted directions, coordinates of the region)
and judged by the textbook distances (`_assess`).

Imports: engine.types, engine.numerics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gradwatch.engine.numerics import ROUNDING, ROUNDING_SAFETY, Signs, dot, rademacher_int8
from gradwatch.engine.types import Directional

if TYPE_CHECKING:
    from gradwatch.engine.core import Engine
    from gradwatch.engine.types import TensorState

__all__ = ["JointProbe", "JointScreen"]

Vector = NDArray[np.float64]

#: Directions of the joint screen (a bug is missed only if every one of them is unlucky: a
#: one-row bug carrying a share ρ of its tensor's gradient norm shows as |d| ≈ r·ρ·c·|Z|,
#: Z ~ N(0, 1), so with c = 10⁶·δJ a direction misses it only when |Z| < ~2e-5 / (r·ρ);
#: for r = 0.5, ρ = 1/16: P ≈ 5e-4 per direction, ~1e-10 for three).
SCREEN_DIRECTIONS = 3
#: |d| above SIGNIFICANCE · σ_d is a discrepancy; below it, rounding can explain it.
SIGNIFICANCE = 10.0
#: Each tensor's share of the analytic projection, in units of δJ: c = SIGNAL · δJ.
SIGNAL = 1e6
#: The shorter step of the noise measurement and of the confirmation, as a fraction of the
#: first: not ½, whose exact doubling would let losses rounded to a coarse grid (J near 0
#: made of larger terms) read as perfectly smooth and noiseless.
RATIO = 0.6
#: The confirmation's second ratio (1/√2: no small k makes both k·0.6 and k/√2 integers).
CONFIRM_RATIO = 1 / math.sqrt(2)
#: Std of D(r·s) − r²·D(s) in units of one evaluation's rounding δJ: √(6 + 6r⁴ − 8r²) (J(θ)
#: is shared by both second differences).
NOISE_SPREAD = math.sqrt(6 + 6 * RATIO**4 - 8 * RATIO**2)
#: The confirmation's tests (linearity of d, smoothness of J) at this many standard
#: deviations of their noise: a bug's d is exactly linear and its J smooth, so a bug fails
#: one by chance with P ≈ 6e-5 per test.
CONFIRM_SIGMAS = 4.0
#: The confirmation's last step, as a fraction of the screen's: kinks nearer θ than the
#: screen's steps are not crossed there, while a bug's discrepancy scales with it and stands
#: ZOOM_SIGMAS σ out. Not below MIN_ZOOM (the step is still ≥ 1e4 ulps of a typical
#: parameter), not above MAX_ZOOM (a longer step crosses the same kinks).
ZOOM_SIGMAS = 400.0
MIN_ZOOM = 1e-4
MAX_ZOOM = 1e-2
#: A second difference whose non-quadratic part is at least this share of a discrepancy
#: explains it as a kink (a kink moves d and D by about the same amount).
KINK_SHARE = 0.25
#: Largest step per element, relative to the tensor's RMS value (at least 1e-2 of it, so
#: zero-initialised tensors move too): keeps truncation (∝ s³) below rounding.
MAX_RELATIVE_STEP = 1e-4
#: Largest Euclidean length of the whole perturbation δ.
MAX_NORM = 1e-3
#: When one evaluation is noisier than PRECISION_MARGIN · ROUNDING_SAFETY · u · |J|
#: (≈ 3.6e-14 |J|; float32 rounds at ~6e-8), the backend looks for the module that loses
#: float64 (`_precision.find_lossy_modules`); a clean float64 model measures ≈ 1×.
PRECISION_MARGIN = 10.0
#: Relative noise of one evaluation that only a lower precision explains (float64 rounds at
#: 1.1e-16; its intermediates would have to cancel 10⁶-fold to reach this).
FLOAT32_NOISE = 1e-10
#: Noise above RESCALE × the assumed δJ: the steps are sized again (`JointScreen._resize`).
RESCALE = 4.0
#: A noisy screen also measures its noise at steps this many times shorter (truncation and
#: kinks shrink with the step, rounding does not: `JointScreen._resize`).
SHORTEN = 10.0
#: A check whose typical tensor cannot be resolved to this relative error cannot judge.
RESOLUTION_LIMIT = 1e-4
#: Most evaluations localisation may spend in one check, over the budget if need be.
LOCALISE_LIMIT = 96
#: Coordinates checked by central differences inside a located region.
REGION_COORDINATES = 8
#: Direction keys from here on are one tensor's (measurement, vanishing, spare budget).
MEASURE_KEYS = 1000
#: Sign vectors kept during one check, in float64 elements (2²³: 64 MiB): the screen's
#: directions are asked for again by the confirmation and the localisation.
SIGN_CACHE = 2**23
#: Tensors followed at once when several halves disagree (several bugs).
MAX_CULPRITS = 3


@dataclass
class JointProbe:
    """One joint direction and what it measured (`numeric`, `analytic` in loss units)."""

    key: int
    steps: dict[str, float]
    numeric: float = math.nan
    analytic: float = math.nan
    second: float = math.nan  # D = J(θ+δ) + J(θ−δ) − 2J(θ)

    @property
    def discrepancy(self) -> float:
        return self.numeric - self.analytic


@dataclass
class JointScreen:
    """Runs the screen on an engine, then localises (see the module docstring)."""

    engine: Engine
    probes: list[JointProbe] = field(default_factory=list)
    delta_j: float = 0.0  # rounding of one loss evaluation (measured, at least the bound)
    truncation: float = 0.0
    bound: float = 0.0  # float64's own rounding bound of one evaluation
    fired: bool = False
    culprits: list[str] = field(default_factory=list)
    localise_spent: int = 0
    kinked: bool = False  # the noise direction crossed a kink
    _limit: int = 0
    _floor: float = 0.0  # the model-free bound (or J's repeat difference)
    _resolutions: dict[str, float] | None = None
    _signs: dict[tuple[int, str], Signs] = field(default_factory=dict)
    _cached: int = 0  # elements in _signs
    regions: dict[str, NDArray[np.int64]] = field(default_factory=dict)

    # ------------------------------------------------------------------ noise
    @property
    def sigma(self) -> float:
        """Standard deviation of one discrepancy d: rounding of n plus truncation."""
        return math.hypot(self.delta_j, self.truncation)

    def resolutions(self) -> dict[str, float]:
        """Per tensor, the relative error r_t the screen sees: SIGNIFICANCE·σ_d = 2·r_t·s_t·||dθ_t||
        (≈ SIGNIFICANCE / (2·SIGNAL) where the step is not capped). Computed once."""
        if self._resolutions is None:
            steps = self.probes[0].steps if self.probes else {}
            self._resolutions = self._resolutions_at(steps, self.sigma)
        return self._resolutions

    def _resolutions_at(self, steps: dict[str, float], sigma: float) -> dict[str, float]:
        """SIGNIFICANCE·σ_d / (2·s_t·||dθ_t||) per tensor (∞ where the signal is 0)."""
        result = {}
        for name, step in steps.items():
            signal = 2 * step * self.engine.tensors[name].analytic_norm
            result[name] = SIGNIFICANCE * sigma / signal if signal > 0 else math.inf
        return result

    def resolution(self) -> float:
        """The median of `resolutions`: the relative error of a typical tensor the screen sees
        (tensors whose gradient is ~0, like attention key biases, see less)."""
        values = sorted(self.resolutions().values())
        return values[len(values) // 2] if values else math.inf

    def significant(self, d: float, scale: float = 1.0) -> bool:
        return not math.isfinite(d) or abs(d) > SIGNIFICANCE * self.sigma * scale

    # ------------------------------------------------------------------ directions
    def signs(self, key: int, tensor: TensorState) -> Signs:
        """The ±1 vector of direction `key` over `tensor` (0 on by-design exclusions),
        regenerated identically whenever it is asked for (group testing restricts it).

        The screen's directions (keys below MEASURE_KEYS) cover every tensor: while the model
        fits the cache they are drawn for all tensors at once from one stream per key (one
        generator instead of one per tensor: most of their cost on a model of many small
        tensors); otherwise, and for the per-tensor keys, from one stream per tensor."""
        cached = self._signs.get((key, tensor.name))
        if cached is not None:
            return cached
        tensors = self.engine.tensors
        seed = self.engine.settings.seed
        if key < MEASURE_KEYS and self._cached + self._numel <= SIGN_CACHE:
            # one draw over all tensors, cut into per-tensor views in the engine's order
            signs = rademacher_int8(np.random.default_rng([seed, key]), self._numel)
            start = 0
            for other in tensors.values():
                part = signs[start:start + other.numel]
                start += other.numel
                if other.excluded is not None:
                    part[other.excluded] = 0
                self._keep_signs(key, other, part)
            return self._signs[(key, tensor.name)]
        index = list(tensors).index(tensor.name)
        signs = _tensor_signs(np.random.default_rng([seed, key, index]), tensor)
        if self._cached + tensor.numel <= SIGN_CACHE:
            self._keep_signs(key, tensor, signs)
        return signs

    @functools.cached_property
    def _numel(self) -> int:
        return sum(t.numel for t in self.engine.tensors.values())

    def _keep_signs(self, key: int, tensor: TensorState, signs: Signs) -> None:
        self._signs[(key, tensor.name)] = signs
        self._cached += signs.size

    def _active(self) -> list[str]:
        return [t.name for t in self.engine.tensors.values() if t.active]

    def step_sizes(self, values: dict[str, float]) -> dict[str, float]:
        """s_t = c / ||dθ_t||, capped per element and in total length (module docstring)."""
        c = SIGNAL * self.delta_j
        steps = {}
        for name in self._active():
            tensor = self.engine.tensors[name]
            cap = MAX_RELATIVE_STEP * max(values.get(name, 0.0), 1e-2)
            size = tensor.analytic_norm
            steps[name] = min(c / size, cap) if size > 0 and math.isfinite(size) else cap
        length = math.sqrt(sum(s * s * self.engine.tensors[n].numel for n, s in steps.items()))
        if length > MAX_NORM:
            steps = {n: s * MAX_NORM / length for n, s in steps.items()}
        return steps

    def evaluate(
        self, key: int, steps: dict[str, float], masks: dict[str, NDArray[np.bool_]] | None = None
    ) -> JointProbe:
        """J(θ ± δ) for direction `key` over the tensors in `steps` (optionally only some of
        a tensor's elements: those where `masks[name]` is True)."""
        engine = self.engine
        perturbation: dict[str, tuple[Signs, float]] = {}
        analytic = 0.0
        for name, step in steps.items():
            tensor = engine.tensors[name]
            signs = self.signs(key, tensor)
            if masks is not None and name in masks:
                signs = np.where(masks[name], signs, np.int8(0))
            perturbation[name] = (signs, step)
            analytic += step * dot(tensor.analytic, signs)
        plus, minus = engine.joint(perturbation)
        return JointProbe(key, dict(steps), numeric=(plus - minus) / 2, analytic=analytic,
                          second=plus + minus - 2 * engine.loss)

    # ------------------------------------------------------------------ the screen
    def run(self, directions: int, values: dict[str, float]) -> None:
        engine = self.engine
        self.bound = ROUNDING_SAFETY * ROUNDING * abs(engine.loss)
        # At least u·(the loss's scale): a J near 0 is still computed from terms of that
        # size (a cross-entropy of 1e-9 rounds at ~1e-17 in log(1 + ε)), and a noise
        # measurement may land exactly on their rounding grid.
        self.delta_j = max(self.bound, ROUNDING * self.scale,
                           abs(engine.loss - engine.loss_repeat), 1e-300)
        self._floor = self.delta_j
        steps = self.step_sizes(values)
        first = self._noise(0, steps)
        # Compared with the floor the steps were sized for (`_noise` has replaced delta_j).
        # The screen always completes (a check that cannot tell its noise cannot judge): the
        # re-measurements below (a second direction, `_resize`) may take 12 evaluations over
        # the budget.
        if self.kinked or self.sigma > RESCALE * self._floor:
            # The direction crossed a kink (or its rounding happened to grow like s), or it is
            # noisy — perhaps a kink crossed: a kink is crossed in few directions, rounding
            # shows in every one, so a second direction is measured. A kink-shaped measurement
            # says nothing about rounding: the other one is kept, the quieter of two clean
            # ones, and the floor only when both crossed a kink.
            first_kinked, self.kinked = self.kinked, False
            other = self._noise(1, steps)
            other_kinked, self.kinked = self.kinked, self.kinked or first_kinked
            if first_kinked and other_kinked:
                first = (first[0], self._floor, 0.0)
            elif first_kinked:
                first = other
            elif not other_kinked:
                first = min((first, other), key=lambda item: math.hypot(item[1], item[2]))
            self._keep(first)
        if self.sigma > RESCALE * self._floor:
            first = self._resize(first, values)
        self.probes = [first[0]]
        for key in range(1, directions):
            self.probes.append(self.evaluate(key + 1, first[0].steps))
        if directions > 1:
            engine.strategy.append(
                f"joint screen {len(self.probes)} directions × {len(first[0].steps)} tensors"
            )
        self.fired = any(self.significant(p.discrepancy) for p in self.probes)
        if self.fired and directions > 1:
            self.fired = self._confirm()

    def _resize(self, first: tuple[JointProbe, float, float],
                values: dict[str, float]) -> tuple[JointProbe, float, float]:
        """The noise is above the floor the steps were sized for: measure it again at steps
        SHORTEN× shorter and, when rounding is what is high at both, at steps sized for that
        rounding (c = SIGNAL·δJ, longer); keep whichever measurement resolves best.

        Rounding δJ does not depend on the step, so the longer steps win when it is the
        noise: the signal grows, the noise does not. n's truncation (curvature's s³ term)
        and kinks crossed (a ReLU/max-pool input within s of 0 on one side only: a CNN near
        a fit crosses some at every step down to ~1e-9) grow with the step, and shorter steps
        win. Growing the steps for a kink's noise, as for rounding, crossed more kinks and
        read as lost float64. Chosen by measurement, not by the shape of one noisy estimate:
        4–8 evaluations over the budget, only in a noisy check."""
        key = first[0].key
        candidates = [first]
        longer: list[tuple[JointProbe, float, float]] = []
        crossed = self.kinked

        def measure(steps: dict[str, float], short: bool) -> tuple[JointProbe, float, float]:
            # A kink-shaped measurement tells nothing of the noise: `_noise` puts the floor in
            # its place, the screen's most sensitive setting, whose discrepancies the kink
            # tests of `_confirm` then judge. Taken at the shorter steps (few kinks, near θ);
            # at longer ones, whose many kinks could hide a bug's discrepancy, only when no
            # measured candidate resolves the check (below).
            nonlocal crossed
            self.kinked = False
            measured = self._noise(key, steps)
            (candidates if short or not self.kinked else longer).append(measured)
            crossed = crossed or self.kinked
            return measured

        shorter = measure({n: s / SHORTEN for n, s in first[0].steps.items()}, True)
        rounding = min(first[1], shorter[1])  # the step-independent part is at most this
        if rounding > RESCALE * self._floor:
            self.delta_j = rounding
            measure(self.step_sizes(values), False)
        self.kinked = crossed
        best = min(candidates, key=self._resolution_of)
        if longer and self._resolution_of(best) > RESOLUTION_LIMIT:
            best = longer[0]
        self._keep(best)
        return best

    def _resolution_of(self, measured: tuple[JointProbe, float, float]) -> float:
        """The median over the tensors with a signal of `_resolutions_at` for a noise
        measurement: what `resolution` would read with it."""
        probe, rounding, truncation = measured
        values = sorted(v for v in self._resolutions_at(
            probe.steps, math.hypot(rounding, truncation)).values() if math.isfinite(v))
        return values[len(values) // 2] if values else math.inf

    def _noise(self, key: int, steps: dict[str, float]) -> tuple[JointProbe, float, float]:
        """Direction `key` at `steps` and at RATIO of them: the probe, the rounding of one
        evaluation and the truncation of d (see the module docstring); kept as the screen's
        noise at once (`_keep`)."""
        first = self.evaluate(key, steps)
        second = self.evaluate(key, {n: s * RATIO for n, s in steps.items()})
        # D(s) = s²·vᵀHv + rounding: D(r·s) − r²·D(s) leaves the rounding only, of std
        # NOISE_SPREAD·δJ; n(s) − n(r·s)/r = (1 − r²)·(n(s)'s truncation error) + rounding
        rounding = max(self._floor, abs(second.second - RATIO**2 * first.second) / NOISE_SPREAD)
        truncation = abs(first.numeric - second.numeric / RATIO) / (1 - RATIO**2)
        if first.numeric == 0 and first.second == 0:
            # J(θ + δ) == J(θ − δ) == J(θ): the whole step sank below the losses' rounding
            # (J near 0 on a coarse grid), which is then at least the change backprop expects
            rounding = max(rounding, abs(first.analytic))
        if _kink_shaped(first.second, second.second, self._floor):
            # D(s) ∝ s, not s²: the direction crossed a kink, which says nothing about
            # rounding; the screen's kink logic deals with the crossing. (Far above the floor
            # u·max(16|J|, scale), so not a coarse rounding grid that happens to look so.)
            self.kinked = True
            rounding, truncation = self._floor, 0.0
        measured = (first, rounding, truncation)
        self._keep(measured)
        return measured

    def _keep(self, measured: tuple[JointProbe, float, float]) -> None:
        _, rounding, truncation = measured
        self.delta_j, self.truncation = rounding, truncation
        self._resolutions = None

    def _confirm(self) -> bool:
        """Is the largest discrepancy a bug's? A wrong gradient makes d exactly linear in the
        step (d = s·eᵀv), so at r·s it is r·d; a ReLU/max-pool kink crossed by the joint step
        is not (at r·s it is crossed differently, or not at all), nor is a coarse rounding
        grid — except by coincidence (k grid steps with k·r an integer), hence two unrelated
        ratios; then a much shorter step for kinks just beside θ. 2–6 evaluations, only when
        the screen fires."""
        probe = max(self.probes, key=lambda p: abs(p.discrepancy)
                    if math.isfinite(p.discrepancy) else math.inf)
        if not math.isfinite(probe.discrepancy):
            return True
        quadratic = 0
        for ratio in (RATIO, CONFIRM_RATIO):
            shorter = self.evaluate(probe.key, {n: s * ratio for n, s in probe.steps.items()})
            expected = probe.discrepancy * ratio
            # d_r − r·d has std σ_d·√(1 + r²) when d is a bug's; 4 of those (not the 10 of
            # SIGNIFICANCE, which let a 20σ discrepancy that shrank like s² pass as linear)
            nonlinear = abs(shorter.discrepancy - expected) > 0.25 * abs(expected) + \
                CONFIRM_SIGMAS * self.sigma * math.sqrt(1 + ratio**2)
            # Many kinks crossed (a memorised batch puts many ReLU inputs near 0): their number
            # grows like s and each moves d by ∝ s, so d grows like s². Closer to r²·d than to
            # r·d at both ratios is not a bug's; a bug at the alert threshold stands hundreds of
            # σ above the noise, where the two cannot be confused.
            if abs(shorter.discrepancy - ratio**2 * probe.discrepancy) < \
                    abs(shorter.discrepancy - expected):
                quadratic += 1
            # A kink crossed just beside θ moves one side only, by an amount ∝ s: d is then
            # linear too, but D = J(θ+δ) + J(θ−δ) − 2J(θ) grows like s (not s², as curvature
            # does) and is as large as d: the kink explains the discrepancy.
            crossed = _kink_shaped(probe.second, shorter.second, self._floor, ratio) and \
                abs(probe.discrepancy) <= abs(probe.second)
            # J itself is smooth when only backprop is wrong: its second difference is
            # curvature, s²·vᵀHv (+ O(s⁴)), so D(s) − D(r·s)/r² is rounding only. A kink
            # between θ − δ and θ + δ adds a part that is not ∝ s² to D, of the size of what
            # it adds to d; curvature alongside it hides the D ∝ s shape tested above.
            rough = abs(probe.second - shorter.second / ratio**2)
            crossed = crossed or (
                rough > CONFIRM_SIGMAS * NOISE_SPREAD * self.delta_j / ratio**2
                and rough >= KINK_SHARE * abs(probe.discrepancy))
            if nonlinear or crossed:
                self.kinked = True
                return False
        if quadratic == 2:
            self.kinked = True
            return False
        # Kinks just beside θ (ReLU inputs within far less than the step of 0) are crossed
        # by every step the tests above use: J is then linear on either side and d exactly
        # linear too, like a bug's. A bug's d stays linear at any step (d = s·eᵀv); a kink's
        # part vanishes once the step is shorter than the kink's distance. So the direction is
        # evaluated again at the shortest step where a bug's d would still stand ZOOM_SIGMAS σ
        # out (z = ZOOM_SIGMAS·σ/|d|, within [MIN_ZOOM, MAX_ZOOM]): a d that falls clearly
        # below z·d there (by more than a quarter and 4σ) is a kink's. A discrepancy too
        # small to tell at MAX_ZOOM is kept.
        zoom = min(MAX_ZOOM, max(MIN_ZOOM, ZOOM_SIGMAS * self.sigma / abs(probe.discrepancy)))
        zoomed = self.evaluate(probe.key, {n: s * zoom for n, s in probe.steps.items()})
        expected = probe.discrepancy * zoom
        if abs(zoomed.discrepancy - expected) > 0.25 * abs(expected) + \
                CONFIRM_SIGMAS * self.sigma * math.sqrt(1 + zoom**2):
            self.kinked = True
            return False
        return True

    @property
    def suspicious(self) -> bool:
        """One evaluation is noisier than float64 at the loss's scale allows by
        PRECISION_MARGIN: a float32 path, or large terms cancelling (the backend's probe tells
        which)."""
        return self.sigma > PRECISION_MARGIN * ROUNDING_SAFETY * ROUNDING * self.scale

    @property
    def scale(self) -> float:
        """The size of the terms J is computed from: max(|J|, settings.loss_scale) — the
        caller's reference (GradWatch: the largest loss of its checks), since a loss driven
        towards 0 is still computed from terms of its initial size."""
        return max(abs(self.engine.loss), self.engine.settings.loss_scale)

    @property
    def unresolved(self) -> bool:
        """A typical tensor cannot be resolved to a relative error of RESOLUTION_LIMIT."""
        return self.resolution() > RESOLUTION_LIMIT

    @property
    def float32_like(self) -> bool:
        """Noisier than float64 can be at the loss's scale even with its terms cancelling a
        millionfold: σ_d > FLOAT32_NOISE · scale (float32 rounds at 6e-8)."""
        return self.sigma > FLOAT32_NOISE * self.scale

    # ------------------------------------------------------------------ localisation
    def localise(self) -> None:
        """Group testing over tensors along the most significant direction."""
        probe = max(self.probes, key=lambda p: abs(p.discrepancy)
                    if math.isfinite(p.discrepancy) else math.inf)
        start = self.engine.evaluations
        self._limit = start + LOCALISE_LIMIT
        found = self._split(probe, list(probe.steps), probe.discrepancy, 1.0)
        self.culprits = found[:MAX_CULPRITS]
        self.localise_spent += self.engine.evaluations - start

    def _split(self, probe: JointProbe, names: list[str], d: float, scale: float) -> list[str]:
        if len(names) == 1:
            return names
        if self.engine.evaluations + 2 > self._limit:
            return []  # the localisation allowance is spent
        left, right = names[: len(names) // 2], names[len(names) // 2:]
        restricted = self.evaluate(probe.key, {n: probe.steps[n] for n in left})
        d_left = restricted.discrepancy
        d_right = d - d_left  # linearity: the discrepancy is a sum over tensors
        found: list[str] = []
        if self.significant(d_left):
            found += self._split(probe, left, d_left, 1.0)
        if self.significant(d_right, math.sqrt(scale + 1.0)) and len(found) < MAX_CULPRITS:
            found += self._split(probe, right, d_right, scale + 1.0)
        return found  # empty: the discrepancy is spread over both halves


    # ------------------------------------------------------------------ measurement
    def measure(self, name: str, extra_directions: int = 2) -> None:
        """Tensor-restricted directions (an estimate of the layer's distance), then rows and
        elements bisected towards the disagreement, whose coordinates are checked."""
        engine = self.engine
        tensor = engine.tensors[name]
        step = self.probes[0].steps[name]
        parts = []
        for key in range(extra_directions):
            parts.append(self.evaluate(1000 + key, {name: step}))
        region = self._bisect(tensor, step, parts)
        self.regions[name] = region
        directional = [self.directional(tensor, p) for p in parts]
        tensor.sketches.append(Directional.join(directional))
        count = min(REGION_COORDINATES, max(engine.remaining // 2, 2))
        engine.coordinates(tensor, engine.sample_indices(tensor, count, pool=region))

    def directional(self, tensor: TensorState, probe: JointProbe) -> Directional:
        step = probe.steps[tensor.name]
        return Directional(
            numeric=np.array([probe.numeric / step]), analytic=np.array([probe.analytic / step]),
            plus=np.array([self.engine.loss + probe.numeric + probe.second / 2]),
            minus=np.array([self.engine.loss - probe.numeric + probe.second / 2]),
            steps=np.array([step]),
        )

    def _bisect(
        self, tensor: TensorState, step: float, parts: list[JointProbe]
    ) -> NDArray[np.int64]:
        """Rows first (for ≥2-D tensors), then elements of one row, along the restricted
        direction whose discrepancy is largest; 2 evaluations per level."""
        probe = max(parts, key=lambda p: abs(p.discrepancy))
        if not self.significant(probe.discrepancy):
            return np.arange(tensor.numel, dtype=np.int64)
        start, stop = 0, tensor.numel
        row = tensor.numel // tensor.shape[0] if len(tensor.shape) >= 2 else 1
        unit = row if row > 1 else 1
        d, scale = probe.discrepancy, 1.0
        index = np.arange(tensor.numel)
        while self.engine.evaluations + 2 <= self._limit:
            units = (stop - start) // unit
            if units <= 1:
                if unit == 1:
                    break
                unit = 1
                continue
            middle = start + (units // 2) * unit
            mask = (index >= start) & (index < middle)
            left = self.evaluate(probe.key, {tensor.name: step}, masks={tensor.name: mask})
            d_left = left.discrepancy
            d_right = d - d_left
            in_left = self.significant(d_left)
            in_right = self.significant(d_right, math.sqrt(scale + 1.0))
            if in_left == in_right:
                break  # spread over both halves (or lost in noise): keep the region
            if in_left:
                stop, d, scale = middle, d_left, 1.0
            else:
                start, d, scale = middle, d_right, scale + 1.0
        return np.arange(start, stop, dtype=np.int64)

    # ------------------------------------------------------------------ vanishing
    def vanished(self, name: str, values: dict[str, float]) -> bool | None:
        """True when `name`'s perturbations vanish at the check's steps (J(θ+δ) == J(θ−δ)
        exactly, though dθ says it should move) but a step 1e4 larger gives the analytic
        slope: float32 rounding swallows the step (precision lost, not a bug)."""
        tensor = self.engine.tensors[name]
        if not tensor.sketches:
            return None
        sketch = Directional.join(tensor.sketches)
        if not np.all(sketch.plus == sketch.minus) or not np.any(sketch.analytic):
            return False
        large = MAX_RELATIVE_STEP * 1e2 * max(values.get(name, 0.0), 1e-2)
        probe = self.evaluate(2000, {name: large})
        scale = abs(probe.numeric) + abs(probe.analytic)
        return scale > 0 and abs(probe.discrepancy) <= 1e-2 * scale


def _tensor_signs(rng: np.random.Generator, tensor: TensorState) -> Signs:
    """±1 (int8) for each of `tensor`'s elements (0 on by-design exclusions)."""
    signs = rademacher_int8(rng, tensor.numel)
    if tensor.excluded is not None:
        signs[tensor.excluded] = 0
    return signs


def _kink_shaped(second: float, shorter: float, bound: float, ratio: float = RATIO) -> bool:
    """D(s) ≈ D(r·s)/r, far above rounding: the second difference grows like s (a kink crossed
    between θ − s·v and θ + s·v), not like s² (smooth) nor at random (rounding)."""
    if not (abs(second) > 100 * bound and math.isfinite(second) and math.isfinite(shorter)):
        return False
    return second * shorter > 0 and abs(second - shorter / ratio) <= 0.25 * abs(second)
