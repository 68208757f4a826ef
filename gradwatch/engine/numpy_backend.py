"""`gradwatch.check`: the framework-free check over dicts of numpy arrays.

This is the textbook recipe: θ is every parameter flattened and concatenated in the order of
`params`; for each coordinate, dθapprox[i] = (J(θ + ε·e_i) − J(θ − ε·e_i)) / (2ε) with all other
coordinates unchanged; the distance is ||dθapprox − dθ||₂ / (||dθapprox||₂ + ||dθ||₂).

Imports: gradwatch.common, engine.types, engine.core, engine.report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.errors import ConfigError, InputError, LossError
from gradwatch.common.progress import resolve_progress
from gradwatch.common.settings import DEFAULT, Default
from gradwatch.engine.core import run_check
from gradwatch.engine.report import CheckReport, Mode, Thresholds
from gradwatch.engine.types import CheckOptions, CheckSettings, check_settings, select_names

__all__ = ["check"]

Vector = NDArray[np.float64]
Cost = Callable[[dict[str, NDArray[np.float64]]], Any]


def check(
    cost: Cost,
    params: Mapping[str, Any],
    grads: Mapping[str, Any],
    *,
    options: CheckOptions | Mapping[str, Any] | None = None,
    eps: float | Default | None = DEFAULT,
    mode: Mode | Default = DEFAULT,
    thresholds: Thresholds | Mapping[str, float] | Default | None = DEFAULT,
    seed: int | Default = DEFAULT,
    budget: int | Default | None = DEFAULT,
    samples: int | Default = DEFAULT,
    directions: int | Default = DEFAULT,
    top_k: int | Default = DEFAULT,
    include: str | Sequence[str] | Default | None = DEFAULT,
    exclude: str | Sequence[str] | Default | None = DEFAULT,
    progress: bool | Callable[[int, int], None] = False,
) -> CheckReport:
    """Check backprop gradients `grads` of `cost` at `params` by central differences.

    Args:
        cost: `cost(params_dict) -> float`, the full objective J(θ). It receives float64 copies
            of `params` (never your arrays) and must not modify them.
        params: name → array. Their order is the order of θ.
        grads: name → dθ with the same shapes. Keys may be the parameter names or, as in the
            classic course code, "d" + name ("dW1" for "W1").
        options: the check's `gradwatch.CheckOptions` (mode, budget, eps, thresholds,
            include, exclude, seed, samples, directions, top_k; its table has their defaults).
            Here mode defaults to "full" (every coordinate, the recipe) and budget to None
            (unlimited; ignored by "full").
        eps, mode, thresholds, seed, budget, samples, directions, top_k, include, exclude:
            shorthands for the fields of `options` (give each setting one way). `include` and
            `exclude` are globs over the names of `params`; the others are held fixed.
        progress: True for a progress bar on stderr, or a callable(done, total).

    Example:
        >>> import numpy as np, gradwatch
        >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> params = {"W": np.array([[0.5, -0.25]])}
        >>> cost = lambda p: float(np.sum((x @ p["W"].T) ** 2))
        >>> grads = {"dW": 2 * ((x @ params["W"].T).T @ x)}
        >>> gradwatch.check(cost, params, grads).verdict
        'ok'
    """
    options, settings = check_settings(
        "check", options, eps=eps, mode=mode, thresholds=thresholds, seed=seed, budget=budget,
        samples=samples, directions=directions, top_k=top_k, include=include, exclude=exclude,
    )
    if not callable(cost):
        raise ConfigError(
            f"cost must be a function cost(params) -> float, got {type(cost).__name__} "
            f"{cost!r}; e.g. cost=lambda p: float(((x @ p['W'].T - y) ** 2).mean())."
        )
    values = _as_float64_params(params)
    analytic = _match_grads(values, grads)
    if options.include is not None or options.exclude is not None:
        names = select_names(list(analytic), options.include, options.exclude, what="params")
        analytic = {name: analytic[name] for name in names}
    return _run(cost, values, analytic, settings, progress)


def _run(
    cost: Cost,
    values: dict[str, Vector],
    analytic: dict[str, Vector],
    settings: CheckSettings,
    progress: bool | Callable[[int, int], None],
) -> CheckReport:
    objective = _DictObjective(cost, values)
    shapes = {name: list(value.shape) for name, value in values.items()}
    with resolve_progress(progress, "gradwatch check") as report_progress:
        return run_check(
            objective, analytic, settings, probe={"source": "check", "shapes": shapes},
            progress=report_progress,
        )


def _as_float64_params(params: Mapping[str, Any]) -> dict[str, Vector]:
    if not isinstance(params, Mapping) or not params:
        raise InputError(
            f"params must be a non-empty dict of name → numpy array, got "
            f"{type(params).__name__}{' (empty)' if isinstance(params, Mapping) else ''}."
        )
    values: dict[str, Vector] = {}
    for name, value in params.items():
        array = np.asarray(value)
        if array.dtype.kind not in "f":
            raise InputError(
                f"params[{name!r}] has dtype {array.dtype}; central differences need "
                f"floating-point parameters (an integer cannot move by eps). Pass "
                f"params[{name!r}].astype(np.float64), or leave it out of params."
            )
        values[str(name)] = np.array(array, dtype=np.float64, copy=True)  # never the user's
    return values


def _match_grads(values: Mapping[str, Vector], grads: Mapping[str, Any]) -> dict[str, Vector]:
    if not isinstance(grads, Mapping):
        raise InputError(f"grads must be a dict of name → array, got {type(grads).__name__}.")
    analytic: dict[str, Vector] = {}
    missing = []
    for name, value in values.items():
        key = name if name in grads else ("d" + name if "d" + name in grads else None)
        if key is None:
            missing.append(name)
            continue
        grad = np.asarray(grads[key])
        if grad.shape != value.shape:
            raise InputError(
                f"grads[{key!r}] has shape {grad.shape} but params[{name!r}] has shape "
                f"{value.shape}; each gradient must have its parameter's shape. Check that "
                f"the backward pass returns d{name} for {name} (not its transpose)."
            )
        if grad.dtype.kind not in "fiu":
            raise InputError(f"grads[{key!r}] has dtype {grad.dtype}; expected real numbers.")
        analytic[name] = np.array(grad, dtype=np.float64)
    if missing:
        raise InputError(
            f"grads has no entry for params {missing}; expected keys {list(values)} (or "
            f"{['d' + n for n in values]}), got {list(grads)}. Pass one gradient per parameter."
        )
    extra = set(map(str, grads)) - set(values) - {"d" + n for n in values}
    if extra:
        raise InputError(
            f"grads has keys {sorted(extra)} that match no parameter; expected keys "
            f"{list(values)} (or with a 'd' prefix). Remove them or add the parameters."
        )
    return analytic


def loss_as_float(value: Any, where: str) -> float:
    """Turn a cost's return value into a float, or explain why it cannot be one."""
    array = np.asarray(value)
    if array.size != 1:
        raise LossError(
            f"{where} must return a scalar loss, got an array of shape {array.shape}. "
            f"Reduce it (e.g. .mean() or .sum()) to the single number you minimise."
        )
    if array.dtype.kind not in "fiub":
        raise LossError(f"{where} must return a real number, got dtype {array.dtype}.")
    return float(array.reshape(()))


