"""The monitor's alert rules, as pure functions: checks and states in, transitions out.

The monitor's alert rules, as pure functions: checks and the stored states in, new states and
transitions out. No MLflow, no database, no clock (the caller passes `now`).

Five rules, each one alert per run (the key of its state machine is ``<run id>/<rule>``)::

    distance     the overall distance or any layer's distance ≥ the alert threshold (finite
                 values only; one alert per run: its message lists the worst layers, so the
                 overall alert absorbs the per-layer ones) — the "backprop definition"
                 measurement (central differences on the float64 model)
    non_finite   a distance (overall or a layer) is NaN or ±inf, in a check that ran
    error        the check itself failed (verdict "error"): the central differences, or the
                 training-kernels measurement (its "error" is folded into the verdict)
    kernels      the "training kernels" measurement alerts: its own verdict is "alert"
                 (a layer's ratio ≥ the run's alert ratio, default 32) or its ratio is NaN or
                 ±inf; one alert per run, its message lists the worst layers by ratio
    stale        a RUNNING run whose last check is older than `multiple` × its expected
                 interval; resolves when checks resume or the run ends

The first four advance once per check read, in step order, so an alert that fired and resolved
between two polls produces both transitions. A check without the training-kernels measurement
(a float32 model on CPU: nothing to measure) counts as a clean check for "kernels".

Which verdict means what. `gradwatch/verdict` is the worse of the two measurements', so an
"alert" there may come from either: "distance" reads the distances themselves and "kernels"
the measurement's own verdict (`gradwatch/precision/verdict`), never the folded one. An
"error" there fires "error"; when only the training-kernels measurement failed (its own
verdict "error", the distance finite), the distances were measured and still go through
"distance" and "non_finite" (`definition_failed`). "stale" advances once per poll (its "checks" are
polls), and its transition step is the poll's Unix second: each stale episode and each repeat has
its own id, and the notification carries the run's last check step instead.

The expected interval of a run comes from its `gradwatch.every` param: a duration ("30min") is
that many seconds, a cron expression the gap between its next two firings, and a number of steps
the observed spacing of its checks (the median of the latest gaps, `observed_interval`). A run
with a step schedule and fewer than two checks has no expected interval yet, and is never stale.

Imports: gradwatch.common, gradwatch.record (layout, reader), gradwatch.alerts, monitor.config.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from gradwatch.alerts.state import AlertPolicy, AlertState, Transition, advance
from gradwatch.common.errors import ConfigError
from gradwatch.monitor.config import RULES
from gradwatch.record.layout import (
    LAYER_PREFIX,
    PRECISION_LAYER_PREFIX,
    VERDICT_CODES,
    parse_every,
)
from gradwatch.record.reader import CheckPoint, MonitoredRun

__all__ = [
    "CHECK_RULES",
    "RuleOutcome",
    "check_signals",
    "definition_failed",
    "evaluate_checks",
    "evaluate_stale",
    "expected_interval",
    "kernels_alerting",
    "observed_interval",
    "worst_kernel_layers",
    "worst_layers",
]

#: The rules that advance once per check, in the order they are evaluated.
STALE = "stale"
CHECK_RULES: tuple[str, ...] = tuple(rule for rule in RULES if rule != STALE)
ERROR_VERDICT = VERDICT_CODES["error"]
ALERT_VERDICT = VERDICT_CODES["alert"]
#: The two measurements of a check, as alerts name them (`CheckReport.fired_by`).
DEFINITION = "backprop definition"
KERNELS = "training kernels"
_RECENT_GAPS = 20  # gaps the observed interval is the median of


@dataclass(frozen=True)
class RuleOutcome:
    """What one run's new checks (or one staleness look) did to its alerts.

    `states` holds every rule state that changed (to be saved); `transitions` the announced
    ones in order, each with the check that caused it (None for "stale").
    """

    states: dict[str, AlertState] = field(default_factory=dict)
    transitions: list[tuple[str, Transition, CheckPoint | None]] = field(default_factory=list)


def check_signals(check: CheckPoint, alert_threshold: float) -> dict[str, bool]:
    """Which rules one check alerts.

    Example:
        >>> c = CheckPoint(step=10, timestamp_ms=0, rel_distance=2e-3, verdict=2,
        ...                max_element_error=None, layers={"gradwatch/layer/w": float("nan")})
        >>> check_signals(c, 1e-3)
        {'distance': True, 'non_finite': True, 'error': False, 'kernels': False}
        >>> k = CheckPoint(10, 0, 1e-9, 2, None, precision_verdict=2, precision_ratio=900.0)
        >>> check_signals(k, 1e-3)
        {'distance': False, 'non_finite': False, 'error': False, 'kernels': True}
    """
    values = [] if definition_failed(check.verdict, check.precision_verdict,
                                     check.rel_distance) else [check.rel_distance,
                                                               *check.layers.values()]
    return {
        "distance": any(math.isfinite(v) and v >= alert_threshold for v in values),
        "non_finite": any(not math.isfinite(v) for v in values),
        "error": check.verdict == ERROR_VERDICT,
        "kernels": kernels_alerting(check.precision_verdict, check.precision_ratio),
    }


def definition_failed(
    verdict: float | None, precision_verdict: float | None, rel_distance: float | None
) -> bool:
    """Whether a check's central differences failed (its distances say nothing then): verdict
    "error", unless that error is the training-kernels measurement's alone (its own verdict
    "error" and the distance finite: the distances were measured).

    Example:
        >>> definition_failed(3, None, float("nan")), definition_failed(3, 3, 1e-9)
        (True, False)
    """
    if verdict != ERROR_VERDICT:
        return False
    only_kernels = precision_verdict == ERROR_VERDICT and rel_distance is not None and \
        math.isfinite(rel_distance)
    return not only_kernels


def kernels_alerting(precision_verdict: float | None, ratio: float | None) -> bool:
    """The "kernels" rule's signal: the training-kernels verdict is "alert", or its ratio is
    NaN or ±inf (None, None: not measured, not alerting)."""
    return precision_verdict == ALERT_VERDICT or (ratio is not None and not math.isfinite(ratio))


def evaluate_checks(
    run_id: str,
    checks: Sequence[CheckPoint],
    states: Mapping[str, AlertState],
    policies: Mapping[str, AlertPolicy],
    alert_threshold: float,
) -> RuleOutcome:
    """Advance the per-check rules through `checks` (sorted by step)."""
    outcome = RuleOutcome()
    current = {rule: states.get(rule, AlertState()) for rule in CHECK_RULES}
    for check in checks:
        for rule, alerting in check_signals(check, alert_threshold).items():
            current[rule], transition = advance(
                policies[rule], current[rule], alerting, step=check.step, key=f"{run_id}/{rule}"
            )
            if transition is not None:
                outcome.transitions.append((rule, transition, check))
    if checks:
        outcome.states.update(
            {rule: s for rule, s in current.items() if s != states.get(rule, AlertState())}
        )
    return outcome


def evaluate_stale(
    run: MonitoredRun,
    state: AlertState | None,
    policy: AlertPolicy,
    *,
    now: float,
    last_check_at: float | None,
    interval: float | None,
    multiple: float,
) -> RuleOutcome:
    """Advance the "stale" rule by one look at `now` (Unix seconds).

    A run that is not stale and has no stale alert going costs nothing (empty outcome).
    """
    state = state or AlertState()
    stale = is_stale(run, now=now, last_check_at=last_check_at, interval=interval,
                     multiple=multiple)
    if not stale and state.state == "inactive":
        return RuleOutcome()
    new_state, transition = advance(policy, state, stale, step=int(now),
                                    key=f"{run.run_id}/{STALE}")
    outcome = RuleOutcome()
    if new_state != state:
        outcome.states[STALE] = new_state
    if transition is not None:
        outcome.transitions.append((STALE, transition, None))
    return outcome


def is_stale(
    run: MonitoredRun, *, now: float, last_check_at: float | None, interval: float | None,
    multiple: float,
) -> bool:
    """now − (last check, else run start) > multiple × interval, for a RUNNING run."""
    if run.status != "RUNNING" or interval is None or interval <= 0:
        return False
    reference = last_check_at
    if reference is None and run.start_time_ms is not None:
        reference = run.start_time_ms / 1000.0
    return reference is not None and now - reference > multiple * interval


def expected_interval(
    run: MonitoredRun, observed: float | None, *, now: float
) -> float | None:
    """Seconds expected between two checks of `run` (see the module docstring).

    Example:
        >>> run = MonitoredRun("r", "1", "n", "RUNNING", 0, None, None, None,
        ...                    params={"gradwatch.every": "30min"})
        >>> expected_interval(run, None, now=0.0)
        1800.0
    """
    if run.every is None:
        return observed
    try:
        every = parse_every(run.every)
    except ConfigError:
        return observed  # a param written by hand: fall back on what the checks show
    if every.seconds is not None:
        return every.seconds
    if every.cron is not None:
        return _cron_gap(every.cron, now)
    return observed


def observed_interval(
    previous: float | None, last_check_at: float | None, checks: Sequence[CheckPoint]
) -> float | None:
    """The median gap (seconds) between consecutive checks among the latest ones read, or
    `previous` when fewer than two checks give a gap.

    Example:
        >>> checks = [CheckPoint(s, s * 1000, 0.0, 0, None) for s in (10, 20, 40)]
        >>> observed_interval(None, 0.0, checks)
        10.0
    """
    times = [] if last_check_at is None else [last_check_at]
    times += [check.timestamp_ms / 1000.0 for check in checks]
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a][-_RECENT_GAPS:]
    return statistics.median(gaps) if gaps else previous


def worst_layers(
    layers: Mapping[str, float], *, limit: int = 5, prefix: str = LAYER_PREFIX
) -> list[tuple[str, float]]:
    """The `limit` worst layers, names without the ``gradwatch/layer/`` prefix (or `prefix`):
    non-finite first, then by value (distance, or ratio), largest first.

    Example:
        >>> worst_layers({"gradwatch/layer/a": 1e-8, "gradwatch/layer/b": float("nan"),
        ...               "gradwatch/layer/c": 1e-2}, limit=2)
        [('b', nan), ('c', 0.01)]
    """
    def badness(item: tuple[str, float]) -> tuple[int, float]:
        value = item[1]
        return (1, 0.0) if not math.isfinite(value) else (0, value)

    ranked = sorted(layers.items(), key=badness, reverse=True)[:limit]
    return [(name.removeprefix(prefix), value) for name, value in ranked]


def worst_kernel_layers(check: CheckPoint, *, limit: int = 5) -> list[tuple[str, float]]:
    """The check's `limit` worst layers by training-kernels ratio (names without the
    ``gradwatch/precision/layer/`` prefix), non-finite first.

    Example:
        >>> c = CheckPoint(10, 0, 1e-9, 2, None, precision_layers={
        ...     "gradwatch/precision/layer/a": 1.5, "gradwatch/precision/layer/b": 900.0})
        >>> worst_kernel_layers(c)
        [('b', 900.0), ('a', 1.5)]
    """
    return worst_layers(check.precision_layers, limit=limit, prefix=PRECISION_LAYER_PREFIX)


def _cron_gap(expression: str, now: float) -> float | None:
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(expression, timezone=timezone.utc)
    first = trigger.get_next_fire_time(None, datetime.fromtimestamp(now, timezone.utc))
    second = None if first is None else trigger.get_next_fire_time(first, first)
    if first is None or second is None:
        return None
    return (second - first).total_seconds()

