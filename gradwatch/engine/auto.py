"""`mode="auto"`: the exact recipe when it fits the budget, otherwise a search within it.

With a backend that perturbs several tensors at once (`JointObjective`: PyTorch, numpy):
  1. screen   every tensor at once along a few joint random directions (`_screen`): ~10
              evaluations whatever the tensor count, and a significance test against the
              measured rounding noise (which also verifies that float64 held);
  2. locate   when it fires: group testing over tensors, then rows and elements, bounded by
              `_screen.LOCALISE_LIMIT` evaluations (reported when over the budget);
  3. measure  the located tensors: restricted directions (an estimated layer distance) and
              the coordinates of the located region (the element rule);
  4. spare    what is left of the budget measures tensors picked at random: small ones
              exactly, others along 2 restricted directions each.

Other backends (one tensor at a time), with P parameters and a budget of B (B < 2P + 2):
  1. exact   small tensors (biases, norms) get every coordinate, up to a fifth of B;
  2. screen  every other tensor gets a few random ±1 directions: an estimate of its distance
             that costs 2 evaluations per direction whatever the tensor's size;
  3. locate  a tensor whose estimate reaches the warn threshold is bisected — rows first, then
             elements of a single row — with one ±1 direction on each half: the half that keeps
             the disagreement holds the bug. A one-row or one-element bug is found in
             ~4·log2(rows · cols) evaluations;
  4. elements the rest of the budget goes to coordinates: inside the located region first,
             then the largest-|dθ| and random coordinates of every tensor not checked exactly,
             so `worst` points at the bad row/element and the element rule sees sparse bugs.

Imports: engine.types, engine.screen.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gradwatch.engine.screen import SCREEN_DIRECTIONS, JointScreen
from gradwatch.engine.types import Directional

if TYPE_CHECKING:
    from gradwatch.engine.core import Engine
    from gradwatch.engine.types import TensorState

__all__ = ["run_auto", "verify_precision"]

#: Shares of the budget for the exact, screening and localisation phases.
EXACT_SHARE = 0.2
SCREEN_SHARE = 0.2
LOCATE_SHARE = 0.2
#: Directions per tensor when screening (more only makes the estimate smoother).
TENSOR_SCREEN_DIRECTIONS = 4
#: Coordinates checked inside a located region.
REGION_COORDINATES = 32


def run_auto(engine: Engine) -> None:
    tensors = list(engine.tensors.values())
    if engine.settings.budget is None or 2 * engine.n_active <= engine.remaining:
        verify_precision(engine)
        if not engine.precision_lost:
            engine.run_full()
        return
    if hasattr(engine.objective, "joint_losses"):
        _run_joint(engine)
        return
    budget = engine.remaining
    rest = _exact_small(engine, tensors, int(budget * EXACT_SHARE))
    if not rest:
        return
    k = int(np.clip(budget * SCREEN_SHARE // (2 * len(rest)), 1, TENSOR_SCREEN_DIRECTIONS))
    for tensor in rest:
        if engine.remaining >= 2:
            engine.sketch(tensor, int(min(k, engine.remaining // 2)))
    engine.strategy.append(f"screen {k} directions × {len(rest)} tensors")

    noise = engine.noise()
    screened = {t.name: _screen_distance(t, noise) for t in rest}
    suspects = [t for t in rest if screened[t.name] >= engine.settings.thresholds.warn]
    suspects.sort(key=lambda t: -screened[t.name])
    locate_budget = int(budget * LOCATE_SHARE)
    for tensor in suspects:
        share = locate_budget // max(len(suspects), 1)
        region = _locate(engine, tensor, min(share, engine.remaining - 2), noise)
        if region.size < tensor.numel:
            engine.strategy.append(f"located {tensor.name}: {_describe(region, tensor)}")
            count = min(REGION_COORDINATES, engine.remaining // 2)
            engine.coordinates(tensor, engine.sample_indices(tensor, count, pool=region))
    per_tensor = (engine.remaining // 2) // len(rest)
    if per_tensor >= 1:
        engine.run_sample(per_tensor, rest)


def verify_precision(engine: Engine) -> None:
    """Measure the rounding of one loss evaluation along a joint direction (4 evaluations,
    backends that perturb tensors jointly): a full check is only as good as float64 is."""
    if hasattr(engine.objective, "joint_losses") and any(
            t.active for t in engine.tensors.values()):
        engine.screen = JointScreen(engine)
        engine.screen.run(1, engine.scales)


def _run_joint(engine: Engine) -> None:
    screen = JointScreen(engine)
    engine.screen = screen
    engine.joint_mode = True
    screen.run(SCREEN_DIRECTIONS, engine.scales)
    if engine.precision_lost:
        engine.strategy.append("stopped: kinks beside the checked point" if engine.kinks_only
                               else "stopped: float64 precision lost")
        return
    if screen.fired:
        screen.localise()
        for name in screen.culprits:
            screen.measure(name)
            if screen.vanished(name, engine.scales):
                engine.vanished.append(name)
        located = ", ".join(
            f"{name}: {_describe(screen.regions[name], engine.tensors[name])}"
            for name in screen.culprits
        )
        engine.strategy.append(f"located {located}" if located else "not localised")
    _spare(engine, screen)


def _spare(engine: Engine, screen: JointScreen) -> None:
    """Measure tensors picked at random with what the budget has left (exact when small)."""
    order = engine.rng.permutation(len(engine.tensors))
    names = [list(engine.tensors)[i] for i in order]
    measured = 0
    steps = screen.probes[0].steps if screen.probes else {}
    for name in names:
        tensor = engine.tensors[name]
        if name in screen.culprits or not tensor.active or name not in steps:
            continue
        free = tensor.numel - tensor.n_excluded
        if 2 * free <= min(engine.remaining, 64):
            engine.coordinates(tensor, np.arange(tensor.numel, dtype=np.int64))
        elif engine.remaining >= 4:
            parts = [screen.evaluate(3000 + k, {name: steps[name]}) for k in range(2)]
            tensor.sketches.append(Directional.join(
                [screen.directional(tensor, p) for p in parts]))
        else:
            break
        measured += 1
    if measured:
        engine.strategy.append(f"measured {measured} more tensors")


def _exact_small(engine: Engine, tensors: list[TensorState], allowance: int) -> list[TensorState]:
    """Check the smallest tensors exactly while they fit `allowance`; return the others."""
    exact: set[str] = set()
    for tensor in sorted(tensors, key=lambda t: t.numel):
        cost = 2 * tensor.numel
        if cost > allowance:
            break
        engine.coordinates(tensor, np.arange(tensor.numel, dtype=np.int64))
        allowance -= cost
        exact.add(tensor.name)
    if exact:
        engine.strategy.append(f"exact {len(exact)} small tensors")
    return [t for t in tensors if t.name not in exact]


def _screen_distance(tensor: TensorState, noise: float) -> float:
    """Sketch estimate of the tensor's distance: sqrt(mean (vᵀ(n − a))²) / (||a|| + ||n||)."""
    if not tensor.sketches:
        return 0.0
    sketch = Directional.join(tensor.sketches)
    diff = math.sqrt(float(np.mean((sketch.numeric - sketch.analytic) ** 2)))
    denominator = tensor.analytic_norm + math.sqrt(
        float(np.mean(sketch.numeric**2))
    )
    if not math.isfinite(diff) or not math.isfinite(denominator):
        return math.inf
    floor = 100 * noise * math.sqrt(tensor.numel)  # 100 × a projection's noise
    return diff / denominator if diff > floor and denominator > 0 else 0.0


