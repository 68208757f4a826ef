"""The gradient-check engine: plans which coordinates/directions to probe, spends loss
evaluations through a backend, and turns the results into a `CheckReport`.

A backend (numpy dicts, a PyTorch module, ...) implements `Objective`: evaluate J(θ) and J at
θ with one parameter tensor perturbed, either along coordinates or along dense directions.
Everything else — modes, budgets, noise floors, kinks, verdicts — lives here, once.

Modes (one signature, the dispatcher in `run_check` picks the strategy):
  full    every coordinate, the textbook recipe, 2P + 2 evaluations
  sample  k coordinates per tensor: half the largest |dθ|, half uniformly random (from `seed`)
  sketch  k random ±1 directions per tensor: ||dθapprox − dθ|| estimated from projections
  auto    full if it fits the budget, else a joint screen of every tensor → group-testing
          localisation → measurement of what was found (`_screen`)

Elements that autograd leaves without gradient on purpose (an `nn.Embedding`'s padding_idx
row) are excluded by the backend (`Objective.by_design`): never perturbed, never judged.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.errors import ConfigError
from gradwatch.common.progress import Progress
from gradwatch.engine.numerics import ROUNDING, Signs, noise_per_element, norm, rademacher
from gradwatch.engine.report import CheckReport, Mode, Thresholds

if TYPE_CHECKING:
    from gradwatch.engine.screen import JointScreen

__all__ = [
    "CheckSettings",
    "Directional",
    "JointObjective",
    "Objective",
    "glob_list",
    "make_settings",
    "run_check",
    "select_names",
]

Vector = NDArray[np.float64]
Indices = NDArray[np.int64]

MODES = ("full", "sample", "sketch", "auto")

class Objective(Protocol):
    """What the engine needs from a backend. All values are float64.

    `directions` has shape (k, numel) and is applied to the flattened tensor with one step
    size per row; `direction_losses` also returns the *realised* half-steps
    ((θ + s·v) − (θ − s·v)) / 2 as stored after rounding, so projections are exact.
    """

    def loss(self) -> float: ...

    def coordinate_losses(
        self, layer: str, indices: Indices, eps: float
    ) -> tuple[Vector, Vector]: ...

    def direction_losses(
        self, layer: str, directions: Vector, steps: Vector
    ) -> tuple[Vector, Vector, Vector]: ...


class JointObjective(Objective, Protocol):
    """A backend that can perturb several tensors at once (the joint screen of auto mode).

    `joint_losses({name: (signs, step)})` returns J(θ + δ) and J(θ − δ) for δ = step·signs
    (signs: flat int8 ±1, 0 where left out, per tensor); `scales()` the RMS value
    of each tensor (step caps); `by_design()` the elements to leave out of the check, with the
    reason, e.g. {"emb.weight": (indices, "padding_idx row 0 of nn.Embedding 'emb'")}.
    """

    def joint_losses(
        self, perturbation: Mapping[str, tuple[Signs, float]]
    ) -> tuple[float, float]: ...

    def scales(self) -> dict[str, float]: ...

    def by_design(self) -> dict[str, tuple[Indices, str]]: ...


@dataclass(frozen=True)
class CheckSettings:
    """Validated settings of one check (built by `make_settings`)."""

    eps: float = 1e-7
    mode: Mode = "full"
    thresholds: Thresholds = field(default_factory=Thresholds)
    budget: int | None = None
    seed: int = 0
    samples: int = 16
    directions: int = 8
    top_k: int = 5
    loss_scale: float = 0.0  # size of the terms the loss is computed from (0: |J|)


def glob_list(value: str | Sequence[str] | None, argument: str) -> list[str]:
    """`include=` / `exclude=` as a list of fnmatch globs (None: none)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{argument} must be a glob string or a list of them, got {value!r}.")


def select_names(
    names: Sequence[str],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    *,
    what: str,
) -> list[str]:
    """The tensors to check, in order: matching an `include` glob (all without one) and no
    `exclude` glob. `what` names them in the error when nothing is left ("parameter", ...).

    Example:
        >>> select_names(["0.weight", "0.bias"], "*.weight", None, what="parameter")
        ['0.weight']
    """
    includes, excludes = glob_list(include, "include"), glob_list(exclude, "exclude")
    selected = [
        name for name in names
        if (not includes or any(fnmatch.fnmatchcase(name, g) for g in includes))
        and not any(fnmatch.fnmatchcase(name, g) for g in excludes)
    ]
    if not selected:
        raise ConfigError(
            f"include={include!r} / exclude={exclude!r} leave no {what} to check. They are: "
            f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}."
        )
    return selected


