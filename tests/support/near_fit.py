"""Correct models at the points where checks are hardest: near a fit, beside ReLU kinks.

Shared by tests/engine (test_precision, test_kernels) and benchmarks/bench_near_fit.py.

* `beside_kinks(offset)`: an MLP whose two ReLU layers take, on the batch's first row, every
  input within about `offset` of 0. Every step a check can take crosses some of those kinks and
  J is linear on either side of each, so central differences disagree with backprop's
  one-sided slope by an amount linear in the step — as a bug's would — at every step above
  `offset`.
* `fitted_cnn(steps)`: conv/BatchNorm/ReLU/max-pool trained with Adam on one batch of 8 images
  until it has learnt it (loss ~1e-4 after 600 steps): many ReLU and max-pool inputs sit near
  their kinks and the loss is nearly flat.
* `memorising_net(loss)`: a small MLP with a correct custom autograd op (so the training-kernels
  measurement runs) trained until it has learnt its batch, under cross-entropy or
  BCE-with-logits: float32 gradients there are only as good as u/p (p ≈ 1e-4).
* `pass_through_identity_op(module)`: route a module's output through that correct custom op
  (a real model with a fused kernel of its own, as far as gradwatch can tell).

Everything is built from fixed seeds, on the CPU, in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.torch_models import seeded

__all__ = ["beside_kinks", "ce", "fitted_cnn", "memorising_net", "pass_through_identity_op"]

Objective = Callable[[nn.Module, Any], torch.Tensor]


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]).float(), batch[1])  # as HF's loss: .float()


def beside_kinks(offset: float) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The MLP 16-256-256-10 (ReLU) and its batch of 8; see the module docstring."""
    with seeded(0):
        model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
        with torch.no_grad():
            for index in (0, 2):
                inputs = x if index == 0 else F.relu(model[0](x))
                layer = model[index]
                layer.bias.copy_(-(inputs[:1] @ layer.weight.T)[0]
                                 + offset * torch.randn(layer.out_features))
    return model, (x, y)


def fitted_cnn(steps: int = 600, lr: float = 3e-3
               ) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Two conv 3x3 / BatchNorm / ReLU / max-pool blocks and a linear head, after `steps` Adam
    steps on its one batch (8 images 3x16x16, 10 classes)."""
    with seeded(0):
        blocks: list[nn.Module] = []
        for fan_in, fan_out in ((3, 8), (8, 16)):
            blocks += [nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.BatchNorm2d(fan_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
        model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
        batch = (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
        _train(model, batch, ce, steps, lr)
    return model, batch


class _Identity(torch.autograd.Function):
    """A correct custom op: the reason the training path is measured at all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


_IDENTITY_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def pass_through_identity_op(module: nn.Module) -> None:
    """Pass `module`'s output through `_Identity` (forward and backward exact, in every dtype):
    its class is swapped for a subclass of the same name, kept by `copy.deepcopy`."""
    base = type(module)
    if base not in _IDENTITY_CLASSES:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return _Identity.apply(base.forward(self, *args, **kwargs))

        _IDENTITY_CLASSES[base] = type(base.__name__, (base,), {"forward": forward})
    module.__class__ = _IDENTITY_CLASSES[base]


class _MemorisingNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(16, 64), nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(_Identity.apply(torch.tanh(self.hidden(x))))
        return out


def _bce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch[0]), batch[1])


def memorising_net(loss: str, steps: int = 400
                   ) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], Objective]:
    """(model, batch, objective) after `steps` Adam steps (lr 1e-2) on the batch; `loss` is
    "cross_entropy" (10 classes) or "bce_with_logits" (3 labels)."""
    with seeded(0):
        x = torch.randn(8, 16)
        if loss == "cross_entropy":
            model, y, objective = _MemorisingNet(10), torch.randint(0, 10, (8,)), ce
        elif loss == "bce_with_logits":
            model, y, objective = _MemorisingNet(3), torch.randint(0, 2, (8, 3)).float(), _bce
        else:
            raise ValueError(f"loss must be 'cross_entropy' or 'bce_with_logits', got {loss!r}")
        _train(model, (x, y), objective, steps, 1e-2)
    return model, (x, y), objective


def _train(model: nn.Module, batch: Any, objective: Objective, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(model, batch).backward()
        optimizer.step()
