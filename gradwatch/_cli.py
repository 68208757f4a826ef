"""The `gradwatch` command line.

    gradwatch demo [--bug KIND --bug-at STEP]   train a small model with GradWatch attached
    gradwatch check MODULE:FACTORY              one-off check of your model; exit 1 on alert
    gradwatch flush                             deliver what the local spool still holds
    gradwatch monitor [--once] [--config FILE]  watch MLflow and notify (status, silence ...)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradwatch._exceptions import GradwatchError, InputError, SpoolLockedError
from gradwatch._version import __version__

__all__ = ["main"]

EXIT_OK, EXIT_ALERT, EXIT_ERROR = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except GradwatchError as exc:
        print(f"gradwatch: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    from gradwatch._demo import BUG_KINDS

    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small PyTorch model with GradWatch attached")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--every", type=int, default=100, help="steps between checks")
    demo.add_argument("--bug", choices=sorted(BUG_KINDS), help="plant a wrong backward")
    demo.add_argument("--bug-at", type=int, default=300, help="step at which to plant it")
    demo.add_argument("--seed", type=int, default=0)
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

    flush = commands.add_parser("flush", help="deliver spooled records to MLflow now")
    flush.add_argument("--spool-dir", type=Path, default=None)
    flush.add_argument("--timeout", type=float, default=120.0)
    flush.set_defaults(handler=_flush)

    from gradwatch._monitor_cli import add_monitor_parser

    add_monitor_parser(commands)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from gradwatch._demo import run_demo

    result = run_demo(steps=args.steps, every=args.every, bug=args.bug, bug_at=args.bug_at,
                      seed=args.seed, mlflow=not args.no_mlflow)
    alerts = [r for r in result.reports if r.verdict == "alert"]
    print(f"\ntrained {result.steps} steps in {result.seconds:.1f} s; final loss "
          f"{result.final_loss:.4f}; {len(result.reports)} checks, {len(alerts)} alerting")
    if result.run_id is not None:
        print(f"MLflow run id: {result.run_id}")
        print(f"Open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return EXIT_OK


def _load_factory(target: str) -> Any:
    if ":" not in target:
        raise InputError(f"expected MODULE:FACTORY (e.g. mypkg.models:make), got {target!r}.")
    module_name, _, attribute = target.rpartition(":")
    path = Path(module_name)
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
            raise InputError(f"cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"{module_name!r} has no callable {attribute!r}.")
    return factory


def _check(args: argparse.Namespace) -> int:
    from gradwatch._torch_check import check_module

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
    report = check_module(model, batch, loss_fn, mode=args.mode, budget=args.budget,
                          eps=args.eps, seed=args.seed)
    print(report.summary())
    if args.json:
        Path(args.json).write_text(report.model_dump_json(indent=2))
    if report.verdict == "alert":
        return EXIT_ALERT
    return EXIT_ERROR if report.verdict == "error" else EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    from gradwatch._record import deliver_payload
    from gradwatch._spool import default_spool_dir, replay

    root = args.spool_dir or default_spool_dir()
    if not root.exists():
        print(f"nothing to flush: {root} does not exist")
        return EXIT_OK
    directories = sorted(p for p in root.iterdir() if p.is_dir())
    left = 0
    for directory in directories:
        try:
            result = replay(directory, deliver_payload, timeout=args.timeout)
        except SpoolLockedError as exc:  # a training run still owns it: it delivers itself
            print(json.dumps({"spool": str(directory), "skipped": str(exc)}))
            continue
        left += result.pending
        print(json.dumps({"spool": str(directory), "delivered": result.delivered,
                          "pending": result.pending, "last_error": result.last_error}))
    return EXIT_OK if left == 0 else EXIT_ERROR
