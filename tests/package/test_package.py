"""The package surface: a sorted, complete __all__, one exception tree, lint and types."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import gradwatch

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_and_complete() -> None:
    public = {
        name for name, value in vars(gradwatch).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert gradwatch.__all__ == sorted(gradwatch.__all__)
    assert public | {"__version__"} == set(gradwatch.__all__)


def test_every_error_is_a_gradwatch_error() -> None:
    for name in ("ConfigError", "InputError", "LossError", "MissingDependencyError",
                 "GradientAlertError", "DeliveryError", "SpoolLockedError",
                 "UnsupportedModelError", "MonitorLockedError"):
        assert issubclass(getattr(gradwatch, name), gradwatch.GradwatchError)
    assert issubclass(gradwatch.ConfigError, ValueError)
    assert issubclass(gradwatch.LossError, gradwatch.InputError)
    assert issubclass(gradwatch.UnsupportedModelError, gradwatch.InputError)
    assert issubclass(gradwatch.MissingDependencyError, ImportError)


def test_the_public_surface_is_gradwatch_and_gradwatch_testing() -> None:
    """Privacy by module: the subsystems are subpackages whose __init__ exports nothing, so
    `from gradwatch import …` (and gradwatch.testing, like numpy.testing) is the whole API."""
    import ast
    import importlib

    top = {p.name for p in (ROOT / "gradwatch").iterdir() if not p.name.startswith(".")
           and p.name != "__pycache__"}
    subpackages = {"alerts", "common", "dashboard", "engine", "monitor", "record", "watch"}
    assert top == {"__init__.py", "__main__.py", "testing.py", "cli.py", "demo.py", "py.typed",
                   *subpackages}
    for name in sorted(subpackages):
        init = ROOT / "gradwatch" / name / "__init__.py"
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{init}: a docstring only"
        module = importlib.import_module(f"gradwatch.{name}")
        assert module.__doc__ and "Imports:" in module.__doc__, f"{init}: what it may import"


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


@pytest.mark.slow
def test_integrations_install_from_a_wheel(tmp_path: Path) -> None:
    """integrations/ ships in the wheel as gradwatch.integrations and imports from there."""
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w")]
    try:
        import setuptools  # noqa: F401  (then no isolated build env needs downloading)

        build.append("--no-build-isolation")
    except ImportError:
        pass
    result = subprocess.run([*build, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (tmp_path / "w").glob("gradwatch-*.whl")
    adapters = sorted(p.stem for p in (ROOT / "integrations").glob("*.py"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for adapter in adapters:
        assert f"gradwatch/integrations/{adapter}.py" in names
    assert not any(n.startswith("integrations/") or n.startswith("tests/") for n in names)

    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    modules = [f"gradwatch.integrations.{a}" for a in adapters if a != "__init__"]
    script = (
        "import importlib, gradwatch, gradwatch.integrations\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(gradwatch.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "KERAS_BACKEND": "torch"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith(str(target))  # the wheel's copy, not the checkout


def test_importing_gradwatch_does_not_import_torch() -> None:
    """The core package needs only numpy, pydantic, mlflow and apscheduler; torch (a second of
    import time, and an extra) is imported when a PyTorch check first runs."""
    import subprocess
    import sys

    probe = "import sys, gradwatch; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
