"""The monitor's per-check rules as pure functions: which rule each measurement fires, the
"kernels" rule's state machine (deduplicated like "distance"), and the config and silences
accepting its name. Checks are built by hand here; test_monitor.py has them end to end."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gradwatch.alerts.state import AlertPolicy, transition_id
from gradwatch.monitor.config import RULES, MonitorConfig
from gradwatch.monitor.rules import (
    CHECK_RULES,
    check_signals,
    definition_failed,
    evaluate_checks,
    worst_kernel_layers,
)
from gradwatch.monitor.stored import SilenceMatcher
from gradwatch.record.reader import CheckPoint

ALERT = 1e-3
P = "gradwatch/precision/layer/"


def check(step: int, *, distance: float = 1e-9, verdict: int = 0,
          precision: int | None = None, ratio: float | None = None,
          layers: dict[str, float] | None = None) -> CheckPoint:
    return CheckPoint(step, step * 1000, distance, verdict, None,
                      {"gradwatch/layer/w": distance}, precision_verdict=precision,
                      precision_ratio=ratio,
                      precision_layers={P + name: value for name, value in (layers or {}).items()})


def fired(**kwargs: Any) -> set[str]:
    return {rule for rule, on in check_signals(check(10, **kwargs), ALERT).items() if on}


def test_kernels_is_a_rule_of_its_own_everywhere_rules_are_named() -> None:
    assert "kernels" in RULES and "kernels" in CHECK_RULES
    assert RULES.index("stale") == len(RULES) - 1  # the per-check rules come first
    config = MonitorConfig.model_validate({
        "experiments": ["x"], "policies": {"default": {"repeat_every": 3},
                                           "kernels": {"fire_after": 2}}})
    assert config.policy_for("kernels") == AlertPolicy(fire_after=2, repeat_every=3)
    assert SilenceMatcher(rule="kern*").matches("r", ["e"], "kernels")


@pytest.mark.parametrize(("kwargs", "rules"), [
    # no measurement (float32 on CPU): the kernels rule is quiet, the rest as before
    ({}, set()),
    ({"distance": 5e-3, "verdict": 2}, {"distance"}),
    # the kernels alert, folded into the verdict: "kernels" only, never "distance"
    ({"verdict": 2, "precision": 2, "ratio": 900.0}, {"kernels"}),
    # a warning is not an alert; a non-finite ratio is, whatever the verdict says
    ({"verdict": 1, "precision": 1, "ratio": 12.0}, set()),
    ({"verdict": 1, "precision": 1, "ratio": math.inf}, {"kernels"}),
    ({"verdict": 2, "precision": 2, "ratio": math.nan}, {"kernels"}),
    # both measurements alert: both rules
    ({"distance": 5e-3, "verdict": 2, "precision": 2, "ratio": 50.0}, {"distance", "kernels"}),
    # the kernels measurement failed (folded "error"): "error", and the distances, which
    # were measured, still judged
    ({"distance": 5e-3, "verdict": 3, "precision": 3}, {"error", "distance"}),
    ({"verdict": 3, "precision": 3}, {"error"}),
    # the central differences failed (NaN): "error" alone, with or without the kernels'
    ({"distance": math.nan, "verdict": 3}, {"error"}),
    ({"distance": math.nan, "verdict": 3, "precision": 3}, {"error"}),
    ({"distance": math.nan, "verdict": 3, "precision": 2, "ratio": 90.0}, {"error", "kernels"}),
])
def test_which_rule_each_measurement_fires(kwargs: dict[str, Any], rules: set[str]) -> None:
    assert fired(**kwargs) == rules


def test_definition_failed_reads_the_folded_error() -> None:
    assert not definition_failed(2, 3, 1e-9)
    assert not definition_failed(3, 3, 1e-9)  # the kernels' error alone
    assert definition_failed(3, None, math.nan)
    assert definition_failed(3, 3, math.nan)
    assert definition_failed(3.0, None, None)  # from /metrics' latest values (floats)


def test_the_kernels_rule_fires_once_per_run_and_resolves() -> None:
    policies = {rule: AlertPolicy() for rule in RULES}
    bad = {"first.weight": 8e4, "first.bias": 3e4, "second.weight": 1.7}
    checks = [check(10, precision=0, ratio=1.5),
              check(20, verdict=2, precision=2, ratio=8e4, layers=bad),
              check(30, verdict=2, precision=2, ratio=9e4, layers=bad),
              check(40),  # a check without the measurement counts as clean
              check(50, verdict=2, precision=2, ratio=math.nan)]
    outcome = evaluate_checks("run1", checks, {}, policies, ALERT)
    assert [(rule, t.kind, t.step) for rule, t, _ in outcome.transitions] == [
        ("kernels", "firing", 20), ("kernels", "resolved", 40), ("kernels", "firing", 50)]
    assert outcome.transitions[0][1].id == transition_id("run1/kernels", "firing", 20)
    assert set(outcome.states) == {"kernels"} and outcome.states["kernels"].state == "firing"
    # its message lists the worst layers by ratio, worst first
    assert worst_kernel_layers(checks[1], limit=2) == [("first.weight", 8e4),
                                                       ("first.bias", 3e4)]
    # a later poll, still alerting: the state machine holds it (no second "firing")
    later = evaluate_checks("run1", [check(60, verdict=2, precision=2, ratio=9e4)],
                            outcome.states, policies, ALERT)
    assert later.transitions == []
