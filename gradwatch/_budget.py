"""Sizing each check so gradwatch costs a fixed share of training time.

With `GradWatch(budget=None)` (the default) every check gets

    budget = overhead · (steps since the last check) · (seconds per training step)
             / (seconds per loss evaluation of the last check)

loss evaluations, clamped to [MINIMUM, MAXIMUM]. When that budget cannot cover every parameter
tensor, the check covers the next tensors of a rotation and the following checks cover the
rest, so a bug in any one layer is still found — within a few checks instead of one. Step
time excludes the time spent in checks; the seconds per evaluation include the check's fixed
costs (the float64 copy, the backward), so the estimate errs on the cheap side.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["AdaptiveBudget", "Rotation"]

#: First check (nothing measured yet): enough for a small model's full check.
FIRST_BUDGET = 256
MINIMUM = 24
MAXIMUM = 2000
#: What auto mode needs to say something useful about one large tensor: a 4-direction screen
#: and a few coordinates.
PER_TENSOR = 40


class AdaptiveBudget:
    """Measures training steps and checks; proposes the next check's evaluation budget."""

    def __init__(self, overhead: float, *, window: int = 50) -> None:
        self.overhead = overhead
        self.step_seconds: deque[float] = deque(maxlen=window)
        self.eval_seconds: float | None = None

    def step_finished(self, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self.step_seconds.append(seconds)

    def check_finished(self, seconds: float, evaluations: int) -> None:
        if evaluations > 0 and seconds > 0:
            self.eval_seconds = seconds / evaluations

    def next_budget(self, steps_since_last: int) -> int:
        if self.eval_seconds is None or not self.step_seconds:
            return FIRST_BUDGET
        ordered = sorted(self.step_seconds)
        step = ordered[len(ordered) // 2]  # median: robust to the odd slow step
        allowed = self.overhead * max(steps_since_last, 1) * step
        return int(min(MAXIMUM, max(MINIMUM, allowed / self.eval_seconds)))

    def state_dict(self) -> dict[str, Any]:
        return {"eval_seconds": self.eval_seconds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.eval_seconds = state.get("eval_seconds", self.eval_seconds)


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
