"""The report every gradient check returns: `CheckReport`, `LayerReport`, `ElementReport`.

The report is the contract between the engine and everything that consumes it (the callback,
the MLflow record, the monitor, the dashboards). It is a pydantic v2 model that round-trips
through JSON; `schema_version` changes whenever a field changes meaning.

Distances are *relative distances* (see docs/numerics.md)::

    rel_distance = ||dθapprox − dθ||₂ / (||dθapprox||₂ + ||dθ||₂)

< 1e-7 great, ~1e-5 worth a look, ≥ 1e-3 very likely a bug in the backward pass.

Imports: gradwatch.common, engine.summary (to render itself).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gradwatch.common.errors import ConfigError

__all__ = [
    "SCHEMA_VERSION",
    "CheckReport",
    "ElementReport",
    "KernelElement",
    "KernelLayer",
    "KernelReport",
    "LayerReport",
    "Mode",
    "RatioThresholds",
    "Thresholds",
    "Verdict",
]

SCHEMA_VERSION = 1

Verdict = Literal["ok", "warn", "alert", "error"]
Mode = Literal["full", "sample", "sketch", "auto"]

#: Severity order of verdicts; `max` over it gives the combined verdict.
VERDICT_RANK: dict[str, int] = {"ok": 0, "warn": 1, "alert": 2, "error": 3}


def worst_verdict(*verdicts: Verdict) -> Verdict:
    """The most severe of `verdicts` ("ok" when none are given)."""
    worst: Verdict = "ok"
    for verdict in verdicts:
        if VERDICT_RANK[verdict] > VERDICT_RANK[worst]:
            worst = verdict
    return worst


class Thresholds(BaseModel):
    """Where a relative distance turns into a warning or an alert.

    Example:
        >>> Thresholds(warn=1e-6, alert=1e-4).classify(5e-5)
        'warn'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    warn: float = Field(default=1e-5, description="distance from which a check warns")
    alert: float = Field(default=1e-3, description="distance from which a check alerts")

    def __init__(self, **data: float) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:  # one exception tree: a bad setting is a ConfigError
            messages = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise ConfigError(f"Invalid Thresholds: {messages}") from None

    @model_validator(mode="after")
    def _check_order(self) -> Thresholds:
        for name in ("warn", "alert"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"Thresholds.{name} must be a finite number > 0, got {value!r}. "
                    f"Typical values: warn=1e-5, alert=1e-3."
                )
        if not self.warn < self.alert:
            raise ConfigError(
                f"Thresholds.warn must be below Thresholds.alert, got warn={self.warn!r} "
                f"and alert={self.alert!r}. Swap them or pick e.g. warn=1e-5, alert=1e-3."
            )
        return self

    def level(self, verdict: str) -> float:
        """The threshold a "warn" or "alert" verdict was reached at."""
        return self.alert if verdict == "alert" else self.warn

    def classify(self, distance: float) -> Verdict:
        """The verdict a relative distance earns on its own (non-finite → "alert")."""
        if not math.isfinite(distance) or distance >= self.alert:
            return "alert"
        if distance >= self.warn:
            return "warn"
        return "ok"


class RatioThresholds(BaseModel):
    """Where the training-kernels ratio turns into a warning or an alert.

    The ratio is (distance of the training gradient from the float64 one) / (distance of an
    emulated correct computation at the training precision from it); correct models measured
    on the HF zoo stay below ~5 (bf16 parameters, the longest reductions), a wrong backward
    reaches 50 and more at bf16 and 10⁴ at float32.

    Example:
        >>> RatioThresholds().classify(40.0), RatioThresholds(warn=2, alert=4).classify(3)
        ('alert', 'warn')
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    warn: float = Field(default=12.0, description="ratio from which the measurement warns")
    alert: float = Field(default=32.0, description="ratio from which the measurement alerts")

    def __init__(self, **data: float) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            messages = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise ConfigError(f"Invalid RatioThresholds: {messages}") from None

    @model_validator(mode="after")
    def _check_order(self) -> RatioThresholds:
        for name in ("warn", "alert"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 1):
                raise ConfigError(
                    f"RatioThresholds.{name} must be a finite number > 1 (a ratio of "
                    f"distances; 1 is a correct kernel's), got {value!r}. Defaults: warn=12, "
                    f"alert=32."
                )
        if not self.warn < self.alert:
            raise ConfigError(
                f"RatioThresholds.warn must be below .alert, got warn={self.warn!r} and "
                f"alert={self.alert!r}. Swap them or pick e.g. warn=12, alert=32."
            )
        return self

    def classify(self, ratio: float) -> Verdict:
        """The verdict a ratio earns (non-finite → "alert")."""
        if not math.isfinite(ratio) or ratio >= self.alert:
            return "alert"
        return "warn" if ratio >= self.warn else "ok"


class ElementReport(BaseModel):
    """One checked element of a parameter tensor."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    index: tuple[int, ...] = Field(description="unravelled index into the parameter tensor")
    analytic: float = Field(description="dθ[i] from backprop")
    numeric: float = Field(description="dθapprox[i] from central differences")
    abs_diff: float = Field(description="|numeric − analytic|")
    rel_error: float = Field(
        description="abs_diff / max(|analytic| + |numeric|, noise floor): floor-protected"
    )
    kink: bool = Field(
        default=False,
        description="the central difference straddles a non-differentiable point",
    )


