"""The package surface: a sorted, complete __all__, one exception tree, lint and types."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import gradwatch

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_complete() -> None:
    public = {
        name for name, value in vars(gradwatch).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert gradwatch.__all__ == sorted(gradwatch.__all__)
    assert public | {"__version__"} == set(gradwatch.__all__)


def test_every_error_is_a_gradwatch_error() -> None:
    for name in ("ConfigError", "InputError", "LossError", "MissingDependencyError",
                 "GradientAlertError", "DeliveryError", "SpoolLockedError"):
        assert issubclass(getattr(gradwatch, name), gradwatch.GradwatchError)
    assert issubclass(gradwatch.ConfigError, ValueError)
    assert issubclass(gradwatch.LossError, gradwatch.InputError)
    assert issubclass(gradwatch.MissingDependencyError, ImportError)


def test_private_modules_stay_private() -> None:
    public = {"__init__", "testing"}  # gradwatch.testing is public, like numpy.testing
    modules = [p.stem for p in (ROOT / "gradwatch").glob("*.py") if p.stem not in public]
    assert modules and all(m.startswith("_") for m in modules)


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], [sys.executable, "-m", "mypy"]],
    ids=["ruff", "mypy"],
)
def test_lint_and_types_are_clean(command: list[str]) -> None:
    if command[0] == "ruff" and shutil.which("ruff") is None:
        command = [sys.executable, "-m", "ruff", *command[1:]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
