"""The classic 3-layer network of the gradient-checking exercise, in plain numpy.

LINEAR → RELU → LINEAR → RELU → LINEAR → SIGMOID with the cross-entropy cost, a forward pass,
a correct backward pass and the exercise's buggy one (two planted mistakes), plus the
hand-written check loop that gradwatch's full mode must reproduce to the last digits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Params = dict[str, np.ndarray]


def make_problem(seed: int = 1) -> tuple[Params, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3))
    y = np.array([[1, 1, 0]])
    params = {
        "W1": rng.standard_normal((5, 4)),
        "b1": rng.standard_normal((5, 1)),
        "W2": rng.standard_normal((3, 5)),
        "b2": rng.standard_normal((3, 1)),
        "W3": rng.standard_normal((1, 3)),
        "b3": rng.standard_normal((1, 1)),
    }
    return params, x, y


def forward(x: np.ndarray, y: np.ndarray, p: Params) -> tuple[float, tuple[Any, ...]]:
    m = x.shape[1]
    z1 = p["W1"] @ x + p["b1"]
    a1 = np.maximum(0, z1)
    z2 = p["W2"] @ a1 + p["b2"]
    a2 = np.maximum(0, z2)
    z3 = p["W3"] @ a2 + p["b3"]
    a3 = 1 / (1 + np.exp(-z3))
    log_probs = np.multiply(-np.log(a3), y) + np.multiply(-np.log(1 - a3), 1 - y)
    cost = float(1.0 / m * np.sum(log_probs))
    return cost, (z1, a1, z2, a2, z3, a3)


def backward(
    x: np.ndarray, y: np.ndarray, p: Params, cache: tuple[Any, ...], *, buggy: bool = False
) -> Params:
    m = x.shape[1]
    _, a1, _, a2, _, a3 = cache
    dz3 = a3 - y
    dw3 = 1.0 / m * dz3 @ a2.T
    db3 = 1.0 / m * np.sum(dz3, axis=1, keepdims=True)
    da2 = p["W3"].T @ dz3
    dz2 = da2 * (a2 > 0)
    dw2 = 1.0 / m * dz2 @ a1.T * (2 if buggy else 1)  # planted: dW2 doubled
    db2 = 1.0 / m * np.sum(dz2, axis=1, keepdims=True)
    da1 = p["W2"].T @ dz2
    dz1 = da1 * (a1 > 0)
    dw1 = 1.0 / m * dz1 @ x.T
    db1 = (4.0 if buggy else 1.0) / m * np.sum(dz1, axis=1, keepdims=True)  # planted: ×4
    return {"dW1": dw1, "db1": db1, "dW2": dw2, "db2": db2, "dW3": dw3, "db3": db3}


def reference_check(
    x: np.ndarray, y: np.ndarray, p: Params, grads: Params, epsilon: float = 1e-7
) -> tuple[float, np.ndarray, np.ndarray]:
    """The seed recipe, written out by hand: returns (difference, gradapprox, grad)."""
    keys = list(p)
    theta = np.concatenate([p[k].reshape(-1) for k in keys])
    grad = np.concatenate([grads["d" + k].reshape(-1) for k in keys])

    def unflatten(vector: np.ndarray) -> Params:
        out, start = {}, 0
        for k in keys:
            size = p[k].size
            out[k] = vector[start : start + size].reshape(p[k].shape)
            start += size
        return out

    gradapprox = np.zeros(theta.shape[0])
    for i in range(theta.shape[0]):
        theta_plus = np.copy(theta)
        theta_plus[i] = theta_plus[i] + epsilon
        j_plus, _ = forward(x, y, unflatten(theta_plus))
        theta_minus = np.copy(theta)
        theta_minus[i] = theta_minus[i] - epsilon
        j_minus, _ = forward(x, y, unflatten(theta_minus))
        gradapprox[i] = (j_plus - j_minus) / (2 * epsilon)
    numerator = np.linalg.norm(grad - gradapprox)
    denominator = np.linalg.norm(grad) + np.linalg.norm(gradapprox)
    return float(numerator / denominator), gradapprox, grad
