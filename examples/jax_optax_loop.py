"""Train a small MLP with JAX and optax, and let gradwatch check its gradients every N steps.

    python examples/jax_optax_loop.py                          # 300 steps, a check every 50
    python examples/jax_optax_loop.py --bug                    # a wrong backward: alerts
    python examples/jax_optax_loop.py --steps 40 --every 10 --no-mlflow

The loop is plain JAX + optax in float32; the one gradwatch line is `watch_step(...)` after
each update. Checks run in float64 on copies, so the trained parameters are bit-identical with
and without gradwatch (tests/test_integration_jax.py asserts it). `--bug` swaps in a loss whose
second dense layer has a hand-written backward (`jax.custom_vjp`) that doubles dW: training
still runs, gradwatch alerts and blames "dense2/w". MLflow: as GradWatch (MLFLOW_TRACKING_URI,
else ./mlflow.db; a new run in experiment "gradwatch" unless MLFLOW_RUN_ID is set).
Exit status: 1 when a check alerted, else 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradwatch import CheckReport, GradWatch
from gradwatch.integrations.jax import watch_step

Params = dict[str, dict[str, jax.Array]]
Batch = tuple[np.ndarray, np.ndarray]

#: inputs → hidden → outputs
SIZES = (8, 32, 3)
WEIGHT_DECAY = 1e-4


def make_data(examples: int, *, seed: int = 0) -> Batch:
    """Inputs and targets of a random tanh teacher network, plus a little noise: float32
    numpy arrays (slicing them costs no JAX compilation; jit moves each batch to the device)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, SIZES[0]))
    teacher = rng.normal(size=(SIZES[0], SIZES[-1])) / np.sqrt(SIZES[0])
    y = np.tanh(x @ teacher) + 0.05 * rng.normal(size=(examples, SIZES[-1]))
    return x.astype(np.float32), y.astype(np.float32)


def init_params(*, seed: int = 0) -> Params:
    """{"dense1": {"w", "b"}, "dense2": {"w", "b"}}: LeCun-normal weights, zero biases, float32.

    Drawn with numpy, which compiles nothing (each eager `jax.random` call is a compilation).
    """
    rng = np.random.default_rng(seed + 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES), start=1):
        weight = rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)
        params[f"dense{i}"] = {"w": jax.device_put(weight.astype(np.float32)),
                               "b": jax.device_put(np.zeros(fan_out, np.float32))}
    return params


@jax.custom_vjp
def doubled_dw_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w with a planted backward bug: the gradient it returns for w is twice the truth."""
    return x @ w


def _matmul_forward(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w, (x, w)


def _matmul_backward(saved: tuple[jax.Array, jax.Array], g: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    x, w = saved
    return g @ w.T, 2 * (x.T @ g)  # the bug: dL/dw = xᵀg, not 2·xᵀg


doubled_dw_matmul.defvjp(_matmul_forward, _matmul_backward)


def _loss(params: Params, batch: Batch, *, bug: bool) -> jax.Array:
    """Mean squared error + WEIGHT_DECAY · Σ||w||²: the full objective the optimizer sees."""
    x, y = batch
    hidden = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    matmul = doubled_dw_matmul if bug else jnp.matmul
    output = matmul(hidden, params["dense2"]["w"]) + params["dense2"]["b"]
    penalty = sum(jnp.sum(layer["w"] ** 2) for layer in params.values())
    return jnp.mean((output - y) ** 2) + WEIGHT_DECAY * penalty


def loss_fn(params: Params, batch: Batch) -> jax.Array:
    return _loss(params, batch, bug=False)


def buggy_loss_fn(params: Params, batch: Batch) -> jax.Array:
    return _loss(params, batch, bug=True)


@partial(jax.jit, static_argnums=(0, 1))
def train_step(
    loss: Any, learning_rate: float, params: Params, opt_state: Any, batch: Batch
) -> tuple[Params, Any, jax.Array]:
    """One Adam step on `loss` (static: compiled once per loss and learning rate)."""
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


@dataclass
class TrainResult:
    params: Params
    losses: list[float] = field(default_factory=list)
    reports: list[tuple[int, CheckReport]] = field(default_factory=list)


def train(
    *,
    steps: int,
    watch: GradWatch | None = None,
    bug: bool = False,
    batch_size: int = 32,
    examples: int = 512,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> TrainResult:
    """Train for `steps` Adam steps on minibatches; with `watch`, gradwatch checks on the side."""
    loss = buggy_loss_fn if bug else loss_fn
    x, y = make_data(examples, seed=seed)
    params = init_params(seed=seed)
    opt_state = optax.adam(learning_rate).init(params)
    result = TrainResult(params)
    batches = examples // batch_size
    for step in range(1, steps + 1):
        start = ((step - 1) % batches) * batch_size
        batch = (x[start:start + batch_size], y[start:start + batch_size])
        params, opt_state, value = train_step(loss, learning_rate, params, opt_state, batch)
        result.losses.append(float(value))
        if watch is not None:  # the one gradwatch line
            report = watch_step(watch, loss, params, batch, step=step)
            if report is not None:
                result.reports.append((step, report))
    result.params = params
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="steps between checks")
    parser.add_argument("--bug", action="store_true", help="plant a wrong backward in dense2")
    parser.add_argument("--budget", type=int, default=None,
                        help="loss evaluations per check (default: adaptive, ~0.5%% overhead)")
    parser.add_argument("--no-mlflow", action="store_true", help="check and alert, log nothing")
    parser.add_argument("--spool-dir", default=None, help="gradwatch's local journal")
    args = parser.parse_args(argv)
    with GradWatch(every=args.every, budget=args.budget, mlflow=not args.no_mlflow,
                   spool_dir=args.spool_dir) as watch:
        result = train(steps=args.steps, watch=watch, bug=args.bug)
    print(f"trained {args.steps} steps: loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    for step, report in result.reports:
        worst = report.worst_layers(1)
        blamed = f", worst layer {worst[0][0]}" if worst else ""
        print(f"step {step:>5}: {report.verdict:<5} rel_distance {report.rel_distance:.2e} "
              f"over {', '.join(report.layers)}{blamed}")
    if watch.run_id:
        print(f"MLflow run {watch.run_id}")
    return 1 if any(report.verdict == "alert" for _, report in result.reports) else 0


if __name__ == "__main__":
    sys.exit(main())
