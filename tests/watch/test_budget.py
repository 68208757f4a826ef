"""The adaptive budget: sizing checks from measured costs, and the rotation over tensors."""

from __future__ import annotations

import pytest

from gradwatch.watch.budget import FIRST_BUDGET, MAXIMUM, MINIMUM, AdaptiveBudget, Rotation


def measured(overhead: float, step: float, checks: list[tuple[float, int, float]]
             ) -> AdaptiveBudget:
    budget = AdaptiveBudget(overhead)
    for _ in range(20):
        budget.step_finished(step)
    for seconds, evaluations, evaluation_seconds in checks:
        budget.check_finished(seconds, evaluations, evaluation_seconds)
    return budget


def test_first_check_gets_the_first_budget() -> None:
    assert AdaptiveBudget(0.01).next_budget(1000) == FIRST_BUDGET
    only_steps = AdaptiveBudget(0.01)
    only_steps.step_finished(0.01)
    assert only_steps.next_budget(1000) == FIRST_BUDGET


def test_budget_leaves_out_the_fixed_part_of_a_check() -> None:
    # 10 ms steps, 1% of 1000 steps = 100 ms; a check's fixed part 20 ms, 0.5 ms/evaluation.
    budget = measured(0.01, 0.010, [(0.020 + 100 * 0.0005, 100, 100 * 0.0005)])
    assert abs(budget.next_budget(1000) - 160) <= 1  # (100 ms − 20 ms) / 0.5 ms
    # The same check modelled as all per-evaluation cost would have given 100 ms / 0.7 ms.
    unsplit = measured(0.01, 0.010, [(0.070, 100, 0.0)])
    assert abs(unsplit.next_budget(1000) - 142) <= 1


def test_budget_scales_with_the_steps_since_the_last_check() -> None:
    budget = measured(0.01, 0.010, [(0.060, 100, 0.050)])
    assert budget.next_budget(2000) > 2 * budget.next_budget(1000) - 1


def test_budget_is_clamped() -> None:
    expensive = measured(0.001, 0.001, [(1.0, 10, 0.5)])  # fixed part alone is over the share
    assert expensive.next_budget(10) == MINIMUM
    cheap = measured(0.5, 1.0, [(0.001, 10, 0.0005)])
    assert cheap.next_budget(10_000) == MAXIMUM


def test_a_slow_spell_does_not_swing_the_budget() -> None:
    steady = [(0.060, 100, 0.050)] * 4
    budget = measured(0.01, 0.010, [*steady, (5.0, 100, 4.9)])  # one stalled check
    assert budget.next_budget(1000) == measured(0.01, 0.010, steady).next_budget(1000)


@pytest.mark.parametrize("seconds, evaluations", [(0.0, 10), (0.5, 0), (float("nan"), 10)])
def test_checks_that_measured_nothing_are_ignored(seconds: float, evaluations: int) -> None:
    budget = AdaptiveBudget(0.01)
    budget.step_finished(0.01)
    budget.check_finished(seconds, evaluations, 0.0)
    assert budget.next_budget(1000) == FIRST_BUDGET


def test_state_round_trips_and_reads_the_old_format() -> None:
    budget = measured(0.01, 0.010, [(0.060, 100, 0.050), (0.070, 100, 0.055)])
    restored = AdaptiveBudget(0.01)
    restored.load_state_dict(budget.state_dict())
    for _ in range(20):
        restored.step_finished(0.010)
    assert restored.next_budget(1000) == budget.next_budget(1000)
    old = AdaptiveBudget(0.01)
    old.load_state_dict({"eval_seconds": 0.001})  # gradwatch 0.1 saved one number
    old.step_finished(0.010)
    assert old.next_budget(1000) == 100


def test_rotation_covers_every_tensor_across_checks() -> None:
    sizes = {"a.weight": 10_000, "a.bias": 100, "b.weight": 5_000, "b.bias": 10}
    rotation = Rotation()
    seen: list[str] = []
    for _ in range(4):
        chosen = rotation.pick(sizes, MINIMUM)
        assert chosen is not None and chosen
        seen += chosen
    assert set(seen) == set(sizes)
    assert rotation.pick(sizes, 2 * sum(sizes.values()) + 2) is None  # everything fits