def _locate(engine: Engine, tensor: TensorState, allowance: int, noise: float) -> NDArray[np.int64]:
    """Bisect the tensor (rows, then elements of one row) towards the disagreeing part.

    Each step probes both halves with one ±1 direction each (4 evaluations). A half is
    "disagreeing" when |vᵀ(n − a)| is far above noise and ≥ warn relative to |vᵀn| + |vᵀa|.
    Bisection stops when both halves disagree (the bug is spread) or neither does.
    """
    warn = engine.settings.thresholds.warn
    start, stop = 0, tensor.numel
    row = tensor.numel // tensor.shape[0] if len(tensor.shape) >= 2 else 1
    unit = row if row > 1 else 1
    spent = 0
    while spent + 4 <= allowance:
        units = (stop - start) // unit
        if units <= 1:
            if unit == 1:
                break
            unit = 1  # one row left: continue among its elements
            continue
        middle = start + (units // 2) * unit
        halves = ((start, middle), (middle, stop))
        directions = np.zeros((2, tensor.numel))
        for i, (low, high) in enumerate(halves):
            directions[i, low:high] = engine.rademacher(1, high - low)[0]
        probe = engine.directions(tensor, directions)
        spent += 4
        disagreement = np.abs(probe.numeric - probe.analytic)
        scale = np.abs(probe.numeric) + np.abs(probe.analytic)
        projection_noise = noise * engine.settings.eps / probe.steps
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.where(scale > 0, disagreement / np.where(scale > 0, scale, 1), 0)
        relative = np.where(np.isfinite(disagreement), relative, np.inf)
        disagrees = (relative >= warn) & ~(disagreement <= 100 * projection_noise)
        if disagrees[0] == disagrees[1]:
            break
        start, stop = halves[0] if disagrees[0] else halves[1]
    return np.arange(start, stop, dtype=np.int64)


def _describe(region: NDArray[np.int64], tensor: TensorState) -> str:
    first = tuple(int(i) for i in np.unravel_index(int(region[0]), tensor.shape))
    if region.size == 1:
        return f"element {list(first)}"
    if len(tensor.shape) >= 2 and region.size == tensor.numel // tensor.shape[0]:
        return f"row {first[0]}"
    return f"{region.size} elements from {list(first)}"
