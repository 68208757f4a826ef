"""Keras training runs for tests/integrations/test_integration_keras.py, in a process of their own.

Keras fixes its backend when it is imported (KERAS_BACKEND), so each backend runs here, in a
subprocess, and reports what the tests assert on as JSON:

    KERAS_BACKEND=torch python tests/support/keras_train.py SPEC.json RESULT.json

SPEC is {"scenarios": [names], "spool_dir": path, "tracking_uri": url or null}; RESULT maps
each scenario name to its findings. Every scenario builds its own seeded model and data.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

import gradwatch
from gradwatch.integrations.keras import GradWatchCallback

ROWS, FEATURES = 64, 4


def data(seed: int = 0, rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(FEATURES, 1))) + 0.1 * rng.normal(size=(rows, 1)))
    return x, y.astype("float32")


class BuggyDense(keras.layers.Layer):
    """A dense layer whose backward scales dkernel by `scale` (1.0: a correct layer)."""

    def __init__(self, units: int, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units, self.scale = units, scale

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel",
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

    def call(self, inputs: Any) -> Any:
        scale = self.scale

        @keras.ops.custom_gradient
        def matmul(x: Any, kernel: Any) -> Any:
            def grad(*args: Any, upstream: Any = None) -> Any:
                if upstream is None:  # jax passes upstream positionally, torch by keyword
                    (upstream,) = args
                dx = keras.ops.matmul(upstream, keras.ops.transpose(kernel))
                dkernel = keras.ops.matmul(keras.ops.transpose(x), upstream) * scale  # the bug
                return dx, dkernel

            return keras.ops.matmul(x, kernel), grad

        # a tensor, not the Variable: torch.autograd.Function only tracks tensor arguments
        return matmul(inputs, keras.ops.convert_to_tensor(self.kernel)) + self.bias

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units, "scale": self.scale}


class WeightedSquares(keras.losses.Loss):
    """A custom loss whose config does not rebuild it (no get_config for `weight`)."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return keras.ops.mean(self.weight * keras.ops.square(y_true - y_pred), axis=-1)


class TwoInputs(keras.Model):
    """A subclassed model (Keras' automatic config) on a dict of int token ids and floats:
    Embedding, an activity regulariser (add_loss during the forward), BatchNormalization."""

    def __init__(self, units: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.embed = keras.layers.Embedding(12, 3, name="embed")
        self.hidden = keras.layers.Dense(units, activation="tanh", name="hidden",
                                         activity_regularizer=keras.regularizers.L2(0.1))
        self.norm = keras.layers.BatchNormalization(name="norm")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, inputs: dict[str, Any], training: bool = False) -> Any:
        tokens = keras.ops.mean(self.embed(inputs["tokens"]), axis=1)
        features = keras.ops.concatenate([tokens, inputs["features"]], axis=-1)
        return self.out(self.norm(self.hidden(features), training=training))


def small_model(*, l2: float = 1e-2, bug: float | None = None) -> Any:
    """Dense(tanh, L2) - Dropout - Dense: dropout on, so training consumes Keras' RNG. Layers
    are named, so variable names do not depend on how many models the process built."""
    first = (BuggyDense(16, scale=bug, name="buggy") if bug is not None else
             keras.layers.Dense(16, activation="tanh", name="hidden",
                                kernel_regularizer=keras.regularizers.L2(l2)))
    return keras.Sequential([keras.Input((FEATURES,)), first,
                             keras.layers.Dropout(0.25, name="dropout"),
                             keras.layers.Dense(1, name="output")], name="small")


def host(variable: Any) -> np.ndarray:
    """A variable's value as numpy (not through torch's `__array__`, which warns)."""
    value = variable.value
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def digest(model: Any) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(host(v)).tobytes()).hexdigest()
            for v in model.weights]


def name_counters() -> dict[str, int]:
    """Keras' automatic-name counters ("dense" → 3 means "dense_3" comes next)."""
    from keras.src.backend.common import global_state

    return dict(global_state.get_global_attribute("object_name_uids") or {})


def taken(before: dict[str, int]) -> dict[str, int]:
    """How many automatic names of each kind were used since `before`."""
    now = name_counters()
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


def iterations(model: Any) -> int:
    return int(host(model.optimizer.iterations))


def global_state() -> dict[str, Any]:
    """What a check must leave as it was: the next random numbers, Keras' float settings."""
    from keras.src.backend.common import dtypes

    state = {"random": random.random(), "numpy": float(np.random.random()),
             "floatx": keras.config.floatx(), "policy": keras.config.dtype_policy().name,
             "float64_promotes_to": dtypes.BIT64_TO_BIT32_DTYPE.get("float64"),
             "new_float_array": str(keras.ops.convert_to_tensor([0.5]).dtype)}
    if keras.backend.backend() == "torch":
        import torch

        state["torch"] = float(torch.rand(1))
    return state


def losses(history: Any) -> list[float]:
    return [float(value) for value in history.history["loss"]]