class LayerReport(BaseModel):
    """The check of one parameter tensor (a "layer" in reports and in MLflow)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    rel_distance: float = Field(description="floor-protected relative distance of this tensor")
    verdict: Verdict
    numel: int = Field(description="elements in the tensor")
    checked: int = Field(description="elements checked by central differences")
    directions: int = Field(default=0, description="random ±1 directions checked (sketch)")
    estimated: bool = Field(description="rel_distance is estimated from a subset or sketch")
    kinks: int = Field(default=0, description="elements left out because they straddle a kink")
    rel_distance_without_kinks: float | None = Field(
        default=None, description="the distance the verdict used, when kinks were left out"
    )
    worst: list[ElementReport] = Field(default_factory=list, description="worst elements first")
    shape: tuple[int, ...] = ()
    screened: bool = Field(
        default=False, description="looked at by the joint screen of every tensor (auto mode)"
    )
    excluded: int = Field(
        default=0, description="elements left out by design (an embedding's padding_idx row)"
    )
    grad_norm: float = Field(default=0.0, description="||dθ|| of the checked part")
    noise_floor: float = Field(default=0.0, description="rounding-noise level of ||dθapprox||")
    notes: list[str] = Field(default_factory=list, description="why the verdict is what it is")


class KernelElement(BaseModel):
    """One element of a tensor's gradient as training computes it, against the references."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    index: tuple[int, ...] = Field(description="unravelled index into the parameter tensor")
    training: float = Field(description="dθ[i] as training computes it (dtype, kernels)")
    reference: float = Field(description="dθ[i] by float64 backprop (validated by central "
                                         "differences)")
    emulated: float = Field(description="dθ[i] by the float64 path rounded to the training "
                                        "precision")


class KernelLayer(BaseModel):
    """The training-kernels measurement of one parameter tensor."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    distance: float = Field(description="relative distance of the training gradient from the "
                                        "float64 reference (floor-protected)")
    reference_distance: float = Field(description="the same distance for the emulated "
                                                  "computation at the training precision")
    ratio: float = Field(description="distance / max(reference_distance, unit roundoff)")
    verdict: Verdict
    numel: int = 0
    worst: list[KernelElement] = Field(default_factory=list, description="largest "
                                       "|training − reference| first")


class KernelReport(BaseModel):
    """The second measurement of a check: the gradient training computes (its dtype, autocast,
    compiled graph, custom ops, device) against the float64 reference, judged by the error
    that an emulated correct computation at the same precision makes (docs/numerics.md).

    `status`: "measured"; "same" (the training path is the float64 check's own: float32 eager
    on CPU without autocast or custom autograd ops, nothing more to measure); "off" (not
    asked for); "error" (could not measure, `reasons` says why). `verdict` is None unless
    measured or error.
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    status: Literal["measured", "same", "off", "error"]
    verdict: Verdict | None = None
    reasons: list[str] = Field(default_factory=list)
    dtype: str = Field(default="", description="the training precision emulated (the lowest "
                                               "floating dtype training computes in)")
    autocast: str | None = Field(default=None, description="autocast dtype, when training "
                                                           "runs under autocast")
    compiled: bool = False
    device: str = ""
    custom_ops: list[str] = Field(default_factory=list, description="custom autograd ops seen")
    distance: float = math.nan
    reference_distance: float = math.nan
    ratio: float = Field(default=math.nan, description="the largest layer ratio")
    thresholds: RatioThresholds = Field(default_factory=RatioThresholds)
    layers: dict[str, KernelLayer] = Field(default_factory=dict)
    seconds: float = 0.0

    def worst_layers(self, k: int = 3) -> list[tuple[str, KernelLayer]]:
        """The `k` layers with the largest ratios, worst first."""
        return sorted(self.layers.items(), key=lambda item: _sortable(item[1].ratio),
                      reverse=True)[:k]


