"""The `gradwatch monitor` commands.

    gradwatch monitor [--config FILE]            run until SIGTERM / Ctrl-C
    gradwatch monitor --once [--config FILE]     one poll, send what is due, exit (cron, tests)
    gradwatch monitor --check [--config FILE]    validate the config, print it (no secrets)
    gradwatch monitor status [--json]            the alert table, outbox and silences
    gradwatch monitor silence add [--run GLOB] [--experiment GLOB] [--rule GLOB]
                                  --for 2h | --until 2026-12-01T09:00 [--comment TEXT]
    gradwatch monitor silence list [--all]
    gradwatch monitor silence expire ID

`status` and `silence` open the state without its lock, so they work beside a running monitor.
The state is found from ``--state URL``, else the config's ``state_url`` (``--config`` or
``$GRADWATCH_CONFIG``), else ``$GRADWATCH_STATE_URL``, else the default file.

Imports: the monitor's modules, gradwatch.common, gradwatch.record, gradwatch.alerts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from gradwatch.common.errors import ConfigError, GradwatchError

__all__ = ["add_monitor_parser"]

EXIT_OK, EXIT_ERROR = 0, 2
STATE_ENV = "GRADWATCH_STATE_URL"


def add_monitor_parser(commands: Any) -> None:
    """Register `gradwatch monitor` on the top-level subparsers."""
    monitor = commands.add_parser(
        "monitor", help="watch MLflow for gradwatch checks and send notifications",
        description="Watch MLflow for gradwatch checks, apply the alert rules and send "
        "deduplicated notifications (see README, 'The monitor').",
    )
    _config_option(monitor)
    mode = monitor.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one poll, send, exit")
    mode.add_argument("--check", action="store_true",
                      help="validate the config and print it (secrets hidden), then exit")
    monitor.add_argument("--log-level", default="INFO",
                         choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    monitor.set_defaults(handler=_run)
    actions = monitor.add_subparsers(dest="action")

    status = actions.add_parser("status", help="print the alert table")
    _state_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    silence = actions.add_parser("silence", help="mute alerts for a while")
    silences = silence.add_subparsers(dest="silence_action", required=True)
    add = silences.add_parser("add", help="add a silence",
                              description="Mute the alerts that match every given glob "
                              "(an omitted one matches anything).")
    _state_options(add)
    add.add_argument("--run", metavar="GLOB", help="run id glob")
    add.add_argument("--experiment", metavar="GLOB", help="experiment name or id glob")
    add.add_argument("--rule", metavar="GLOB",
                     help="distance, non_finite, error, kernels or stale (or a glob)")
    until = add.add_mutually_exclusive_group(required=True)
    until.add_argument("--for", dest="duration", metavar="DURATION",
                       help="e.g. 90min, 2h, 1d")
    until.add_argument("--until", metavar="TIME", help="ISO 8601, e.g. 2026-12-01T09:00Z")
    add.add_argument("--comment", default="", help="why (shown in status and logs)")
    add.set_defaults(handler=_silence_add)
    listing = silences.add_parser("list", help="list active silences")
    _state_options(listing)
    listing.add_argument("--all", action="store_true", help="expired ones too")
    listing.set_defaults(handler=_silence_list)
    expire = silences.add_parser("expire", help="end a silence now")
    _state_options(expire)
    expire.add_argument("silence_id", type=int, metavar="ID")
    expire.set_defaults(handler=_silence_expire)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML or YAML config (default: $GRADWATCH_CONFIG, else the "
                        "GRADWATCH_* environment alone)")


def _state_options(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.add_argument("--state", metavar="URL", default=None,
                        help="the monitor's state (SQLAlchemy URL or SQLite path)")


# ---------------------------------------------------------------------------- the service
def _run(args: argparse.Namespace) -> int:
    from gradwatch.monitor.config import load_config
    from gradwatch.monitor.metrics import serve_metrics
    from gradwatch.monitor.service import Monitor
    from gradwatch.record.reader import resolve_experiments

    # the channels' URLs are read with the rest, so that an unset variable is listed with the
    # file's problems, all at once, before anything is printed as valid or started
    config = load_config(args.config, resolve_channels=True)
    if args.check:
        print(json.dumps(config.describe(), indent=2))
        return EXIT_OK
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    monitor = Monitor(config)
    try:
        if args.once:
            return _once(monitor)
        try:
            resolve_experiments(monitor.client, config.experiments)
        except ConfigError:
            raise  # an unknown experiment will not fix itself: refuse to start
        except Exception as error:  # MLflow not up yet: the polls retry
            logging.getLogger("gradwatch.monitor").warning(
                "MLflow is not reachable yet (%s); polling anyway", type(error).__name__)
        server = serve_metrics(monitor)
        if server is not None:
            logging.getLogger("gradwatch.monitor").info("metrics on %s", server.url)
        try:
            monitor.run_forever()
        finally:
            if server is not None:
                server.close()
    finally:
        monitor.close()
    return EXIT_OK


def _once(monitor: Any) -> int:
    try:
        poll, sent = monitor.run_once()
    except GradwatchError:
        raise
    except Exception as error:
        from gradwatch.alerts.redact import describe, scrub_urls

        print(f"gradwatch: the poll failed: {scrub_urls(describe(error))}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps({"poll": poll.as_dict(), "sent": sent.sent, "failed": sent.failed,
                      "dead": sent.dead}))
    return EXIT_OK


# ---------------------------------------------------------------------------- status
def _open_state(args: argparse.Namespace, *, create: bool = False) -> Any:
    from gradwatch.monitor.config import CONFIG_ENV, load_config
    from gradwatch.monitor.schema import default_state_url
    from gradwatch.monitor.state import MonitorState

    url = args.state
    if url is None and (args.config or os.environ.get(CONFIG_ENV)):
        url = load_config(args.config).state_url
    url = url or os.environ.get(STATE_ENV) or default_state_url()
    from gradwatch.monitor.schema import parse_url, sqlite_file

    database = sqlite_file(parse_url(url))
    if database is not None and not database.exists() and not create:
        raise ConfigError(
            f"No monitor state at {database}: has `gradwatch monitor` run with this state? "
            f"Point at its state with --state URL or --config FILE (its state_url)."
        )
    return MonitorState(url, lock=False)


def _status(args: argparse.Namespace) -> int:
    with _open_state(args) as state:
        now = time.time()
        alerts = [a for a in state.alerts() if a.state.state != "inactive" or a.last_transition]
        data = {
            "state": repr(state),
            "last_poll": state.meta("last_poll"),
            "scheduler": state.meta("scheduler"),
            "lease": _lease_dict(state.lease(), now),
            "replicas": [{
                "replica_id": r.replica_id, "host": r.host, "pid": r.pid, "role": r.role,
                "started_at": r.started_at, "heartbeat_at": r.heartbeat_at,
            } for r in state.replicas()],
            "run_names": state.meta("run_names") or {},
            "outbox": state.outbox_counts(),
            "alerts": [{
                "run_id": a.run_id, "rule": a.rule, "state": a.state.state,
                "since_step": a.state.active_since_step, "fired_at_step": a.state.fired_at_step,
                "last_transition": a.last_transition, "last_transition_step":
                a.last_transition_step, "updated_at": a.updated_at,
            } for a in alerts],
            "silences": [_silence_dict(s) for s in state.silences(now=now)],
            "dead": [{"id": r.id, "notification_id": r.notification_id, "channel": r.channel,
                      "attempts": r.attempts, "last_error": r.last_error}
                     for r in state.outbox("dead")],
        }
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        _print_status(data, now)
    return EXIT_OK


def _lease_dict(held: Any, now: float) -> dict[str, Any] | None:
    """Who is active and since when (an expired lease: nobody, until a replica takes it)."""
    if held is None:
        return None
    return {"holder": held.holder, "active_since": held.acquired_at,
            "renewed_at": held.renewed_at, "expires_at": held.expires_at,
            "expired": held.expires_at <= now}


def _print_status(data: dict[str, Any], now: float) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text: status must work without the monitor extra
        print(json.dumps(data, indent=2, default=str))
        return
    console = Console(highlight=False)
    poll = data["last_poll"]
    if poll is None:
        console.print("No poll recorded yet in " + data["state"])
    else:
        outcome = f"[red]failed: {poll['error']}[/red]" if poll.get("error") else "ok"
        console.print(f"Last poll {_ago(now - poll['started_at'])}: {outcome}; "
                      f"{poll['runs']} runs, {poll['new_checks']} new checks, "
                      f"{poll['seconds']} s", markup=True)
    missed = (data["scheduler"] or {}).get("misses")
    if missed:
        console.print(f"[yellow]{missed} polls missed their time[/yellow]")
    held = data["lease"]
    if held is not None:
        who = "nobody (the lease lapsed)" if held["expired"] else held["holder"]
        console.print(f"Active monitor: {who}, since {_ago(now - held['active_since'])}")
    for replica in data["replicas"]:
        console.print(f"  replica {replica['replica_id']} ({replica['role']}), heartbeat "
                      f"{_ago(now - replica['heartbeat_at'])}")
    outbox = data["outbox"]
    console.print(f"Outbox: {outbox['pending']} pending, {outbox['sent']} sent, "
                  f"{outbox['dead']} dead")
    names = data["run_names"]
    table = Table(title="Alerts")
    for column in ("run", "rule", "state", "fired at step", "last transition", "updated"):
        table.add_column(column)
    for alert in data["alerts"]:
        style = {"firing": "bold red", "pending": "yellow"}.get(alert["state"], "")
        run = alert["run_id"]
        label = f"{names[run]} ({run[:8]})" if run in names else run
        last = f"{alert['last_transition']} @ {alert['last_transition_step']}" \
            if alert["last_transition"] else ""
        table.add_row(label, alert["rule"], alert["state"], str(alert["fired_at_step"] or ""),
                      last, _ago(now - alert["updated_at"]), style=style or None)
    console.print(table)
    if data["silences"]:
        _print_silences(console, data["silences"], now)
    for row in data["dead"]:
        console.print(f"[red]dead notification {row['notification_id']} to {row['channel']} "
                      f"after {row['attempts']} attempts: {row['last_error']}[/red]")


# ---------------------------------------------------------------------------- silences
def _silence_add(args: argparse.Namespace) -> int:
    from gradwatch.monitor.config import RULES
    from gradwatch.monitor.stored import SilenceMatcher

    if args.rule is not None and not any(ch in args.rule for ch in "*?[") \
            and args.rule not in RULES:
        raise ConfigError(f"--rule must be one of {', '.join(RULES)} (or a glob), got "
                          f"{args.rule!r}.")
    matcher = SilenceMatcher(run_id=args.run, experiment=args.experiment, rule=args.rule)
    with _open_state(args, create=True) as state:  # a silence may come before the monitor
        if args.duration is not None:
            silence_id = state.add_silence(matcher, duration=_seconds(args.duration),
                                           comment=args.comment)
        else:
            silence_id = state.add_silence(matcher, expires_at=_timestamp(args.until),
                                           comment=args.comment)
        (silence,) = [s for s in state.silences(active_only=False) if s.id == silence_id]
    print(json.dumps(_silence_dict(silence)))
    return EXIT_OK


def _silence_list(args: argparse.Namespace) -> int:
    with _open_state(args) as state:
        silences = [_silence_dict(s) for s in state.silences(active_only=not args.all)]
    for silence in silences:
        print(json.dumps(silence))
    if not silences:
        print("no silences" if args.all else "no active silences", file=sys.stderr)
    return EXIT_OK


def _silence_expire(args: argparse.Namespace) -> int:
    with _open_state(args) as state:
        silence = state.expire_silence(args.silence_id)
    print(json.dumps(_silence_dict(silence)))
    return EXIT_OK


def _silence_dict(silence: Any) -> dict[str, Any]:
    matcher = silence.matcher
    return {"id": silence.id, "run": matcher.run_id, "experiment": matcher.experiment,
            "rule": matcher.rule, "created": _iso(silence.created_at),
            "expires": _iso(silence.expires_at), "comment": silence.comment}


def _print_silences(console: Any, silences: list[dict[str, Any]], now: float) -> None:
    from rich.table import Table

    table = Table(title="Active silences")
    for column in ("id", "run", "experiment", "rule", "expires", "comment"):
        table.add_column(column)
    for s in silences:
        table.add_row(str(s["id"]), s["run"] or "*", s["experiment"] or "*", s["rule"] or "*",
                      s["expires"], s["comment"])
    console.print(table)


# ---------------------------------------------------------------------------- helpers
def _seconds(text: str) -> float:
    from gradwatch.record.layout import parse_every

    try:
        every = parse_every(text)
    except ConfigError:
        every = None
    if every is None or every.seconds is None:
        raise ConfigError(f"--for must be a duration such as 90min, 2h or 1d, got {text!r}.")
    return every.seconds


def _timestamp(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--until must be an ISO 8601 time such as 2026-12-01T09:00Z, got "
                          f"{text!r}.") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is local time
    return moment.timestamp()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
