"""The alert state machine: pending → firing → resolved, counted in checks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from gradwatch import ConfigError, GradwatchError, InputError
from gradwatch.alerts.state import (
    AlertPolicy,
    AlertState,
    AlertTracker,
    Transition,
    advance,
    transition_id,
)

T, F = True, False


def _run(tracker: AlertTracker, checks: list[bool], first_step: int = 0) -> list[str | None]:
    """The transition kind (or None) of each check, at steps first_step, first_step + 1, ..."""
    return [
        t.kind if (t := tracker.observe(alerting, step=first_step + i)) else None
        for i, alerting in enumerate(checks)
    ]


# ------------------------------------------------------------------------ policy
def test_policy_defaults_fire_at_once_resolve_at_once_never_repeat() -> None:
    policy = AlertPolicy()
    assert (policy.fire_after, policy.resolve_after, policy.repeat_every) == (1, 1, None)
    assert repr(policy) == "AlertPolicy(fire_after=1, resolve_after=1, repeat_every=None)"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"fire_after": 0}, ["fire_after", "greater than or equal to 1", "got 0"]),
        ({"resolve_after": -2}, ["resolve_after", "got -2"]),
        ({"repeat_every": 0}, ["repeat_every", "got 0", "None"]),
        ({"fire_after": 1.5}, ["fire_after", "integer", "got 1.5"]),
        ({"fire_after": "3"}, ["fire_after", "integer", "got '3'"]),
        ({"fire_after": True}, ["fire_after", "got True"]),
        ({"fire_aftr": 2}, ["fire_aftr", "not a setting", "fire_after, resolve_after"]),
    ],
)
def test_bad_policy_is_a_config_error_naming_the_setting(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        AlertPolicy(**kwargs)
    for word in words:
        assert word in str(caught.value)
    assert "AlertPolicy(fire_after=2" in str(caught.value)  # how to fix it
    assert isinstance(caught.value, GradwatchError)


def test_policy_is_frozen_and_keyword_only() -> None:
    policy = AlertPolicy(fire_after=2)
    with pytest.raises(ValueError):
        policy.fire_after = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        AlertPolicy(2)  # type: ignore[call-arg]
    assert AlertPolicy.model_validate_json(policy.model_dump_json()) == policy


def test_tracker_rejects_a_policy_that_is_not_one() -> None:
    with pytest.raises(ConfigError, match="AlertPolicy"):
        AlertTracker({"fire_after": 2})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="key must be a str"):
        AlertTracker(key=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ the cases by name
def test_fires_once_and_stays_quiet_without_repeat() -> None:
    tracker = AlertTracker()
    assert _run(tracker, [F, T, T, T, T]) == [None, "firing", None, None, None]
    assert tracker.state.state == "firing"
    assert tracker.state.fired_at_step == 1
    assert tracker.state.last_notified_step == 1
    assert tracker.state.ever_fired


def test_pending_until_fire_after_consecutive_checks() -> None:
    tracker = AlertTracker(AlertPolicy(fire_after=3))
    assert _run(tracker, [T, T]) == [None, None]
    assert tracker.state.state == "pending"
    assert tracker.state.alerting_streak == 2
    assert tracker.state.active_since_step == 0
    assert tracker.observe(True, step=2) == Transition("firing", 2, "", 2)
    assert tracker.state.active_since_step == 0


def test_pending_falls_back_to_inactive_silently() -> None:
    tracker = AlertTracker(AlertPolicy(fire_after=3))
    assert _run(tracker, [T, T, F]) == [None, None, None]
    assert tracker.state == AlertState()
    # the streak starts over: two more alerting checks are not enough
    assert _run(tracker, [T, T], first_step=3) == [None, None]
    assert tracker.observe(True, step=5) is not None


def test_no_repeat_within_the_interval_then_repeat_every_n_alerting_checks() -> None:
    tracker = AlertTracker(AlertPolicy(repeat_every=3))
    kinds = _run(tracker, [T, T, T, T, T, T, T])
    assert kinds == ["firing", None, None, "repeat", None, None, "repeat"]
    assert tracker.state.last_notified_step == 6
    assert tracker.state.fired_at_step == 0


def test_only_alerting_checks_count_towards_a_repeat() -> None:
    tracker = AlertTracker(AlertPolicy(repeat_every=2, resolve_after=3))
    kinds = _run(tracker, [T, F, F, T, F, T])
    assert kinds == ["firing", None, None, None, None, "repeat"]


def test_repeat_every_one_repeats_on_every_alerting_check() -> None:
    tracker = AlertTracker(AlertPolicy(repeat_every=1))
    assert _run(tracker, [T, T, T]) == ["firing", "repeat", "repeat"]


def test_resolves_after_m_clean_checks_and_an_alert_resets_the_count() -> None:
    tracker = AlertTracker(AlertPolicy(resolve_after=2))
    kinds = _run(tracker, [T, F, T, F, F, F])
    assert kinds == ["firing", None, None, None, "resolved", None]
    state = tracker.state
    assert state.state == "inactive"
    assert state.ever_fired and state.fired_at_step == 0 and state.last_notified_step == 4
    assert (state.alerting_streak, state.clear_streak, state.since_notified) == (0, 0, 0)


def test_fires_again_after_resolving_with_a_new_id() -> None:
    tracker = AlertTracker(AlertPolicy(fire_after=2), key="run-1")
    transitions = [tracker.observe(a, step=s) for s, a in enumerate([T, T, F, T, T])]
    fired = [t for t in transitions if t is not None]
    assert [t.kind for t in fired] == ["firing", "resolved", "firing"]
    assert [t.step for t in fired] == [1, 2, 4]
    assert len({t.id for t in fired}) == 3
    assert fired[1].fired_at_step == 1 and tracker.state.fired_at_step == 4


def test_resolved_carries_the_step_it_fired_at() -> None:
    tracker = AlertTracker(AlertPolicy(resolve_after=2, repeat_every=1))
    transitions = [tracker.observe(a, step=10 * s) for s, a in enumerate([T, T, F, F])]
    assert [(t.kind, t.step, t.fired_at_step) for t in transitions if t] == [
        ("firing", 0, 0), ("repeat", 10, 0), ("resolved", 30, 0),
    ]


def test_truthy_alerting_values_are_accepted() -> None:
    tracker = AlertTracker()
    transition = tracker.observe(np.float64(2.0) > 1.0, step=0)  # type: ignore[arg-type]
    assert transition is not None and transition.kind == "firing"
    assert tracker.observe(np.bool_(False), step=1) is not None  # type: ignore[arg-type]


# ------------------------------------------------------------------------ exhaustive
POLICIES = [
    AlertPolicy(fire_after=f, resolve_after=r, repeat_every=n)
    for f, r, n in itertools.product((1, 2, 3), (1, 2, 3), (None, 1, 2))
]


def _run_length(checks: tuple[bool, ...], i: int, value: bool) -> int:
    """How many checks in a row up to and including i equal `value`."""
    length = 0
    while i - length >= 0 and checks[i - length] == value:
        length += 1
    return length


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_every_sequence_of_up_to_eight_checks_follows_the_rules(policy: AlertPolicy) -> None:
    for n in range(9):
        for checks in itertools.product((False, True), repeat=n):
            tracker = AlertTracker(policy, key="k")
            firing, fired_at, alerting_since_fired = False, -1, 0
            for i, alerting in enumerate(checks):
                transition = tracker.observe(alerting, step=i)
                kind = transition.kind if transition else None
                run = _run_length(checks, i, alerting)
                if firing and alerting:
                    alerting_since_fired += 1
                # each rule is written from the definition, independently of the tracker
                expect_fire = not firing and alerting and run == policy.fire_after
                expect_resolve = firing and not alerting and run == policy.resolve_after
                expect_repeat = (
                    firing and alerting and policy.repeat_every is not None
                    and alerting_since_fired % policy.repeat_every == 0
                )
                expected = ("firing" if expect_fire else "resolved" if expect_resolve
                            else "repeat" if expect_repeat else None)
                assert kind == expected, (checks, i)
                if transition is not None:
                    assert transition.step == i
                    assert transition.id == transition_id("k", transition.kind, i)
                if expect_fire:
                    firing, fired_at, alerting_since_fired = True, i, 0
                elif expect_resolve:
                    firing = False
                    assert transition is not None and transition.fired_at_step == fired_at
                state = tracker.state
                pending = not firing and alerting
                assert state.state == ("firing" if firing else "pending" if pending
                                       else "inactive"), (checks, i)
                assert state.ever_fired == (fired_at >= 0)


# ------------------------------------------------------------------------ ids
def test_ids_are_stable_and_differ_by_key_kind_and_step() -> None:
    base = transition_id("run-1", "firing", 100)
    assert base == transition_id("run-1", "firing", 100)
    assert len(base) == 32 and int(base, 16) >= 0
    others = {
        transition_id("run-2", "firing", 100),
        transition_id("run-1", "resolved", 100),
        transition_id("run-1", "firing", 101),
    }
    assert base not in others and len(others) == 3
    # the separator keeps ("a", step) apart from keys that end like a kind
    assert transition_id("a\x1ffiring", "firing", 1) != transition_id("a", "firing", 1)


def test_a_replayed_run_gives_the_same_ids() -> None:
    checks = [T, T, F, T, T, T, F]
    first = AlertTracker(AlertPolicy(repeat_every=2), key="run-9")
    second = AlertTracker(AlertPolicy(repeat_every=2), key="run-9")
    ids_first = [t.id for s, a in enumerate(checks) if (t := first.observe(a, step=s))]
    ids_second = [t.id for s, a in enumerate(checks) if (t := second.observe(a, step=s))]
    assert ids_first == ids_second and len(ids_first) == 5


def test_transition_is_a_frozen_value() -> None:
    transition = Transition(kind="firing", step=3, key="k", fired_at_step=3)
    assert transition == Transition(kind="firing", step=3, key="k", fired_at_step=3)
    assert hash(transition) == hash(Transition(kind="firing", step=3, key="k", fired_at_step=3))
    with pytest.raises(AttributeError):
        transition.step = 4  # type: ignore[misc]


# ------------------------------------------------------------------------ state
def test_state_dict_round_trips_through_json_mid_firing() -> None:
    policy = AlertPolicy(fire_after=2, resolve_after=2, repeat_every=3)
    original = AlertTracker(policy, key="run-1")
    _run(original, [T, T, T, F])  # firing, two alerting checks towards a repeat, one clean
    saved = json.loads(json.dumps(original.state_dict()))
    assert saved["state"] == "firing" and saved["version"] == 1

    restored = AlertTracker(policy, key="run-1")
    restored.load_state_dict(saved)
    assert restored.state == original.state
    rest = [T, T, F, F, T, T]
    assert _run(restored, rest, first_step=4) == _run(original, rest, first_step=4)
    assert _run(AlertTracker(policy), rest) != _run(restored, rest)  # the state mattered


def test_old_and_partial_state_dicts_load_with_defaults() -> None:
    tracker = AlertTracker(AlertPolicy(resolve_after=2))
    tracker.load_state_dict({})
    assert tracker.state == AlertState()
    tracker.load_state_dict({"state": "firing", "fired_at_step": 7})  # no counters saved
    assert tracker.state.state == "firing" and tracker.state.clear_streak == 0
    assert tracker.observe(False, step=8) is None
    resolved = tracker.observe(False, step=9)
    assert resolved is not None and resolved.fired_at_step == 7


def test_a_saved_streak_fires_under_a_stricter_policy_loaded_later() -> None:
    saved = AlertTracker(AlertPolicy(fire_after=5))
    _run(saved, [T, T, T])
    looser = AlertTracker(AlertPolicy(fire_after=2))
    looser.load_state_dict(saved.state_dict())
    transition = looser.observe(True, step=3)
    assert transition is not None and transition.kind == "firing"


@pytest.mark.parametrize(
    ("state_dict", "words"),
    [
        ({"state": "exploded"}, ["state", "exploded", "state_dict()"]),
        ({"alerting_streak": -1}, ["alerting_streak", "-1"]),
    ],
)
def test_a_corrupt_state_dict_is_an_input_error(state_dict: dict, words: list[str]) -> None:
    with pytest.raises(InputError) as caught:
        AlertTracker().load_state_dict(state_dict)
    for word in words:
        assert word in str(caught.value)


def test_advance_is_pure() -> None:
    policy, state = AlertPolicy(fire_after=2), AlertState()
    pending, transition = advance(policy, state, True, step=0)
    assert state == AlertState() and transition is None and pending.state == "pending"
    again, _ = advance(policy, state, True, step=0)
    assert again == pending


def test_reset_forgets_everything() -> None:
    tracker = AlertTracker()
    tracker.observe(True, step=0)
    tracker.reset()
    assert tracker.state == AlertState()
    assert "state='inactive'" in repr(tracker)
