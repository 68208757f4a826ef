"""The configuration of `gradwatch monitor`: one pydantic model from TOML/YAML and env vars.

The configuration of `gradwatch monitor`: one pydantic model, read from TOML or YAML and
overridden by ``GRADWATCH_*`` environment variables, checked as a whole before anything starts.

An example ``monitor.toml``::

    tracking_uri = "http://127.0.0.1:5000"     # default: $MLFLOW_TRACKING_URI, else MLflow's own
    experiments = ["llm-pretrain", "42"]        # names or ids, at least one
    tags = { team = "nlp" }                     # only runs with all of these tags
    poll_interval = 60                          # seconds between polls
    send_interval = 5                           # seconds between looks at the outbox
    read_workers = 4                            # MLflow reads at once (runs with new checks)
    history_window = 86400                      # runs that ended before: not replayed
    sweep_interval = 600                        # seconds between full searches of all runs
    # misfire_grace_time = 60                   # seconds a late poll may still run (default:
                                                # one poll interval)
    # state_url = "sqlite:////var/lib/gradwatch/monitor.db"   # default: default_state_url()

    [thresholds]
    warn = 1e-5
    alert = 1e-3

    [policies.default]                          # every rule, counted in checks
    fire_after = 1
    resolve_after = 1
    repeat_every = 10
    [policies.stale]                            # one rule: these fields on top of the default
    fire_after = 2

    [staleness]
    enabled = true
    multiple = 3            # stale: last check older than 3 × the run's expected interval

    [channels.ops]
    url_env = "GRADWATCH_SLACK_URL"             # the URL (with its token) lives in this variable
    [channels.oncall]
    url_file = "/run/secrets/oncall_webhook"    # ... or in this file (relative: to this file)
    [channels.local]
    url = "json://127.0.0.1:8080"               # in clear only when it holds nothing secret

    [prometheus]
    enabled = true
    host = "127.0.0.1"
    port = 9464

Notification URLs carry tokens, so the file never holds one in clear: a literal ``url`` is
accepted only when `redact` would leave it unchanged (no user, password, path or query value);
anything else is refused with the fix (``url_env`` or ``url_file``). The URLs are read at
start-up, by `MonitorConfig.resolved_channels`; ``load_config(..., resolve_channels=True)`` reads
them too, to list an unset one with the file's problems. `repr`, `MonitorConfig.describe` and every
error message are safe to log: channels show where their URL comes from, never the URL.

Environment variables (``environ``, default `os.environ`) override the file, one value each:
``GRADWATCH_<FIELD>`` for a top-level setting, ``__`` to go one level down; setting names are
case-insensitive, table keys (channel names, tag names) are matched to the file's keys without
regard to case and otherwise kept as written::

    GRADWATCH_POLL_INTERVAL=30
    GRADWATCH_EXPERIMENTS=llm-pretrain,42           # or a JSON list: '["a,b", "c"]'
    GRADWATCH_TAGS__team=nlp
    GRADWATCH_THRESHOLDS__ALERT=1e-3
    GRADWATCH_POLICIES__STALE__REPEAT_EVERY=none    # none/null: unset an optional value
    GRADWATCH_CHANNELS__OPS__URL_ENV=SLACK_URL
    GRADWATCH_PROMETHEUS__ENABLED=true
    GRADWATCH_THRESHOLDS='{"warn": 1e-6, "alert": 1e-4}'   # a whole table, as JSON

``GRADWATCH_CONFIG`` names the file when `load_config` gets no path. Other ``GRADWATCH_*``
variables whose first part is not a setting (``GRADWATCH_SPOOL_DIR``, ...) are left alone.

Imports: gradwatch.common, gradwatch.engine (thresholds), gradwatch.alerts, monitor.schema,
monitor.config_files.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from gradwatch.alerts.channels import make_notifier
from gradwatch.alerts.notify import Notifier
from gradwatch.alerts.redact import redact, scrub_urls
from gradwatch.alerts.state import AlertPolicy
from gradwatch.common.errors import ConfigError, MissingDependencyError
from gradwatch.engine.report import Thresholds
from gradwatch.monitor.config_files import anchor_secret_files, read_file, read_secret_file
from gradwatch.monitor.schema import default_state_url, parse_url

__all__ = [
    "RULES",
    "ChannelSpec",
    "MonitorConfig",
    "PrometheusConfig",
    "RuleName",
    "StalenessConfig",
    "load_config",
]

#: The monitor's alert rules, as named in ``[policies.<rule>]`` and in silences ("kernels":
#: the training-kernels measurement, `gradwatch.monitor.rules`).
RuleName = Literal["distance", "non_finite", "error", "kernels", "stale"]
RULES: tuple[str, ...] = get_args(RuleName)
PolicyName = Literal["default", "distance", "non_finite", "error", "kernels", "stale"]

ENV_PREFIX = "GRADWATCH_"
CONFIG_ENV = "GRADWATCH_CONFIG"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[+-]?[0-9]+")
_NONE_WORDS = frozenset({"none", "null"})
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

SECRET_URL_HELP = (
    "Notification URLs usually carry a token, so the config file must not hold one in clear. "
    "Put the URL in an environment variable and write `url_env = \"SLACK_URL\"`, or in a file "
    "readable only by the monitor and write `url_file = \"/run/secrets/slack\"`."
)


# ---------------------------------------------------------------------------- parts
class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChannelSpec(_Section):
    """Where one notification channel's URL comes from: exactly one of the three fields.

    Example:
        >>> ChannelSpec(url_env="SLACK_URL").source
        'env:SLACK_URL'
        >>> ChannelSpec(url="https://hooks.example.com/T0/B0/secret")
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for ChannelSpec
        ...
    """

    url: str | None = Field(
        default=None,
        description="the apprise or http(s) URL, only if it holds no secret, e.g. "
        "url = \"json://127.0.0.1:8080\"",
    )
    url_env: str | None = Field(
        default=None,
        description="the name of the environment variable that holds the URL, e.g. "
        "url_env = \"SLACK_URL\"",
    )
    url_file: str | None = Field(
        default=None,
        description="the path of a file that holds the URL, e.g. "
        "url_file = \"/run/secrets/slack\"",
    )

    @model_validator(mode="after")
    def _check_one_source(self) -> ChannelSpec:
        given = [name for name in ("url", "url_env", "url_file") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                f"a channel needs exactly one of url_env, url_file or url, got "
                f"{' and '.join(given) if given else 'none'}. {SECRET_URL_HELP}"
            )
        if self.url is not None:
            _check_clear_url(self.url)
        if self.url_env is not None and not _ENV_NAME.fullmatch(self.url_env):
            shown = repr(redact(self.url_env) if "://" in self.url_env else self.url_env)
            raise ValueError(
                f"url_env must be the NAME of an environment variable (letters, digits, '_'), "
                f"got {shown}; put the URL itself in that variable: url_env = \"SLACK_URL\"."
            )
        if self.url_file is not None and "://" in self.url_file:
            raise ValueError(
                f"url_file must be the path of a file that holds the URL, got what looks like "
                f"a URL ({redact(self.url_file)!r}). Write the URL into a file and give its "
                f"path: url_file = \"/run/secrets/slack\"."
            )
        return self

    @property
    def source(self) -> str:
        """Where the URL comes from, safe to show: ``env:NAME``, ``file:PATH`` or the URL."""
        if self.url_env is not None:
            return f"env:{self.url_env}"
        if self.url_file is not None:
            return f"file:{self.url_file}"
        return redact(self.url or "")

    def resolve(self, environ: Mapping[str, str] | None = None) -> SecretStr:
        """The URL, read now from the environment or the file; `ConfigError` if absent."""
        env = os.environ if environ is None else environ
        if self.url_env is not None:
            value = env.get(self.url_env, "").strip()
            if not value:
                raise ConfigError(f"environment variable {self.url_env} is not set or empty; "
                                  f"set it to the channel's notification URL.")
        elif self.url_file is not None:
            value = read_secret_file(Path(self.url_file).expanduser())
        else:
            value = (self.url or "").strip()
        scheme, sep, _ = value.partition("://")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
            raise ConfigError(
                f"{self.source} does not hold a URL with a scheme (got {redact(value)!r}); "
                f"expected e.g. 'https://hooks.example.com/…' or 'slack://…'."
            )
        return SecretStr(value)


class StalenessConfig(_Section):
    """The "stale" rule: a RUNNING run whose last check is older than `multiple` × its
    expected check interval alerts; it resolves when checks resume or the run ends."""

    enabled: bool = Field(default=True, description="true or false (default true)")
    multiple: float = Field(
        default=3.0, gt=1, allow_inf_nan=False,
        description="a number > 1 of expected check intervals (default 3), e.g. multiple = 3",
    )


class PrometheusConfig(_Section):
    """The optional ``/metrics`` endpoint (latest distances and alert states)."""

    enabled: bool = Field(default=False, description="true or false (default false)")
    host: str = Field(
        default="127.0.0.1", min_length=1,
        description="the address to bind (default \"127.0.0.1\": this machine only)",
    )
    port: int = Field(
        default=9464, ge=1, le=65535, description="a TCP port 1-65535 (default 9464)"
    )


# ---------------------------------------------------------------------------- the config
class MonitorConfig(_Section):
    """Everything `gradwatch monitor` needs, checked at once; build it with `load_config`.

    Example:
        >>> config = MonitorConfig(experiments=["llm"], state_url="sqlite:////tmp/m.db",
        ...                        channels={"ops": {"url_env": "SLACK_URL"}})
        >>> config.poll_interval, config.misfire_grace, config.policy_for("stale")
        (60.0, 60.0, AlertPolicy(fire_after=1, resolve_after=1, repeat_every=None))
        >>> config.describe()["channels"]
        {'ops': 'env:SLACK_URL'}
    """

    tracking_uri: str | None = Field(
        default=None, min_length=1,
        description="the MLflow tracking URI, e.g. tracking_uri = \"http://127.0.0.1:5000\" "
        "(default: $MLFLOW_TRACKING_URI, else MLflow's own default)",
    )
    experiments: tuple[str, ...] = Field(
        min_length=1,
        description="at least one experiment name or id, e.g. experiments = [\"llm-pretrain\"]",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="tags a run must carry to be watched, e.g. tags = { team = \"nlp\" }",
    )
    poll_interval: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="seconds between two polls, > 0 (default 60), e.g. poll_interval = 60",
    )
    send_interval: float = Field(
        default=5.0, gt=0, allow_inf_nan=False,
        description="seconds between two looks at the outbox for notifications to (re)send, "
        "> 0 (default 5)",
    )
    history_window: float = Field(
        default=86400.0, ge=0, allow_inf_nan=True,
        description="seconds; a run seen for the first time that ended longer ago than this is "
        "not replayed (no notifications for its past checks). Default 86400 (a day); inf: "
        "replay every run",
    )
    sweep_interval: float = Field(
        default=600.0, ge=0, allow_inf_nan=False,
        description="seconds between two searches of every run, ≥ 0 (default 600); the polls "
        "between them search only running runs, runs started since the last poll and runs "
        "that were running at it; 0: every poll searches every run",
    )
    read_workers: int = Field(
        default=4, ge=1, le=64,
        description="MLflow reads run at once when many runs have new checks, 1-64 (default 4)",
    )
    misfire_grace_time: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="seconds a late poll may still run, > 0 (default: one poll interval)",
    )
    state_url: str = Field(
        default_factory=default_state_url, min_length=1,
        description="a SQLAlchemy URL or SQLite path for the monitor's state, e.g. "
        "state_url = \"sqlite:////var/lib/gradwatch/monitor.db\"",
    )
    thresholds: Thresholds = Field(
        default_factory=Thresholds,
        description="a table with warn < alert, e.g. [thresholds] warn = 1e-5, alert = 1e-3",
    )
    policies: dict[PolicyName, AlertPolicy] = Field(
        default_factory=dict,
        description=f"tables named default or a rule ({', '.join(RULES)}) with fire_after, "
        f"resolve_after, repeat_every (whole numbers of checks ≥ 1)",
    )
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)
    channels: dict[str, ChannelSpec] = Field(
        default_factory=dict,
        description="tables [channels.<name>] with one of url_env, url_file or url",
    )
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)

    @field_validator("experiments", mode="before")
    @classmethod
    def _experiments_as_strings(cls, value: Any) -> Any:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            value = [str(item).strip() if isinstance(item, (str, int)) and not isinstance(
                item, bool) else item for item in value]
            if "" in value:
                raise ValueError("an experiment name or id is empty; remove it")
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_values_as_strings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: str(item) if isinstance(item, int) and not isinstance(item, bool)
                    else item for key, item in value.items()}
        return value

    @field_validator("thresholds", mode="before")
    @classmethod
    def _threshold_names(cls, value: Any) -> Any:
        # Thresholds' own message for an unknown key does not name it; this one does.
        if isinstance(value, Mapping):
            valid = list(Thresholds.model_fields)
            for key in value:
                if key not in valid:
                    close = difflib.get_close_matches(str(key), valid, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(f"{key!r} is not a threshold; {hint}valid: "
                                     f"{', '.join(valid)}, e.g. [thresholds] alert = 1e-3")
        return value

    @field_validator("state_url")
    @classmethod
    def _state_url_parses(cls, value: str) -> str:
        parse_url(value)  # ConfigError (a ValueError) names the expected forms
        return value

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, value: dict[str, ChannelSpec]) -> dict[str, ChannelSpec]:
        bad = [name for name in value if not _CHANNEL_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"channel names must be letters, digits, '_', '-' or '.', up to "
                             f"64 characters, got {bad!r}; rename them, e.g. [channels.ops]")
        return value

    # -------------------------------------------------------------------- derived
    @property
    def misfire_grace(self) -> float:
        """Seconds a late poll may still run: `misfire_grace_time`, else one poll interval."""
        if self.misfire_grace_time is None:
            return self.poll_interval
        return self.misfire_grace_time

    def policy_for(self, rule: str) -> AlertPolicy:
        """The rule's policy: its own fields on top of ``[policies.default]``."""
        if rule not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(RULES)}, got {rule!r}.")
        merged = self.policies.get("default", AlertPolicy()).model_dump()
        own = self.policies.get(rule)  # type: ignore[call-overload]  # checked above
        if own is not None:
            merged.update(own.model_dump(include=own.model_fields_set))
        return AlertPolicy(**merged)

    def resolved_channels(
        self, environ: Mapping[str, str] | None = None
    ) -> dict[str, SecretStr]:
        """Each channel's URL, read now (at start-up); every missing one in one `ConfigError`.

        The values are `SecretStr` so that printing the dict shows no URL; call
        ``.get_secret_value()`` to hand one to `make_notifier`.
        """
        resolved: dict[str, SecretStr] = {}
        problems = []
        for name, channel in self.channels.items():
            try:
                resolved[name] = channel.resolve(environ)
            except ConfigError as exc:
                problems.append(f"channels.{name}: {exc}")
        if problems:
            raise ConfigError(_summary("Cannot read the monitor's channel URLs", problems))
        return resolved

    def notifiers(self, environ: Mapping[str, str] | None = None) -> dict[str, Notifier]:
        """A `Notifier` per channel (`make_notifier` on each resolved URL)."""
        return {name: make_notifier(url.get_secret_value())
                for name, url in self.resolved_channels(environ).items()}

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-able data, safe to log or show in `gradwatch monitor status`:
        channels show their source, URLs lose their passwords."""
        data = self.model_dump(mode="json", exclude={"channels", "misfire_grace_time"})
        data["tracking_uri"] = _hide_credentials(self.tracking_uri)
        data["state_url"] = _hide_credentials(self.state_url)
        data["misfire_grace_time"] = self.misfire_grace
        data["channels"] = {name: spec.source for name, spec in self.channels.items()}
        return data

    def __repr_args__(self) -> Any:
        safe = self.describe()
        for name in type(self).model_fields:
            yield name, safe[name] if name in ("tracking_uri", "state_url") else getattr(
                self, name)


# ---------------------------------------------------------------------------- loading
def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
    *, resolve_channels: bool = False,
) -> MonitorConfig:
    """Read `path` (TOML, or YAML with PyYAML), apply ``GRADWATCH_*`` overrides, validate.

    `path` None: ``$GRADWATCH_CONFIG``, else the environment alone. `environ` defaults to
    `os.environ`. Every problem is reported at once, one line each, in one `ConfigError`.
    `resolve_channels` also reads each channel's URL now (from `environ` or its file) and
    builds its notifier, so that an unset variable or a URL no notifier takes is listed with
    the file's problems (`gradwatch monitor --check`, and the monitor before it starts).
    It is off by default because `status` and `silence` read the config only for its state and
    must work from a shell that does not hold the channels' secrets.

    Example:
        >>> config = load_config(None, {"GRADWATCH_EXPERIMENTS": "a,b",
        ...                             "GRADWATCH_POLL_INTERVAL": "30", "HOME": "/home/me"})
        >>> config.experiments, config.poll_interval, config.state_url
        (('a', 'b'), 30.0, 'sqlite:////home/me/.local/state/gradwatch/monitor.db')
        >>> try:
        ...     load_config(None, {"GRADWATCH_POLL_INTERVAL": "soon", "HOME": "/h"})
        ... except ConfigError as error:
        ...     print(error)
        Invalid gradwatch monitor config (from the environment), 2 problems:
          - experiments: required, but not given. Expected at least one experiment name or id, ...
          - poll_interval (from GRADWATCH_POLL_INTERVAL): Input should be a valid number, ...
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data: dict[str, Any] = {}
    origin = "from the environment"
    if path is not None:
        file = Path(path).expanduser()
        data = read_file(file)
        anchor_secret_files(data, file.parent)
        origin = f"in {file}"
    sources, problems = _apply_env(data, env)
    if "tracking_uri" not in data and env.get("MLFLOW_TRACKING_URI"):
        data["tracking_uri"] = env["MLFLOW_TRACKING_URI"]
        sources[("tracking_uri",)] = "MLFLOW_TRACKING_URI"
    data.setdefault("state_url", default_state_url(env))
    config: MonitorConfig | None = None
    try:
        config = MonitorConfig.model_validate(data)
    except ValidationError as exc:
        problems += _describe_errors(exc, sources)
    if resolve_channels:
        problems += _channel_problems(data.get("channels"), env)
    if config is not None and not problems:
        return config
    raise ConfigError(_summary(f"Invalid gradwatch monitor config ({origin})", problems))


