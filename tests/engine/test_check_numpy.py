"""gradwatch.check on numpy dicts: the recipe, reproduced to the last digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gradwatch
from tests.support.classic_net import backward, forward, make_problem, reference_check


def _classic(buggy: bool) -> tuple[gradwatch.CheckReport, float, np.ndarray, dict]:
    params, x, y = make_problem()
    _, cache = forward(x, y, params)
    grads = backward(x, y, params, cache, buggy=buggy)
    report = gradwatch.check(lambda p: forward(x, y, p)[0], params, grads)
    difference, gradapprox, _ = reference_check(x, y, params, grads)
    return report, difference, gradapprox, params


@pytest.mark.parametrize("buggy", [False, True], ids=["correct", "planted-bug"])
def test_full_mode_reproduces_the_hand_written_loop(buggy: bool) -> None:
    report, difference, gradapprox, params = _classic(buggy)
    assert report.mode == "full"
    assert report.coordinates == gradapprox.size == 47
    assert report.evaluations == 2 * 47 + 2
    assert report.rel_distance == pytest.approx(difference, rel=1e-12, abs=0)
    # every reported element is the loop's own dθapprox[i], bit for bit
    offsets = np.cumsum([0] + [v.size for v in params.values()])
    for k, (name, layer) in enumerate(report.layers.items()):
        for element in layer.worst:
            flat = np.ravel_multi_index(element.index, params[name].shape)
            assert element.numeric == gradapprox[offsets[k] + flat]


def test_correct_backward_is_ok_and_buggy_one_alerts_where_the_bugs_are() -> None:
    good, good_difference, _, _ = _classic(buggy=False)
    assert good.verdict == "ok", good.summary()
    assert good_difference < 1e-7
    bad, _, _, _ = _classic(buggy=True)
    assert bad.verdict == "alert", bad.summary()
    assert bad.rel_distance > 1e-3
    alerting = {name for name, layer in bad.layers.items() if layer.verdict == "alert"}
    assert {"W2", "b1"} <= alerting
    # W1 and W3 are computed correctly; they must not be blamed
    assert bad.layers["W3"].verdict == "ok"
    assert bad.layers["W1"].verdict == "ok"
    assert "W2" in str(bad) and "alert" in str(bad).lower()


def test_grads_keyed_like_params_or_with_d_prefix_give_the_same_report() -> None:
    params, x, y = make_problem()
    _, cache = forward(x, y, params)
    grads = backward(x, y, params, cache)
    plain = {name[1:]: value for name, value in grads.items()}
    a = gradwatch.check(lambda p: forward(x, y, p)[0], params, grads)
    b = gradwatch.check(lambda p: forward(x, y, p)[0], params, plain)
    assert a.rel_distance == b.rel_distance


def test_the_users_arrays_are_not_modified() -> None:
    params, x, y = make_problem()
    _, cache = forward(x, y, params)
    grads = backward(x, y, params, cache)
    before = {k: v.copy() for k, v in params.items()}
    grads_before = {k: v.copy() for k, v in grads.items()}
    seen: list[int] = []

    def cost(p: dict) -> float:
        seen.append(id(p["W1"]))
        return forward(x, y, p)[0]

    gradwatch.check(cost, params, grads)
    for name in params:
        assert np.array_equal(params[name], before[name])
        assert id(params["W1"]) not in seen
    for name in grads:
        assert np.array_equal(grads[name], grads_before[name])


def test_report_round_trips_through_json() -> None:
    report, *_ = _classic(buggy=True)
    text = report.model_dump_json()
    again = gradwatch.CheckReport.model_validate_json(text)
    assert again == report
    assert again.schema_version == 1


@pytest.mark.parametrize("mode", ["sample", "sketch", "auto"])
def test_other_modes_agree_on_the_classic_network(mode: str) -> None:
    params, x, y = make_problem()
    _, cache = forward(x, y, params)
    for buggy, expected in ((False, "ok"), (True, "alert")):
        grads = backward(x, y, params, cache, buggy=buggy)
        report = gradwatch.check(
            lambda p: forward(x, y, p)[0], params, grads, mode=mode, budget=60, samples=4,
            directions=3,
        )
        assert report.verdict == expected, report.summary()
        assert report.evaluations <= 60


def test_non_finite_loss_alerts_and_its_report_is_strict_json() -> None:
    params = {"w": np.ones(3)}
    report = gradwatch.check(lambda p: float(p["w"].sum()) * math.inf, params, {"w": params["w"]})
    assert report.verdict == "alert"
    assert any(reason.startswith("non-finite") for reason in report.reasons)

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    text = report.model_dump_json()
    json.loads(text, parse_constant=refuse)  # NaN/inf are written as strings, not bare NaN
    again = gradwatch.CheckReport.model_validate_json(text)
    assert math.isinf(again.loss) and math.isnan(again.rel_distance)
