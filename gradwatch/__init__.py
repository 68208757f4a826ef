"""gradwatch: numerical gradient checks you can run during real training.

    >>> import gradwatch
    >>> gradwatch.__all__[:3]
    ['AlertPolicy', 'AlertSettings', 'CheckOptions']

The public surface is what `__all__` lists (and `gradwatch.testing`); the subpackages —
engine, watch, record, alerts, monitor, dashboard, common — are private. Every exported class
and function says `gradwatch` as its module, so reprs, tracebacks, pickles and doctests name
`gradwatch.CheckReport`, not the file it happens to live in.

    >>> gradwatch.CheckReport.__module__, gradwatch.ConfigError("x").__class__.__module__
    ('gradwatch', 'gradwatch')

Imports: every subpackage (it re-exports the public names).
"""

from __future__ import annotations

from gradwatch.alerts.settings import AlertSettings
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
    MonitorStandbyError,
    SpoolLockedError,
    UnsupportedModelError,
)
from gradwatch.common.version import __version__
from gradwatch.engine.numerics import rel_distance
from gradwatch.engine.numpy_backend import check
from gradwatch.engine.report import (
    CheckReport,
    ElementReport,
    KernelElement,
    KernelLayer,
    KernelReport,
    LayerReport,
    RatioThresholds,
    Thresholds,
)
from gradwatch.engine.torch_backend import check_module
from gradwatch.engine.types import CheckOptions
from gradwatch.record.recorder import MlflowRecorder, NullRecorder, Recorder, RecordSettings
from gradwatch.watch.callback import GradWatch
from gradwatch.watch.plan import CheckPlan

__all__ = [
    "AlertPolicy",
    "AlertSettings",
    "CheckOptions",
    "CheckPlan",
    "CheckReport",
    "ConfigError",
    "DeliveryError",
    "ElementReport",
    "GradWatch",
    "GradientAlertError",
    "GradwatchError",
    "InputError",
    "KernelElement",
    "KernelLayer",
    "KernelReport",
    "LayerReport",
    "LossError",
    "MissingDependencyError",
    "MlflowRecorder",
    "MonitorLockedError",
    "MonitorStandbyError",
    "NullRecorder",
    "RatioThresholds",
    "RecordSettings",
    "Recorder",
    "SpoolLockedError",
    "Thresholds",
    "UnsupportedModelError",
    "__version__",
    "check",
    "check_module",
    "rel_distance",
]


def _claim_exports() -> None:
    for name in __all__:
        value = globals()[name]
        if isinstance(value, type) or callable(value):
            value.__module__ = __name__


_claim_exports()