def _channel_problems(channels: Any, environ: Mapping[str, str]) -> list[str]:
    """One line per channel whose URL cannot be read, or that no notifier accepts.

    Reads the raw table, so that the channels are checked even when another part of the config
    is invalid; a channel that is itself malformed is already among the validation errors.
    """
    if not isinstance(channels, Mapping):
        return []
    problems = []
    for name, raw in channels.items():
        try:
            spec = ChannelSpec.model_validate(raw)
        except ValidationError:
            continue
        try:
            make_notifier(spec.resolve(environ).get_secret_value())
        except (ConfigError, MissingDependencyError) as exc:  # apprise URLs need apprise
            problems.append(f"channels.{name}: {exc}")
    return problems


def _summary(title: str, problems: list[str]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"{title}, {count}:\n" + "\n".join(f"  - {scrub_urls(line)}" for line in problems)


# ---------------------------------------------------------------------------- environment
def _apply_env(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[tuple[str, ...], str], list[str]]:
    """Write each ``GRADWATCH_*`` override into `data`; return {loc: variable} and problems."""
    sources: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for variable in sorted(environ):
        if not variable.upper().startswith(ENV_PREFIX) or variable.upper() == CONFIG_ENV:
            continue
        segments = variable[len(ENV_PREFIX):].split("__")
        if segments[0].lower() not in MonitorConfig.model_fields or "" in segments:
            continue  # another gradwatch variable (GRADWATCH_SPOOL_DIR, ...)
        loc, annotation, optional = _walk(segments, data)
        try:
            value = _coerce(environ[variable], annotation, optional=optional)
        except ValueError as exc:
            problems.append(f"{'.'.join(loc)} (from {variable}): {exc}")
            continue
        _set(data, loc, value)
        sources[loc] = variable
    return sources, problems


def _walk(segments: list[str], data: Any) -> tuple[tuple[str, ...], Any, bool]:
    """The location `segments` name in the config, and the annotation found there."""
    annotation: Any = MonitorConfig
    optional = False
    loc: list[str] = []
    for segment in segments:
        annotation, optional = _unwrap_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            key = segment.lower()
            field = annotation.model_fields.get(key)
            annotation = field.annotation if field is not None else None
        else:
            existing = data if isinstance(data, dict) else {}
            key = next((k for k in existing if str(k).lower() == segment.lower()), segment)
            args = get_args(annotation)
            annotation = args[1] if get_origin(annotation) is dict and len(args) == 2 else None
        loc.append(key)
        data = data.get(key) if isinstance(data, dict) else None
    annotation, optional = _unwrap_optional(annotation)
    return tuple(loc), annotation, optional


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _coerce(text: str, annotation: Any, *, optional: bool) -> Any:
    """An environment string as the value `annotation` wants (pydantic converts the rest)."""
    value = text.strip()
    if optional and value.lower() in _NONE_WORDS:
        return None
    origin = get_origin(annotation)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    if origin in (list, tuple) or (is_model or origin is dict):
        opener = "[" if origin in (list, tuple) else "{"
        if value.startswith(opener):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                example = '["a", "b"]' if opener == "[" else '{"key": 1}'
                raise ValueError(f"expected JSON ({exc.msg} at character {exc.pos}), "
                                 f"e.g. {example}") from None
        if origin in (list, tuple):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value  # pydantic says a table was expected
    if annotation is int and _INT.fullmatch(value):
        return int(value)  # AlertPolicy counts are strict ints: "3" would not do
    return value


def _set(data: dict[str, Any], loc: tuple[str, ...], value: Any) -> None:
    for key in loc[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[loc[-1]] = value


# ---------------------------------------------------------------------------- error texts
def _describe_errors(exc: ValidationError, sources: Mapping[tuple[str, ...], str]) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        where = ".".join(part for part in loc if part != "[key]") or "(top level)"
        path = tuple(part for part in loc if part != "[key]")
        variables = [variable for source, variable in sources.items()
                     if source[: len(path)] == path or path[: len(source)] == source]
        if variables:
            where += f" (from {', '.join(variables)})"
        lines.append(f"{where}: {_explain(error, loc)}")
    return lines


def _explain(error: Any, loc: tuple[str, ...]) -> str:
    kind = error["type"]
    parent, field = _field_at(loc[:-1]), _field_at(loc)
    if kind == "extra_forbidden":
        valid = list(parent.model_fields) if _is_model(parent) else []
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"not a setting; {hint}valid settings here: {', '.join(valid)}."
    if kind == "missing":
        example = f" Expected {field.description}." if isinstance(field, FieldInfo) else ""
        return f"required, but not given.{example}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if loc and loc[-1] == "[key]":
        return f"{message}, got {_show(error.get('input'), loc)}."
    if kind == "value_error":  # our own validators: the message says what to do
        return message if message.endswith(".") else message + "."
    expected = f" Expected {field.description}." if isinstance(field, FieldInfo) else ""
    return f"{message}, got {_show(error.get('input'), loc)}.{expected}"


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _field_at(loc: tuple[str, ...]) -> Any:
    """The `FieldInfo` at `loc` (a model, or None, when the location is not a field)."""
    current: Any = MonitorConfig
    found: Any = MonitorConfig
    for part in loc:
        current, _ = _unwrap_optional(current)
        if _is_model(current):
            found = current.model_fields.get(part)
            current = found.annotation if found is not None else None
        elif get_origin(current) in (dict, list, tuple):
            if part == "[key]":
                continue
            args = get_args(current)
            current = args[-1] if args else None
            found = current
        else:
            return None
    if _is_model(found) or isinstance(found, FieldInfo):
        return found
    return None


def _show(value: Any, loc: tuple[str, ...]) -> str:
    """`value` as an error may quote it: URLs redacted, channel values never shown."""
    if loc and loc[0] == "channels" and not isinstance(value, (dict, list, type(None))):
        return f"a {type(value).__name__} (not shown)"
    if isinstance(value, dict):
        return f"a table with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(item, loc) for item in value[:5]) + (
            ", …]" if len(value) > 5 else "]")
    if isinstance(value, str):
        if "://" in value:
            return repr(redact(value))
        return repr(value if len(value) <= 60 else value[:59] + "…")
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return repr(value)


def _check_clear_url(url: str) -> None:
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if redact(text) != f"{scheme.lower()}{sep}{rest}" or not sep:
        raise ValueError(
            f"url holds a secret in clear ({redact(text)!r}: everything shown as *** is "
            f"hidden from logs). {SECRET_URL_HELP}"
        )


def _hide_credentials(url: str | None) -> str | None:
    """`url` with its user info and query values masked; scheme, host and path kept.

    >>> _hide_credentials("postgresql://gw:pw@db.internal/gradwatch?sslkey=k")
    'postgresql://gw:***@db.internal/gradwatch?sslkey=***'
    >>> _hide_credentials("sqlite:////var/lib/gradwatch/monitor.db")
    'sqlite:////var/lib/gradwatch/monitor.db'
    """
    if url is None or "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    netloc = re.match(r"[^/?#]*", rest).group()  # type: ignore[union-attr]  # always matches
    tail = rest[len(netloc):]
    user, at, host = netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        netloc = f"{name}:***@{host}" if colon else f"***@{host}"
    path, question, query = tail.partition("?")
    if question:
        query = "&".join(f"{item.partition('=')[0]}=***" for item in query.split("&") if item)
        path = f"{path}?{query}"
    return f"{scheme}://{netloc}{path.partition('#')[0]}"
