"""The layout of gradwatch's MLflow record: which keys, tags, params and artifacts hold what.

The one contract between the record writer (`gradwatch.record.writer`) and every reader of the
record (`gradwatch.record.reader`, the dashboards, the monitor, users' own queries).

Imports: gradwatch.common only (and APScheduler, deferred, to validate a cron `every`).

Per check, at step = the training global step:
  metrics  gradwatch/rel_distance, gradwatch/verdict (0 ok, 1 warn, 2 alert, 3 error),
           gradwatch/max_element_error, gradwatch/evaluations, gradwatch/seconds,
           gradwatch/layer/<parameter name>  (sanitised to MLflow's key rules, ≤ 250 chars,
           `layer_metric_keys`; only the tensors measured on their own in this check — a
           tensor that was only screened jointly has no distance of its own),
           gradwatch/coverage/screened, /localised, /measured (tensor counts),
           gradwatch/estimated (1 when rel_distance is an estimate),
           the training-kernels measurement, when it ran (a check's `kernels`, status
           "measured" or "error"): gradwatch/precision/verdict (its own verdict code, also
           folded into gradwatch/verdict), gradwatch/precision/ratio (the largest layer ratio),
           gradwatch/precision/distance and /reference_distance (overall, training and
           emulated), gradwatch/precision/layer/<parameter name> (each layer's ratio)
  tags     gradwatch.status (latest verdict word), gradwatch.last_step,
           gradwatch.alert ("firing" / "resolved", once an alert ever fired)
  artifact gradwatch/checks/step-<9-digit step>.json  (the CheckReport JSON, `artifact_path`)
Every `report_every` checks and at train end: artifact gradwatch/report.html (and at train end
gradwatch/report.png), the run report built from this record by `gradwatch.dashboard.report`.
Once per run, params: gradwatch.version, .every (`parse_every`), .mode, .eps, .budget,
.threshold.warn, .threshold.alert, .probe_rows.
A run gradwatch created itself (the tracking server was down at train start) also has the tags
gradwatch.created ("true") and gradwatch.local_id (the spool's key it was created for), and
lands in the experiment DEFAULT_EXPERIMENT unless one is named.

Values: MLflow stores NaN as NaN but refuses ±inf, so ±inf is written as ±DBL_MAX
(`encode_metric`) and read back as ±inf (`decode_metric`).
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from gradwatch.common.errors import ConfigError

__all__ = [
    "ALERT_TAG",
    "CHECKS_FOLDER",
    "COVERAGE_KINDS",
    "COVERAGE_PREFIX",
    "CREATED_TAG",
    "DEFAULT_EXPERIMENT",
    "ESTIMATED",
    "EVALUATIONS",
    "EVERY_HELP",
    "EVERY_PARAM",
    "LAST_STEP_TAG",
    "LAYER_PREFIX",
    "LOCAL_ID_TAG",
    "MAX_ELEMENT_ERROR",
    "MAX_KEY_LENGTH",
    "METRIC_PREFIX",
    "PARAM_PREFIX",
    "PRECISION_DISTANCE",
    "PRECISION_LAYER_PREFIX",
    "PRECISION_PREFIX",
    "PRECISION_RATIO",
    "PRECISION_REFERENCE",
    "PRECISION_VERDICT",
    "REL_DISTANCE",
    "REPORT_HTML",
    "REPORT_PNG",
    "SECONDS",
    "STATUS_TAG",
    "VERDICT",
    "VERDICT_CODES",
    "VERDICT_WORDS",
    "Every",
    "artifact_path",
    "decode_metric",
    "encode_metric",
    "layer_metric_keys",
    "parse_every",
    "threshold_param",
]

# -- metrics ----------------------------------------------------------------------------------

METRIC_PREFIX = "gradwatch/"
REL_DISTANCE = METRIC_PREFIX + "rel_distance"
VERDICT = METRIC_PREFIX + "verdict"  # the code of VERDICT_CODES, as a float
MAX_ELEMENT_ERROR = METRIC_PREFIX + "max_element_error"
EVALUATIONS = METRIC_PREFIX + "evaluations"
SECONDS = METRIC_PREFIX + "seconds"
ESTIMATED = METRIC_PREFIX + "estimated"  # 1 when rel_distance is an estimate
LAYER_PREFIX = METRIC_PREFIX + "layer/"
#: Tensors a check screened jointly / localised / measured on their own (auto mode).
COVERAGE_PREFIX = METRIC_PREFIX + "coverage/"
COVERAGE_KINDS = ("screened", "localised", "measured")
#: The training-kernels measurement (`CheckReport.kernels`).
PRECISION_PREFIX = METRIC_PREFIX + "precision/"
PRECISION_VERDICT = PRECISION_PREFIX + "verdict"
PRECISION_RATIO = PRECISION_PREFIX + "ratio"
PRECISION_DISTANCE = PRECISION_PREFIX + "distance"
PRECISION_REFERENCE = PRECISION_PREFIX + "reference_distance"
PRECISION_LAYER_PREFIX = PRECISION_PREFIX + "layer/"
VERDICT_CODES = {"ok": 0, "warn": 1, "alert": 2, "error": 3}
VERDICT_WORDS = tuple(sorted(VERDICT_CODES, key=VERDICT_CODES.__getitem__))

#: MLflow's limit on the length of a key (mlflow.utils.validation).
MAX_KEY_LENGTH = 250

_BAD_KEY_CHARACTERS = re.compile(r"[^\w.\- /]")  # MLflow allows alnum _ - . space / (and :)
_DBL_MAX = sys.float_info.max  # what the record writes for ±inf

# -- tags and params --------------------------------------------------------------------------

STATUS_TAG = "gradwatch.status"  # the latest verdict word
LAST_STEP_TAG = "gradwatch.last_step"  # the step of the latest check: the readers' high-water mark
ALERT_TAG = "gradwatch.alert"  # "firing" / "resolved", once an alert ever fired
CREATED_TAG = "gradwatch.created"  # "true" on a run gradwatch created itself
LOCAL_ID_TAG = "gradwatch.local_id"  # the spool key a created run was made for
PARAM_PREFIX = "gradwatch."
#: The param every gradwatch run has from the moment gradwatch attaches (`parse_every` reads it).
EVERY_PARAM = PARAM_PREFIX + "every"
DEFAULT_EXPERIMENT = "gradwatch"


def threshold_param(level: str) -> str:
    """The param holding a run's threshold for `level` ("warn" or "alert").

    Example:
        >>> threshold_param("alert")
        'gradwatch.threshold.alert'
    """
    return f"{PARAM_PREFIX}threshold.{level}"


# -- artifacts --------------------------------------------------------------------------------

CHECKS_FOLDER = "gradwatch/checks"
REPORT_HTML = "gradwatch/report.html"
REPORT_PNG = "gradwatch/report.png"


def artifact_path(step: int) -> str:
    """`gradwatch/checks/step-000001000.json` for step 1000."""
    return f"{CHECKS_FOLDER}/step-{step:09d}.json"


# -- keys and values --------------------------------------------------------------------------


def _sanitise(name: str) -> str:
    cleaned = _BAD_KEY_CHARACTERS.sub("_", name).replace("/", "_").strip()
    if cleaned in ("", ".", ".."):
        cleaned = "_" + cleaned
    return cleaned


def layer_metric_keys(names: Iterable[str], prefix: str = LAYER_PREFIX) -> dict[str, str]:
    """Parameter name → metric key `gradwatch/layer/<sanitised name>` (or under `prefix`,
    e.g. `PRECISION_LAYER_PREFIX`), unique and ≤ 250 chars.

    Characters MLflow refuses become "_"; names that collide after that, or that are too long,
    get "-" + the first 8 hex digits of sha1(original name), so the key of a name never depends
    on which other names are present.

    Example:
        >>> layer_metric_keys(["encoder.layer.0.weight", "a:b", "a_b"])["a:b"]
        'gradwatch/layer/a_b-...'
    """
    names = list(names)
    room = MAX_KEY_LENGTH - len(prefix)
    cleaned = {name: _sanitise(name) for name in names}
    counts: dict[str, int] = {}
    for value in cleaned.values():
        counts[value] = counts.get(value, 0) + 1
    keys = {}
    for name, value in cleaned.items():
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        changed = value != name
        if (counts[value] > 1 and changed) or len(value) > room:
            value = f"{value[: room - 9]}-{digest}"
        keys[name] = prefix + value
    return keys


def encode_metric(value: float) -> float:
    """The value to log: ±inf as ±DBL_MAX (MLflow refuses ±inf), NaN kept (a real outcome)."""
    return float(value) if not math.isinf(value) else math.copysign(_DBL_MAX, value)


def decode_metric(value: float) -> float:
    """A logged value read back: ±DBL_MAX as ±inf (see `encode_metric`)."""
    value = float(value)
    return math.copysign(math.inf, value) if abs(value) == _DBL_MAX else value


# -- the param gradwatch.every ----------------------------------------------------------------

_DURATION = re.compile(
    r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>s|sec|secs|seconds?|m|min|mins|minutes?|"
    r"h|hr|hrs|hours?|d|days?)\s*$",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

EVERY_HELP = (
    "every must be a number of optimizer steps (e.g. every=1000), a duration (every='30min', "
    "'2h', '90s') or a cron expression (every='0 * * * *' for hourly)"
)


@dataclass(frozen=True)
class Every:
    """A parsed `every=`: exactly one of steps, seconds, cron is set. `describe()` is the value
    of the param `gradwatch.every`, which `parse_every` reads back."""

    steps: int | None = None
    seconds: float | None = None
    cron: str | None = None

    def describe(self) -> str:
        if self.steps is not None:
            return str(self.steps)
        if self.seconds is not None:
            return f"{self.seconds:g}s"
        return str(self.cron)


def parse_every(every: int | str) -> Every:
    """Parse `every=`: an int (steps), a duration string or a cron expression.

    Example:
        >>> parse_every(1000), parse_every("30min").seconds, parse_every("0 * * * *").cron
        (Every(steps=1000, seconds=None, cron=None), 1800.0, '0 * * * *')
    """
    if isinstance(every, bool):
        raise ConfigError(f"{EVERY_HELP}; got {every!r}.")
    if isinstance(every, int):
        if every < 1:
            raise ConfigError(f"{EVERY_HELP}; got every={every}, which is not ≥ 1.")
        return Every(steps=every)
    if not isinstance(every, str):
        raise ConfigError(f"{EVERY_HELP}; got {type(every).__name__} {every!r}.")
    if every.strip().isdigit():
        return parse_every(int(every))
    match = _DURATION.match(every)
    if match:
        seconds = float(match["value"]) * _UNIT_SECONDS[match["unit"][0].lower()]
        if seconds <= 0:
            raise ConfigError(f"{EVERY_HELP}; got every={every!r}, a duration of zero.")
        return Every(seconds=seconds)
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(every)
    except ValueError as exc:
        raise ConfigError(f"{EVERY_HELP}; got every={every!r} ({exc}).") from None
    return Every(cron=every.strip())
