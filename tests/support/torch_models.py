"""Small PyTorch models for gradwatch's tests: clean ones, and ones with planted backward bugs.

Every planted bug lives in a custom `torch.autograd.Function` whose forward is correct and whose
backward is wrong in one documented way. Central differences only run the forward pass, so they
see the true gradient; backprop sees the wrong one, and gradwatch must notice.

Everything is built from a fixed seed: module initialisation runs under `torch.random.fork_rng`
(so building a model never moves the caller's global RNG) and data comes from a local
`torch.Generator`. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BAD_ELEMENT",
    "BAD_ROW",
    "BUG_KINDS",
    "KINK_OFFSET",
    "SUBTLE_FACTOR",
    "Batch",
    "BugKind",
    "BuggyL2PenaltyFn",
    "BuggyLinear",
    "BuggyLinearFn",
    "DetachedWeightLinear",
    "LossFn",
    "attention_model",
    "batchnorm_cnn",
    "batchnorm_mlp",
    "big_bug_model",
    "bug_model",
    "classification_batch",
    "cnn",
    "cross_entropy_loss",
    "detached_weight_model",
    "dropout_in_loss",
    "embedding_batch",
    "embedding_model",
    "gru_model",
    "image_batch",
    "kink_model",
    "l2_regularised",
    "mse_loss",
    "nan_loss",
    "noise_in_loss",
    "regression_batch",
    "relu_mlp",
    "seeded",
    "sequence_batch",
    "split_attention_model",
    "tanh_mlp",
    "with_buggy_l2_penalty",
]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

BugKind = Literal[
    "none",
    "scaled",
    "transposed",
    "sign",
    "sign_input",
    "mean_not_sum",
    "one_row",
    "one_element",
    "dropped_input_grad",
    "subtle",
]
BUG_KINDS: tuple[BugKind, ...] = tuple(k for k in get_args(BugKind) if k != "none")

#: The weight row that the `one_row` bug scales by 1.5.
BAD_ROW = 3
#: The weight element that the `one_element` bug moves by half the largest |dW|.
BAD_ELEMENT = (2, 5)
#: The factor of the `subtle` bug: rel_distance ≈ 0.0005 / 2.0005 ≈ 2.5e-4, a warning.
SUBTLE_FACTOR = 1.0005
#: Where `kink_model` puts one ReLU pre-activation: inside ±eps (1e-7) of the kink at 0.
KINK_OFFSET = 3e-8


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under `torch.manual_seed(seed)` and restore the global RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ planted bugs
class BuggyLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with a correct forward and a backward broken as `bug` says.

    `x` is (batch, in), `weight` (out, in), `bias` (out,). The correct backward is
    dx = dy W, dW = dyᵀ x, db = Σ_batch dy; each bug kind changes exactly one of them.
    `generate_vmap_rule` lets gradwatch evaluate the (correct) forward under `torch.func.vmap`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bug: BugKind
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, _bias, bug = inputs
        ctx.save_for_backward(x, weight)
        ctx.bug = bug

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        bug: BugKind = ctx.bug
        grad_x: torch.Tensor | None = grad_out @ weight
        grad_weight = grad_out.T @ x
        grad_bias = grad_out.sum(0)
        if bug == "scaled":
            # dW doubled (e.g. a factor 2 from d/dW of a square, applied twice)
            grad_weight = 2 * grad_weight
        elif bug == "transposed":
            # dW returned transposed: only shape-compatible for a square weight
            grad_weight = grad_weight.T
        elif bug == "sign":
            # dW negated: the optimiser would climb the loss
            grad_weight = -grad_weight
        elif bug == "sign_input":
            # dx negated: this layer is right, every layer *before* it gets −(true gradient)
            grad_x = -grad_out @ weight
        elif bug == "mean_not_sum":
            # db averaged over the batch instead of summed: 1/batch of the true gradient
            grad_bias = grad_out.mean(0)
        elif bug == "one_row":
            # only row BAD_ROW of dW wrong (scaled by 1.5), e.g. an off-by-one in a loop
            grad_weight = grad_weight.clone()
            grad_weight[BAD_ROW] *= 1.5
        elif bug == "one_element":
            # only dW[BAD_ELEMENT] wrong: moved by half the largest |dW|
            grad_weight = grad_weight.clone()
            grad_weight[BAD_ELEMENT] += 0.5 * grad_weight.abs().max()
        elif bug == "dropped_input_grad":
            # no dx at all: every layer before this one gets no gradient
            grad_x = None
        elif bug == "subtle":
            # dW off by 0.05 %: a warning, not an alert
            grad_weight = SUBTLE_FACTOR * grad_weight
        elif bug != "none":
            raise ValueError(f"unknown bug kind {bug!r}")
        return grad_x, grad_weight, grad_bias, None


class BuggyLinear(nn.Module):
    """`nn.Linear` computed through `BuggyLinearFn`, with the planted `bug`."""

    def __init__(self, in_features: int, out_features: int, bug: BugKind = "none") -> None:
        super().__init__()
        if bug == "transposed" and in_features != out_features:
            raise ValueError("the transposed bug needs a square weight")
        reference = nn.Linear(in_features, out_features)  # the usual initialisation
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = BuggyLinearFn.apply(x, self.weight, self.bias, self.bug)
        return output


class BuggyL2PenaltyFn(torch.autograd.Function):
    """λ·||W||² with a wrong backward: returns λ·W where d/dW λ·||W||² = 2λ·W."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor, strength: float) -> torch.Tensor:
        return strength * (weight**2).sum()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        weight, strength = inputs
        ctx.save_for_backward(weight)
        ctx.strength = strength

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad_out * ctx.strength * weight, None  # BUG: the factor 2 is missing


