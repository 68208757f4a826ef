"""Kernels whose float64 path is right and whose training-precision path is wrong.

A fused kernel's wrapper (Triton, CUDA) usually falls back to a reference implementation for
float64, so a float64 check runs the reference and never the kernel. These stand-ins do the
same in Python: the float64 path is exact, the float32/bf16/fp16 path carries the fault.

* `tanh_op`: a `torch.library.custom_op` ("gwtest::faulty_tanh") whose backward is 1% wrong
  for every dtype but float64 (the fault measured in issue 15: central differences read ok);
  `clean_tanh_op` ("gwtest::tanh") is its correct twin;
* `ScaledBackward`: a `torch.autograd.Function` computing x·w whose backward to x is 1.5×
  too large for every dtype but float64 (large enough to stand above bf16 rounding);
* `FaultyTanhNet`, `FaultyScaleNet`: small models around them (`FaultyTanhNet(clean=True)`
  uses the correct op), and `CleanNet` without;
* `plant_kernel_fault(module)`: the same fault after any module's forward (a real model's
  layer), planted in the module's class so that copies of the model keep it;
* `GroupedConvNet`: no planted fault — a grouped `nn.Conv1d` (32 channels, 4 groups, kernel
  8: wav2vec2's positional convolution's shape) whose bf16 CPU kernel in PyTorch 2.13's oneDNN
  (3.12) returns an output uncorrelated with the right one on AVX512-BF16/AMX CPUs, this
  project's machine among them; `grouped_conv_bf16_error()` measures that kernel alone, so a
  test can say what the check must read on the machine it runs on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: How wrong the backward is outside float64.
TANH_FAULT = 1.01
SCALE_FAULT = 1.5


@torch.library.custom_op("gwtest::faulty_tanh", mutates_args=())
def tanh_op(x: torch.Tensor) -> torch.Tensor:
    """tanh(x), whose registered backward is 1% off unless x is float64."""
    return torch.tanh(x)


@tanh_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _tanh_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(output)


def _tanh_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    result = grad * (1 - y * y)
    return result if y.dtype == torch.float64 else result * TANH_FAULT


tanh_op.register_autograd(_tanh_backward, setup_context=_tanh_context)


@torch.library.custom_op("gwtest::tanh", mutates_args=())
def clean_tanh_op(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) with a correct backward at every dtype."""
    return torch.tanh(x)


@clean_tanh_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _clean_tanh_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    return grad * (1 - y * y)


clean_tanh_op.register_autograd(_clean_tanh_backward, setup_context=_tanh_context)


class ScaledBackward(torch.autograd.Function):
    """y = x · w (w a per-feature scale); dL/dx is 1.5× too large outside float64."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        grad_x = grad * w
        if grad_x.dtype != torch.float64:
            grad_x = grad_x * SCALE_FAULT
        grad_w = (grad * x).sum_to_size(w.shape)
        return grad_x, grad_w


class FaultyTanhNet(nn.Module):
    """first → faulty tanh → second: `first`'s gradient passes through the faulty backward
    (`clean=True`: the correct op)."""

    def __init__(self, width: int = 8, *, clean: bool = False) -> None:
        super().__init__()
        self.first = nn.Linear(4, width)
        self.second = nn.Linear(width, 1)
        self.clean = clean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = clean_tanh_op if self.clean else tanh_op
        return self.second(op(self.first(x)))


class _FaultyGradient(torch.autograd.Function):
    """Identity whose backward is 1.5× too large outside float64."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad if grad.dtype == torch.float64 else grad * SCALE_FAULT


_FAULTY_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def plant_kernel_fault(module: nn.Module) -> None:
    """Make `module`'s output carry `_FaultyGradient`: the gradient of everything before it
    is 1.5× too large outside float64. The class is swapped for a subclass of the same name,
    so `copy.deepcopy` and `.double()` keep the fault and nothing else changes."""
    base = type(module)
    if base not in _FAULTY_CLASSES:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            output = base.forward(self, *args, **kwargs)
            return _FaultyGradient.apply(output)

        _FAULTY_CLASSES[base] = type(base.__name__, (base,), {"forward": forward})
    module.__class__ = _FAULTY_CLASSES[base]


class FaultyScaleNet(nn.Module):
    """first → ScaledBackward(·, scale) → tanh → second: `first`'s gradient passes through
    the faulty dL/dx (the scale's own gradient is right)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.first = nn.Linear(8, width)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.second = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(ScaledBackward.apply(self.first(x), self.scale)))


class CleanNet(nn.Module):
    """FaultyScaleNet with a plain multiplication: nothing wrong at any precision."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.first = nn.Linear(8, width)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.second = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x) * self.scale))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss all these models train on."""
    return nn.functional.mse_loss(model(batch[0]).float(), batch[1].float())


class GroupedConvNet(nn.Module):
    """Conv1d(32, 32, 8, groups) → tanh → mean over time → Linear(32, 1)."""

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(32, 32, 8, padding=4, groups=groups)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean(-1))


def grouped_conv_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 32, 40, generator=generator), torch.randn(4, 1, generator=generator)


def grouped_conv_bf16_error(groups: int = 4) -> float:
    """The relative distance of PyTorch's bf16 `conv1d` (`GroupedConvNet`'s shape) from the
    float64 result on this machine: ~1e-3 for a correct kernel (bf16 rounding), ~0.7 for one
    whose output is unrelated to the right one."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 40, generator=generator, dtype=torch.float64)
    weight = torch.randn(32, 32 // groups, 8, generator=generator, dtype=torch.float64)
    exact = nn.functional.conv1d(x, weight, padding=4, groups=groups)
    low = nn.functional.conv1d(x.bfloat16(), weight.bfloat16(), padding=4, groups=groups).double()
    return float((low - exact).norm() / (low.norm() + exact.norm()))


def mse_float(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean squared error in float32 (the model's output may be bf16 under autocast)."""
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()