def summary(callback: GradWatchCallback) -> list[dict[str, Any]]:
    return [{"step": r.probe.get("step"), "verdict": r.verdict, "rel_distance": r.rel_distance,
             "layers": {name: layer.verdict for name, layer in r.layers.items()},
             "worst": [name for name, _ in r.worst_layers(1)], "loss": r.loss,
             "evaluations": r.evaluations, "reasons": r.reasons, "probe": r.probe,
             "summary": r.summary()} for r in callback.reports]


def train(callbacks: list[Any], *, epochs: int = 2, **model_args: Any) -> Any:
    keras.utils.set_random_seed(0)
    model = small_model(**model_args)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=epochs, callbacks=callbacks, verbose=0)
    return model, history


def probe() -> tuple[np.ndarray, np.ndarray]:
    x, y = data(seed=1, rows=8)
    return x, y


# ---------------------------------------------------------------------- scenarios
def scenario_pair(spec: dict[str, Any]) -> dict[str, Any]:
    """The same seeded fit with and without the callback (every=3, 8 steps)."""
    callback = GradWatchCallback(probe=probe(), every=3, budget=2000, mlflow=False,
                                 spool_dir=spec["spool_dir"])
    before = name_counters()
    watched, watched_history = train([callback])
    watched_after = global_state()
    watched_after["names_taken"] = taken(before)
    before = name_counters()
    plain, plain_history = train([])
    plain_after = global_state()
    plain_after["names_taken"] = taken(before)
    return {
        "watched": {"digest": digest(watched), "loss": losses(watched_history),
                    "after": watched_after},
        "plain": {"digest": digest(plain), "loss": losses(plain_history), "after": plain_after},
        "iterations": iterations(watched),
        "callback_step": callback.step,
        "reports": summary(callback),
    }


def scenario_bug(spec: dict[str, Any]) -> dict[str, Any]:
    """dkernel of the first layer scaled by 1.5; on_alert="stop" at the first check (step 3)."""
    callback = GradWatchCallback(probe=probe(), every=3, first_step=False, budget=2000,
                                 on_alert="stop", mlflow=False, spool_dir=spec["spool_dir"])
    model, history = train([callback], epochs=5, bug=1.5)
    return {"iterations": iterations(model), "epochs": len(history.history["loss"]),
            "reports": summary(callback)}


def scenario_raise(spec: dict[str, Any]) -> dict[str, Any]:
    """The same bug with on_alert="raise": GradientAlertError out of fit, the record closed."""
    callback = GradWatchCallback(probe=probe(), every=3, first_step=False, budget=2000,
                                 on_alert="raise", mlflow=False, spool_dir=spec["spool_dir"])
    try:
        train([callback], epochs=5, bug=1.5)
    except gradwatch.GradientAlertError as exc:
        return {"raised": str(exc).splitlines()[0], "step": callback.step,
                "closed": not callback.watch.schedule.running}
    return {"raised": None, "step": callback.step, "closed": None}


def scenario_selection(spec: dict[str, Any]) -> dict[str, Any]:
    """include= globs over the variable names, and the adaptive budget's rotation."""
    only_hidden = GradWatchCallback(probe=probe(), every=4, include="hidden/*", budget=2000,
                                    mlflow=False, spool_dir=spec["spool_dir"])
    train([only_hidden], epochs=1)
    # budget=None: sized from measured times, tiny here, so successive checks rotate
    adaptive = GradWatchCallback(probe=probe(), every=1, mlflow=False, overhead=0.01,
                                 spool_dir=spec["spool_dir"])
    train([adaptive], epochs=3)
    return {"only_hidden": [sorted(r.layers) for r in only_hidden.reports],
            "adaptive": [{"layers": sorted(r.layers), "verdict": r.verdict,
                          "budget": r.probe["budget"], "rotation": "rotation" in r.probe}
                         for r in adaptive.reports]}


def scenario_subclassed(spec: dict[str, Any]) -> dict[str, Any]:
    """TwoInputs with WeightedSquares: rebuilt from its automatic config, int inputs kept."""
    rng = np.random.default_rng(2)
    x = {"tokens": rng.integers(0, 12, size=(32, 5)).astype("int32"),
         "features": rng.normal(size=(32, FEATURES)).astype("float32")}
    y = rng.normal(size=(32, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = TwoInputs()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=WeightedSquares(2.0))
    callback = GradWatchCallback(probe=({k: v[:8] for k, v in x.items()}, y[:8]), every=2,
                                 budget=2000, mlflow=False, spool_dir=spec["spool_dir"])
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback], verbose=0)
    return {"reports": summary(callback)}


def scenario_correct_custom_gradient(spec: dict[str, Any]) -> dict[str, Any]:
    """The same custom-gradient layer without the bug: the check is ok."""
    callback = GradWatchCallback(probe=probe(), every=3, first_step=False, budget=2000,
                                 mlflow=False, spool_dir=spec["spool_dir"])
    model, _ = train([callback], epochs=1, bug=1.0)
    return {"iterations": iterations(model), "reports": summary(callback)}


