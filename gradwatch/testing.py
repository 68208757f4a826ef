"""pytest helpers: fail a test when backprop is wrong, with the worst elements in the message.

    from gradwatch.testing import assert_gradients_ok

    def test_my_layer_backward():
        assert_gradients_ok(model, batch, loss_fn)

Imports: gradwatch.engine (a public top-level module).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradwatch.engine.report import CheckReport

__all__ = ["assert_gradients_ok", "assert_report_ok"]


def assert_report_ok(report: CheckReport, *, allow_warn: bool = True) -> CheckReport:
    """Raise AssertionError (with the report's table) unless the verdict is ok (or warn).

    Example:
        >>> import numpy as np, gradwatch
        >>> report = gradwatch.check(lambda p: float((p["w"] ** 2).sum()),
        ...                          {"w": np.ones(2)}, {"w": np.ones(2)})  # wrong: should be 2w
        >>> assert_report_ok(report)
        Traceback (most recent call last):
        ...
        AssertionError: backprop disagrees with central differences ...
    """
    allowed = ("ok", "warn") if allow_warn else ("ok",)
    if report.verdict not in allowed:
        raise AssertionError(
            f"backprop disagrees with central differences (verdict {report.verdict}, "
            f"expected {' or '.join(allowed)}):\n{report.summary(max_elements=5)}"
        )
    return report


def assert_gradients_ok(
    model: Any,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    *,
    allow_warn: bool = True,
    **check_module_kwargs: Any,
) -> CheckReport:
    """Run `gradwatch.check_module(model, batch, loss_fn, **kwargs)` and assert it is ok.

    Returns the report so a test can look further. With `allow_warn=False` a "warn" verdict
    (distance between the warn and alert thresholds) fails too.
    """
    from gradwatch.engine.torch_backend import check_module

    report = check_module(model, batch, loss_fn, **check_module_kwargs)
    return assert_report_ok(report, allow_warn=allow_warn)
