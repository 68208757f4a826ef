"""Check reports that measured the training kernels, from real checks, for the record, monitor
and dashboard tests.

`TanhNet` is a float32 model around a `torch.library` custom op: "gwmon::faulty_tanh", whose
registered backward is 1% wrong for every dtype but float64 (the check's central differences
on the float64 copy run the correct path and read ok; the training-kernels measurement reads a
ratio of ~10⁴ on the layer before it), or its correct twin "gwmon::tanh". A custom op in the
graph is what makes a float32 CPU model's kernels worth measuring. Reports are written to
MLflow by the record's own writer (`tests.support.dashboard_runs.write_run`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

import gradwatch
from gradwatch import CheckReport
from gradwatch.engine.report import KernelReport

#: How wrong the faulty op's backward is outside float64.
FAULT = 1.01
#: The layers whose gradient passes through the op (they alert); the others stay ok.
BEFORE_OP = ("first.weight", "first.bias")


@torch.library.custom_op("gwmon::faulty_tanh", mutates_args=())
def faulty_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x), whose registered backward is 1% off unless x is float64."""
    return torch.tanh(x)


@torch.library.custom_op("gwmon::tanh", mutates_args=())
def clean_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) with a correct backward at every dtype."""
    return torch.tanh(x)


def _fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _save_output(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(output)


def _faulty_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    result = grad * (1 - y * y)
    return result if y.dtype == torch.float64 else result * FAULT


def _clean_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    return grad * (1 - y * y)


for _op, _backward in ((faulty_tanh, _faulty_backward), (clean_tanh, _clean_backward)):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_save_output)


class TanhNet(nn.Module):
    """first → (faulty or correct) tanh op → second."""

    def __init__(self, *, faulty: bool) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 1)
        self.faulty = faulty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = faulty_tanh if self.faulty else clean_tanh
        result: torch.Tensor = self.second(op(self.first(x)))
        return result


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


@cache
def _checked(faulty: bool) -> str:
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator))
    with torch.random.fork_rng():  # the model's initialisation: not the session's RNG
        torch.manual_seed(0)
        model = TanhNet(faulty=faulty)
    report = gradwatch.check_module(model, batch, mse)
    return report.model_dump_json()


def kernel_report(*, faulty: bool) -> CheckReport:
    """A fresh copy of the real check of `TanhNet(faulty=...)`: "alert" by the training
    kernels alone (the definition ok) when faulty, "ok" with the kernels measured otherwise."""
    report = CheckReport.model_validate_json(_checked(faulty))
    assert report.kernels is not None and report.kernels.status == "measured", report.summary()
    assert report.kernels.verdict == ("alert" if faulty else "ok"), report.summary()
    return report


def kernel_error_report() -> CheckReport:
    """The clean check whose training-kernels measurement failed: what folding its "error"
    gives (verdict "error", the central differences' "ok" kept as `definition_verdict`)."""
    report = kernel_report(faulty=False)
    reason = ("training kernels: could not measure the gradient at training precision "
              "(custom ops gwmon::tanh): RuntimeError: out of memory")
    report.kernels = KernelReport(status="error", verdict="error", reasons=[reason],
                                  device="cpu", custom_ops=["gwmon::tanh"])
    report.definition_verdict = report.verdict
    report.verdict = "error"
    report.reasons.append(reason)
    return report
