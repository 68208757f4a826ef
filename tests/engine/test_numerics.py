"""Properties of the distance and the element rule (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gradwatch
from gradwatch.engine.numerics import element_floor, element_rel_errors, find_kinks, rel_distance

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
vectors = st.integers(1, 40).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=finite), arrays(np.float64, n, elements=finite)))


@given(vectors)
def test_distance_is_symmetric_and_bounded(pair: tuple[np.ndarray, np.ndarray]) -> None:
    numeric, analytic = pair
    d = rel_distance(numeric, analytic)
    assert 0.0 <= d <= 1.0 + 1e-12  # triangle inequality: ||n − a|| ≤ ||n|| + ||a||
    assert d == pytest.approx(rel_distance(analytic, numeric), rel=1e-12, abs=0)


@given(vectors)
def test_distance_is_the_plain_norm_formula(pair: tuple[np.ndarray, np.ndarray]) -> None:
    numeric, analytic = pair
    denominator = np.linalg.norm(numeric) + np.linalg.norm(analytic)
    assume(denominator > 0)
    expected = np.linalg.norm(analytic - numeric) / denominator
    assert rel_distance(numeric, analytic) == expected


@given(vectors, st.floats(min_value=1e-3, max_value=1e3))
def test_distance_is_scale_invariant(pair: tuple[np.ndarray, np.ndarray], scale: float) -> None:
    numeric, analytic = pair
    assume(np.linalg.norm(numeric) + np.linalg.norm(analytic) > 1e-100)
    assert rel_distance(scale * numeric, scale * analytic) == pytest.approx(
        rel_distance(numeric, analytic), rel=1e-9, abs=1e-15)


@given(vectors, st.floats(min_value=0, max_value=1e7))
def test_floor_only_lowers_the_distance_and_is_inert_above_the_norms(
    pair: tuple[np.ndarray, np.ndarray], floor: float
) -> None:
    numeric, analytic = pair
    plain = rel_distance(numeric, analytic)
    floored = rel_distance(numeric, analytic, floor=floor)
    assert floored <= plain
    if np.linalg.norm(numeric) + np.linalg.norm(analytic) >= floor:
        assert floored == plain


def test_equal_vectors_are_at_distance_zero_and_zeros_are_not_nan() -> None:
    v = np.array([1.0, -2.0, 3.0])
    assert rel_distance(v, v) == 0.0
    assert rel_distance(np.zeros(3), np.zeros(3)) == 0.0
    assert gradwatch.rel_distance is rel_distance


@given(vectors, st.floats(min_value=1e-12, max_value=1.0))
def test_element_errors_are_between_zero_and_one(
    pair: tuple[np.ndarray, np.ndarray], floor: float
) -> None:
    numeric, analytic = pair
    errors = element_rel_errors(numeric, analytic, floor)
    assert np.all(errors >= 0) and np.all(errors <= 1.0 + 1e-12)


@given(
    arrays(np.float64, st.integers(1, 30),
           elements=st.floats(min_value=-1e-9, max_value=1e-9, allow_nan=False)),
    arrays(np.float64, 1, elements=st.floats(min_value=-1e-9, max_value=1e-9, allow_nan=False)),
)
def test_pure_noise_elements_stay_a_tenth_below_the_alert_threshold(
    noise_values: np.ndarray, offset: np.ndarray
) -> None:
    # analytic and numeric both within ±noise of zero: the true gradient is zero
    noise = 1e-9
    floor = element_floor(noise, alert=1e-3)
    errors = element_rel_errors(noise_values, noise_values * 0 + offset[0], floor)
    assert np.all(errors <= 2 * noise / floor + 1e-15)
    assert np.all(errors < 1e-3)


@given(
    arrays(np.float64, st.integers(2, 64),
           elements=st.floats(min_value=1e-3, max_value=10.0, allow_nan=False)),
    st.integers(0, 63),
    st.floats(min_value=0.01, max_value=2.0),
)
def test_one_wrong_element_is_caught_where_the_norm_dilutes_it(
    gradient: np.ndarray, position: int, error: float
) -> None:
    # a sparse bug: one element off by `error` (relative); the element rule reports
    # error / (2 + error), whatever the size of the tensor
    position %= gradient.size
    analytic = gradient.copy()
    analytic[position] *= 1 + error
    errors = element_rel_errors(gradient, analytic, floor=1e-6)
    assert errors[position] == pytest.approx(error / (2 + error), rel=1e-9)
    assert int(np.argmax(errors)) == position
    assert errors[position] >= 1e-3


@settings(max_examples=50)
@given(st.floats(min_value=-0.9, max_value=0.9), st.floats(min_value=0.1, max_value=5.0))
def test_a_kink_inside_the_step_is_recognised_and_a_wrong_slope_is_not(
    where: float, slope: float
) -> None:
    # J(t) = slope · max(0, t − kink), kink at where·ε from the checked point t = 0
    eps = 1e-7
    kink = where * eps

    def j(t: float) -> float:
        return slope * max(0.0, t - kink)

    plus, minus, loss = np.array([j(eps)]), np.array([j(-eps)]), j(0.0)
    analytic_side = slope if kink < 0 else 0.0  # backprop's one-sided slope at t = 0
    assume(abs(where) > 0.05)
    kinks = find_kinks(loss, plus, minus, np.array([analytic_side]), eps, noise=1e-12)
    assert kinks[0]
    wrong = find_kinks(loss, plus, minus, np.array([3 * slope + 1]), eps, noise=1e-12)
    assert not wrong[0]


def test_smooth_curvature_is_not_a_kink() -> None:
    eps = 1e-7
    curvature = 1e4  # J = c·t²/2 around t0 = 1 → f − b = c·ε, but dθapprox is exact

    def j(t: float) -> float:
        return curvature * t * t / 2

    plus, minus = np.array([j(1 + eps)]), np.array([j(1 - eps)])
    kinks = find_kinks(j(1.0), plus, minus, np.array([curvature * 1.0]), eps, noise=1e-9)
    assert not kinks[0]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 11), st.floats(min_value=0.05, max_value=1.0))
def test_check_finds_a_random_wrong_element_of_a_quadratic(
    seed: int, wrong: int, error: float
) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((6, 4))
    w = rng.standard_normal((3, 4))

    def cost(p: dict[str, np.ndarray]) -> float:
        residual = a @ p["W"] - b
        return float(0.5 * np.sum(residual**2))

    grad = a.T @ (a @ w - b)
    assume(np.min(np.abs(grad)) > 1e-3)
    clean = gradwatch.check(cost, {"W": w}, {"W": grad})
    assert clean.verdict == "ok", clean.summary()
    index = np.unravel_index(wrong, w.shape)
    broken = grad.copy()
    broken[index] *= 1 + error
    report = gradwatch.check(cost, {"W": w}, {"W": broken})
    assert report.verdict == "alert", report.summary()
    assert report.layers["W"].worst[0].index == tuple(int(i) for i in index)
    assert math.isclose(report.layers["W"].worst[0].analytic, broken[index])