class CheckReport(BaseModel):
    """The result of one gradient check.

    Example:
        >>> import numpy as np, gradwatch
        >>> params = {"w": np.array([1.0, 2.0])}
        >>> report = gradwatch.check(lambda p: float((p["w"] ** 2).sum()), params,
        ...                          {"w": 2 * params["w"]})
        >>> report.verdict, report.rel_distance < 1e-7
        ('ok', True)
        >>> type(report).model_validate_json(report.model_dump_json()) == report
        True
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    schema_version: int = SCHEMA_VERSION
    rel_distance: float = Field(description="overall relative distance (NaN if not computed)")
    estimated: bool = Field(
        default=False, description="rel_distance is estimated (directions, a subset), not exact"
    )
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list, description="why the verdict is what it is")
    mode: Literal["full", "sample", "sketch", "auto"]
    strategy: str = Field(default="", description="what auto mode chose, per phase")
    eps: float
    thresholds: Thresholds = Field(default_factory=Thresholds)
    coordinates: int = Field(description="coordinates checked by central differences")
    directions: int = Field(default=0, description="random directions checked (sketch)")
    evaluations: int = Field(description="loss evaluations spent")
    seconds: float
    evaluation_seconds: float = Field(
        default=0.0, description="of `seconds`, the part spent evaluating the loss"
    )
    loss: float = Field(description="J(θ) at the checked point, in float64")
    noise_floor: float = Field(default=0.0, description="estimated rounding noise per element")
    kinks: int = 0
    rel_distance_without_kinks: float | None = Field(
        default=None, description="the distance the verdict used, when kinks were left out"
    )
    max_element_error: float = Field(default=0.0, description="largest element rel_error")
    layers: dict[str, LayerReport] = Field(default_factory=dict)
    coverage: dict[str, int] = Field(
        default_factory=dict,
        description="tensors in the check: screened (jointly), localised, measured, excluded "
                    "elements",
    )
    precision: dict[str, object] = Field(
        default_factory=dict,
        description="float64 integrity: rounding of one loss evaluation (delta_j_relative), "
                    "casts kept at float64 by the guard, modules that still lose precision",
    )
    probe: dict[str, object] = Field(
        default_factory=dict, description="what the check ran on (shapes, step, source)"
    )
    definition_verdict: Verdict | None = Field(
        default=None, description="the central-difference measurement's own verdict, set "
                                  "whenever the training-kernels measurement ran (its verdict is "
                                  "folded into `verdict`); None when it did not"
    )
    kernels: KernelReport | None = Field(
        default=None, description="the training-kernels measurement (PyTorch checks): the "
                                  "gradient at the training precision against the float64 one"
    )

    # ------------------------------------------------------------------ reading
    def worst_layers(self, k: int = 3) -> list[tuple[str, LayerReport]]:
        """The `k` layers with the largest distances, worst first."""
        ranked = sorted(
            self.layers.items(),
            key=lambda item: (VERDICT_RANK[item[1].verdict], _sortable(item[1].rel_distance)),
            reverse=True,
        )
        return ranked[:k]

    def fired_by(self) -> list[str]:
        """The measurements whose verdict is this report's: "backprop definition" (central
        differences on the float64 model) and/or "training kernels" (the training precision)."""
        definition = self.definition_verdict or self.verdict
        kernels = self.kernels.verdict if self.kernels is not None else None
        found = [name for name, verdict in (("backprop definition", definition),
                                            ("training kernels", kernels))
                 if verdict == self.verdict]
        return found or ["backprop definition"]

    @property
    def ok(self) -> bool:
        """True when the verdict is "ok" or "warn" (nothing that should fail a test)."""
        return self.verdict in ("ok", "warn")

    def summary(self, *, max_layers: int = 20, max_elements: int = 3) -> str:
        """A human-readable table for a terminal or a test failure."""
        from gradwatch.engine.summary import render_summary

        return render_summary(self, max_layers=max_layers, max_elements=max_elements)

    def __str__(self) -> str:
        return self.summary()


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value  # not measured: below every distance
