"""GradWatchCallback in real Keras 3 training: the torch backend end to end, jax too.

Keras fixes its backend when it is imported, so training runs in subprocesses
(`tests/support/keras_train.py`), never in the pytest process: one per backend for the scenarios
without MLflow (a module-scoped fixture runs them once, for whichever test asks first, so no
test depends on another's order) and one for the MLflow record. Each subprocess runs with
`-W error`, as pytest does here, and with its own KERAS_HOME (nothing written to ~/.keras).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gradwatch
from tests.support.mlflow_server import MlflowServer

if importlib.util.find_spec("keras") is None:
    pytest.skip("keras is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "support" / "keras_train.py"
SCENARIOS = ["pair", "second_fit", "steps_per_execution", "selection", "subclassed", "bug",
             "raise", "correct_custom_gradient", "regulariser", "errors"]
#: The small model's trainable variables, as the checks name them.
VARIABLES = {"hidden/kernel", "hidden/bias", "output/kernel", "output/bias"}


def run_keras(backend: str, scenarios: list[str], directory: Path,
              tracking_uri: str | None = None) -> dict[str, Any]:
    """Run `scenarios` of tests/support/keras_train.py with KERAS_BACKEND=backend; their results."""
    directory.mkdir(parents=True, exist_ok=True)
    spec, result = directory / "spec.json", directory / "result.json"
    spec.write_text(json.dumps({"scenarios": scenarios, "spool_dir": str(directory / "spool"),
                                "tracking_uri": tracking_uri}))
    env = {**os.environ, "KERAS_BACKEND": backend, "KERAS_HOME": str(directory / "keras-home"),
           "GRADWATCH_SPOOL_DIR": str(directory / "spool")}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), str(spec), str(result)],
        cwd=directory, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"{backend} run failed:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-6000:]}"
    results: dict[str, Any] = json.loads(result.read_text())
    assert results["backend"] == backend
    return results


def requires(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the Keras {package} backend needs {package}, which is not installed")


@pytest.fixture(scope="module", params=["torch", "jax"])
def keras_run(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario without MLflow, run once per backend."""
    backend: str = request.param
    requires(backend)
    return run_keras(backend, SCENARIOS, tmp_path_factory.mktemp(f"keras-{backend}"))


# ---------------------------------------------------------------------- training
def test_training_is_bit_identical_with_and_without_the_callback(
    keras_run: dict[str, Any]
) -> None:
    pair = keras_run["pair"]
    # Dense(L2)-Dropout-Dense, Adam, shuffled batches: dropout and shuffling draw random
    # numbers, so any RNG the checks consumed would show in the weights.
    assert pair["watched"]["loss"] == pair["plain"]["loss"]
    assert pair["watched"]["digest"] == pair["plain"]["digest"]
    # the global RNGs (Python, numpy, torch), Keras' float settings and its automatic layer
    # names (the float64 copy's layers take none) are as they were
    assert pair["watched"]["after"] == pair["plain"]["after"]
    assert pair["watched"]["after"]["names_taken"]  # the model itself took some
    assert pair["watched"]["after"]["floatx"] == "float32"
    assert pair["watched"]["after"]["new_float_array"].endswith("float32")
    reports = pair["reports"]
    assert [r["step"] for r in reports] == [1, 3, 6]  # first_step, then every=3
    for report in reports:
        assert report["verdict"] == "ok", report["summary"]
        assert report["rel_distance"] < 1e-7  # float64 central differences: ~1e-9
        assert set(report["layers"]) == VARIABLES
        assert report["evaluations"] == 2 * 97 + 2  # 97 parameters: the full recipe
        probe = report["probe"]
        assert probe["source"] == "keras" and probe["backend"] == keras_run["backend"]
        assert probe["from"] == "probe= batch" and probe["model"] == "Sequential"
        assert probe["batch"] == ["float64[8, 4]", "float64[8, 1]"]
    # the step is the optimizer's counter after the update: 64 rows / 16 × 2 epochs
    assert pair["iterations"] == pair["callback_step"] == 8


def test_a_second_fit_continues_the_optimizer_step(keras_run: dict[str, Any]) -> None:
    second = keras_run["second_fit"]
    assert second["first"] == [1, 3]
    assert second["all"] == [1, 3, 6]  # steps 5-8 in the second fit; no new "first step"
    assert second["iterations"] == second["callback_step"] == 8


