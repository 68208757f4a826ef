"""The one exception tree of gradwatch.

Catch at the level you need::

    GradwatchError                 base of everything gradwatch raises on purpose
    ├── ConfigError (ValueError)   a setting is invalid: eps, mode, thresholds, budget, globs
    ├── InputError (ValueError)    params, grads, model or batch do not fit together
    │   └── LossError              the loss could not be computed or is not a scalar
    ├── MissingDependencyError (ImportError)
    │                              an optional extra (torch, ...) is not installed
    └── GradientAlertError         a check alerted and GradWatch(on_alert="raise") was asked

Every message says what was expected, what was got, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GradientAlertError",
    "GradwatchError",
    "InputError",
    "LossError",
    "MissingDependencyError",
]


class GradwatchError(Exception):
    """Base class of every error gradwatch raises on purpose."""


class ConfigError(GradwatchError, ValueError):
    """A gradwatch setting is invalid (eps, mode, thresholds, budget, include/exclude)."""


class InputError(GradwatchError, ValueError):
    """The inputs do not fit together: params vs grads, model vs batch, parameter dtypes."""


class LossError(InputError):
    """The loss could not be computed from the inputs, or is not a real scalar."""


class MissingDependencyError(GradwatchError, ImportError):
    """An optional dependency is needed for this call but is not installed."""


def missing_dependency(feature: str, package: str, extra: str) -> MissingDependencyError:
    """Build the standard 'Using X, but Y is not installed' error."""
    return MissingDependencyError(
        f"Using {feature}, but the '{package}' package is not installed. "
        f"Install it with `pip install 'gradwatch[{extra}]'`."
    )


class GradientAlertError(GradwatchError):
    """A gradient check alerted and `GradWatch(on_alert="raise")` asked to stop training."""
