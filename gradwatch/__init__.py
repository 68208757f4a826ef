"""gradwatch: numerical gradient checks you can run during real training.

    >>> import gradwatch
    >>> gradwatch.__all__[:3]
    ['AlertPolicy', 'CheckPlan', 'CheckReport']

The public surface is what `__all__` lists; every other module is private.
"""

from __future__ import annotations

from gradwatch.alerts.state import AlertPolicy
from gradwatch.common.errors import (
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
from gradwatch.common.version import __version__
from gradwatch.engine.numerics import rel_distance
from gradwatch.engine.numpy_backend import check
from gradwatch.engine.report import CheckReport, ElementReport, LayerReport, Thresholds
from gradwatch.engine.torch_backend import check_module
from gradwatch.watch.callback import CheckPlan, GradWatch

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
