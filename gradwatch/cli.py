"""The `gradwatch` command line: demo, report, flush and the monitor's commands.

The `gradwatch` command line.

    gradwatch demo [--bug KIND --bug-at STEP]   train a small model with GradWatch attached
    gradwatch check MODULE:FACTORY              one-off check of your model; exit 1 on alert
    gradwatch flush                             deliver what the local spool still holds
    gradwatch monitor [--once] [--config FILE]  watch MLflow and notify (status, silence ...)
    gradwatch report RUN_ID [-o FILE.html]      a run's self-contained HTML report (--log, --png)
    gradwatch dashboard --experiment NAME -o FILE.html   compare an experiment's runs

Imports: anything below it (the command line is the top: nothing imports it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradwatch.common.errors import GradwatchError, InputError
from gradwatch.common.version import __version__
from gradwatch.record.replay import FolderResult
from gradwatch.record.spool import REJECTED

__all__ = ["main"]

EXIT_OK, EXIT_ALERT, EXIT_ERROR = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 ok, 1 alert (a verdict), 2 anything else: a usage error, a check that could not
    run, an exception (one line on stderr; the traceback too with --debug)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except GradwatchError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"gradwatch: {_without_prefix(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gradwatch: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # never exit 1 (the "alert" code) over a crash
        if args.debug:
            traceback.print_exc()
        print(f"gradwatch: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _without_prefix(message: str) -> str:
    return message[len("gradwatch: "):] if message.startswith("gradwatch: ") else message


def _parser() -> argparse.ArgumentParser:
    from gradwatch.demo import BUG_KINDS

    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    parser.add_argument("--debug", "-v", action="store_true",
                        help="print the traceback of an error, not just its one-line message")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train a small PyTorch model with GradWatch attached",
        description="Train a 3-layer MLP on synthetic data with GradWatch attached (logged to "
        "MLflow's default store, ./mlflow.db); with --bug, plant a wrong backward in layer 3 at "
        "--bug-at and watch the next check alert and name the layer and row.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--steps", type=int, default=600, help="training steps")
    demo.add_argument("--every", type=int, default=100, help="steps between checks")
    demo.add_argument("--bug", choices=sorted(BUG_KINDS), help="plant a wrong backward")
    demo.add_argument("--bug-at", type=int, default=None,
                      help="step at which to plant the bug (with --bug; default: half-way)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    demo.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    demo.set_defaults(handler=_demo)

    check = commands.add_parser(
        "check", help="check a model once; exit 1 on alert (for CI)",
        description="MODULE:FACTORY names a module (dotted, or a path to a .py file) and a "
        "function returning (model, batch) or (model, batch, loss_fn).",
    )
    check.add_argument("target", metavar="MODULE:FACTORY")
    check.add_argument("--mode", default="auto", choices=["auto", "full", "sample", "sketch"])
    check.add_argument("--budget", type=int, default=2000)
    check.add_argument("--eps", type=float, default=None)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--json", metavar="PATH", help="also write the report JSON here")
    check.set_defaults(handler=_check)

    flush = commands.add_parser(
        "flush", help="deliver spooled records to MLflow now",
        description="Deliver what the spool folders still hold (a dead tracking server, a "
        "crash), and remove each folder once all its records are delivered. Exit 0 when "
        "nothing is left undelivered, 2 otherwise (records still pending, or refused by MLflow "
        "and kept in the folder's rejected.jsonl).",
    )
    flush.add_argument("--spool-dir", type=Path, default=None,
                       help="the spool root (default: $GRADWATCH_SPOOL_DIR, else "
                       "~/.cache/gradwatch/spool)")
    flush.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to spend on each folder (default: 120)")
    flush.add_argument("--json", action="store_true",
                       help="print one JSON document (totals and each folder) instead of text")
    flush.set_defaults(handler=_flush)

    from gradwatch.monitor.cli import add_monitor_parser

    add_monitor_parser(commands)

    report = commands.add_parser(
        "report", help="build a run's HTML report (self-contained, works offline)",
        description="Build the run report from the run's gradwatch record in MLflow: distance "
        "per check, layer x step heatmap, worst elements.",
    )
    report.add_argument("run_id", metavar="RUN_ID")
    report.add_argument("-o", "--output", type=Path, default=None,
                        help="write the HTML here (default: report-<run id>.html)")
    report.add_argument("--png", type=Path, default=None, help="also write a static PNG here")
    report.add_argument("--log", action="store_true",
                        help="log it to the run as gradwatch/report.html instead of a file")
    _tracking_options(report)
    report.set_defaults(handler=_report)

    dashboard = commands.add_parser(
        "dashboard", help="compare the gradwatch runs of an experiment in one HTML file",
    )
    dashboard.add_argument("--experiment", required=True, metavar="NAME",
                           help="experiment name or id")
    dashboard.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.html")
    dashboard.add_argument("--no-layers", action="store_true",
                           help="leave out the layers that alerted (one MLflow call per layer "
                           "per run), for a quick look at a large experiment")
    _tracking_options(dashboard)
    dashboard.set_defaults(handler=_dashboard)
    return parser


def _tracking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's "
                        "own default)")
    parser.add_argument("--tracking-url", default=None,
                        help="the MLflow UI's http(s) address, for links to runs (default: the "
                        "tracking URI when it is http(s))")


def _client(args: argparse.Namespace) -> Any:
    from mlflow import MlflowClient

    from gradwatch.record.writer import resolve_tracking_uri

    return MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri))


def _report(args: argparse.Namespace) -> int:
    from gradwatch.dashboard.report import build_run_report, log_run_report, render_run_png

    client = _client(args)
    if args.log:
        written = log_run_report(client, args.run_id, tracking_url=args.tracking_url,
                                 png=args.png is not None)
        print(json.dumps({"run_id": args.run_id, "artifacts": written}))
        return EXIT_OK
    output = args.output or Path(f"report-{args.run_id}.html")
    page = build_run_report(client, args.run_id, tracking_url=args.tracking_url)
    _write_text(output, page)
    result = {"run_id": args.run_id, "html": str(output), "bytes": len(page.encode())}
    if args.png is not None:
        result["png"] = str(render_run_png(client, args.run_id, args.png))
    print(json.dumps(result))
    return EXIT_OK


def _dashboard(args: argparse.Namespace) -> int:
    from gradwatch.dashboard.report import build_experiment_dashboard

    page = build_experiment_dashboard(_client(args), args.experiment,
                                      tracking_url=args.tracking_url, layers=not args.no_layers)
    _write_text(args.output, page)
    print(json.dumps({"experiment": args.experiment, "html": str(args.output),
                      "bytes": len(page.encode())}))
    return EXIT_OK


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: an existing file is never left half-written."""
    if path.is_dir():
        raise InputError(f"-o must be a file path, got the directory {str(path)!r}; e.g. "
                         f"-o {path / 'report.html'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _demo(args: argparse.Namespace) -> int:
    from gradwatch.demo import run_demo, validate_demo

    validate_demo(steps=args.steps, every=args.every, bug=args.bug, bug_at=args.bug_at)
    bug_at = args.bug_at if args.bug_at is not None else args.steps // 2
    result = run_demo(steps=args.steps, every=args.every, bug=args.bug, bug_at=bug_at,
                      seed=args.seed, mlflow=not args.no_mlflow)
    alerts = [r for r in result.reports if r.verdict == "alert"]
    checks = len(result.reports)
    print(f"\ntrained {result.steps} steps in {result.seconds:.1f} s; final loss "
          f"{result.final_loss:.4f}; {checks} check{'s' if checks != 1 else ''}, "
          f"{len(alerts)} alerting")
    if result.run_id is not None:
        print(f"MLflow run id: {result.run_id}")
        print(f"Open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return EXIT_OK


def _load_factory(target: str) -> Any:
    if ":" not in target:
        raise InputError(f"expected MODULE:FACTORY (e.g. mypkg.models:make), got {target!r}.")
    module_name, _, attribute = target.rpartition(":")
    path = Path(module_name)
    if module_name.endswith(".py") and not path.is_file():
        raise InputError(
            f"no such file: {module_name!r} (from {target!r}). Give the path of the Python file "
            f"that defines {attribute}(), e.g. path/to/model.py:{attribute}, or a module "
            f"importable from here (mypkg.models:{attribute})."
        )
    if module_name.endswith(".py") or path.exists():
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise InputError(f"cannot import {module_name!r} as a Python file.")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InputError(
                f"cannot import module {module_name!r}: {exc}. The current directory is on the "
                f"path; for a module elsewhere set PYTHONPATH, or name the file itself: "
                f"path/to/{module_name.replace('.', '/')}.py:{attribute}."
            ) from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"{module_name!r} has no callable {attribute!r}.")
    return factory


def _check(args: argparse.Namespace) -> int:
    from gradwatch.common.errors import LossError
    from gradwatch.engine.torch_backend import check_module

    output = Path(args.json) if args.json else None
    if output is not None and not (output.parent.is_dir() and os.access(output.parent, os.W_OK)):
        # before the check, not after it: a bad path must not cost a whole check
        raise InputError(
            f"--json {args.json}: the folder {str(output.parent)!r} does not exist or is not "
            f"writable. Create it, or give a path in a folder that exists."
        )
    made = _load_factory(args.target)()
    if isinstance(made, dict):
        model, batch, loss_fn = made["model"], made["batch"], made.get("loss_fn")
    elif isinstance(made, tuple) and len(made) in (2, 3):
        model, batch, loss_fn = (*made, None)[:3]
    else:
        raise InputError(
            f"{args.target} must return (model, batch), (model, batch, loss_fn) or a dict "
            f"with those keys; got {type(made).__name__}."
        )
    try:
        report = check_module(model, batch, loss_fn, mode=args.mode, budget=args.budget,
                              eps=args.eps, seed=args.seed)
    except LossError as exc:
        if loss_fn is not None:
            raise
        raise InputError(
            f"{exc} From the command line: return (model, batch, loss_fn) from "
            f"{args.target}, with loss_fn(model, batch) -> scalar loss tensor."
        ) from exc
    print(report.summary())
    if output is not None:
        output.write_text(report.model_dump_json(indent=2))
    if report.verdict == "alert":
        return EXIT_ALERT
    return EXIT_ERROR if report.verdict == "error" else EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    from gradwatch.dashboard.report import log_requested_report
    from gradwatch.record.replay import default_spool_dir, replay_all
    from gradwatch.record.writer import Deliverer

    root = args.spool_dir or default_spool_dir()
    # The spool's own warnings say what the summary says, once per record: --debug shows them.
    logger = logging.getLogger("gradwatch.flush")
    if not args.debug:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False

    def deliverer(folder: Path) -> Deliverer:  # the run reports the spools ask for included
        return Deliverer(folder, report_builder=log_requested_report)

    folders = replay_all(root, deliverer, timeout=args.timeout, logger=logger)
    if args.json:
        print(json.dumps(_flush_document(root, folders)))
    else:
        for line in _flush_lines(root, folders):
            print(line)
    problem = _flush_problem(root, folders)
    if problem is None:
        return EXIT_OK
    print(f"gradwatch: {problem}", file=sys.stderr)
    return EXIT_ERROR


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _flush_lines(root: Path, folders: list[FolderResult]) -> list[str]:
    """A summary line, then one line per folder that is kept for a reason."""
    if not folders:
        return [f"nothing to flush: no spool in {root}"]
    delivered = sum(f.delivered for f in folders)
    runs = sum(1 for f in folders if f.delivered)
    summary = [f"delivered {_count(delivered, 'record')} from {_count(runs, 'run')}"
               if delivered else "delivered nothing",
               f"{_count(sum(f.removed for f in folders), 'folder')} removed"]
    in_use = [f for f in folders if f.in_use]
    if in_use:
        pids = ", ".join(str(f.owner_pid) for f in in_use if f.owner_pid is not None)
        one = len(in_use) == 1
        owners = ("a running process" if one else "running processes") + (
            f" (PID {pids})" if pids else "")
        summary.append(f"{_count(len(in_use), 'folder')} in use by {owners}, left to "
                       f"{'it' if one else 'them'}")
    lines = ["; ".join(summary)]
    for folder in folders:
        if folder.pending and not folder.in_use:
            lines.append(f"kept {folder.directory}: {_count(folder.pending, 'record')} not "
                         f"delivered ({folder.last_error or 'the timeout ran out'})")
        if folder.rejected and not folder.in_use:
            lines.append(f"kept {folder.directory}: {_count(folder.rejected, 'record')} "
                         f"rejected, in {folder.directory / REJECTED} "
                         f"({folder.rejected_reason or 'no reason recorded'})")
    return lines


def _flush_problem(root: Path, folders: list[FolderResult]) -> str | None:
    """The one-line reason the flush exits 2, None when nothing is left undelivered."""
    pending = sum(f.pending for f in folders if not f.in_use)
    rejected = sum(f.rejected for f in folders if not f.in_use)
    problems = []
    if pending:
        problems.append(f"{_count(pending, 'record')} could not be delivered yet; "
                        f"{'it stays' if pending == 1 else 'they stay'} in {root}: run "
                        f"`gradwatch flush` again once the tracking server answers")
    if rejected:
        problems.append(f"{_count(rejected, 'record')} refused by MLflow "
                        f"{'is' if rejected == 1 else 'are'} kept in {REJECTED}: inspect, "
                        f"then delete the folder")
    return "; ".join(problems) or None


def _flush_document(root: Path, folders: list[FolderResult]) -> dict[str, Any]:
    return {
        "spool_dir": str(root),
        "delivered": sum(f.delivered for f in folders),
        "pending": sum(f.pending for f in folders if not f.in_use),
        "rejected": sum(f.rejected for f in folders if not f.in_use),
        "removed": sum(f.removed for f in folders),
        "in_use": sum(f.in_use for f in folders),
        "folders": [{"spool": str(f.directory), "delivered": f.delivered, "pending": f.pending,
                     "rejected": f.rejected, "rejected_now": f.rejected_now,
                     "removed": f.removed, "in_use": f.in_use,
                     "owner_pid": f.owner_pid, "last_error": f.last_error,
                     "rejected_reason": f.rejected_reason} for f in folders],
    }
