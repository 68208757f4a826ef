"""`check_jax`: a gradient check of a JAX loss over a pytree of parameters.

    from gradwatch.integrations.jax import check_jax, watch_step

    report = check_jax(loss_fn, params, batch)         # loss_fn(params, batch) -> scalar
    watch_step(watch, loss_fn, params, batch, step=step)  # in a training loop, every step

The analytic gradient dθ is `jax.grad(loss_fn)` and dθapprox comes from central differences,
both in float64 on float64 copies of `params` and of the batch's floating arrays. float64 is
*scoped* to the check with JAX's `enable_x64` context manager: `jax_enable_x64` is never flipped
globally, and arrays your code creates after a check have the dtypes they had before.

Layer names are the pytree paths of the leaves joined by "/": `{"dense1": {"w": ...}}` →
"dense1/w", a list index is its number ("layers/0/kernel"), an attribute its name (dataclass,
namedtuple, Equinox module). They are what `include=`/`exclude=` globs match and what the
MLflow record turns into `gradwatch/layer/dense1_w`. Two leaves whose names would collide
fall back to `jax.tree_util.keystr` ("['a/b']" and "['a']['b']").

Evaluations are compiled, never run op by op: for each checked leaf one program evaluates J at
a chunk of perturbed copies of that leaf at once, `jax.vmap` over the stacked copies (or
`jax.lax.map`, one after the other, where vmap cannot run the loss). Chunks have one fixed size
per leaf, so a check compiles once per leaf (plus once for the gradient), and JAX's own caches
make later checks with the same `loss_fn`, shapes and dtypes compile nothing at all.

Imports: gradwatch (the public API and the engine, watch and common subpackages), jax.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.errors import ConfigError, InputError, LossError, missing_dependency
from gradwatch.common.progress import resolve_progress
from gradwatch.common.settings import DEFAULT, Default
from gradwatch.engine.core import run_check
from gradwatch.engine.report import CheckReport, Mode, Thresholds
from gradwatch.engine.torch_model import describe_batch
from gradwatch.engine.types import CheckOptions, check_settings, select_names
from gradwatch.watch.callback import first_rows

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised by a test that hides jax
    raise missing_dependency("gradwatch.integrations.jax", "jax", "jax") from exc

if TYPE_CHECKING:
    from gradwatch.watch.callback import CheckPlan, GradWatch

__all__ = ["check_jax", "leaf_names", "watch_step"]

Vector = NDArray[np.float64]
LossFn = Callable[[Any, Any], Any]
Batching = Literal["vmap", "map"]

#: Bytes one chunk of stacked perturbed copies of a leaf may take (built on the host, then
#: moved to the device): small enough that building it costs less than evaluating it.
CHUNK_BYTES = 16 * 2**20
MAX_CHUNK = 64

LOSS_FN_HELP = (
    "gradwatch calls loss_fn(params, batch) with float64 copies of params (the same pytree) "
    "and of batch's floating arrays, under jax.grad, jax.jit and jax.vmap: it must be a pure "
    "JAX function of both, returning the scalar loss you minimise (with any regularisation)."
)
TRACING_HELP = (
    "loss_fn must be traceable by jax.jit: no Python `if`/`float()`/`.item()`/`np.asarray` on "
    "values that depend on params or batch (use jnp.where / jax.lax.cond instead)."
)


def check_jax(
    loss_fn: LossFn,
    params: Any,
    batch: Any = None,
    *,
    options: CheckOptions | Mapping[str, Any] | None = None,
    mode: Mode | Default = DEFAULT,
    eps: float | Default | None = DEFAULT,
    budget: int | Default | None = DEFAULT,
    thresholds: Thresholds | Mapping[str, float] | Default | None = DEFAULT,
    seed: int | Default = DEFAULT,
    include: str | Sequence[str] | Default | None = DEFAULT,
    exclude: str | Sequence[str] | Default | None = DEFAULT,
    samples: int | Default = DEFAULT,
    directions: int | Default = DEFAULT,
    top_k: int | Default = DEFAULT,
    batching: Batching = "vmap",
    progress: bool | Callable[[int, int], None] = False,
) -> CheckReport:
    """Check `jax.grad(loss_fn)` at `params` against central differences, in float64.

    Args:
        loss_fn: `loss_fn(params, batch) -> scalar`, the full objective (regularisation
            included), a pure JAX function: it is traced by jax.grad, jax.jit and jax.vmap.
        params: a pytree (nested dicts, lists, tuples, registered nodes such as flax/haiku
            dicts or Equinox modules) whose leaves are floating jax/numpy arrays. Never
            modified; the check runs on float64 copies.
        batch: any pytree passed through to `loss_fn` (None by default); floating arrays are
            cast to float64 copies, integer arrays kept, other leaves (str, int) passed as they
            are.
        options: a `gradwatch.CheckOptions` (defaults in its table; here, as for
            `check_module`, mode "auto" and budget 2000). Its `include`/`exclude` are globs
            over the leaf names ("dense1/w", see `leaf_names`); leaves left out are held fixed.
        mode, eps, budget, thresholds, seed, include, exclude, samples, directions, top_k:
            shorthands for the fields of `options` (give each setting one way).
        batching: "vmap" evaluates a chunk of perturbed copies of a leaf in one `jax.vmap`
            call (falling back to "map" where vmap cannot run the loss); "map" runs them one
            after the other inside one compiled `jax.lax.map` (less memory).
        progress: True for a progress bar on stderr, or a callable(done, total).

    Example:
        >>> import jax.numpy as jnp
        >>> from gradwatch.integrations.jax import check_jax
        >>> params = {"dense": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
        >>> x = jnp.arange(12.0).reshape(4, 3) / 10
        >>> loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["dense"]["w"] + p["dense"]["b"]) ** 2)
        >>> report = check_jax(loss, params, x)
        >>> report.verdict, list(report.layers), report.coordinates
        ('ok', ['dense/b', 'dense/w'], 8)
    """
    options, settings = check_settings(
        "check_jax", options, mode=mode, eps=eps, budget=budget, thresholds=thresholds,
        seed=seed, include=include, exclude=exclude, samples=samples, directions=directions,
        top_k=top_k,
    )
    if batching not in ("vmap", "map"):
        raise ConfigError(f"batching must be 'vmap' or 'map', got {batching!r}.")
    if not callable(loss_fn):
        raise InputError(
            f"loss_fn must be a function loss_fn(params, batch) -> scalar, got "
            f"{type(loss_fn).__name__}. Pass the loss first: check_jax(loss_fn, params, batch)."
        )
    started = time.perf_counter()
    with _float64_scope():
        tree = _ParamTree.flatten(params)
        names = tree.select(options.include, options.exclude)
        objective = _JaxObjective(loss_fn, tree, batch, names, batching)
        analytic = objective.analytic_gradients()
        objective.compile()
        probe: dict[str, Any] = {
            "source": "check_jax",
            "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
            "batch": describe_batch(batch),
            "parameters": tree.float_numel,
            "leaves": len(tree.names),
            "backend": jax.default_backend(),
            "setup_seconds": round(time.perf_counter() - started, 6),
        }
        with resolve_progress(progress, "gradwatch check") as report_progress:
            report = run_check(objective, analytic, settings, probe=probe,
                               progress=report_progress)
    if objective.loss_dtype != "float64":
        report.reasons.append(
            f"the loss is computed in {objective.loss_dtype}, not float64: loss_fn casts to a "
            f"lower precision, so central differences measure mostly rounding. Remove the cast."
        )
    report.probe["batching"] = objective.batching_used()
    return report


def leaf_names(params: Any) -> list[str]:
    """The names `check_jax` gives the leaves of `params`, in pytree order.

    Example:
        >>> import numpy as np
        >>> leaf_names({"dense1": {"w": np.ones(2), "b": np.ones(1)}, "scale": [np.ones(3)]})
        ['dense1/b', 'dense1/w', 'scale/0']
    """
    return list(_ParamTree.flatten(params, validate=False).names)


def watch_step(
    watch: GradWatch,
    loss_fn: LossFn,
    params: Any,
    batch: Any = None,
    *,
    step: int,
    batching: Batching = "vmap",
) -> CheckReport | None:
    """`GradWatch.step()` for a JAX loop: call once per optimizer step, after the update.

    When the watch's schedule says a check is due, runs `check_jax` sized by the watch (mode,
    eps, budget — adaptive by default —, thresholds, seed; `include`/`exclude` from the
    watch, narrowed to the next leaves of its rotation when one check cannot cover them
    all) on the first `watch.probe_rows` rows of `batch` (else of `GradWatch(probe=...)`),
    records it to MLflow and feeds the alerts, exactly as `step()` does for PyTorch. Returns
    the report when a check ran, else None. Training state is never touched.

    Example (a loop with optax):
        >>> from gradwatch import GradWatch
        >>> watch = GradWatch(every=100, mlflow=False)    # doctest: +SKIP
        >>> for step, batch in enumerate(batches, start=1):  # doctest: +SKIP
        ...     params, opt_state = train_step(params, opt_state, batch)
        ...     watch_step(watch, loss_fn, params, batch, step=step)
    """

    def run(plan: CheckPlan) -> CheckReport:
        probe, source = batch, "batch given to watch_step()"
        if probe is None and watch.probe is not None:
            probe, source = watch.probe, "probe= batch"
        if probe is None:
            raise ConfigError(
                "gradwatch has no batch to check on: pass one to watch_step(watch, loss_fn, "
                "params, batch, step=...) or give GradWatch(probe=batch). (A JAX loop has no "
                "forward hook to capture one from.)"
            )
        if watch.probe_rows is not None:
            probe = first_rows(probe, watch.probe_rows)
        include, exclude = watch.include, watch.exclude
        tree = _ParamTree.flatten(params, validate=False)
        sizes = {name: tree.sizes[name] for name in tree.select(include, exclude)}
        chosen = plan.tensors(sizes)
        if chosen is not None:  # the rotation's turn: exactly these leaves
            include, exclude = [glob.escape(name) for name in chosen], None
        report = check_jax(loss_fn, params, probe, include=include, exclude=exclude,
                           batching=batching, **plan.check_kwargs())
        report.probe.update({"step": step, "from": source})
        return report

    return watch.check_with(run, step=step)


# ---------------------------------------------------------------------- float64 scope
def _float64_scope() -> AbstractContextManager[Any]:
    """`jax.enable_x64(True)` (JAX ≥ 0.8; thread-local, restored on exit), else the older
    `jax.experimental.enable_x64()`. Never `jax.config.update("jax_enable_x64", ...)`."""
    scope: Any = getattr(jax, "enable_x64", None)
    if scope is None:  # pragma: no cover - JAX < 0.8
        from importlib import import_module

        scope = import_module("jax.experimental").enable_x64
        return scope()
    return scope(True)


# ---------------------------------------------------------------------- the params pytree
def _entry_name(entry: Any) -> str:
    """One path entry: a dict key, a sequence index, an attribute name, a flattened index."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


