"""The training-kernels measurement on a CUDA device (skipped without one).

fp16 and bf16 autocast with the CUDA SDPA backends (flash, memory-efficient) on a tiny LLaMA
must raise no alarm; a Triton kernel (when triton is installed) with a correct backward reads
ok, the same kernel with a planted wrong backward is caught on its layer. The Triton op's
wrapper falls back to a PyTorch reference for float64, as real fused kernels do, so central
differences never run the kernel.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradwatch
from tests.support.hf_zoo import make_zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                         ids=["flash", "efficient"])
def test_cuda_sdpa_backends_under_autocast_raise_no_alarm(dtype: torch.dtype,
                                                          backend: SDPBackend) -> None:
    entry = make_zoo("sdpa")["llama"]
    model = entry.build().cuda()
    for seed in range(3):
        batch = {k: v.cuda() for k, v in entry.batch(seed).items()}
        with sdpa_kernel([backend, SDPBackend.MATH]), torch.autocast("cuda", dtype=dtype):
            report = gradwatch.check_module(model, batch, budget=200, seed=seed)
        kernels = report.kernels
        assert kernels is not None and kernels.status == "measured", report.summary()
        assert kernels.device == "cuda" and kernels.verdict == "ok", report.summary()


def _triton_scale(fault: float) -> Any:
    """y = x · w by a Triton kernel (float64: a PyTorch reference), backward dx by Triton
    too, `fault` × too large."""
    import triton
    import triton.language as tl

    @triton.jit
    def multiply(a_ptr: Any, b_ptr: Any, out_ptr: Any, n: Any, columns: Any, factor: Any,
                 BLOCK: tl.constexpr) -> None:
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
        b = tl.load(b_ptr + offsets % columns, mask=mask).to(tl.float32)
        tl.store(out_ptr + offsets, (a * b * factor).to(out_ptr.dtype.element_ty), mask=mask)

    def launch(a: torch.Tensor, w: torch.Tensor, factor: float) -> torch.Tensor:
        a = a.contiguous()
        out = torch.empty_like(a)
        n = a.numel()
        multiply[(triton.cdiv(n, 1024),)](a, w.to(a.dtype).contiguous(), out, n, w.numel(),
                                          factor, BLOCK=1024)
        return out

    class TritonScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            return x * w if x.dtype == torch.float64 else launch(x, w, 1.0)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, w = ctx.saved_tensors
            grad_w = (grad * x).sum_to_size(w.shape).to(w.dtype)
            if grad.dtype == torch.float64:
                return grad * w, grad_w
            return launch(grad, w, fault), grad_w

    return TritonScale


class _ScaledNet(nn.Module):
    def __init__(self, function: Any) -> None:
        super().__init__()
        self.first = nn.Linear(8, 64)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 64))
        self.second = nn.Linear(64, 1)
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.function.apply(self.first(x), self.scale)))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("fault", [1.0, 1.5], ids=["correct", "planted"])
def test_a_triton_backward_is_judged_at_the_training_precision(fault: float) -> None:
    torch.manual_seed(0)
    model = _ScaledNet(_triton_scale(fault)).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch = (torch.randn(32, 8, device="cuda", generator=generator),
             torch.randn(32, 1, device="cuda", generator=generator))

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]).float(), b[1].float())

    with torch.autocast("cuda", dtype=torch.bfloat16):
        report = gradwatch.check_module(model, batch, loss_fn)
    kernels = report.kernels
    assert kernels is not None and kernels.status == "measured", report.summary()
    assert report.definition_verdict in (None, "ok")
    if fault == 1.0:
        assert kernels.verdict == "ok", report.summary()
    else:
        assert kernels.layers["first.weight"].verdict == "alert", report.summary()
        assert kernels.layers["scale"].verdict == "ok"
