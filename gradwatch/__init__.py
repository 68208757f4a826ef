"""gradwatch: numerical gradient checks you can run during real training.

    >>> import gradwatch
    >>> gradwatch.__all__[:3]
    ['AlertPolicy', 'CheckPlan', 'CheckReport']

The public surface is what `__all__` lists; every other module is private.
"""

from __future__ import annotations

from gradwatch._alerts import AlertPolicy
from gradwatch._callback import CheckPlan, GradWatch
from gradwatch._check import check
from gradwatch._exceptions import (
    ConfigError,
    DeliveryError,
    GradientAlertError,
    GradwatchError,
    InputError,
    LossError,
    MissingDependencyError,
    MonitorLockedError,
    SpoolLockedError,
    UnsupportedModelError,
)
from gradwatch._numerics import rel_distance
from gradwatch._report import CheckReport, ElementReport, LayerReport, Thresholds
from gradwatch._torch_check import check_module
from gradwatch._version import __version__

__all__ = [
    "AlertPolicy",
    "CheckPlan",
    "CheckReport",
    "ConfigError",
    "DeliveryError",
    "ElementReport",
    "GradWatch",
    "GradientAlertError",
    "GradwatchError",
    "InputError",
    "LayerReport",
    "LossError",
    "MissingDependencyError",
    "MonitorLockedError",
    "SpoolLockedError",
    "Thresholds",
    "UnsupportedModelError",
    "__version__",
    "check",
    "check_module",
    "rel_distance",
]