@dataclass
class _ParamTree:
    """The flattened params: names, leaves and where the floating ones are."""

    leaves: list[Any]
    treedef: Any
    names: list[str]
    sizes: dict[str, int]
    dtypes: dict[str, Any]

    @staticmethod
    def flatten(params: Any, *, validate: bool = True) -> _ParamTree:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not flat:
            raise InputError(
                f"params has no leaves: got {type(params).__name__} {_short(params)}. Pass the "
                f"pytree of arrays you differentiate, e.g. {{'dense': {{'w': w, 'b': b}}}}."
            )
        names = ["/".join(_entry_name(e) for e in path) or "params" for path, _ in flat]
        if len(set(names)) < len(names):  # e.g. {"a/b": x, "a": {"b": y}}: use keystr for all
            names = [jax.tree_util.keystr(path) or "params" for path, _ in flat]
        leaves, sizes, dtypes = [], {}, {}
        for name, (_, leaf) in zip(names, flat):
            dtype = _leaf_dtype(leaf, name)
            leaves.append(leaf)
            sizes[name] = int(np.prod(np.shape(leaf), dtype=np.int64))
            dtypes[name] = dtype
        tree = _ParamTree(leaves, treedef, names, sizes, dtypes)
        if validate and not any(tree.is_float(name) for name in names):
            raise InputError(
                f"params has no floating-point leaf (dtypes: "
                f"{sorted({str(d) for d in dtypes.values()})}); there is no gradient to check. "
                f"Pass the trainable float parameters."
            )
        return tree

    def is_float(self, name: str) -> bool:
        return bool(jnp.issubdtype(self.dtypes[name], jnp.floating))

    @property
    def float_numel(self) -> int:
        return sum(size for name, size in self.sizes.items() if self.is_float(name))

    def select(
        self, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None
    ) -> list[str]:
        """The leaves to check: matching an `include` glob (all without one) and no `exclude`."""
        selected = select_names(self.names, include, exclude, what="leaf of params")
        for name in selected:
            if not self.is_float(name):
                raise InputError(
                    f"params leaf {name!r} has dtype {self.dtypes[name]}; central differences "
                    f"and jax.grad need floating-point leaves (an integer cannot move by eps). "
                    f"Leave it out with exclude=[{glob.escape(name)!r}] (it is then held "
                    f"fixed), or move it out of params (e.g. into batch)."
                )
        return selected


