"""The live model must not notice a check: bit-identical before and after."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch


class Net(nn.Module):
    """BatchNorm, dropout, a frozen layer and an integer buffer: everything a check could touch."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.frozen(x)))


def _loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    x = batch["inputs"][0]
    logits = model(x + batch["inputs"][1]["shift"])
    return nn.functional.cross_entropy(logits, batch["labels"]) + 1e-3 * sum(
        (p**2).sum() for p in model.parameters() if p.requires_grad
    )


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
        "grad_mode": torch.is_grad_enabled(),
    }


def _assert_identical(before: dict[str, Any], after: dict[str, Any]) -> None:
    for kind in ("params", "buffers"):
        for name, value in before[kind].items():
            assert torch.equal(value, after[kind][name]), f"{kind} {name} changed"
            assert value.dtype == after[kind][name].dtype
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, f".grad of {name} appeared"
        else:
            assert torch.equal(grad, after["grads"][name]), f".grad of {name} changed"
    for kind in ("requires_grad", "training", "dtypes", "python_rng", "grad_mode"):
        assert before[kind] == after[kind], f"{kind} changed"
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])


@pytest.mark.parametrize("mode", ["full", "sample", "sketch", "auto"])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_model_grads_flags_and_rng_are_bit_identical_after_a_check(
    mode: str, batching: str
) -> None:
    torch.manual_seed(0)
    model = Net().train()
    model.body[1].eval()  # a mixed train/eval tree must come back mixed
    batch = {
        "inputs": (torch.randn(16, 6), {"shift": torch.randn(1, 6)}),
        "labels": torch.randint(0, 3, (16,)),
    }
    _loss(model, batch).backward()  # populated .grad, as mid-training
    np.random.seed(3)
    random.seed(4)
    batch_before = {"x": batch["inputs"][0].clone(), "labels": batch["labels"].clone()}
    before = _snapshot(model)
    report = gradwatch.check_module(model, batch, _loss, mode=mode, budget=300,
                                    batching=batching)  # type: ignore[arg-type]
    assert report.verdict in ("ok", "warn"), report.summary()
    _assert_identical(before, _snapshot(model))
    assert torch.equal(batch["inputs"][0], batch_before["x"])
    assert batch["inputs"][0].dtype == torch.float32
    # the frozen layer is skipped, everything trainable is checked
    assert "frozen.weight" not in report.layers
    assert set(report.layers) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert report.probe["batch"] == {
        "inputs": ["float32[16, 6]", {"shift": "float32[1, 6]"}],
        "labels": "int64[16]",
    }


def test_a_loss_that_draws_random_numbers_leaves_the_global_streams_alone() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    before = torch.get_rng_state()

    def noisy(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return (m(b) + 1e-3 * torch.randn(4, 1)).pow(2).mean()

    report = gradwatch.check_module(model, x, noisy)
    assert report.verdict == "error"
    assert any("dropout" in reason for reason in report.reasons)
    assert torch.equal(torch.get_rng_state(), before)


def test_checking_does_not_change_the_next_training_step() -> None:
    def train(check: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if check and step % 2 == 0:
                gradwatch.check_module(
                    model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(train(check=False), train(check=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_is_checked_on_its_device_and_left_untouched() -> None:
    torch.manual_seed(0)
    model = Net().cuda().train()
    batch = {
        "inputs": (torch.randn(16, 6, device="cuda"), {"shift": torch.randn(1, 6, device="cuda")}),
        "labels": torch.randint(0, 3, (16,), device="cuda"),
    }
    _loss(model, batch).backward()
    before = _snapshot(model)
    cuda_before = torch.cuda.get_rng_state_all()
    report = gradwatch.check_module(model, batch, _loss, mode="full")
    assert report.verdict in ("ok", "warn"), report.summary()
    _assert_identical(before, _snapshot(model))
    assert all(torch.equal(a, b) for a, b in zip(cuda_before, torch.cuda.get_rng_state_all()))
