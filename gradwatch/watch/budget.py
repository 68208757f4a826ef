"""Sizing each check so gradwatch costs a fixed share of training time.

With `GradWatch(budget=None)` (the default) a check of n loss evaluations is modelled as
costing  F + n·e  seconds: F the part that does not grow with n (the float64 copy, the backward,
the report and its spooling) and e the seconds per loss evaluation, both taken from the
previous checks (medians of the last few, robust to a slow spell). The next check gets

    n = (overhead · (steps since the last check) · (seconds per training step) − F) / e

evaluations, clamped to [MINIMUM, MAXIMUM]. MINIMUM is what PyTorch's joint screen of every
tensor costs (`_screen`: J twice, the noise measurement, 3 directions), so even a check at the
floor looks at every tensor. Backends that perturb one tensor at a time (Keras, JAX) cover the
next tensors of a rotation instead, the following checks covering the rest. The seconds per
training step are the wall time of the loop over the STEP_WINDOW steps before a check, divided
by those steps: nothing is timed on the steps before, and a pause of the loop earlier in the
interval (an evaluation, a checkpoint, another job on the machine) does not inflate what a check
may spend. (With a wall-clock schedule the next due step is unknown: the whole interval.)

Imports: nothing else of gradwatch.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["STEP_WINDOW", "AdaptiveBudget", "Rotation"]

#: Training steps timed before each check (the seconds per step the allowance is built on).
STEP_WINDOW = 20

#: First check (nothing measured yet): enough for a small model's full check.
FIRST_BUDGET = 256
#: The joint screen's cost: 2 (J twice) + 2 (half step) + 3 directions × 2
#: (`_screen.SCREEN_DIRECTIONS`).
MINIMUM = 10
MAXIMUM = 2000
#: What auto mode needs to say something useful about one large tensor: a 4-direction screen
#: and a few coordinates.
PER_TENSOR = 40


class AdaptiveBudget:
    """Measures training steps and checks; proposes the next check's evaluation budget.

    Example:
        >>> budget = AdaptiveBudget(0.01)
        >>> for _ in range(10):
        ...     budget.step_finished(0.005)  # 5 ms training steps
        >>> budget.check_finished(0.030, evaluations=24, evaluation_seconds=0.012)
        >>> budget.next_budget(1000)  # (0.01 · 1000 · 5 ms − 18 ms) / 0.5 ms
        64
    """

    def __init__(self, overhead: float, *, window: int = 50, checks: int = 5) -> None:
        self.overhead = overhead
        self.step_seconds: deque[float] = deque(maxlen=window)
        self.fixed_seconds: deque[float] = deque(maxlen=checks)
        self.eval_seconds: deque[float] = deque(maxlen=checks)  # per evaluation

    def step_finished(self, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self.step_seconds.append(seconds)

    def check_finished(
        self, seconds: float, evaluations: int, evaluation_seconds: float = 0.0
    ) -> None:
        """Record a check that took `seconds` in all, `evaluation_seconds` of them in
        `evaluations` loss evaluations (0: not measured, all of it counts per evaluation)."""
        if not (evaluations > 0 and seconds > 0 and math.isfinite(seconds)):
            return  # an errored check says nothing about the cost of evaluations
        if 0 < evaluation_seconds <= seconds:
            self.eval_seconds.append(evaluation_seconds / evaluations)
            self.fixed_seconds.append(seconds - evaluation_seconds)
        else:
            self.eval_seconds.append(seconds / evaluations)
            self.fixed_seconds.append(0.0)

    def next_budget(self, steps_since_last: int) -> int:
        if not self.eval_seconds or not self.step_seconds:
            return FIRST_BUDGET
        step = statistics.median(self.step_seconds)
        allowed = self.overhead * max(steps_since_last, 1) * step
        spare = allowed - statistics.median(self.fixed_seconds)
        per_evaluation = statistics.median(self.eval_seconds)
        return int(min(MAXIMUM, max(MINIMUM, spare / per_evaluation)))

    def state_dict(self) -> dict[str, Any]:
        return {"eval_seconds": list(self.eval_seconds),
                "fixed_seconds": list(self.fixed_seconds)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        per_eval, fixed = state.get("eval_seconds"), state.get("fixed_seconds")
        if isinstance(per_eval, (int, float)):  # written by gradwatch ≤ 0.1: one number
            per_eval, fixed = [per_eval], [0.0]
        if isinstance(per_eval, list) and isinstance(fixed, list) and len(per_eval) == len(fixed):
            self.eval_seconds.clear()
            self.fixed_seconds.clear()
            self.eval_seconds.extend(float(v) for v in per_eval)
            self.fixed_seconds.extend(float(v) for v in fixed)


class Rotation:
    """Round-robin over parameter tensors for checks that cannot cover them all at once."""

    def __init__(self) -> None:
        self.cursor = 0

    def pick(self, sizes: Mapping[str, int], budget: int) -> list[str] | None:
        """Tensors for a check of `budget` evaluations; None when everything fits (full)."""
        names = list(sizes)
        if not names or 2 * sum(sizes.values()) + 2 <= budget:
            return None
        chosen: list[str] = []
        spent = 2
        start = self.cursor % len(names)
        for offset in range(len(names)):
            name = names[(start + offset) % len(names)]
            cost = min(2 * sizes[name], PER_TENSOR)
            if chosen and spent + cost > budget:
                break
            chosen.append(name)
            spent += cost
        self.cursor = (start + len(chosen)) % len(names)
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cursor = int(state.get("cursor", self.cursor))