def test_with_steps_per_execution_checks_land_after_the_execution_of_each_multiple(
    keras_run: dict[str, Any]
) -> None:
    found = keras_run["steps_per_execution"]  # 2 on JAX; the torch backend only takes 1
    expected = [2, 4, 6] if found["per_execution"] == 2 else [1, 3, 6]
    assert found["steps"] == expected  # hooks at 2, 4, 6, 8: the first, 3 in 4, 6
    assert found["iterations"] == 8


def test_include_globs_and_the_adaptive_rotation_pick_the_variables(
    keras_run: dict[str, Any]
) -> None:
    selection = keras_run["selection"]
    assert selection["only_hidden"] == [["hidden/bias", "hidden/kernel"]] * 2  # steps 1, 4
    adaptive = selection["adaptive"]  # budget=None, a check at every one of 12 steps
    assert len(adaptive) == 12 and all(r["verdict"] == "ok" for r in adaptive)
    assert adaptive[0]["layers"] == sorted(VARIABLES)  # the first budget covers everything
    rotating = [r for r in adaptive if r["rotation"]]
    assert rotating, "sized from 0.01 of a few-ms step, later checks cannot cover all tensors"
    assert {name for r in rotating[:4] for name in r["layers"]} == VARIABLES


def test_a_subclassed_model_with_int_inputs_and_a_custom_loss_is_checked(
    keras_run: dict[str, Any]
) -> None:
    reports = keras_run["subclassed"]["reports"]  # rebuilt from Keras' automatic config
    assert [r["step"] for r in reports] == [1, 2, 4]
    for report in reports:
        assert report["verdict"] == "ok", report["summary"]
        assert set(report["layers"]) == {"embed/embeddings", "hidden/kernel", "hidden/bias",
                                         "norm/gamma", "norm/beta", "out/kernel", "out/bias"}
        # token ids stay integers; the floating features are checked in float64
        assert report["probe"]["batch"] == [{"tokens": "int32[8, 5]",
                                             "features": "float64[8, 4]"}, "float64[8, 1]"]


# ---------------------------------------------------------------------- verdicts
def test_a_planted_backward_bug_alerts_blames_its_layer_and_stops_fit(
    keras_run: dict[str, Any]
) -> None:
    bug = keras_run["bug"]  # dkernel × 1.5 in a custom-gradient layer; on_alert="stop"
    (report,) = bug["reports"]
    assert report["step"] == 3 and report["verdict"] == "alert", report["summary"]
    assert report["worst"] == ["buggy/kernel"]
    assert report["layers"] == {"buggy/kernel": "alert", "buggy/bias": "ok",
                                "output/kernel": "ok", "output/bias": "ok"}
    assert bug["iterations"] == 3 and bug["epochs"] == 1  # of 5 epochs × 4 steps


def test_on_alert_raise_ends_fit_with_the_alert_and_closes_the_record(
    keras_run: dict[str, Any]
) -> None:
    raised = keras_run["raise"]
    assert raised["raised"] == "gradwatch: gradient check alert at step 3."
    assert raised["step"] == 3 and raised["closed"] is True


def test_the_same_custom_gradient_without_the_bug_is_ok(keras_run: dict[str, Any]) -> None:
    correct = keras_run["correct_custom_gradient"]
    assert [r["verdict"] for r in correct["reports"]] == ["ok"], correct["reports"][0]["summary"]
    assert correct["iterations"] == 4


def test_the_objective_includes_the_regulariser(keras_run: dict[str, Any]) -> None:
    found = keras_run["regulariser"]  # Dense(1) with L2(5.0) on its kernel, fixed weights
    report = found["report"]
    assert report["verdict"] == "ok", report["summary"]
    # J is the compiled loss plus model.losses, dθ its gradient: 2λW dominates it here
    assert report["loss"] == pytest.approx(found["full"], rel=1e-12)
    assert found["full"] > 3 * found["mse"]
    assert found["grad_norm"] == pytest.approx(found["full_grad_norm"], rel=1e-9)
    assert found["data_grad_norm"] < 0.2 * found["full_grad_norm"]
    # a check whose backprop side left model.losses out would alert
    assert found["omitted_verdict"] == "alert"