def scenario_regulariser(spec: dict[str, Any]) -> dict[str, Any]:
    """A linear model with a strong L2 on its kernel, weights fixed (learning rate 0): the
    check's objective and dθ against the closed forms with and without the L2 term."""
    strength = 5.0
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(
        1, kernel_regularizer=keras.regularizers.L2(strength), name="linear")], name="linear")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = data()
    px, py = probe()
    callback = GradWatchCallback(probe=(px, py), every=1000, budget=2000, mlflow=False,
                                 spool_dir=spec["spool_dir"])
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[callback], verbose=0)
    kernel, bias = (host(w).astype(np.float64) for w in model.weights)
    residual = px.astype(np.float64) @ kernel + bias - py
    data_grad = 2 / residual.size * px.astype(np.float64).T @ residual  # d mean(r²) / dW
    full_grad = data_grad + 2 * strength * kernel  # + d λ·ΣW² / dW
    mse = float(np.mean(residual**2))
    full = mse + strength * float(np.sum(kernel**2))
    # What a check whose analytic side omitted model.losses would conclude:
    omitted = gradwatch.check(
        lambda p: np.mean((px @ p["kernel"] + p["bias"] - py) ** 2)
        + strength * np.sum(p["kernel"] ** 2),
        {"kernel": kernel, "bias": bias}, {"kernel": data_grad, "bias": 2 * residual.mean(0)},
    )
    report = callback.reports[0]
    return {
        "report": summary(callback)[0], "mse": mse, "full": full,
        "grad_norm": report.layers["linear/kernel"].grad_norm,
        "full_grad_norm": float(np.linalg.norm(full_grad)),
        "data_grad_norm": float(np.linalg.norm(data_grad)),
        "omitted_verdict": omitted.verdict,
    }


def scenario_second_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """Two fits of 4 steps: the step continues from optimizer.iterations."""
    callback = GradWatchCallback(probe=probe(), every=3, budget=2000, mlflow=False,
                                 spool_dir=spec["spool_dir"])
    model, _ = train([callback], epochs=1)
    first = [r.probe["step"] for r in callback.reports]
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[callback], verbose=0)
    return {"first": first, "all": [r.probe["step"] for r in callback.reports],
            "iterations": iterations(model), "callback_step": callback.step}


def scenario_steps_per_execution(spec: dict[str, Any]) -> dict[str, Any]:
    """steps_per_execution=2 where the backend has it (JAX; torch only takes 1): the hook runs
    every 2 steps, and checks land at the end of the execution a multiple of every fell in."""
    per_execution = 2 if keras.backend.backend() == "jax" else 1
    callback = GradWatchCallback(probe=probe(), every=3, budget=2000, mlflow=False,
                                 spool_dir=spec["spool_dir"])
    keras.utils.set_random_seed(0)
    model = small_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                  steps_per_execution=per_execution)
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    return {"per_execution": per_execution, "iterations": iterations(model),
            "steps": [r.probe["step"] for r in callback.reports]}


def scenario_record(spec: dict[str, Any]) -> dict[str, Any]:
    """A fit inside `mlflow.start_run()`: the record goes into that run."""
    import mlflow

    mlflow.set_tracking_uri(spec["tracking_uri"])
    experiment = mlflow.set_experiment("keras-gradwatch")
    callback = GradWatchCallback(probe=probe(), every=2, budget=2000,
                                 tracking_uri=spec["tracking_uri"], spool_dir=spec["spool_dir"])
    with mlflow.start_run() as run:
        mlflow.log_param("script", "keras_train")
        keras.utils.set_random_seed(0)
        model = small_model()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        x, y = data(rows=48)
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    return {"run_id": run.info.run_id, "watch_run_id": callback.watch.run_id,
            "experiment_id": experiment.experiment_id, "reports": summary(callback)}


def scenario_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """The messages of the errors raised when the callback is built wrongly."""
    attempts = {
        "no_probe": lambda: GradWatchCallback(every=10, mlflow=False),
        "list_probe": lambda: GradWatchCallback(probe=list(probe()), mlflow=False),
        "loss_fn": lambda: GradWatchCallback(probe=probe(), loss_fn=print, mlflow=False),
        "unknown": lambda: GradWatchCallback(probe=probe(), evry=10, mlflow=False),
        "both": lambda: GradWatchCallback(probe=probe(), every=5,
                                          watch=gradwatch.GradWatch(mlflow=False)),
        "strings": lambda: GradWatchCallback(probe=(np.array(["a"]), np.ones(1)), mlflow=False),
    }
    found: dict[str, dict[str, str | None]] = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except gradwatch.GradwatchError as exc:
            found[name] = {"type": type(exc).__name__, "message": str(exc)}
        else:
            found[name] = {"type": None, "message": ""}
    return found


SCENARIOS = {name[len("scenario_"):]: function for name, function in globals().items()
             if name.startswith("scenario_")}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = {"backend": keras.backend.backend()}
    for name in spec["scenarios"]:
        results[name] = SCENARIOS[name](spec)
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
