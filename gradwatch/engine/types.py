"""The engine's settings and shared types, below the engine and the strategies that use them.

`CheckOptions` (the public check options, validated, with the defaults written once) and the
`CheckSettings` of one check they resolve to; the `Objective` protocols a backend implements,
tensor selection, `Directional` and `TensorState` (what the engine learns about one tensor).
The engine, the auto strategy, the screen and the assessment all use them.

Imports: gradwatch.common, gradwatch.engine.numerics, gradwatch.engine.report.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.errors import ConfigError
from gradwatch.common.settings import DEFAULT, Default, Settings, with_shorthands
from gradwatch.engine.numerics import Signs, norm
from gradwatch.engine.report import Mode, RatioThresholds, Thresholds

__all__ = [
    "ENTRY_DEFAULTS",
    "MODES",
    "CheckOptions",
    "CheckSettings",
    "Directional",
    "Indices",
    "JointObjective",
    "Objective",
    "TensorState",
    "Vector",
    "check_settings",
    "glob_list",
    "select_names",
]

Vector = NDArray[np.float64]
Indices = NDArray[np.int64]

MODES = ("full", "sample", "sketch", "auto")
Kernels = Literal["auto", "off"]
ShardedStrategy = Literal["auto", "gathered", "collective"]
SHARDED_STRATEGIES: tuple[str, ...] = ("auto", "gathered", "collective")

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
    """The settings of one check, every value resolved (`CheckOptions.settings`)."""

    eps: float = 1e-7
    mode: Mode = "full"
    thresholds: Thresholds = field(default_factory=Thresholds)
    budget: int | None = None
    seed: int = 0
    samples: int = 16
    directions: int = 8
    top_k: int = 5
    loss_scale: float = 0.0  # size of the terms the loss is computed from (0: |J|)
    kernels: Kernels = "auto"
    kernel_thresholds: RatioThresholds = field(default_factory=RatioThresholds)
    sharded: ShardedStrategy = "auto"


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


#: The entry points, whose defaults for `mode` and `budget` differ on purpose (`CheckOptions`).
Entry = Literal["check", "check_module", "check_jax", "GradWatch"]

#: (mode, budget) where `CheckOptions` leaves them out, by entry point; the table in its
#: docstring says why. For `GradWatch` a budget of None is the adaptive budget.
ENTRY_DEFAULTS: dict[str, tuple[Mode, int | None]] = {
    "check": ("full", None),
    "check_module": ("auto", 2000),
    "check_jax": ("auto", 2000),
    "GradWatch": ("auto", None),
}


@dataclass(frozen=True, kw_only=True, repr=False)
class CheckOptions(Settings):
    """The options of a gradient check, shared by `gradwatch.check`, `check_module`,
    `check_jax` (as `options=`) and `GradWatch` (as `check=`); each of them also takes every
    field as a keyword shorthand (`check_module(..., budget=500)`), and a field given both
    ways is a `ConfigError`. Every value is validated here, when the object is built.

    ==========  ==========  ====================================================================
    field       default     meaning
    ==========  ==========  ====================================================================
    mode        see below   "full" (every coordinate), "sample", "sketch" or "auto" (full when
                            2P + 2 ≤ budget, else a budgeted search that still finds and
                            localises a bug in one row or element)
    budget      see below   most loss evaluations ("auto", "sample", "sketch"); None: no fixed
                            budget (unlimited for a check, adaptive for GradWatch); ≥ 4
    eps         1e-7        the central-difference step ε (float64); None: the default
    thresholds  warn 1e-5,  `Thresholds(warn=, alert=)` or a dict with those keys
                alert 1e-3
    include     None (all)  fnmatch globs over the tensor names; a tensor is checked when it
    exclude     None        matches an `include` glob (any, without one) and no `exclude` glob
    seed        0           seeds gradwatch's private generator (GradWatch adds the step)
    samples     16          coordinates per tensor in "sample" mode
    directions  8           random directions per tensor in "sketch" mode
    top_k       5           worst elements kept per layer
    kernels     "auto"      PyTorch: also measure the gradient as training computes it (dtype,
                            autocast, compiled graph, custom ops) against float64, where the
                            training path differs from the float64 one; "off": never
    sharded     "auto"      FSDP models: "gathered" (rank 0 checks an unsharded float64 copy),
                            "collective" (no rank gathers: every rank perturbs its own shards)
                            or "auto" (gathered when the copy fits in rank 0's host memory)
    ==========  ==========  ====================================================================

    `kernel_thresholds` (default warn 12, alert 32): a `RatioThresholds(warn=, alert=)` or a
    dict, for that measurement's ratio (the training gradient's error over a correct
    computation's at the training precision, `gradwatch.engine.kernels`).

    `mode` and `budget` differ by entry point, on purpose (`ENTRY_DEFAULTS`); left out, they
    read `DEFAULT`:

    ================================  ======  =================================================
    entry point                       mode    budget
    ================================  ======  =================================================
    `gradwatch.check` (numpy)         "full"  None: unlimited — the textbook recipe, exact
    `check_module`, `check_jax`       "auto"  2000 — a real model does not fit 2P + 2
    `GradWatch` (during training)     "auto"  None: adaptive — sized from measured step and
                                              check times to take `overhead` of training
    ================================  ======  =================================================

    Example:
        >>> options = CheckOptions(budget=500, thresholds={"warn": 1e-6, "alert": 1e-4})
        >>> options
        CheckOptions(budget=500, thresholds=Thresholds(warn=1e-06, alert=0.0001))
        >>> options.mode, options.eps
        (DEFAULT, 1e-07)
        >>> settings = options.settings("check_module")
        >>> settings.mode, settings.budget, settings.samples
        ('auto', 500, 16)
        >>> CheckOptions().settings("check").mode
        'full'
    """

    NONE_IS_DEFAULT: ClassVar[frozenset[str]] = frozenset(
        {"eps", "thresholds", "include", "exclude", "kernel_thresholds"})

    mode: Mode | Default = DEFAULT
    budget: int | Default | None = DEFAULT
    eps: float = 1e-7
    thresholds: Thresholds | Mapping[str, float] = field(default_factory=Thresholds)
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    seed: int = 0
    samples: int = 16
    directions: int = 8
    top_k: int = 5
    kernels: Kernels = "auto"
    kernel_thresholds: RatioThresholds | Mapping[str, float] = field(
        default_factory=RatioThresholds)
    sharded: ShardedStrategy = "auto"

    def __post_init__(self) -> None:
        self._fill_defaults()
        if self.mode is not DEFAULT and self.mode not in MODES:
            raise ConfigError(
                f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {self.mode!r}. "
                f"Use 'full' for the exact recipe or 'auto' to stay within `budget`."
            )
        if self.budget is not DEFAULT and self.budget is not None:
            _check_budget(self.budget)
        _check_eps(self.eps)
        object.__setattr__(self, "thresholds", _thresholds(self.thresholds))
        if self.kernels not in ("auto", "off"):
            raise ConfigError(f"kernels must be 'auto' (measure the training precision where "
                              f"it differs from float64) or 'off', got {self.kernels!r}.")
        if self.sharded not in SHARDED_STRATEGIES:
            raise ConfigError(f"sharded must be 'auto', 'gathered' (rank 0 checks a gathered "
                              f"float64 copy) or 'collective' (no rank gathers the model), got "
                              f"{self.sharded!r}.")
        object.__setattr__(self, "kernel_thresholds", _thresholds(
            self.kernel_thresholds, RatioThresholds, "kernel_thresholds", "{'warn': 12, "
            "'alert': 32}"))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            globs = glob_list(value, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(globs))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}.")
        for name, low in (("samples", 1), ("directions", 1), ("top_k", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int ≥ {low}, got {value!r}.")

    def settings(self, entry: Entry, *, loss_scale: float | None = None) -> CheckSettings:
        """The settings of one check run by `entry`: `mode` and `budget` from
        `ENTRY_DEFAULTS` where this object leaves them out."""
        if loss_scale is not None and (isinstance(loss_scale, bool) or not isinstance(
                loss_scale, (int, float)) or not math.isfinite(loss_scale) or loss_scale < 0):
            raise ConfigError(f"loss_scale must be a finite float ≥ 0 (the size of the terms "
                              f"the loss is computed from, e.g. its value at initialisation) "
                              f"or None, got {loss_scale!r}.")
        mode, budget = ENTRY_DEFAULTS[entry]
        assert isinstance(self.thresholds, Thresholds)  # made one in __post_init__
        return CheckSettings(
            eps=float(self.eps), mode=mode if self.mode is DEFAULT else self.mode,
            thresholds=self.thresholds, budget=budget if self.budget is DEFAULT else self.budget,
            seed=self.seed, samples=self.samples, directions=self.directions, top_k=self.top_k,
            loss_scale=float(loss_scale or 0.0), kernels=self.kernels,
            kernel_thresholds=self.kernel_thresholds,  # type: ignore[arg-type]
            sharded=self.sharded,
        )


def check_settings(
    entry: Entry,
    options: CheckOptions | Mapping[str, Any] | None,
    *,
    loss_scale: float | None = None,
    argument: str = "options",
    **shorthands: Any,
) -> tuple[CheckOptions, CheckSettings]:
    """`options` (the entry point's `argument=`) with the keyword shorthands it was given
    filled in (a setting given both ways is a ConfigError), and the settings of its check."""
    merged = with_shorthands(CheckOptions, options, shorthands, argument=argument, entry=entry)
    return merged, merged.settings(entry, loss_scale=loss_scale)


def _check_eps(eps: Any) -> None:
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


def _check_budget(budget: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ConfigError(f"budget must be an int (loss evaluations) or None, got {budget!r}.")
    if budget < 4:
        raise ConfigError(
            f"budget={budget} is too small to check anything: a check needs 2 evaluations "
            f"of J(θ) plus 2 per coordinate, so at least 4. Raise budget (default 2000)."
        )


def _thresholds(thresholds: Any, kind: type[Any] = Thresholds, argument: str = "thresholds",
                example: str = "{'warn': 1e-5, 'alert': 1e-3}") -> Any:
    if isinstance(thresholds, kind):
        return thresholds
    if isinstance(thresholds, Mapping):
        return kind(**thresholds)
    raise ConfigError(
        f"{argument} must be a gradwatch.{kind.__name__} or a dict like {example}, got "
        f"{type(thresholds).__name__}."
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
class TensorState:
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