class _DictObjective:
    """J over a dict of float64 arrays that gradwatch owns; perturbs one entry at a time."""

    def __init__(self, cost: Cost, values: dict[str, Vector]) -> None:
        self.cost = cost
        self.values = values
        self.calls = 0

    def _evaluate(self) -> float:
        self.calls += 1
        try:
            value = self.cost(dict(self.values))
        except Exception as exc:
            if self.calls == 1:
                raise LossError(
                    f"cost(params) raised {type(exc).__name__}: {exc}. gradwatch calls "
                    f"cost with a dict of float64 arrays keyed like params; make sure cost "
                    f"accepts that."
                ) from exc
            raise
        return loss_as_float(value, "cost(params)")

    def loss(self) -> float:
        return self._evaluate()

    def coordinate_losses(
        self, layer: str, indices: NDArray[np.int64], eps: float
    ) -> tuple[Vector, Vector]:
        flat = self.values[layer].reshape(-1)  # a view: the dict sees every change
        plus = np.empty(indices.size)
        minus = np.empty(indices.size)
        for k, i in enumerate(indices):
            original = flat[i]
            flat[i] = original + eps  # θ + ε·e_i, as the recipe: θ[i] + ε
            plus[k] = self._evaluate()
            flat[i] = original - eps
            minus[k] = self._evaluate()
            flat[i] = original  # restored exactly, not by subtracting ε
        return plus, minus

    def direction_losses(
        self, layer: str, directions: Vector, steps: Vector
    ) -> tuple[Vector, Vector, Vector]:
        base = self.values[layer]
        plus = np.empty(directions.shape[0])
        minus = np.empty(directions.shape[0])
        realised = np.empty_like(directions)
        try:
            for k, (direction, step) in enumerate(zip(directions, steps)):
                delta = step * direction.reshape(base.shape)
                up, down = base + delta, base - delta
                realised[k] = ((up - down) / 2).reshape(-1)  # exact: up and down are close
                self.values[layer] = up
                plus[k] = self._evaluate()
                self.values[layer] = down
                minus[k] = self._evaluate()
        finally:
            self.values[layer] = base
        return plus, minus, realised