def _leaf_dtype(leaf: Any, name: str) -> Any:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return leaf.dtype
    if isinstance(leaf, (bool, int, float)):
        return np.asarray(leaf).dtype
    raise InputError(
        f"params must be a pytree of arrays (nested dicts, lists, tuples of jax or numpy "
        f"arrays); leaf {name!r} is a {type(leaf).__name__}. Convert it with jnp.asarray, move "
        f"it out of params (into batch or a closure), or register its class as a pytree node "
        f"(jax.tree_util.register_pytree_node) if it holds arrays."
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------- compiled programs
class _Static:
    """A value inside a jit static argument: equal by value when hashable, else by identity
    (then each check compiles anew, which is correct, only slower)."""

    __slots__ = ("by_value", "hash", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        try:
            self.hash, self.by_value = hash(value), True
        except TypeError:
            self.hash, self.by_value = id(value), False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return NotImplemented
        if self.value is other.value:
            return True
        if not (self.by_value and other.by_value) or type(self.value) is not type(other.value):
            return False
        try:
            return bool(self.value == other.value)
        except Exception:
            return False

    def __hash__(self) -> int:
        return self.hash


@dataclass(frozen=True)
class _Layout:
    """Everything static about a check's loss: jit keys its compiled programs on it, so a
    later check with an equal layout (same loss_fn, pytree structures, static batch leaves)
    and equal shapes/dtypes reuses them."""

    loss_fn: _Static
    params_tree: _Static
    batch_tree: _Static
    #: batch leaves that are not arrays (str, int, ...): (position, value), passed as they are
    batch_static: tuple[tuple[int, _Static], ...]
    #: positions of the floating params leaves: jax.grad differentiates all of them
    differentiable: tuple[int, ...]

    def call(self, leaves: Sequence[Any], batch_arrays: Sequence[Any]) -> Any:
        """loss_fn(params, batch) rebuilt from the dynamic leaves."""
        params = jax.tree_util.tree_unflatten(self.params_tree.value, list(leaves))
        batch_leaves: list[Any] = list(batch_arrays)
        for position, value in self.batch_static:
            batch_leaves.insert(position, value.value)
        batch = jax.tree_util.tree_unflatten(self.batch_tree.value, batch_leaves)
        return self.loss_fn.value(params, batch)


def _scalar_loss(layout: _Layout, leaves: Sequence[Any], batch_arrays: Sequence[Any]) -> Any:
    return jnp.reshape(layout.call(leaves, batch_arrays), ())  # shape checked beforehand


@partial(jax.jit, static_argnums=0)
def _value_and_grad(layout: _Layout, leaves: tuple[Any, ...], batch_arrays: tuple[Any, ...]
                    ) -> Any:
    """J(θ) and dθ for every floating leaf (also the unchecked ones: one program whatever
    include/exclude say, so rotating checks reuse it)."""

    def of_floats(floats: tuple[Any, ...]) -> Any:
        replaced = list(leaves)
        for position, value in zip(layout.differentiable, floats):
            replaced[position] = value
        return _scalar_loss(layout, replaced, batch_arrays)

    return jax.value_and_grad(of_floats)(tuple(leaves[p] for p in layout.differentiable))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _stacked_losses(
    layout: _Layout, position: int, batching: Batching, stack: Any,
    leaves: tuple[Any, ...], batch_arrays: tuple[Any, ...],
) -> Any:
    """J at each of the stacked values of leaf `position`, every other leaf as given.

    Only the perturbed leaf is batched: whatever does not depend on it (the layers before it)
    is computed once per chunk, not once per copy.
    """

    def one(value: Any) -> Any:
        replaced = list(leaves)
        replaced[position] = value
        return _scalar_loss(layout, replaced, batch_arrays)

    if batching == "vmap":
        return jax.vmap(one)(stack)
    return jax.lax.map(one, stack)


def _static_leaf(leaf: Any) -> bool:
    """A batch leaf that is passed as it is (compiled in), not as an array argument."""
    if isinstance(leaf, jax.Array):
        return False
    return not (isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in "biufc")


def _to_float64(leaf: Any) -> Any:
    """A device copy of an array leaf, in float64 when floating (integers keep their dtype).

    Through the host, on purpose: a cast on the device (or `jnp.asarray`) is an eager JAX op,
    compiled once per shape and dtype; a host copy and `jax.device_put` compile nothing.
    """
    host = np.asarray(leaf)
    if jnp.issubdtype(host.dtype, jnp.floating):
        host = host.astype(np.float64)
    return jax.device_put(host)


# ---------------------------------------------------------------------- the objective
class _JaxObjective:
    """The engine's `Objective` over float64 copies of a params pytree (built inside the
    float64 scope; every method runs inside it)."""

    def __init__(
        self, loss_fn: LossFn, tree: _ParamTree, batch: Any, names: list[str], batching: Batching
    ) -> None:
        self.names = names
        self.batching: Batching = batching
        self.positions = {name: i for i, name in enumerate(tree.names)}
        self.shapes = {name: tuple(np.shape(tree.leaves[i])) for name, i in
                       self.positions.items()}
        # Host float64 copies of the checked leaves: perturbations are built from these with
        # numpy, so every perturbed value is rounded once, on the host, exactly as the recipe.
        self.values: dict[str, Vector] = {}
        leaves = []
        for name, leaf in zip(tree.names, tree.leaves):
            if name in names:
                self.values[name] = _host_float64(leaf, name).reshape(-1)
                leaves.append(jax.device_put(self.values[name].reshape(self.shapes[name])))
            else:
                leaves.append(_to_float64(leaf))
        self.leaves = tuple(leaves)
        batch_leaves, batch_tree = jax.tree_util.tree_flatten(batch)
        self.batch_arrays = tuple(_to_float64(leaf) for leaf in batch_leaves
                                  if not _static_leaf(leaf))
        self.layout = _Layout(
            loss_fn=_Static(loss_fn),
            params_tree=_Static(tree.treedef),
            batch_tree=_Static(batch_tree),
            batch_static=tuple((i, _Static(leaf)) for i, leaf in enumerate(batch_leaves)
                               if _static_leaf(leaf)),
            differentiable=tuple(i for i, name in enumerate(tree.names) if tree.is_float(name)),
        )
        self.loss_dtype = "float64"
        self.compiled: dict[str, Any] = {}
        self.chunks: dict[str, int] = {}
        self.vmap_unavailable: str | None = None
        self.used: dict[str, str] = {}

    # -------------------------------------------------------------- set-up
    def analytic_gradients(self) -> dict[str, Vector]:
        """Check the loss's shape and dtype (one trace, no compile), then dθ in float64."""
        try:
            shape = jax.eval_shape(self.layout.call, self.leaves, self.batch_arrays)
        except Exception as exc:
            raise _loss_error(exc) from exc
        if not isinstance(shape, jax.ShapeDtypeStruct):
            count = len(shape) if isinstance(shape, (tuple, list)) else "several"
            raise LossError(
                f"loss_fn(params, batch) returned a {type(shape).__name__} ({count} values); "
                f"expected one scalar. If it returns (loss, aux), pass "
                f"lambda p, b: loss_fn(p, b)[0]."
            )
        if int(np.prod(shape.shape, dtype=np.int64)) != 1:
            raise LossError(
                f"loss_fn(params, batch) returned an array of shape {tuple(shape.shape)}; "
                f"expected a scalar loss. Reduce it with jnp.mean or jnp.sum."
            )
        if not jnp.issubdtype(shape.dtype, jnp.floating):
            raise LossError(
                f"loss_fn(params, batch) returned dtype {shape.dtype}; expected a real "
                f"floating-point loss (the gradient of an integer or complex value is not "
                f"what you minimise)."
            )
        self.loss_dtype = str(shape.dtype)
        try:
            _, grads = _value_and_grad(self.layout, self.leaves, self.batch_arrays)
        except Exception as exc:
            raise LossError(
                f"jax.grad of loss_fn failed with {type(exc).__name__}: {exc}. {LOSS_FN_HELP}"
            ) from exc
        by_position = dict(zip(self.layout.differentiable, grads))
        return {name: np.array(by_position[self.positions[name]], dtype=np.float64)
                for name in self.names}

    def compile(self) -> None:
        """Compile (or fetch from JAX's cache) one evaluation program per checked leaf."""
        for name in self.names:
            numel = self.values[name].size
            if numel == 0:
                continue  # nothing to perturb: the engine never asks
            chunk = int(max(1, min(MAX_CHUNK, CHUNK_BYTES // (8 * max(numel, 1)))))
            self.chunks[name] = chunk
            spec = jax.ShapeDtypeStruct((chunk, *self.shapes[name]), jnp.float64)
            self.compiled[name] = self._lower(name, spec)

    def _lower(self, name: str, spec: Any) -> Any:
        position = self.positions[name]
        if self.batching == "vmap" and self.vmap_unavailable is None:
            try:
                compiled = _stacked_losses.lower(
                    self.layout, position, "vmap", spec, self.leaves, self.batch_arrays
                ).compile()
                self.used[name] = "vmap"
                return compiled
            except Exception as exc:  # vmap cannot run every loss: one by one instead
                self.vmap_unavailable = f"{type(exc).__name__}: {str(exc)[:200]}"
        try:
            compiled = _stacked_losses.lower(
                self.layout, position, "map", spec, self.leaves, self.batch_arrays
            ).compile()
        except Exception as exc:
            raise _loss_error(exc) from exc
        self.used[name] = "map"
        return compiled

    def batching_used(self) -> dict[str, Any]:
        used: dict[str, Any] = {"mode": self.batching, "per_tensor": dict(self.used),
                                "chunk": dict(self.chunks)}
        if self.vmap_unavailable is not None:
            used["vmap_unavailable"] = self.vmap_unavailable
        return used

    # -------------------------------------------------------------- evaluation
    def loss(self) -> float:
        value, _ = _value_and_grad(self.layout, self.leaves, self.batch_arrays)
        return float(value)

    def coordinate_losses(
        self, layer: str, indices: NDArray[np.int64], eps: float
    ) -> tuple[Vector, Vector]:
        base = self.values[layer]
        # θ + ε·e_i and θ − ε·e_i: one IEEE double rounding each, as the recipe's θ[i] ± ε.
        moved = np.concatenate([base[indices] + eps, base[indices] - eps])
        where = np.concatenate([indices, indices])

        def fill(stack: Vector, rows: slice) -> None:
            count = rows.stop - rows.start
            stack[np.arange(count), where[rows]] = moved[rows]

        losses = self._losses(layer, 2 * indices.size, fill)
        return losses[: indices.size], losses[indices.size:]

    def direction_losses(
        self, layer: str, directions: Vector, steps: Vector
    ) -> tuple[Vector, Vector, Vector]:
        base = self.values[layer]
        delta = steps[:, None] * directions  # s·(±1 or 0) is exact
        up, down = base + delta, base - delta  # θ ± s·v, each rounded once
        # The step each direction realises, ((θ + s·v) − (θ − s·v)) / 2, enters the analytic
        # projection; it is exact because the two points are close (Sterbenz).
        realised = (up - down) / 2
        moved = np.concatenate([up, down])

        def fill(stack: Vector, rows: slice) -> None:
            stack[: rows.stop - rows.start] = moved[rows]

        losses = self._losses(layer, 2 * directions.shape[0], fill)
        k = directions.shape[0]
        return losses[:k], losses[k:], realised

    def _losses(self, layer: str, total: int, fill: Callable[[Vector, slice], None]) -> Vector:
        """J at `total` perturbed copies of `layer`, one compiled call per chunk. Every chunk
        has the leaf's fixed size (the last one padded with unperturbed copies, whose values
        are dropped), so nothing is compiled here."""
        chunk, base = self.chunks[layer], self.values[layer]
        compiled, shape = self.compiled[layer], self.shapes[layer]
        losses = np.empty(total)
        for start in range(0, total, chunk):
            rows = slice(start, min(start + chunk, total))
            stack = np.tile(base, (chunk, 1))
            fill(stack, rows)
            values = compiled(stack.reshape(chunk, *shape), self.leaves, self.batch_arrays)
            losses[rows] = np.asarray(values, dtype=np.float64)[: rows.stop - rows.start]
        return losses


def _host_float64(leaf: Any, name: str) -> Vector:
    try:
        return np.array(leaf, dtype=np.float64)  # a copy: the user's array is never written
    except jax.errors.TracerArrayConversionError as exc:
        raise InputError(
            f"params leaf {name!r} is a JAX tracer: check_jax was called inside jax.jit, "
            f"jax.grad or jax.vmap. Call it outside, on concrete arrays (e.g. between training "
            f"steps)."
        ) from exc


def _loss_error(exc: Exception) -> LossError:
    tracing = isinstance(exc, (jax.errors.ConcretizationTypeError,
                               jax.errors.TracerArrayConversionError,
                               jax.errors.TracerBoolConversionError,
                               jax.errors.TracerIntegerConversionError))
    return LossError(
        f"loss_fn(params, batch) raised {type(exc).__name__}: {str(exc)[:500]}. "
        f"{TRACING_HELP if tracing else LOSS_FN_HELP}"
    )
