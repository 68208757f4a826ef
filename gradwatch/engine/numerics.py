"""Distances, element errors, noise floors and kinks: the maths every backend shares.

Notation: `analytic` is dθ from backprop, `numeric` is dθapprox from central differences

    dθapprox[i] = (J(θ + ε·e_i) − J(θ − ε·e_i)) / (2ε)

and all of it is float64. The derivations are in docs/numerics.md.

Imports: nothing else of gradwatch (numpy only).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "ROUNDING",
    "SIGNIFICANCE",
    "dot",
    "element_rel_errors",
    "find_kinks",
    "judged_distance",
    "noise_per_element",
    "norm",
    "rademacher",
    "rademacher_int8",
    "rel_distance",
]

Vector = NDArray[np.float64]
Signs = NDArray[np.int8]

#: Unit roundoff of float64: every loss evaluation is exact to about ROUNDING·|J|.
ROUNDING = float(np.finfo(np.float64).eps) / 2

#: A loss evaluation is trusted to ~ROUNDING_SAFETY·ROUNDING·|J| (sums of many terms round more
#: than once); the empirical estimate in `noise_per_element` takes over when it is larger.
ROUNDING_SAFETY = 16.0


def rel_distance(numeric: Vector, analytic: Vector, floor: float = 0.0) -> float:
    """Relative distance ||numeric − analytic||₂ / max(||numeric||₂ + ||analytic||₂, floor).

    With `floor=0` this is exactly the textbook formula (plain norms, not squared). The floor
    protects vectors that are both at the rounding-noise level: their plain distance is ~1.0
    although nothing is wrong. Two all-zero vectors are at distance 0.

    Example:
        >>> import numpy as np
        >>> rel_distance(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
        0.0
        >>> round(rel_distance(np.array([2.0]), np.array([1.0])), 6)
        0.333333
    """
    numerator = float(np.linalg.norm(analytic - numeric))
    denominator = float(np.linalg.norm(analytic)) + float(np.linalg.norm(numeric))
    denominator = max(denominator, floor)
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def norm(a: Vector) -> float:
    """||a||₂ of a float64 vector, without BLAS (see `dot`; numpy's norm calls ddot)."""
    flat = np.ravel(a)
    return math.sqrt(float(np.einsum("i,i->", flat, flat)))


def dot(a: Vector, b: Vector | Signs) -> float:
    """aᵀb for 1-D float64 vectors (b may be int8 ±1) without BLAS: a multi-threaded OpenBLAS
    ddot on a busy machine spins for milliseconds where this loop takes microseconds (200k
    elements: 2.3 ms vs 0.06 ms measured here)."""
    return float(np.einsum("i,i->", a, b))


def rademacher(rng: np.random.Generator, count: int) -> Vector:
    """`count` independent ±1 entries: one random bit each, eight from every random byte
    (bit 0 → −1, bit 1 → +1, converted in place: 3× faster than a lookup table)."""
    return rademacher_int8(rng, count).astype(np.float64)


def rademacher_int8(rng: np.random.Generator, count: int) -> Signs:
    """`rademacher` as int8, the same draws: a screen direction is 1 byte per element, not 8.
    Freshly allocated float64 directions over a whole model page-fault their way into memory
    (5 directions over 269k parameters: ~2 ms of a ~10 ms check); int8 ones take 1/8 of it,
    and the few ops that read them (`torch.add` into float64, `dot`) convert on the fly."""
    bits = np.unpackbits(np.frombuffer(rng.bytes(-(-count // 8)), dtype=np.uint8), count=count)
    signs = bits.view(np.int8)  # unpackbits' own fresh array: edited in place
    signs *= 2
    signs -= 1
    return signs


#: A discrepancy is real when it exceeds SIGNIFICANCE × its rounding-noise level.
SIGNIFICANCE = 10.0


def judged_distance(numeric_norm: float, analytic_norm: float, diff_norm: float, level: float,
                    warn: float) -> float:
    """The distance a verdict is taken from, given the norms and the noise level of ||n − a||.

    A significant discrepancy (||n − a|| > SIGNIFICANCE · level) is measured by the textbook
    formula ||n − a|| / (||n|| + ||a||) with no floor: a tensor whose gradient sits well above
    its noise is judged on its own scale, however small that scale is. A discrepancy that
    rounding can explain is divided by max(||n|| + ||a||, SIGNIFICANCE · level · 10 / warn),
    so that it reads at most warn/10 — below the warn threshold — instead of ~1.0 for a
    gradient that is zero in exact arithmetic (an attention key bias).

    Example:
        >>> judged_distance(1.0, 1.0, 0.2, 1e-6, 1e-5)      # real: textbook 0.2 / 2
        0.1
        >>> judged_distance(1e-6, 2e-6, 3e-6, 1e-6, 1e-5) <= 1e-6   # rounding: ≤ warn / 10
        True
    """
    denominator = numeric_norm + analytic_norm
    if not (diff_norm > SIGNIFICANCE * level) and level > 0:
        denominator = max(denominator, SIGNIFICANCE * level * 10.0 / warn)
    if denominator == 0.0:
        return 0.0 if diff_norm == 0.0 else math.inf
    if not math.isfinite(diff_norm) or not math.isfinite(denominator):
        return math.inf
    return diff_norm / denominator


def element_rel_errors(numeric: Vector, analytic: Vector, floor: float) -> Vector:
    """Per element |n − a| / max(|n| + |a|, floor): the floor-protected element measure.

    The norm-level distance dilutes a sparse bug (one wrong weight in a 64×64 layer moves it by
    ~1e-4); this measure does not. Without the floor, an element whose true gradient is ~0 would
    read as 1.0 from rounding noise alone, so `floor` is set from the estimated noise (see
    `element_floor`).
    """
    abs_diff = np.abs(numeric - analytic)
    scale = np.maximum(np.abs(numeric) + np.abs(analytic), floor)
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = np.where(scale > 0, abs_diff / np.where(scale > 0, scale, 1.0), 0.0)
    return np.where(np.isfinite(abs_diff), errors, np.inf)


def noise_per_element(
    loss: float,
    loss_repeat: float,
    second_differences: Vector,
    eps: float,
) -> float:
    """Estimated rounding noise of one central difference, in gradient units.

    A loss evaluation carries an absolute error δJ; the central difference turns it into
    ~δJ/ε of noise in dθapprox[i]. δJ is taken as the largest of
      * ROUNDING_SAFETY · u · |J|                (the model-free bound),
      * |J(θ) − J(θ)'|                           (two evaluations that should be identical),
      * median_i |J(θ+εe_i) + J(θ−εe_i) − 2J(θ)|  (the second difference: rounding + ε²·J''),
    the last being measured on this model, so losses that round more than |J| suggests (large
    logits cancelling, float32 inside the loss) get a floor that fits them.
    """
    model_free = ROUNDING_SAFETY * ROUNDING * abs(loss)
    repeat = abs(loss - loss_repeat) if math.isfinite(loss_repeat) else 0.0
    finite = second_differences[np.isfinite(second_differences)]
    measured = float(np.median(np.abs(finite))) if finite.size else 0.0
    return max(model_free, repeat, measured) / eps


def floor_factor(alert: float) -> float:
    """How many noise levels a floor sits above the noise: pure noise then reads as 1/factor.

    10/alert puts pure noise an order of magnitude below alerting (1e4 for the default 1e-3).
    It is kept within [1e2, 1e6] so that extreme thresholds do not produce floors that swallow
    real gradients (alert=1e-9 would otherwise put the floor 1e10 noise levels up).
    """
    return min(max(10.0 / alert, 1e2), 1e6)


def element_floor(noise: float, alert: float) -> float:
    """Floor for `element_rel_errors`: noise · floor_factor(alert).

    An element whose analytic and numeric values are both noise has |n − a| ≈ noise, so its
    error is ≤ 1/floor_factor (alert/10 with the default thresholds): far below alerting.
    """
    return noise * floor_factor(alert)


def find_kinks(
    loss: float,
    plus: Vector,
    minus: Vector,
    analytic: Vector,
    eps: float | Vector,
    noise: float | Vector,
) -> NDArray[np.bool_]:
    """Mark the central differences that straddle a non-differentiable point (ReLU, max, abs).

    With forward and backward one-sided differences
        f = (J(θ+ε) − J(θ)) / ε,   b = (J(θ) − J(θ−ε)) / ε,
    a smooth J has f − b = ε·J'' (tiny at ε = 1e-7) and dθapprox = (f + b)/2 ≈ dθ.
    If a kink lies between θ−ε and θ+ε, J is piecewise linear there with slopes s₁, s₂; backprop
    returns the slope on θ's side (one of f, b) and dθapprox − dθ = ±(f − b)/2.
    An element is a kink when
      1. |f − b| is well above noise (100 · noise), and
      2. the analytic value lies between f and b (a wrong backward generally does not), and
      3. the disagreement is what the kink explains: |dθapprox − dθ| ≥ |f − b| / 10.
    """
    forward = (plus - loss) / eps
    backward = (loss - minus) / eps
    numeric = (plus - minus) / (2 * eps)
    spread = np.abs(forward - backward)
    low = np.minimum(forward, backward) - 10 * noise
    high = np.maximum(forward, backward) + 10 * noise
    with np.errstate(invalid="ignore"):
        return (
            (spread > 100 * noise)
            & (analytic >= low)
            & (analytic <= high)
            & (np.abs(numeric - analytic) >= spread / 10)
        )
