"""gradwatch: numerical gradient checks you can run during real training.

    >>> import gradwatch
    >>> sorted(gradwatch.__all__)[:3]
    ['CheckReport', 'ConfigError', 'ElementReport']

The public surface is what `__all__` lists; every other module is private.
"""

from __future__ import annotations

from gradwatch._check import check
from gradwatch._exceptions import (
    ConfigError,
    GradwatchError,
    InputError,
    LossError,
    MissingDependencyError,
)
from gradwatch._numerics import rel_distance
from gradwatch._report import CheckReport, ElementReport, LayerReport, Thresholds
from gradwatch._torch_check import check_module
from gradwatch._version import __version__

__all__ = [
    "CheckReport",
    "ConfigError",
    "ElementReport",
    "GradwatchError",
    "InputError",
    "LayerReport",
    "LossError",
    "MissingDependencyError",
    "Thresholds",
    "__version__",
    "check",
    "check_module",
    "rel_distance",
]