class DetachedWeightLinear(nn.Linear):
    """A linear layer with a stray `.detach()`: y = x W.detach()ᵀ + b.

    The loss depends on W (central differences see it), autograd returns no gradient for it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.detach().T + self.bias


# ------------------------------------------------------------------ losses
def mse_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def cross_entropy_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def l2_regularised(loss_fn: LossFn, strength: float = 1e-2) -> LossFn:
    """`loss_fn` plus strength·Σ p² over every parameter, implemented correctly by autograd."""

    def regularised(model: nn.Module, batch: Batch) -> torch.Tensor:
        penalty = sum((p**2).sum() for p in model.parameters())
        return loss_fn(model, batch) + strength * penalty

    return regularised


def with_buggy_l2_penalty(loss_fn: LossFn, parameter: str, strength: float = 0.1) -> LossFn:
    """`loss_fn` plus strength·||W||² on one parameter, through `BuggyL2PenaltyFn`."""

    def regularised(model: nn.Module, batch: Batch) -> torch.Tensor:
        weight = model.get_parameter(parameter)
        return loss_fn(model, batch) + BuggyL2PenaltyFn.apply(weight, strength)

    return regularised


def dropout_in_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Non-deterministic: dropout forced on inside the loss, whatever the model's mode."""
    x, y = batch
    return F.mse_loss(F.dropout(model(x), p=0.5, training=True), y)


def noise_in_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Non-deterministic: fresh Gaussian noise added to the output on every call."""
    x, y = batch
    output = model(x)
    return F.mse_loss(output + 1e-3 * torch.randn_like(output), y)


def nan_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """A loss that is NaN at the checked point (log of a negative number)."""
    x, y = batch
    return torch.log(-1.0 - F.mse_loss(model(x), y))


# ------------------------------------------------------------------ batches
def regression_batch(n: int, inputs: int, outputs: int, seed: int = 0) -> Batch:
    generator = _generator(seed)
    return (
        torch.randn(n, inputs, generator=generator),
        torch.randn(n, outputs, generator=generator),
    )


def classification_batch(n: int, inputs: int, classes: int, seed: int = 0) -> Batch:
    generator = _generator(seed)
    return (
        torch.randn(n, inputs, generator=generator),
        torch.randint(0, classes, (n,), generator=generator),
    )


def image_batch(n: int, channels: int, size: int, classes: int, seed: int = 0) -> Batch:
    generator = _generator(seed)
    return (
        torch.randn(n, channels, size, size, generator=generator),
        torch.randint(0, classes, (n,), generator=generator),
    )


def sequence_batch(n: int, length: int, features: int, classes: int, seed: int = 0) -> Batch:
    generator = _generator(seed)
    return (
        torch.randn(n, length, features, generator=generator),
        torch.randint(0, classes, (n,), generator=generator),
    )


def embedding_batch(n: int, length: int, vocabulary: int, classes: int, seed: int = 0) -> Batch:
    generator = _generator(seed)
    return (
        torch.randint(0, vocabulary, (n, length), generator=generator),
        torch.randint(0, classes, (n,), generator=generator),
    )


# ------------------------------------------------------------------ models with bugs
def bug_model(bug: BugKind, *, width: int = 6, seed: int = 0) -> nn.Sequential:
    """Linear(4, w) → Tanh → BuggyLinear(w, w, bug) → Tanh → Linear(w, 3); buggy layer is "2".

    For `regression_batch(n, 4, 3)`. The clean layer before the buggy one is where the
    `dropped_input_grad` and `sign_input` bugs show.
    """
    with seeded(seed):
        return nn.Sequential(
            nn.Linear(4, width),
            nn.Tanh(),
            BuggyLinear(width, width, bug),
            nn.Tanh(),
            nn.Linear(width, 3),
        )


def big_bug_model(bug: BugKind, *, width: int = 512, seed: int = 0) -> nn.Sequential:
    """BuggyLinear(w, w, bug) → Tanh, big enough (w = 512: 262,656 parameters) that
    `mode="auto"` with budget 2000 cannot check every coordinate. For
    `regression_batch(n, w, w)`; the buggy layer is "0"."""
    with seeded(seed):
        return nn.Sequential(BuggyLinear(width, width, bug), nn.Tanh())


def detached_weight_model(seed: int = 0) -> nn.Sequential:
    """Linear(4, 6) → Tanh → DetachedWeightLinear(6, 3): "2.weight" gets no gradient."""
    with seeded(seed):
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), DetachedWeightLinear(6, 3))


# ------------------------------------------------------------------ clean models
def tanh_mlp(sizes: tuple[int, ...] = (4, 6, 3), seed: int = 0) -> nn.Sequential:
    """A smooth MLP (no kinks anywhere), for `regression_batch(n, sizes[0], sizes[-1])`."""
    layers: list[nn.Module] = []
    with seeded(seed):
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            if i:
                layers.append(nn.Tanh())
            layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def relu_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(5, 8) → ReLU → Linear(8, 8) → ReLU → Linear(8, 3), for classification."""
    with seeded(seed):
        return nn.Sequential(
            nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        )


