"""`CheckPlan`: what one check of a `GradWatch` should do, as handed to adapters' checks.

Imports: gradwatch.common, gradwatch.engine (the settings), gradwatch.watch (the rotation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradwatch.common.settings import DEFAULT, Default
from gradwatch.engine.report import Mode, Thresholds
from gradwatch.engine.types import CheckOptions, CheckSettings
from gradwatch.watch.budget import Rotation

__all__ = ["CheckPlan"]


class CheckPlan:
    """What one check should do: handed to the `run` of `GradWatch.check_with` (adapters).

    `samples`, `directions` and `top_k` are the watch's when its `CheckOptions` sets them
    (`DEFAULT` otherwise: the engine's defaults).

    Example:
        >>> from gradwatch.watch.budget import Rotation
        >>> plan = CheckPlan(step=10, mode="auto", eps=1e-7, budget=30, thresholds=Thresholds(),
        ...                  seed=10, rotation=Rotation())
        >>> plan.tensors({"w": 1000, "b": 10})  # 30 evaluations cannot cover both
        ['w']
        >>> sorted(plan.check_kwargs())
        ['budget', 'eps', 'mode', 'seed', 'thresholds']
        >>> plan.settings().budget
        30
    """

    def __init__(self, *, step: int, mode: Mode, eps: float, budget: int,
                 thresholds: Thresholds, seed: int, rotation: Rotation | None,
                 samples: int | Default = DEFAULT, directions: int | Default = DEFAULT,
                 top_k: int | Default = DEFAULT) -> None:
        self.step, self.mode, self.eps, self.budget = step, mode, eps, budget
        self.thresholds, self.seed, self.rotation = thresholds, seed, rotation
        self.samples, self.directions, self.top_k = samples, directions, top_k
        self.rotating = False
        self._chosen: tuple[list[str] | None] | None = None

    def check_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `gradwatch.check` / `check_module` / `check_jax`."""
        kwargs = {"mode": self.mode, "eps": self.eps, "budget": self.budget,
                  "thresholds": self.thresholds, "seed": self.seed}
        for name in ("samples", "directions", "top_k"):
            if getattr(self, name) is not DEFAULT:
                kwargs[name] = getattr(self, name)
        return kwargs

    def settings(self) -> CheckSettings:
        """The engine's settings for this check (adapters that run the engine themselves)."""
        return CheckOptions(**self.check_kwargs()).settings("GradWatch")

    def tensors(self, sizes: Mapping[str, int]) -> list[str] | None:
        """The tensors (name → element count, in the model's order) this check covers: None
        for all of them, or the next ones of the rotation when the budget cannot cover them
        all (the following checks cover the rest). Decided once per check."""
        if self._chosen is None:
            chosen = self.rotation.pick(sizes, self.budget) if self.rotation else None
            self._chosen = (chosen,)
            self.rotating = chosen is not None
        return self._chosen[0]