# ---------------------------------------------------------------------- errors
def test_building_the_callback_wrongly_says_what_to_do(keras_run: dict[str, Any]) -> None:
    errors = keras_run["errors"]
    assert errors["no_probe"]["type"] == "ConfigError"
    assert "probe=(x_batch, y_batch)" in errors["no_probe"]["message"]
    assert "Keras passes no data" in errors["no_probe"]["message"]
    assert errors["list_probe"]["type"] == "ConfigError"
    assert "got list" in errors["list_probe"]["message"]
    assert errors["loss_fn"]["type"] == "ConfigError"
    assert "compute_loss" in errors["loss_fn"]["message"]
    assert errors["unknown"]["type"] == "ConfigError"
    assert "evry" in errors["unknown"]["message"] and "budget" in errors["unknown"]["message"]
    assert errors["both"]["type"] == "ConfigError"
    assert errors["strings"]["type"] == "InputError"
    assert "<U1" in errors["strings"]["message"]


def test_without_keras_the_import_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` fails as if absent
    monkeypatch.delitem(sys.modules, "gradwatch.integrations.keras", raising=False)
    with pytest.raises(gradwatch.MissingDependencyError, match=r"gradwatch\[keras\]"):
        importlib.import_module("gradwatch.integrations.keras")


def test_an_unsupported_keras_backend_says_how_to_pick_one(tmp_path: Path) -> None:
    # Without TensorFlow, Keras cannot even be imported on its default backend; with it, the
    # callback refuses the backend. Either way the message names KERAS_BACKEND=torch.
    code = (
        "import gradwatch\n"
        "try:\n"
        "    from gradwatch.integrations.keras import GradWatchCallback\n"
        "    GradWatchCallback(probe=([[0.0]], [[0.0]]), mlflow=False)\n"
        "except gradwatch.GradwatchError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "KERAS_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    expected = ("ConfigError" if importlib.util.find_spec("tensorflow") is not None
                else "MissingDependencyError")
    assert done.stdout.startswith(expected), done.stdout + done.stderr[-3000:]
    assert "KERAS_BACKEND=torch" in done.stdout


# ---------------------------------------------------------------------- the MLflow record
def test_the_record_goes_into_the_active_mlflow_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    requires("torch")
    from mlflow import MlflowClient

    found = run_keras("torch", ["record"], tmp_path, tracking_uri=mlflow_server.url)["record"]
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([found["experiment_id"]])
    assert len(runs) == 1, "GradWatchCallback must log into the active run, not open its own"
    run = runs[0]
    assert run.info.run_id == found["run_id"] == found["watch_run_id"]
    assert run.data.params["script"] == "keras_train"  # the script's own record, same run
    steps = [1, 2, 4, 6]  # 48 rows / 16 × 2 epochs, every=2 and the first step
    assert [r["step"] for r in found["reports"]] == steps
    history = client.get_metric_history(run.info.run_id, "gradwatch/rel_distance")
    assert [m.step for m in history] == steps
    assert all(m.value < 1e-7 for m in history)
    verdicts = client.get_metric_history(run.info.run_id, "gradwatch/verdict")
    assert [m.value for m in verdicts] == [0.0] * 4
    layers = {k for k in run.data.metrics if k.startswith("gradwatch/layer/")}
    assert layers == {"gradwatch/layer/hidden_kernel", "gradwatch/layer/hidden_bias",
                      "gradwatch/layer/output_kernel", "gradwatch/layer/output_bias"}
    params = run.data.params
    assert params["gradwatch.every"] == "2" and params["gradwatch.budget"] == "2000"
    assert run.data.tags["gradwatch.status"] == "ok"
    assert run.data.tags["gradwatch.last_step"] == "6"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "gradwatch/checks")]
    assert artifacts == [f"gradwatch/checks/step-{s:09d}.json" for s in steps]
    text = Path(client.download_artifacts(run.info.run_id, artifacts[-1], str(tmp_path)))
    report = gradwatch.CheckReport.model_validate_json(text.read_text())
    assert report.verdict == "ok" and report.probe["step"] == 6
    assert report.probe["backend"] == "torch" and set(report.layers) == VARIABLES
