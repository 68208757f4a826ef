"""Keras 3: `GradWatchCallback`, a `keras.callbacks.Callback` over `gradwatch.GradWatch`.

    from gradwatch.integrations.keras import GradWatchCallback

    model.compile(optimizer="adam", loss="mse")
    model.fit(x_train, y_train, callbacks=[
        GradWatchCallback(probe=(x_train[:8], y_train[:8]), every=1000)])

`GradWatchCallback(probe, every, **settings)` takes `GradWatch`'s settings (`budget=`,
`on_alert=`, `notify=`, `tracking_uri=`, `spool_dir=`, ...), or a ready `GradWatch` with `watch=`.

- **Backends**: torch and jax (`KERAS_BACKEND`). The tensorflow backend is not supported yet:
  building the callback there raises `ConfigError` (and where TensorFlow is not installed,
  Keras cannot import on it at all: importing this module raises `MissingDependencyError`
  naming `KERAS_BACKEND`).
- **Probe batch**: Keras hands no data to batch hooks, so the batch to check on is given:
  `probe=(x, y)` or `(x, y, sample_weight)` (`x` may be a dict or list for several inputs; `(x,)`
  when `compute_loss` needs no targets), arrays or tensors. It is copied once, to float64 where
  it is floating; its first `probe_rows=8` rows are used. The same batch at every check, so the
  checks are comparable along training.
- **When / "step"**: the step is the optimizer's step counter, `model.optimizer.iterations`
  after the update (one per training batch; with `gradient_accumulation_steps` it still counts
  batches). It is read once at `on_train_begin` (so a second `fit` continues the count) and then
  counted on the host in `on_train_batch_end`, so non-check steps never read device state nor,
  with JAX, make Keras sync its state. With `steps_per_execution=k` (JAX) the hook runs every
  k steps: a check runs at the end of the execution in which a multiple of `every` fell.
- **Loss**: the model's own `compute_loss` (compiled loss, `loss_weights`, and `model.losses`:
  `kernel_regularizer`s, `activity_regularizer`s, `add_loss`) of the probe batch, with the
  forward pass in inference mode (`training=False`: dropout off, BatchNorm on its moving
  statistics). Override `Model.compute_loss` to check another objective.
- **float64, live model untouched**: the check runs on gradwatch's float64 copy of the model
  (rebuilt from `get_config()` with every floating dtype policy set to float64, the compiled
  losses rebuilt in float64, then given the live weights cast to float64). It is built at the
  first check of a `fit` and refreshed at each. The live model's variables are only read; with
  JAX they are read after Keras' own state sync (as `ModelCheckpoint` does). Evaluations are
  stateless calls (`keras.StatelessScope`) on the copy: backprop's dθ from `torch.autograd` or
  `jax.value_and_grad` (compiled with `jax.jit`), dθapprox from central differences. Inside a
  check, and only there, Keras' float precision is float64 (`floatx`, the default dtype policy,
  `jax.enable_x64`, and Keras' type promotion, which otherwise computes float64 reductions such
  as `ops.mean` in float32 on these backends); all of it is restored afterwards, as are the
  Python, numpy and torch RNG states.
- **Layer names**: the variable paths without the model's name: "dense/kernel", "dense_1/bias".
- **MLflow run**: the run active when `fit` starts (`with mlflow.start_run():` around `fit`,
  or `mlflow.keras.autolog()`), else `GradWatch`'s resolution (`MLFLOW_RUN_ID`, or a new run in
  `MLFLOW_EXPERIMENT_NAME` or "gradwatch", ended at train end).
- **Stopping**: `on_alert="stop"` sets `model.stop_training` (Keras ends the fit after the
  batch); "raise" raises `GradientAlertError` out of `fit`.
- **State**: `state_dict()` / `load_state_dict()` (the schedule, the alert state, the rotation
  and the adaptive budget) for your own checkpoints; Keras has no callback state of its own.

Not supported yet: the tensorflow backend; subclassed models without a working
`get_config()` / `from_config()` (the float64 copy is rebuilt from the config); models whose
weights cannot be matched one to one with a rebuilt copy; multi-device distribution
(`keras.distribution`), whose sharded variables the copy does not gather.

Imports: gradwatch (the public API and the engine, watch and common subpackages), keras.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.errors import (
    ConfigError,
    InputError,
    LossError,
    MissingDependencyError,
    missing_dependency,
)
from gradwatch.engine.core import run_check
from gradwatch.engine.report import CheckReport
from gradwatch.engine.torch_model import describe_batch
from gradwatch.engine.types import select_names
from gradwatch.watch.callback import CheckPlan, GradWatch, adapter_watch, first_rows

try:
    import keras
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    if exc.name in (None, "keras"):
        raise missing_dependency("gradwatch.integrations.keras", "keras", "keras") from exc
    raise MissingDependencyError(
        f"Using gradwatch.integrations.keras, but Keras could not import its backend: "
        f"{exc}. Keras picks the backend from KERAS_BACKEND (else ~/.keras/keras.json, default "
        f"'tensorflow'); gradwatch supports 'torch' and 'jax': set KERAS_BACKEND=torch or "
        f"KERAS_BACKEND=jax before Keras is imported, or install the missing package."
    ) from exc

__all__ = ["GradWatchCallback"]

Vector = NDArray[np.float64]

SUPPORTED_BACKENDS = ("torch", "jax")

PROBE_HELP = (
    "Keras passes no data to callbacks' batch hooks, so GradWatchCallback needs the batch to "
    "check on: GradWatchCallback(probe=(x_batch, y_batch), ...), e.g. probe=(x_train[:8], "
    "y_train[:8]); (x, y, sample_weight) and (x,) (when compute_loss needs no targets) work "
    "too."
)


class GradWatchCallback(keras.callbacks.Callback):
    """Numerical gradient checks during `model.fit`, logged to MLflow, with alerts.

    Args:
        probe: the batch to check on, `(x, y)` or `(x, y, sample_weight)` (or `(x,)`); its
            first `probe_rows` rows are used. Required: Keras gives callbacks no data.
        every: optimizer steps between checks, or a wall-clock schedule ("30min", a cron
            expression); default `GradWatch`'s (1000).
        watch: a `GradWatch` to drive instead of building one (then give no other setting).
        **settings: `GradWatch`'s keyword arguments: `first_step`, `probe_rows`, `mode`,
            `budget`, `overhead`, `eps`, `thresholds`, `include`, `exclude` (globs over the
            variable names, e.g. "dense/*"), `on_alert`, `notify`, `tracking_uri`, `run_id`,
            `experiment_name`, `spool_dir`, `mlflow`, ... (not `loss_fn`: the objective is the
            model's `compute_loss`).

    Example:
        >>> import numpy as np
        >>> from gradwatch.integrations.keras import GradWatchCallback
        >>> probe = (np.zeros((8, 3), "float32"), np.zeros((8, 1), "float32"))
        >>> GradWatchCallback(probe=probe, every=500, budget=300, mlflow=False)
        GradWatchCallback(GradWatch(every='500', mode='auto', budget=300, on_alert='continue'), \
probe=['float64[8, 3]', 'float64[8, 1]'])
    """

    def __init__(
        self,
        probe: Any = None,
        every: int | str | None = None,
        *,
        watch: GradWatch | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        backend = keras.backend.backend()
        if backend not in SUPPORTED_BACKENDS:
            raise ConfigError(
                f"GradWatchCallback supports the Keras backends {', '.join(SUPPORTED_BACKENDS)}, "
                f"but Keras runs on {backend!r} (not implemented yet: its gradients would come "
                f"from tf.GradientTape). Set KERAS_BACKEND=torch or KERAS_BACKEND=jax before "
                f"importing Keras."
            )
        if "loss_fn" in settings:
            raise ConfigError(
                "GradWatchCallback checks the model's own objective, model.compute_loss (the "
                "compiled loss plus model.losses), so it takes no loss_fn. To check another "
                "objective, override compute_loss in a Model subclass."
            )
        given_watch = watch is not None
        watch = adapter_watch(every, watch, settings, excluded=("loss_fn", "probe"),
                              also="probe=, and ")
        if given_watch and watch.loss_fn is not None:
            raise ConfigError(
                "the GradWatch passed as watch= has a loss_fn, which GradWatchCallback "
                "does not use (the objective is model.compute_loss). Build it without one."
            )
        if probe is None:
            probe = watch.probe
        self.watch = watch
        self.probe = _Probe(probe, watch.probe_rows)
        self.backend = backend
        self.step = 0
        self._epoch_start = 0
        self._copy: _Float64Copy | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.watch!r}, probe={self.probe.description!r})"

    @property
    def reports(self) -> list[CheckReport]:
        """The checks run in this process, oldest first."""
        return self.watch.reports

    # ------------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model  # with JAX, a sync: here the state is in the variables anyway
        self.step = _optimizer_step(model)
        self._epoch_start = self.step
        self._copy = None  # rebuilt at this fit's first check: compile() may have changed
        self.watch.setup(None, active_run_id=self._active_run_id())

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch_start = self.step

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # `batch` is the index in the epoch of the last step this call covers (several with
        # steps_per_execution > 1), so the optimizer has made epoch start + batch + 1 steps.
        self.step = self._epoch_start + int(batch) + 1
        try:
            self.watch.check_with(self._check, step=self.step)
        except BaseException:  # on_alert="raise" or strict=True: Keras calls no hook when fit
            self.watch.close()  # raises, so deliver the record and end the run here
            self._copy = None
            raise
        if self.watch.should_stop:
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self.watch.close()
        self._copy = None

    def state_dict(self) -> dict[str, Any]:
        return self.watch.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.watch.load_state_dict(state)

    # ------------------------------------------------------------------ the check
    def _check(self, plan: CheckPlan) -> CheckReport:
        model = self.model  # only now: with JAX, reading it syncs Keras' state to the variables
        with _preserved_rng(self.backend):
            if self._copy is None or not self._copy.matches(model):
                self._copy = _Float64Copy.build(model, self.backend, self.probe)
            names = select_names(self._copy.names, self.watch.include, self.watch.exclude,
                                 what="trainable variable")
            chosen = plan.tensors({name: self._copy.sizes[name] for name in names})
            if chosen is not None:  # the rotation's turn: exactly these tensors
                names = [name for name in names if name in chosen]
            report = self._copy.check(model, names, plan)
        report.probe.update({"step": plan.step, "from": "probe= batch"})
        return report

    def _active_run_id(self) -> str | None:
        return self.watch.recorder.active_run_id() if self.watch.use_mlflow else None


def _optimizer_step(model: Any) -> int:
    """`model.optimizer.iterations` now (0 before the optimizer exists)."""
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None:
        return 0
    return int(_to_numpy(getattr(iterations, "value", iterations)).reshape(()))


# ---------------------------------------------------------------------- the probe batch
class _Probe:
    """The probe batch as host arrays: floating leaves in float64, the first rows only."""

    def __init__(self, probe: Any, rows: int | None) -> None:
        if probe is None:
            raise ConfigError(PROBE_HELP)
        if not isinstance(probe, tuple) or not 1 <= len(probe) <= 3:
            got = f"a tuple of {len(probe)}" if isinstance(probe, tuple) else type(probe).__name__
            raise ConfigError(
                f"probe must be a tuple (x, y), (x, y, sample_weight) or (x,), as model.fit "
                f"takes them; got {got}. (A list is not taken for (x, y): Keras reads a list "
                f"as several inputs.) {PROBE_HELP}"
            )
        parts = [keras.tree.map_structure(_host_array, part) for part in probe]
        if rows is not None:
            parts = list(first_rows(tuple(parts), rows))
        x, y, sample_weight = (*parts, None, None)[:3]
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.description = describe_batch([part for part in parts if part is not None])

    def tensors(self) -> tuple[Any, Any, Any]:
        """(x, y, sample_weight) as backend tensors; call inside the float64 scope."""
        convert = keras.ops.convert_to_tensor
        return tuple(  # type: ignore[return-value]
            None if part is None else keras.tree.map_structure(convert, part)
            for part in (self.x, self.y, self.sample_weight)
        )


def _host_array(value: Any) -> Any:
    """A numpy copy of an array or tensor, float64 if it is floating."""
    if value is None:
        return None
    if hasattr(value, "detach"):  # a torch tensor (np.asarray would go through __array__)
        value = value.detach().to("cpu").numpy()
    try:
        array = np.array(value, copy=True)
    except Exception as exc:
        raise InputError(
            f"probe holds a {type(value).__name__} that is not an array or a tensor "
            f"({type(exc).__name__}: {exc}). {PROBE_HELP}"
        ) from exc
    if array.dtype.kind == "f":
        return array.astype(np.float64)
    if array.dtype.kind not in "iub":
        raise InputError(
            f"probe holds an array of dtype {array.dtype}; expected numbers (floating arrays "
            f"are checked in float64, integer ones such as token ids or labels are kept)."
        )
    return array


# ---------------------------------------------------------------------- float64 scope
@contextmanager
def _float64_keras(backend: str) -> Iterator[None]:
    """Keras computing in float64 for the duration: `floatx`, the default dtype policy, JAX's
    x64 mode (thread-local), and Keras' type promotion, which on the torch and jax backends
    maps float64 to float32 (`dtypes.BIT64_TO_BIT32_DTYPE`, "aligned with JAX's default") so
    that e.g. `ops.mean` of a float64 tensor is computed in float32. Restored on exit."""
    from keras.src.backend.common import dtypes, global_state

    # the policy as stored (None until Keras first needs one), not keras.config.dtype_policy(),
    # which would store a float32 policy that no longer follows set_floatx()
    floatx, policy = keras.config.floatx(), global_state.get_global_attribute("dtype_policy")
    demotions = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    demoted = demotions.get("float64") if isinstance(demotions, dict) else None
    with ExitStack() as stack:
        if backend == "jax":
            stack.enter_context(_jax_x64())
        try:
            keras.config.set_floatx("float64")
            keras.config.set_dtype_policy("float64")
            if demoted is not None:
                demotions["float64"] = "float64"  # type: ignore[index]
            yield
        finally:
            if demoted is not None:
                demotions["float64"] = demoted  # type: ignore[index]
            global_state.set_global_attribute("dtype_policy", policy)
            keras.config.set_floatx(floatx)


def _jax_x64() -> AbstractContextManager[Any]:
    import jax

    scope: Any = getattr(jax, "enable_x64", None)
    if scope is None:  # pragma: no cover - JAX < 0.8
        from importlib import import_module

        return import_module("jax.experimental").enable_x64()
    return scope(True)


def _require_float64_arithmetic() -> None:
    """Fail loudly if Keras still rounds float64 to float32 inside the scope (a Keras version
    whose type promotion gradwatch does not know): the check would measure rounding."""
    exact = 1.0 + 2.0**-41
    value = keras.ops.mean(keras.ops.convert_to_tensor([1.0, 1.0 + 2.0**-40], dtype="float64"))
    if float(_to_numpy(value)) != exact:
        raise LossError(
            f"Keras {keras.__version__} on the {keras.backend.backend()} backend computes "
            f"float64 reductions in lower precision even inside gradwatch's float64 scope, so "
            f"central differences would measure rounding, not the gradient. Please report it "
            f"to gradwatch with your Keras version."
        )


@contextmanager
def _preserved_rng(backend: str) -> Iterator[None]:
    """Python's, numpy's (and torch's) global RNG states as they were: building the float64
    copy draws initializer seeds from `random`, which training may use too."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_scope: AbstractContextManager[Any] = nullcontext()
    if backend == "torch":
        import torch

        from gradwatch.engine.torch_model import preserved_global_state

        torch_scope = preserved_global_state(torch)
    try:
        with torch_scope:
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# ---------------------------------------------------------------------- backend arithmetic
def _to_numpy(value: Any) -> NDArray[Any]:
    """A host copy of a backend tensor (torch's `__array__` is avoided: it warns)."""
    if hasattr(value, "detach"):
        return np.array(value.detach().to("cpu").numpy(), copy=True)
    return np.array(value, copy=True)


class _TorchGradients:
    """Evaluations in eager PyTorch; dθ from `torch.autograd.grad`."""

    def __init__(self, loss: Callable[..., Any]) -> None:
        import torch

        self.torch = torch
        self.loss = loss

    def value(self, *arguments: Any) -> float:
        with self.torch.no_grad():
            return float(self.loss(*arguments).item())

    def value_and_grad(
        self, trainable: list[Any], *rest: Any
    ) -> tuple[float, list[NDArray[Any] | None]]:
        torch = self.torch
        leaves = [tensor.detach().clone().requires_grad_(True) for tensor in trainable]
        with torch.enable_grad():
            loss = self.loss(leaves, *rest)
        if not loss.requires_grad:
            raise LossError(
                "model.compute_loss returned a tensor that does not depend on any trainable "
                "variable of the model (it is detached, or computed without them), so there is "
                "no gradient to check."
            )
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return float(loss.detach().item()), [None if g is None else _to_numpy(g) for g in grads]


class _JaxGradients:
    """Evaluations and dθ (`jax.value_and_grad`) compiled once per float64 copy (`jax.jit`)."""

    def __init__(self, loss: Callable[..., Any]) -> None:
        import jax

        self.evaluate = jax.jit(loss)
        self.gradient = jax.jit(jax.value_and_grad(loss))

    def value(self, *arguments: Any) -> float:
        return float(self.evaluate(*arguments))

    def value_and_grad(
        self, trainable: list[Any], *rest: Any
    ) -> tuple[float, list[NDArray[Any] | None]]:
        loss, grads = self.gradient(trainable, *rest)
        return float(loss), [_to_numpy(g) for g in grads]


# ---------------------------------------------------------------------- the float64 copy
class _Float64Copy:
    """The model rebuilt in float64, compiled with the same losses in float64; its variables
    are refreshed from the live model's at each check and never aliased with them."""

    def __init__(
        self, model: Any, clone: Any, backend: str, probe: _Probe, names: list[str]
    ) -> None:
        self.model_id = id(model)
        self.clone = clone
        self.backend = backend
        self.probe = probe
        self.names = names
        live = _all_variables(model)
        self.shapes = [tuple(v.shape) for v in live]
        self.trainable_count = len(model.trainable_variables)
        self.sizes = {name: int(np.prod(shape, dtype=np.int64)) for name, shape
                      in zip(names, self.shapes[: self.trainable_count])}
        self.loss_has_training = "training" in inspect.signature(clone.compute_loss).parameters
        gradients = _TorchGradients if backend == "torch" else _JaxGradients
        self.gradients = gradients(self._loss)

    @classmethod
    def build(cls, model: Any, backend: str, probe: _Probe) -> _Float64Copy:
        with _float64_keras(backend):
            _require_float64_arithmetic()
            clone = _rebuild(model)
            if not clone.built:
                x, _, _ = probe.tensors()
                clone(x, training=False)  # builds the variables
            clone.compile(optimizer=None, loss=_float64_losses(model.loss),
                          loss_weights=_loss_weights(model))
            _match_variables(model, clone)
        return cls(model, clone, backend, probe, _variable_names(model))

    def matches(self, model: Any) -> bool:
        return id(model) == self.model_id and self.shapes == [
            tuple(v.shape) for v in _all_variables(model)]

    def _loss(self, trainable: list[Any], non_trainable: list[Any], data: tuple[Any, ...]) -> Any:
        """J: the compiled loss plus `model.losses` of the probe batch, on the copy, with the
        trainable variables set to `trainable`. Stateless: nothing is written anywhere."""
        clone = self.clone
        x, y, sample_weight = data
        mapping = [*zip(clone.trainable_variables, trainable),
                   *zip(clone.non_trainable_variables, non_trainable)]
        training = {"training": True} if self.loss_has_training else {}
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = clone(x, training=False)  # dropout off, BatchNorm on moving statistics
            # positional, as Keras' train_step calls it; `training` asks for the training loss
            loss = clone.compute_loss(x, y, y_pred, sample_weight, **training)
        if loss is None:
            raise LossError(
                "model.compute_loss returned None for the probe batch: the model was compiled "
                "without a loss and has no other. Compile it with loss=..., or override "
                "compute_loss."
            )
        if tuple(loss.shape) != ():
            raise LossError(
                f"model.compute_loss returned a tensor of shape {list(loss.shape)}, not a "
                f"scalar. Reduce it (e.g. keras.ops.mean) in compute_loss."
            )
        return loss

    def check(self, model: Any, names: list[str], plan: CheckPlan) -> CheckReport:
        live = _all_variables(model)
        values = [_to_numpy(v.value) for v in live]  # read only: the live model is not touched
        with _float64_keras(self.backend):
            for variable, value in zip(_all_variables(self.clone), values):
                variable.assign(value.astype(np.float64) if value.dtype.kind == "f" else value)
            data = self.probe.tensors()
            convert = keras.ops.convert_to_tensor
            trainable = [convert(_to_numpy(v.value)) for v in self.clone.trainable_variables]
            non_trainable = [v.value for v in self.clone.non_trainable_variables]
            _, grads = self.gradients.value_and_grad(trainable, non_trainable, data)
            index = {name: i for i, name in enumerate(self.names)}
            unused = [name for name in names if grads[index[name]] is None]
            analytic = {
                name: np.zeros(self.shapes[index[name]]) if grads[index[name]] is None
                else np.asarray(grads[index[name]], dtype=np.float64)
                for name in names
            }
            objective = _KerasObjective(
                lambda tensors: self.gradients.value(tensors, non_trainable, data),
                trainable, index,
                {name: values[index[name]].astype(np.float64) for name in names},
            )
            settings = plan.settings()
            report = run_check(objective, analytic, settings, probe=self._describe(model))
        _note_unused(report, unused)
        return report

    def _describe(self, model: Any) -> dict[str, Any]:
        return {
            "source": "keras",
            "backend": self.backend,
            "model": type(model).__name__,
            "batch": self.probe.description,
            "parameters": int(sum(self.sizes.values())),
            "loss": "model.compute_loss (compiled loss + model.losses), forward training=False",
        }


def _all_variables(model: Any) -> list[Any]:
    """The variables `stateless_call` takes, in its order: trainable, then non-trainable."""
    return [*model.trainable_variables, *model.non_trainable_variables]


def _variable_names(model: Any) -> list[str]:
    """Trainable variable paths without the model's own name ("dense/kernel"); made unique."""
    prefix = f"{model.name}/"
    paths = [str(getattr(v, "path", v.name)) for v in model.trainable_variables]
    short = [p[len(prefix):] if p.startswith(prefix) else p for p in paths]
    names = short if len(set(short)) == len(short) else paths
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _rebuild(model: Any) -> Any:
    """A new model of the same class from `get_config()`, every floating dtype float64."""
    from keras.src.backend.common import global_state

    classes = {type(layer).__name__: type(layer) for layer in model._flatten_layers()}
    # Building layers takes automatic names from Keras' global counters ("dense_3"); they are
    # put back afterwards, so layers the user creates later are named as without gradwatch.
    counters = global_state.get_global_attribute("object_name_uids")
    saved = dict(counters) if counters is not None else None
    try:
        config = _float64_config(model.get_config())
        with keras.saving.custom_object_scope(classes):
            return type(model).from_config(config)
    except Exception as exc:
        raise InputError(
            f"gradwatch checks a float64 copy of the model, rebuilt from its config, and could "
            f"not rebuild {type(model).__name__}: {type(exc).__name__}: {exc}. Use a Sequential "
            f"or functional model, or give your Model subclass (and custom layers) get_config() "
            f"and from_config() so that type(model).from_config(model.get_config()) works."
        ) from exc
    finally:
        if saved is None:
            global_state.set_global_attribute("object_name_uids", None)
        else:
            current = global_state.get_global_attribute("object_name_uids")
            current.clear()
            current.update(saved)


def _float64_config(config: Any) -> Any:
    """`config` with every floating dtype (a name or a serialised DTypePolicy) → "float64";
    integer and boolean dtypes (token ids, masks) are kept."""
    if isinstance(config, Mapping):
        return {key: _float64_dtype(value) if key == "dtype" else _float64_config(value)
                for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(_float64_config(item) for item in config)
    return config


def _float64_dtype(value: Any) -> Any:
    name = value
    if isinstance(value, Mapping):
        name = value.get("config", {}).get("name") if isinstance(value.get("config"),
                                                                 Mapping) else None
    if isinstance(name, str) and (name.startswith(("float", "bfloat", "mixed_"))):
        return "float64"
    return value


def _float64_losses(losses: Any) -> Any:
    """The compiled `loss` with every `keras.losses.Loss` rebuilt in float64 (a Loss keeps the
    dtype it was built with and casts y_pred to it); names and functions stay as they are."""

    def rebuilt(loss: Any) -> Any:
        if not isinstance(loss, keras.losses.Loss):
            return loss
        try:
            fresh = type(loss).from_config(loss.get_config())
        except Exception:
            fresh = None
        if getattr(fresh, "dtype", None) != "float64":
            # e.g. a subclass whose config does not rebuild it: a shallow copy by hand
            # (copy.copy would pickle it, i.e. serialise it through its config again)
            fresh = object.__new__(type(loss))
            fresh.__dict__.update(loss.__dict__)
            fresh._dtype_policy = keras.dtype_policies.DTypePolicy("float64")
            fresh._dtype = "float64"
        if fresh.dtype != "float64":
            raise LossError(
                f"the compiled loss {loss!r} cannot be rebuilt in float64 (its dtype stays "
                f"{fresh.dtype}); give it get_config()/from_config()."
            )
        return fresh

    return keras.tree.map_structure(rebuilt, losses) if losses is not None else None


def _loss_weights(model: Any) -> Any:
    # compile() keeps loss_weights only in its CompileLoss (and in the compile config, whose
    # serialisation would also serialise the optimizer).
    return getattr(getattr(model, "_compile_loss", None), "_user_loss_weights", None)


def _match_variables(model: Any, clone: Any) -> None:
    live, rebuilt = _all_variables(model), _all_variables(clone)
    trainable = len(model.trainable_variables), len(clone.trainable_variables)
    shapes = [tuple(v.shape) for v in live], [tuple(v.shape) for v in rebuilt]
    if trainable[0] != trainable[1] or shapes[0] != shapes[1]:
        raise InputError(
            f"the float64 copy of {type(model).__name__} rebuilt from its config has other "
            f"variables than the model ({trainable[1]} trainable, shapes {shapes[1][:6]} vs "
            f"{trainable[0]} trainable, shapes {shapes[0][:6]}), so weights cannot be matched. "
            f"Make get_config()/from_config() rebuild the same layers, created in the same "
            f"order."
        )


def _note_unused(report: CheckReport, unused: list[str]) -> None:
    for name in unused:
        layer = report.layers[name]
        if layer.verdict == "ok":
            layer.notes.append("the loss does not depend on this variable (autograd returned "
                               "no gradient and dθapprox agrees)")
        else:
            why = (f"autograd returned no gradient for '{name}', yet the loss changes with it: "
                   f"a detach or a custom gradient returning None")
            layer.notes.append(why)
            report.reasons.append(why)


class _KerasObjective:
    """The engine's `Objective`: J with one trainable tensor perturbed, the others as they are.

    `values` are float64 host copies of the checked tensors that gradwatch owns; each
    perturbed evaluation gets a fresh backend tensor made from (a copy of) them.
    """

    def __init__(
        self,
        evaluate: Callable[[list[Any]], float],
        tensors: list[Any],
        index: Mapping[str, int],
        values: dict[str, Vector],
    ) -> None:
        self.evaluate = evaluate
        self.tensors = tensors
        self.index = index
        self.values = values

    def _with(self, layer: str, value: Vector) -> float:
        tensors = list(self.tensors)
        tensors[self.index[layer]] = keras.ops.convert_to_tensor(np.array(value, copy=True))
        return self.evaluate(tensors)

    def loss(self) -> float:
        return self.evaluate(self.tensors)

    def coordinate_losses(
        self, layer: str, indices: NDArray[np.int64], eps: float
    ) -> tuple[Vector, Vector]:
        value = self.values[layer]
        flat = value.reshape(-1)  # a view
        plus, minus = np.empty(indices.size), np.empty(indices.size)
        for k, i in enumerate(indices):
            original = flat[i]
            try:
                flat[i] = original + eps  # θ + ε·e_i, as the recipe
                plus[k] = self._with(layer, value)
                flat[i] = original - eps
                minus[k] = self._with(layer, value)
            finally:
                flat[i] = original  # restored exactly, not by subtracting ε
        return plus, minus

    def direction_losses(
        self, layer: str, directions: Vector, steps: Vector
    ) -> tuple[Vector, Vector, Vector]:
        base = self.values[layer]
        plus, minus = np.empty(directions.shape[0]), np.empty(directions.shape[0])
        realised = np.empty_like(directions)
        for k, (direction, step) in enumerate(zip(directions, steps)):
            delta = step * direction.reshape(base.shape)
            up, down = base + delta, base - delta
            realised[k] = ((up - down) / 2).reshape(-1)  # exact: up and down are close
            plus[k] = self._with(layer, up)
            minus[k] = self._with(layer, down)
        return plus, minus, realised