def make_settings(
    *,
    eps: float,
    mode: str,
    thresholds: Thresholds | Mapping[str, float] | None,
    budget: int | None,
    seed: int,
    samples: int = 16,
    directions: int = 8,
    top_k: int = 5,
    loss_scale: float | None = None,
) -> CheckSettings:
    """Validate user settings; every failure names the argument and the fix."""
    if loss_scale is not None and (isinstance(loss_scale, bool) or not isinstance(
            loss_scale, (int, float)) or not math.isfinite(loss_scale) or loss_scale < 0):
        raise ConfigError(f"loss_scale must be a finite float ≥ 0 (the size of the terms the "
                          f"loss is computed from, e.g. its value at initialisation) or None, "
                          f"got {loss_scale!r}.")
    if mode not in MODES:
        raise ConfigError(
            f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}. "
            f"Use 'full' for the exact recipe or 'auto' to stay within `budget`."
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ConfigError(f"eps must be a finite float > 0 (default 1e-7), got {eps!r}.")
    if eps <= 0:
        raise ConfigError(
            f"eps must be > 0, got {eps!r}: central differences step ±eps. Use e.g. 1e-7."
        )
    if eps >= 1e-1:
        raise ConfigError(
            f"eps={eps!r} is too large for a derivative estimate (truncation error ~eps²). "
            f"Use a value between 1e-9 and 1e-4; the default is 1e-7."
        )
    for name, value, low in (("samples", samples, 1), ("directions", directions, 1),
                             ("top_k", top_k, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int ≥ {low}, got {value!r}.")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise ConfigError(f"budget must be an int (loss evaluations) or None, got {budget!r}.")
        if budget < 4:
            raise ConfigError(
                f"budget={budget} is too small to check anything: a check needs 2 evaluations "
                f"of J(θ) plus 2 per coordinate, so at least 4. Raise budget (default 2000)."
            )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}.")
    if thresholds is None:
        resolved = Thresholds()
    elif isinstance(thresholds, Thresholds):
        resolved = thresholds
    elif isinstance(thresholds, Mapping):
        resolved = Thresholds(**thresholds)
    else:
        raise ConfigError(
            f"thresholds must be a gradwatch.Thresholds or a dict like "
            f"{{'warn': 1e-5, 'alert': 1e-3}}, got {type(thresholds).__name__}."
        )
    return CheckSettings(
        eps=float(eps), mode=mode,  # type: ignore[arg-type]
        thresholds=resolved, budget=budget, seed=seed,
        samples=samples, directions=directions, top_k=top_k,
        loss_scale=float(loss_scale or 0.0),
    )


@dataclass(frozen=True)
class Directional:
    """Directional derivatives along k directions, per unit of step.

    numeric[k]  = (J(θ + s_k·v_k) − J(θ − s_k·v_k)) / (2·s_k)
    analytic[k] = dθᵀ r_k / s_k with r_k the realised half-step (≈ s_k·v_k)
    `noise` is the rounding noise of numeric[k]: δJ/s_k.
    """

    numeric: Vector
    analytic: Vector
    plus: Vector
    minus: Vector
    steps: Vector

    @staticmethod
    def join(parts: list[Directional]) -> Directional:
        return Directional(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                             ("numeric", "analytic", "plus", "minus", "steps")))


@dataclass
class _Tensor:
    """What the engine has learned about one parameter tensor."""

    name: str
    shape: tuple[int, ...]
    analytic: Vector
    checked: NDArray[np.bool_]
    indices: list[Indices] = field(default_factory=list)
    plus: list[Vector] = field(default_factory=list)
    minus: list[Vector] = field(default_factory=list)
    # random directions over the whole tensor (sketch), see `Directional`
    sketches: list[Directional] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: flat indices left out by design (never perturbed, never judged), and why
    excluded: Indices | None = None
    excluded_reason: str = ""

    @property
    def numel(self) -> int:
        return int(self.analytic.size)

    @functools.cached_property
    def analytic_norm(self) -> float:
        """||dθ||₂ (the gradient does not change during a check: computed once)."""
        return norm(self.analytic)

    @property
    def n_excluded(self) -> int:
        return 0 if self.excluded is None else int(self.excluded.size)

    @property
    def active(self) -> bool:
        """Has elements to check (not all of them excluded by design)."""
        return self.n_excluded < self.numel

    @property
    def n_checked(self) -> int:
        return int(self.checked.sum())


class _Engine:
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
            name: _Tensor(
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
    def coordinates(self, tensor: _Tensor, indices: Indices) -> None:
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

    def directions(self, tensor: _Tensor, directions: Vector) -> Directional:
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
        alert-sized error, `_assess._resolution_problem`.)"""
        if self.vanished:
            return True
        screen = self.screen
        if screen is None or not screen.suspicious:
            return False
        self.diagnose()
        if self.diagnosis.get("lossy_modules") or self.diagnosis.get("escaped"):
            return True
        return screen.float32_like and screen.unresolved

    def joint(self, perturbation: Mapping[str, tuple[Signs, float]]) -> tuple[float, float]:
        """J(θ + δ) and J(θ − δ) with several tensors perturbed at once (`JointObjective`)."""
        started = time.perf_counter()
        plus, minus = self.objective.joint_losses(perturbation)  # type: ignore[attr-defined]
        self.evaluation_seconds += time.perf_counter() - started
        self._spent(2)
        return float(plus), float(minus)

    def sketch(self, tensor: _Tensor, k: int) -> None:
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
            from gradwatch.engine.auto import verify_precision

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

    def run_sample(self, k: int, tensors: list[_Tensor] | None = None) -> None:
        self.strategy.append(f"sample {k}/tensor")
        for tensor in tensors if tensors is not None else list(self.tensors.values()):
            if self.remaining < 2:
                tensor.notes.append("not checked: the evaluation budget ran out")
                continue
            count = int(min(k, tensor.numel - tensor.n_checked, self.remaining // 2))
            self.coordinates(tensor, self.sample_indices(tensor, count))

    def sample_indices(self, tensor: _Tensor, k: int, pool: Indices | None = None) -> Indices:
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
        from gradwatch.engine.auto import run_auto

        run_auto(self)

    # ------------------------------------------------------------------ report
    def finish(self, seconds: float, probe: Mapping[str, object]) -> CheckReport:
        from gradwatch.engine.assess import assess

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
    engine = _Engine(objective, analytic, settings, progress)
    engine.run()
    return engine.finish(time.perf_counter() - start, probe or {})
