"""gradwatch.integrations.jax: `check_jax` over pytrees with float64 scoped to the check,
planted backward bugs (`jax.custom_vjp`) found and localised, clear errors, and the optax
example loop through `GradWatch` (bit-identical training, alerts, the MLflow record).

Every model here reuses a few module-level loss functions and shapes: JAX caches the compiled
check programs per loss function and shapes, so most tests compile nothing.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import ConfigError, GradWatch, InputError, LossError  # noqa: E402
from gradwatch.integrations import jax as gradwatch_jax  # noqa: E402
from gradwatch.integrations.jax import check_jax, leaf_names, watch_step  # noqa: E402
from tests.support.mlflow_server import MlflowServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
Params = dict[str, dict[str, Any]]
Batch = tuple[Any, Any]

#: The element of dense2/w the one-element bug moves, and the row the one-row bug scales.
BAD_ELEMENT = (1, 2)
BAD_ROW = 5
#: The wide layer of the budgeted test: 64·128 = 8,192 weights, so 2P + 2 > 2000.
WIDE_IN, WIDE_OUT = 64, 128


# ---------------------------------------------------------------------- models
def mlp_params(seed: int = 0, dtype: Any = np.float32) -> Params:
    """dense1 (6 → 10), dense2 (10 → 3): 103 parameters, float32 as a training loop has."""
    rng = np.random.default_rng(seed)
    return {
        "dense1": {"w": rng.normal(size=(6, 10)).astype(dtype) / 2,
                   "b": rng.normal(size=10).astype(dtype) / 10},
        "dense2": {"w": rng.normal(size=(10, 3)).astype(dtype) / 2,
                   "b": rng.normal(size=3).astype(dtype) / 10},
    }


def mlp_batch(seed: int = 1, rows: int = 8) -> Batch:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, 6)).astype(np.float32),
            rng.normal(size=(rows, 3)).astype(np.float32))


@jax.custom_vjp
def element_bug_matmul(x: Any, w: Any) -> Any:
    """x @ w whose backward moves dW[BAD_ELEMENT] away from zero by half the largest |dW|."""
    return x @ w


def _element_bug_forward(x: Any, w: Any) -> tuple[Any, tuple[Any, Any]]:
    return x @ w, (x, w)


def _element_bug_backward(saved: tuple[Any, Any], g: Any) -> tuple[Any, Any]:
    x, w = saved
    grad_w = x.T @ g
    push = 0.5 * jnp.max(jnp.abs(grad_w)) * jnp.sign(grad_w[BAD_ELEMENT])
    return g @ w.T, grad_w.at[BAD_ELEMENT].add(push)


element_bug_matmul.defvjp(_element_bug_forward, _element_bug_backward)


@jax.custom_vjp
def row_bug_matmul(x: Any, w: Any) -> Any:
    """x @ w whose backward scales row BAD_ROW of dW by 1.5 (an off-by-one in a loop)."""
    return x @ w


def _row_bug_backward(saved: tuple[Any, Any], g: Any) -> tuple[Any, Any]:
    x, w = saved
    return g @ w.T, (x.T @ g).at[BAD_ROW].multiply(1.5)


row_bug_matmul.defvjp(_element_bug_forward, _row_bug_backward)


def _mlp(params: Params, batch: Batch, matmul: Callable[[Any, Any], Any]) -> Any:
    x, y = batch
    hidden = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    output = matmul(hidden, params["dense2"]["w"]) + params["dense2"]["b"]
    return jnp.mean((output - y) ** 2) + 1e-3 * jnp.sum(params["dense1"]["w"] ** 2)


def mlp_loss(params: Params, batch: Batch) -> Any:
    return _mlp(params, batch, jnp.matmul)


def element_bug_loss(params: Params, batch: Batch) -> Any:
    return _mlp(params, batch, element_bug_matmul)


def wide_params(seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    return {"wide": {"w": rng.normal(size=(WIDE_IN, WIDE_OUT)) / np.sqrt(WIDE_IN),
                     "b": np.zeros(WIDE_OUT)}}


def wide_batch(seed: int = 1) -> Batch:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, WIDE_IN)), rng.normal(size=(4, WIDE_OUT))


def _wide(params: Params, batch: Batch, matmul: Callable[[Any, Any], Any]) -> Any:
    x, y = batch
    return jnp.mean((jnp.tanh(matmul(x, params["wide"]["w"]) + params["wide"]["b"]) - y) ** 2)


def wide_loss(params: Params, batch: Batch) -> Any:
    return _wide(params, batch, jnp.matmul)


def wide_row_bug_loss(params: Params, batch: Batch) -> Any:
    return _wide(params, batch, row_bug_matmul)


def flagged(report: gradwatch.CheckReport) -> set[str]:
    return {name for name, layer in report.layers.items() if layer.verdict != "ok"}


@pytest.fixture
def compiles() -> Iterator[Counter[str]]:
    """Counts XLA compilations while the test runs (jax.monitoring events)."""
    counter: Counter[str] = Counter()

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            counter["backend"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# ---------------------------------------------------------------------- correct and buggy
@pytest.mark.parametrize("mode", ["full", "auto"])
def test_correct_mlp_is_ok_with_a_tiny_distance(mode: str) -> None:
    params = mlp_params()
    report = check_jax(mlp_loss, params, mlp_batch(), mode=mode)
    summary = report.summary()
    assert report.verdict == "ok", summary
    assert report.rel_distance < 1e-6, summary
    assert list(report.layers) == ["dense1/b", "dense1/w", "dense2/b", "dense2/w"]
    assert report.coordinates == 103 and "full" in report.strategy, summary
    assert tuple(report.layers["dense1/w"].shape) == (6, 10)
    assert report.probe["source"] == "check_jax" and report.probe["parameters"] == 103
    assert report.probe["batch"] == ["float32[8, 6]", "float32[8, 3]"]
    assert report.probe["batching"]["per_tensor"] == dict.fromkeys(report.layers, "vmap")


def test_analytic_gradient_matches_jax_grad_in_float64() -> None:
    params, batch = mlp_params(), mlp_batch()
    report = check_jax(mlp_loss, params, batch, mode="full")
    with gradwatch_jax._float64_scope():
        as64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), (params, batch))
        loss, grads = jax.jit(jax.value_and_grad(mlp_loss))(*as64)
        expected = float(np.asarray(grads["dense2"]["w"])[BAD_ELEMENT])
        loss = float(loss)
    worst = {tuple(e.index): e.analytic for e in report.layers["dense2/w"].worst}
    assert report.loss == loss  # J(θ) itself, in float64
    if BAD_ELEMENT in worst:
        assert worst[BAD_ELEMENT] == expected


def test_one_element_bug_is_blamed_on_its_layer_and_element() -> None:
    report = check_jax(element_bug_loss, mlp_params(), mlp_batch(), mode="full")
    summary = report.summary()
    assert report.verdict == "alert", summary
    assert flagged(report) == {"dense2/w"}, summary
    assert report.worst_layers(1)[0][0] == "dense2/w", summary
    worst = report.layers["dense2/w"].worst[0]
    assert tuple(worst.index) == BAD_ELEMENT, summary
    assert worst.analytic != pytest.approx(worst.numeric, rel=1e-3)


@pytest.mark.parametrize("mode", ["sample", "sketch", "auto"])
def test_every_mode_alerts_on_the_planted_bug(mode: str) -> None:
    report = check_jax(element_bug_loss, mlp_params(), mlp_batch(), mode=mode,
                       budget=120)
    assert report.verdict == "alert", report.summary()
    assert report.worst_layers(1)[0][0] == "dense2/w", report.summary()
    assert report.evaluations <= 120


def test_budgeted_auto_mode_finds_a_one_row_bug_in_a_big_leaf() -> None:
    params, batch = wide_params(), wide_batch()
    assert 2 * sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params)) + 2 > 2000
    clean = check_jax(wide_loss, params, batch, mode="auto", budget=2000)
    assert clean.verdict == "ok", clean.summary()
    report = check_jax(wide_row_bug_loss, params, batch, mode="auto", budget=2000)
    summary = report.summary()
    assert "full" not in report.strategy and report.evaluations <= 2000, summary
    assert report.layers["wide/w"].checked < WIDE_IN * WIDE_OUT
    assert report.verdict == "alert" and flagged(report) == {"wide/w"}, summary
    assert report.layers["wide/w"].worst[0].index[0] == BAD_ROW, summary
    assert f"located wide/w: row {BAD_ROW}" in report.strategy, summary


def test_map_batching_gives_the_same_verdicts() -> None:
    report = check_jax(element_bug_loss, mlp_params(), mlp_batch(), mode="full", batching="map")
    assert report.verdict == "alert" and flagged(report) == {"dense2/w"}, report.summary()
    assert set(report.probe["batching"]["per_tensor"].values()) == {"map"}


def test_non_finite_loss_alerts() -> None:
    def log_of_negative(params: Params, batch: Batch) -> Any:
        return jnp.log(-jnp.sum(params["dense1"]["w"] ** 2))

    report = check_jax(log_of_negative, mlp_params(), mode="full")
    assert report.verdict == "alert" and any("non-finite" in r for r in report.reasons)


# ---------------------------------------------------------------------- names and selection
class Layer(NamedTuple):
    kernel: Any
    bias: Any


def test_leaf_names_are_slash_joined_pytree_paths() -> None:
    tree = {"blocks": [Layer(np.ones((2, 2)), np.ones(2)), Layer(np.ones((2, 2)), np.ones(2))],
            "scale": (np.ones(1),), "head": {"w": np.ones(3)}}
    assert leaf_names(tree) == ["blocks/0/kernel", "blocks/0/bias", "blocks/1/kernel",
                                "blocks/1/bias", "head/w", "scale/0"]
    assert leaf_names(np.ones(3)) == ["params"]
    # names that would collide fall back to jax.tree_util.keystr
    assert leaf_names({"a/b": np.ones(1), "a": {"b": np.ones(1)}}) == ["['a']['b']", "['a/b']"]


def test_nested_tuples_and_namedtuples_are_checked() -> None:
    def loss(params: dict[str, Any], x: Any) -> Any:
        hidden = jnp.tanh(x @ params["blocks"][0].kernel + params["blocks"][0].bias)
        return jnp.sum((hidden @ params["blocks"][1].kernel + params["blocks"][1].bias) ** 2)

    rng = np.random.default_rng(0)
    params = {"blocks": [Layer(rng.normal(size=(3, 4)), rng.normal(size=4)),
                         Layer(rng.normal(size=(4, 2)), rng.normal(size=2))]}
    report = check_jax(loss, params, rng.normal(size=(5, 3)), mode="full")
    assert report.verdict == "ok", report.summary()
    assert list(report.layers) == leaf_names(params)


def test_include_and_exclude_select_leaves_by_path() -> None:
    params, batch = mlp_params(), mlp_batch()
    only_dense2 = check_jax(element_bug_loss, params, batch, include="dense2/*", mode="full")
    assert list(only_dense2.layers) == ["dense2/b", "dense2/w"]
    assert only_dense2.verdict == "alert"
    without = check_jax(element_bug_loss, params, batch, exclude=["dense2/w"], mode="full")
    assert list(without.layers) == ["dense1/b", "dense1/w", "dense2/b"]
    assert without.verdict == "ok", without.summary()  # the bug is only in dense2/w
    weights = check_jax(mlp_loss, params, batch, include="*/w", exclude="dense1/*")
    assert list(weights.layers) == ["dense2/w"]
    with pytest.raises(ConfigError, match=r"leave no leaf.*dense1/b, dense1/w, dense2/b"):
        check_jax(mlp_loss, params, batch, include="encoder/*")


# ---------------------------------------------------------------------- float64, scoped
def test_float64_is_scoped_to_the_check_and_nothing_of_the_user_changes() -> None:
    params, batch = mlp_params(), mlp_batch()
    params["dense1"]["b"] = jnp.asarray(params["dense1"]["b"])  # a jax leaf too
    before = jax.tree_util.tree_map(np.array, (params, batch))
    x64_before = jax.config.jax_enable_x64
    seen: list[str] = []

    def recording_loss(p: Params, b: Batch) -> Any:
        seen.extend(str(leaf.dtype) for leaf in jax.tree_util.tree_leaves((p, b)))
        return mlp_loss(p, b)

    report = check_jax(recording_loss, params, batch, mode="full", include="dense1/b")
    assert report.verdict == "ok" and list(report.layers) == ["dense1/b"]
    assert seen and set(seen) == {"float64"}  # the loss ran in float64 ...
    assert jax.config.jax_enable_x64 == x64_before  # ... and the flag is as it was
    assert jnp.ones(3).dtype == jnp.float32
    assert jnp.asarray(1.0).dtype == jnp.float32
    assert (jnp.ones(2) * params["dense1"]["b"][:2]).dtype == jnp.float32
    for old, new in zip(jax.tree_util.tree_leaves(before),
                        jax.tree_util.tree_leaves((params, batch))):
        assert np.asarray(new).dtype == old.dtype and np.array_equal(np.asarray(new), old)


def test_a_check_inside_an_x64_scope_leaves_it_on() -> None:
    with gradwatch_jax._float64_scope():
        check_jax(mlp_loss, mlp_params(), mlp_batch(), include="dense2/b")
        assert jax.config.jax_enable_x64
        assert jnp.ones(1).dtype == jnp.float64
    assert jnp.ones(1).dtype == jnp.float32


def test_a_repeated_check_compiles_nothing(compiles: Counter[str]) -> None:
    params, batch = mlp_params(seed=3), mlp_batch(seed=4)
    check_jax(mlp_loss, params, batch, mode="full")  # warm (possibly cached by other tests)
    compiles.clear()
    report = check_jax(mlp_loss, mlp_params(seed=5), mlp_batch(seed=6), mode="full")
    assert report.evaluations == 2 * 103 + 2
    assert compiles["backend"] == 0


def test_a_check_compiles_one_program_per_leaf_plus_the_gradient(
    compiles: Counter[str],
) -> None:
    def fresh_loss(params: Params, batch: Batch) -> Any:  # a new function: nothing cached
        return mlp_loss(params, batch)

    report = check_jax(fresh_loss, mlp_params(), mlp_batch(), mode="full")
    assert report.evaluations == 208  # ... in 4 chunked programs, never one per evaluation
    assert compiles["backend"] == 1 + 4


# ---------------------------------------------------------------------- errors
def test_bad_loss_functions_get_a_loss_error_that_says_how_to_fix_it() -> None:
    params, batch = mlp_params(), mlp_batch()

    def per_example(p: Params, b: Batch) -> Any:
        return jnp.sum((b[0] @ p["dense1"]["w"]) ** 2, axis=1)

    def with_aux(p: Params, b: Batch) -> Any:
        return mlp_loss(p, b), {"accuracy": 1.0}

    def integer(p: Params, b: Batch) -> Any:
        return jnp.argmax(p["dense1"]["w"])

    def raising(p: Params, b: Batch) -> Any:
        raise KeyError("logits")

    def python_branch(p: Params, b: Batch) -> Any:
        loss = mlp_loss(p, b)
        return loss if loss > 0 else -loss

    cases: list[tuple[Callable[..., Any], list[str]]] = [
        (per_example, ["shape (8,)", "jnp.mean"]),
        (with_aux, ["tuple", "(loss, aux)", "[0]"]),
        (integer, ["int", "floating-point"]),
        (raising, ["KeyError", "logits", "float64 copies"]),
        (python_branch, ["jnp.where", "traceable"]),
    ]
    for loss_fn, words in cases:
        with pytest.raises(LossError) as caught:
            check_jax(loss_fn, params, batch)
        for word in words:
            assert word in str(caught.value), (loss_fn.__name__, str(caught.value))


def test_bad_params_get_an_input_error_naming_the_leaf() -> None:
    batch = mlp_batch()
    with pytest.raises(InputError, match=r"no leaves.*dict \{\}"):
        check_jax(mlp_loss, {}, batch)
    with pytest.raises(InputError, match=r"pytree of arrays.*'dense1/act' is a str"):
        check_jax(mlp_loss, {**mlp_params(), "dense1": {"act": "tanh"}}, batch)
    counted = {**mlp_params(), "steps": np.array(3)}
    with pytest.raises(InputError, match=r"'steps' has dtype int64.*exclude=\['steps'\]"):
        check_jax(mlp_loss, counted, batch)
    report = check_jax(mlp_loss, counted, batch, exclude="steps")  # then held fixed
    assert "steps" not in report.layers and report.verdict == "ok"
    with pytest.raises(InputError, match="no floating-point leaf"):
        check_jax(mlp_loss, {"steps": np.array(3)}, batch)
    with pytest.raises(InputError, match=r"loss_fn must be a function.*dict"):
        check_jax(mlp_params(), mlp_loss, batch)


def test_a_check_inside_a_jax_transformation_says_to_call_it_outside() -> None:
    batch = mlp_batch()

    def inside(params: Params) -> Any:
        check_jax(mlp_loss, params, batch)
        return 0.0

    with pytest.raises(InputError, match=r"tracer.*outside"):
        jax.jit(inside)(mlp_params())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"batching": "loop"}, ["batching", "'vmap'", "'map'"]),
        ({"include": 3}, ["include", "glob"]),
        ({"mode": "fast"}, ["mode", "'auto'"]),
        ({"budget": 2}, ["budget", "at least 4"]),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        check_jax(mlp_loss, mlp_params(), mlp_batch(), **kwargs)
    for word in words:
        assert word in str(caught.value)


def test_missing_jax_is_a_missing_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError
    monkeypatch.delitem(sys.modules, "gradwatch.integrations.jax")
    with pytest.raises(gradwatch.MissingDependencyError,
                       match=r"'jax' package is not installed.*gradwatch\[jax\]"):
        importlib.import_module("gradwatch.integrations.jax")


def test_docstring_examples_run() -> None:
    failures, attempted = doctest.testmod(
        gradwatch_jax, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert attempted > 0 and failures == 0


# ---------------------------------------------------------------------- the optax loop
@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    """examples/jax_optax_loop.py, loaded from its file as a user would run it."""
    path = ROOT / "examples" / "jax_optax_loop.py"
    spec = importlib.util.spec_from_file_location("jax_optax_loop", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_training_is_bit_identical_with_and_without_gradwatch(
    example: ModuleType, tmp_path: Path
) -> None:
    plain = example.train(steps=20)
    # adaptive budget (the default): checks rotate over the leaves (include= escaped names)
    with GradWatch(every=5, mlflow=False, spool_dir=tmp_path / "spool") as watch:
        watched = example.train(steps=20, watch=watch)
    assert [step for step, _ in watched.reports] == [1, 5, 10, 15, 20]
    assert all(r.verdict == "ok" for _, r in watched.reports), watched.reports[-1][1].summary()
    covered = {name for _, report in watched.reports for name in report.layers}
    assert covered == {"dense1/b", "dense1/w", "dense2/b", "dense2/w"}
    assert all(r.probe["batch"] == ["float32[8, 8]", "float32[8, 3]"]  # probe_rows=8
               for _, r in watched.reports)
    assert plain.losses == watched.losses
    for a, b in zip(jax.tree_util.tree_leaves(plain.params),
                    jax.tree_util.tree_leaves(watched.params)):
        assert np.asarray(a).dtype == np.float32
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_planted_bug_alerts_and_is_recorded_in_mlflow(
    example: ModuleType, mlflow_server: MlflowServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "jax-optax-loop")
    watch = GradWatch(every=5, budget=2000, tracking_uri=mlflow_server.url,
                      spool_dir=tmp_path / "spool")
    with watch:
        result = example.train(steps=10, watch=watch, bug=True)
    verdicts = [report.verdict for _, report in result.reports]
    assert verdicts == ["alert"] * 3, result.reports[0][1].summary()
    assert all(r.worst_layers(1)[0][0] == "dense2/w" for _, r in result.reports)
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(str(watch.run_id))
    history = client.get_metric_history(run.info.run_id, "gradwatch/verdict")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (5, 2.0), (10, 2.0)]
    assert run.data.tags["gradwatch.alert"] == "firing"
    assert "gradwatch/layer/dense2_w" in run.data.metrics
    assert run.data.metrics["gradwatch/layer/dense2_w"] > 0.1


def test_watch_step_without_a_batch_records_an_error_check(tmp_path: Path) -> None:
    with GradWatch(every=1, mlflow=False, spool_dir=tmp_path / "spool") as watch:
        report = watch_step(watch, mlp_loss, mlp_params(), step=1)
    assert report is not None and report.verdict == "error"
    assert "no batch to check on" in report.reasons[0]


def test_the_example_script_runs_and_exits_1_on_the_bug(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--steps", "10", "--every", "5", "--no-mlflow", "--spool-dir", str(tmp_path)]
    assert example.main(common) == 0
    assert example.main([*common, "--bug", "--budget", "2000"]) == 1
    out = capsys.readouterr().out
    assert "trained 10 steps" in out and "alert" in out and "worst layer dense2/w" in out