def cnn(seed: int = 0) -> nn.Sequential:
    """Conv2d(1, 3, 3) → ReLU → MaxPool2d(2) → Flatten → Linear(27, 3), on 1×8×8 images."""
    with seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, 3, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, 3),
        )


def _warm_up_running_statistics(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few training-mode forwards so BatchNorm's running statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(x * (1.0 + 0.1 * step) + 0.2)


def batchnorm_mlp(x: torch.Tensor, seed: int = 0) -> nn.Sequential:
    """Linear(5, 8) → BatchNorm1d → Tanh → Dropout(0.5) → Linear(8, 3), left in train mode
    with warmed-up running statistics (gradwatch must switch its copy to eval)."""
    with seeded(seed):
        model = nn.Sequential(
            nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)
        )
        _warm_up_running_statistics(model, x)
    return model


def batchnorm_cnn(x: torch.Tensor, seed: int = 0) -> nn.Sequential:
    """Conv2d(1, 2, 3) → BatchNorm2d → Tanh → Dropout2d → Flatten → Linear(72, 3) on 1×8×8
    images, left in train mode with warmed-up running statistics."""
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(1, 2, kernel_size=3),
            nn.BatchNorm2d(2),
            nn.Tanh(),
            nn.Dropout2d(0.5),
            nn.Flatten(),
            nn.Linear(2 * 6 * 6, 3),
        )
        _warm_up_running_statistics(model, x)
    return model


class _AttentionClassifier(nn.Module):
    """nn.MultiheadAttention (bias=True) self-attention → mean over tokens → Linear."""

    def __init__(self, dim: int, heads: int, classes: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(x, x, x, need_weights=False)
        return self.head(attended.mean(dim=1))


def attention_model(dim: int = 4, heads: int = 2, classes: int = 3, seed: int = 0) -> nn.Module:
    """Self-attention classifier for `sequence_batch(n, length, dim, classes)`.

    The key third of `attn.in_proj_bias` has an exactly-zero true gradient: adding the same
    vector to every key shifts each query's logits by a constant, which softmax ignores.
    """
    with seeded(seed):
        return _AttentionClassifier(dim, heads, classes)


class _SplitAttention(nn.Module):
    """Single-head self-attention with separate q/k/v projections, so that `key.bias` — whose
    true gradient is exactly zero (softmax is shift-invariant) — is a tensor of its own."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.head((weights @ v).mean(dim=1))


def split_attention_model(dim: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    with seeded(seed):
        return _SplitAttention(dim, classes)


class _EmbeddingClassifier(nn.Module):
    """nn.Embedding → mean over tokens → Linear."""

    def __init__(self, vocabulary: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))


def embedding_model(
    vocabulary: int = 12, dim: int = 4, classes: int = 3, seed: int = 0
) -> nn.Module:
    """For `embedding_batch(n, length, vocabulary, classes)`; with a short batch some rows of
    the embedding are unused and have an exactly-zero gradient."""
    with seeded(seed):
        return _EmbeddingClassifier(vocabulary, dim, classes)


class _GRUClassifier(nn.Module):
    """One-layer nn.GRU → last hidden state → Linear."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(x)
        return self.head(last[-1])


def gru_model(features: int = 3, hidden: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    """For `sequence_batch(n, length, features, classes)`."""
    with seeded(seed):
        return _GRUClassifier(features, hidden, classes)


# ------------------------------------------------------------------ kinks
def kink_model(
    offset: float = KINK_OFFSET, unit: int = 1, sample: int = 0, seed: int = 0
) -> tuple[nn.Sequential, Batch]:
    """Linear(3, 4) → ReLU → Linear(4, 2) in float64, with a regression batch of 6, where
    hidden unit `unit`'s pre-activation for sample `sample` is `offset` (within ±eps of the
    ReLU's kink at 0): its bias is set to offset − W[unit]·x[sample].

    Perturbing that bias by ±1e-7 crosses the kink, so its central difference averages two
    slopes while backprop returns one: an explained kink, not a bug.
    """
    with seeded(seed):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = regression_batch(6, 3, 2, seed=seed)
    x, y = x.double(), y.double()
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.bias[unit] = offset - first.weight[unit] @ x[sample]
    return model, (x, y)
