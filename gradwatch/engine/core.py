"""The engine of one check: plans the probes, spends the evaluations, builds the report.

It plans which coordinates/directions to probe, spends loss evaluations through a backend, and
turns the results into a `CheckReport`.

A backend (numpy dicts, a PyTorch module, ...) implements `Objective`: evaluate J(θ) and J at
θ with one parameter tensor perturbed, either along coordinates or along dense directions.
Everything else — modes, budgets, noise floors, kinks, verdicts — lives here, once.

Modes (one signature, the dispatcher in `run_check` picks the strategy):
  full    every coordinate, the textbook recipe, 2P + 2 evaluations
  sample  k coordinates per tensor: half the largest |dθ|, half uniformly random (from `seed`)
  sketch  k random ±1 directions per tensor: ||dθapprox − dθ|| estimated from projections
  auto    full if it fits the budget, else a joint screen of every tensor → group-testing
          localisation → measurement of what was found (`screen`)

Elements that autograd leaves without gradient on purpose (an `nn.Embedding`'s padding_idx
row) are excluded by the backend (`Objective.by_design`): never perturbed, never judged.

Imports: gradwatch.common and the engine's lower modules (types, numerics, report, the auto
strategy and the assessment).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.progress import Progress
from gradwatch.engine.assess import assess
from gradwatch.engine.auto import run_auto, verify_precision
from gradwatch.engine.numerics import ROUNDING, Signs, noise_per_element, rademacher
from gradwatch.engine.report import CheckReport
from gradwatch.engine.types import (
    CheckSettings,
    Directional,
    Indices,
    Objective,
    TensorState,
    Vector,
)

if TYPE_CHECKING:
    from gradwatch.engine.screen import JointScreen

__all__ = ["Engine", "run_check"]

class Engine:
    def __init__(
        self,
        objective: Objective,
        analytic: Mapping[str, NDArray[np.float64]],
        settings: CheckSettings,
        progress: Progress | None,
    ) -> None:
        self.objective = objective
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)  # private: never the user's RNG
        self.tensors = {
            name: TensorState(
                name=name,
                shape=tuple(grad.shape),
                analytic=np.asarray(grad, dtype=np.float64).reshape(-1),
                checked=np.zeros(grad.size, dtype=bool),
            )
            for name, grad in analytic.items()
        }
        self.evaluations = 0
        self.progress = progress
        self.planned = 0
        self.strategy: list[str] = []
        self.loss = math.nan
        self.loss_repeat = math.nan
        self.direction_count = 0
        #: Of the check's time, the part inside the objective (what scales with evaluations).
        self.evaluation_seconds = 0.0
        #: The joint screen of auto mode, when it ran (`_screen.JointScreen`).
        self.screen: JointScreen | None = None
        #: Tensors whose perturbations vanish in rounding (precision lost, not a bug).
        self.vanished: list[str] = []
        #: The screen decided the check (auto mode within a budget), not full coordinates.
        self.joint_mode = False
        #: What the backend found out about float64 integrity (`precision_diagnosis`).
        self.diagnosis: dict[str, object] = {}
        by_design = getattr(objective, "by_design", None)
        for name, (indices, reason) in (by_design() if by_design else {}).items():
            if name in self.tensors and len(indices):
                tensor = self.tensors[name]
                tensor.excluded = np.unique(np.asarray(indices, dtype=np.int64))
                tensor.excluded_reason = reason
                tensor.checked[tensor.excluded] = True  # never sampled by coordinates
        scales = getattr(objective, "scales", None)
        self.scales: dict[str, float] = scales() if scales else {}

    # ------------------------------------------------------------------ probes
    def coordinates(self, tensor: TensorState, indices: Indices) -> None:
        """Central differences along the given (not yet checked) coordinates."""
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        indices = indices[~tensor.checked[indices]]  # excluded elements count as checked
        if indices.size == 0:
            return
        started = time.perf_counter()
        plus, minus = self.objective.coordinate_losses(tensor.name, indices, self.settings.eps)
        self.evaluation_seconds += time.perf_counter() - started
        tensor.checked[indices] = True
        tensor.indices.append(indices)
        tensor.plus.append(np.asarray(plus, dtype=np.float64))
        tensor.minus.append(np.asarray(minus, dtype=np.float64))
        self._spent(2 * indices.size)

    def directions(self, tensor: TensorState, directions: Vector) -> Directional:
        """Central differences along each row v of `directions` (entries ±1 or 0).

        The step is s = ε/√(support of v): the perturbation has Euclidean length ε, as a
        coordinate step has. A longer step (ε on every element of a large tensor) would cross
        ReLU kinks almost surely; this one keeps the rounding noise of the estimated
        ||n − a|| at the level of full mode's (δJ/s = √support · δJ/ε).
        """
        support = np.count_nonzero(directions, axis=1).astype(np.float64)
        steps = self.settings.eps / np.sqrt(np.maximum(support, 1.0))
        started = time.perf_counter()
        plus, minus, realised = self.objective.direction_losses(tensor.name, directions, steps)
        self.evaluation_seconds += time.perf_counter() - started
        plus = np.asarray(plus, dtype=np.float64)
        minus = np.asarray(minus, dtype=np.float64)
        self._spent(2 * directions.shape[0])
        self.direction_count += directions.shape[0]
        return Directional(
            numeric=(plus - minus) / (2 * steps),
            analytic=np.einsum("kn,n->k", np.asarray(realised), tensor.analytic) / steps,
            plus=plus,
            minus=minus,
            steps=steps,
        )

    def diagnose(self) -> None:
        """Ask the backend where float64 is lost (once; `precision_diagnosis`)."""
        diagnose = getattr(self.objective, "precision_diagnosis", None)
        if self.diagnosis or diagnose is None:
            return
        try:
            self.diagnosis = dict(diagnose())
        except Exception as exc:  # the verdict stands without the module's name
            self.diagnosis = {"diagnosis_failed": f"{type(exc).__name__}: {exc}"}

    @property
    def precision_lost(self) -> bool:
        """Float64 did not hold: perturbations vanish in rounding; or the evaluations are
        noisier than float64 at the loss's scale allows and a module was found that loses
        precision, or the noise is float32-like (σ > 1e-10 × the loss's scale) and leaves the
        check without resolution. (Noise with no such module and float64-like in size is a
        flat loss whose terms cancel — a well-fit cross-entropy — not lost precision: the
        check reads ok, or "error: the loss is nearly flat" when it cannot resolve an
        alert-sized error, `_assess._resolution_problem`.) Modules whose response bends only
        where inputs sit beside kinks ("kinked_modules": ReLU/max-pool inputs near 0) stop the
        check the same way — such noise cannot be told from a bug's discrepancy — and the
        report says kinks, not lost precision."""
        if self.vanished:
            return True
        screen = self.screen
        if screen is None or not screen.suspicious:
            return False
        self.diagnose()
        if any(self.diagnosis.get(key) for key in ("lossy_modules", "escaped",
                                                    "kinked_modules")):
            return True
        return screen.float32_like and screen.unresolved

    @property
    def kinks_only(self) -> bool:
        """`precision_lost` with float64 held: the probe found only modules bent by kinks."""
        found = self.diagnosis
        return (bool(found.get("kinked_modules")) and not found.get("lossy_modules")
                and not found.get("escaped") and not self.vanished)

    def joint(self, perturbation: Mapping[str, tuple[Signs, float]]) -> tuple[float, float]:
        """J(θ + δ) and J(θ − δ) with several tensors perturbed at once (`JointObjective`)."""
        started = time.perf_counter()
        plus, minus = self.objective.joint_losses(perturbation)  # type: ignore[attr-defined]
        self.evaluation_seconds += time.perf_counter() - started
        self._spent(2)
        return float(plus), float(minus)

    def sketch(self, tensor: TensorState, k: int) -> None:
        """k random ±1 directions over the whole tensor (E[v vᵀ] = I)."""
        tensor.sketches.append(self.directions(tensor, self.rademacher(k, tensor.numel)))

    def rademacher(self, k: int, m: int) -> Vector:
        """k×m independent ±1 entries (`_numerics.rademacher`)."""
        return rademacher(self.rng, k * m).reshape(k, m)

    def _spent(self, n: int) -> None:
        self.evaluations += n
        if self.progress is not None:
            self.progress(self.evaluations, max(self.planned, self.evaluations))

    @property
    def remaining(self) -> int:
        """Evaluations left in the budget (unbounded without one)."""
        budget = self.settings.budget
        return sys.maxsize if budget is None else budget - self.evaluations

    # ------------------------------------------------------------------ modes
    def run(self) -> None:
        settings = self.settings
        total = self.n_active
        # a full check of a jointly perturbable backend first verifies float64 (4 evaluations)
        verify = 4 if hasattr(self.objective, "joint_losses") else 0
        self.planned = {
            "full": 2 * total + 2 + verify,
            "sample": 2 + 2 * sum(min(settings.samples, t.numel) for t in self.tensors.values()),
            "sketch": 2 + 2 * sum(min(settings.directions, t.numel) for t in self.tensors.values()),
            "auto": min(2 * total + 2, settings.budget or 2 * total + 2),
        }[settings.mode]
        started = time.perf_counter()
        self.loss = float(self.objective.loss())
        self.loss_repeat = float(self.objective.loss())
        self.evaluation_seconds += time.perf_counter() - started
        self._spent(2)
        if not math.isfinite(self.loss) or not self.deterministic:
            return  # reported by finish(): non-finite or non-deterministic, nothing to measure
        if settings.mode == "full":
            verify_precision(self)
            if not self.precision_lost:
                self.run_full()
        elif settings.mode == "sample":
            self.run_sample(self._per_tensor(settings.samples))
        elif settings.mode == "sketch":
            self.run_sketch(self._per_tensor(settings.directions))
        else:
            self.run_auto()

    @property
    def deterministic(self) -> bool:
        """J(θ) twice agreed, up to the rounding of non-deterministic summation order.

        Differences of a few ulps (atomics on GPUs) are absorbed into the noise estimate;
        anything larger (dropout, augmentation) would swamp the central differences.
        """
        tolerance = 64 * ROUNDING * abs(self.loss)
        return abs(self.loss - self.loss_repeat) <= tolerance

    def noise(self) -> float:
        """Rounding noise per central difference, from everything measured so far.

        Where the backend perturbs tensors jointly, δJ is the screen's curvature-free
        measurement (`_screen`); otherwise the second differences (rounding + ε²·J'') bound it
        from above — too high where the curvature is large, which would mask real
        discrepancies in tensors with small gradients."""
        if self.screen is not None:
            return max(self.screen.delta_j, abs(self.loss - self.loss_repeat)) / \
                self.settings.eps
        second = [
            plus + minus - 2 * self.loss
            for tensor in self.tensors.values()
            for plus, minus in zip(tensor.plus, tensor.minus)
        ]
        differences = np.concatenate(second) if second else np.empty(0)
        return noise_per_element(self.loss, self.loss_repeat, differences, self.settings.eps)

    def _per_tensor(self, wanted: int) -> int:
        """Shrink a per-tensor count so the whole plan fits the budget."""
        if self.settings.budget is None:
            return wanted
        n = len(self.tensors)
        return max(1, min(wanted, (self.remaining // 2) // max(n, 1)))

    def run_full(self) -> None:
        self.strategy.append("full")
        for tensor in self.tensors.values():
            self.coordinates(tensor, np.arange(tensor.numel, dtype=np.int64))

    @property
    def n_active(self) -> int:
        """Elements to check: all but the by-design exclusions."""
        return sum(t.numel - t.n_excluded for t in self.tensors.values())

    def run_sample(self, k: int, tensors: list[TensorState] | None = None) -> None:
        self.strategy.append(f"sample {k}/tensor")
        for tensor in tensors if tensors is not None else list(self.tensors.values()):
            if self.remaining < 2:
                tensor.notes.append("not checked: the evaluation budget ran out")
                continue
            count = int(min(k, tensor.numel - tensor.n_checked, self.remaining // 2))
            self.coordinates(tensor, self.sample_indices(tensor, count))

    def sample_indices(self, tensor: TensorState, k: int, pool: Indices | None = None) -> Indices:
        """Half the largest-|dθ| unchecked coordinates, half uniformly random ones."""
        pool = np.flatnonzero(~tensor.checked) if pool is None else pool[~tensor.checked[pool]]
        if k <= 0 or pool.size == 0:
            return np.empty(0, dtype=np.int64)
        if k >= pool.size:
            return pool
        top = k - k // 2
        magnitude = np.abs(tensor.analytic[pool])
        picked = np.argpartition(magnitude, pool.size - top)[pool.size - top:]
        others = np.ones(pool.size, dtype=bool)
        others[picked] = False
        rest = pool[others]
        random = self.rng.choice(rest, size=min(k - top, rest.size), replace=False)
        return np.concatenate([pool[picked], random]).astype(np.int64)

    def run_sketch(self, k: int) -> None:
        self.strategy.append(f"sketch {k}/tensor")
        for tensor in self.tensors.values():
            if self.remaining < 2:
                tensor.notes.append("not checked: the evaluation budget ran out")
                continue
            if tensor.numel <= k:  # as cheap to be exact
                self.coordinates(tensor, np.arange(tensor.numel, dtype=np.int64))
            else:
                self.sketch(tensor, int(min(k, self.remaining // 2)))

    def run_auto(self) -> None:
        run_auto(self)

    # ------------------------------------------------------------------ report
    def finish(self, seconds: float, probe: Mapping[str, object]) -> CheckReport:
        if self.vanished:
            self.diagnose()

        return assess(self, seconds=seconds, probe=dict(probe))


def run_check(
    objective: Objective,
    analytic: Mapping[str, NDArray[np.float64]],
    settings: CheckSettings,
    *,
    probe: Mapping[str, object] | None = None,
    progress: Progress | None = None,
) -> CheckReport:
    """Run one check of `objective` against the backprop gradients `analytic`."""
    start = time.perf_counter()
    engine = Engine(objective, analytic, settings, progress)
    engine.run()
    return engine.finish(time.perf_counter() - start, probe or {})
