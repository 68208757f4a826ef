"""GradWatch in a real Hugging Face Trainer: a tiny BERT built from a config, real MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch import GradWatch
from tests.support.hf_setup import tiny_bert, token_dataset, train, training_args
from tests.support.mlflow_server import MlflowServer

pytest.importorskip("transformers")


def _weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _losses(trainer: Any) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_gradwatch_answers_every_trainer_event() -> None:
    import transformers
    from transformers import TrainerCallback

    watch = GradWatch(every=5, mlflow=False)
    events = [name for name in dir(TrainerCallback) if name.startswith("on_")]
    major = int(transformers.__version__.split(".")[0])
    assert len(events) >= (16 if major >= 5 else 14)  # 16 in 5.x, 15 in 4.57
    for name in events:
        assert callable(getattr(watch, name))
    assert watch.on_some_event_added_in_2030(None, None, None) is None
    with pytest.raises(AttributeError):
        _ = watch.not_an_event


def test_trainer_with_mlflow_reporting_gets_the_gradwatch_record_in_its_run(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-gradwatch")
    watch = GradWatch(every=3, budget=2000, spool_dir=tmp_path / "spool")
    trainer = train(tiny_bert(), training_args(tmp_path / "out", report_to=["mlflow"]), [watch])

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("hf-gradwatch")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "GradWatch must log into the Trainer's run, not open its own"
    run = runs[0]
    assert run.info.run_id == watch.run_id
    assert "train_loss" in run.data.metrics  # HF's own record, same run
    history = client.get_metric_history(run.info.run_id, "gradwatch/rel_distance")
    assert [m.step for m in history] == [1, 3, 6]
    verdicts = client.get_metric_history(run.info.run_id, "gradwatch/verdict")
    assert [m.value for m in verdicts] == [0.0, 0.0, 0.0], [r.summary() for r in watch.reports]
    for key in ("max_element_error", "evaluations", "seconds"):
        assert len(client.get_metric_history(run.info.run_id, f"gradwatch/{key}")) == 3
    layer_keys = [k for k in run.data.metrics if k.startswith("gradwatch/layer/")]
    assert "gradwatch/layer/classifier.weight" in layer_keys
    assert "gradwatch/layer/bert.embeddings.word_embeddings.weight" in layer_keys
    params = run.data.params
    assert params["gradwatch.every"] == "3" and params["gradwatch.mode"] == "auto"
    assert params["gradwatch.threshold.alert"] == "0.001"
    assert {"gradwatch.version", "gradwatch.eps", "gradwatch.budget",
            "gradwatch.threshold.warn"} <= set(params)
    assert run.data.tags["gradwatch.status"] == "ok"
    assert run.data.tags["gradwatch.last_step"] == "6"
    assert "gradwatch.alert" not in run.data.tags
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "gradwatch/checks")]
    assert artifacts == [f"gradwatch/checks/step-{s:09d}.json" for s in (1, 3, 6)]
    text = Path(client.download_artifacts(run.info.run_id, artifacts[1], str(tmp_path))).read_text()
    report = gradwatch.CheckReport.model_validate_json(text)
    assert report.probe["step"] == 3 and report.probe["from"].startswith("inputs of the latest")
    assert report.probe["batch"]["input_ids"] == "int64[8, 12]"
    assert json.loads(text)["verdict"] == "ok"
    assert len(_losses(trainer)) == 6


def _train_pair(tmp_path: Path, watch: GradWatch | None, **overrides: Any) -> Any:
    name = "with" if watch is not None else "without"
    args = training_args(tmp_path / name, **overrides)
    return train(tiny_bert(), args, [watch] if watch is not None else [])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_is_bit_identical_with_and_without_gradwatch(
    tmp_path: Path, precision: str
) -> None:
    overrides = {"bf16": True} if precision == "bf16" else {}
    watch = GradWatch(every=2, mlflow=False)
    with_watch = _train_pair(tmp_path, watch, **overrides)
    without = _train_pair(tmp_path, None, **overrides)
    assert len(watch.reports) == 4  # steps 1, 2, 4, 6
    for report in watch.reports:
        assert report.verdict in ("ok", "warn"), report.summary()  # no false alarm under bf16
    assert _losses(with_watch) == _losses(without)
    first, second = _weights(with_watch), _weights(without)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_label_smoothing_hides_labels_and_the_check_says_what_to_do(tmp_path: Path) -> None:
    # HF pops `labels` before the forward when label smoothing is on: the captured inputs
    # carry no labels, so the model computes no loss. The check is recorded as "error" with
    # the fix, and training goes on.
    watch = GradWatch(every=3, mlflow=False)
    trainer = _train_pair(tmp_path, watch, label_smoothing_factor=0.1)
    assert len(_losses(trainer)) == 6
    assert [r.verdict for r in watch.reports] == ["error"] * 3
    assert "loss_fn" in watch.reports[0].reasons[0]
    # the documented way out: a probe batch with labels, and the objective as loss_fn
    probe = {key: torch.stack([row[key] for row in token_dataset()[:8]])
             for key in ("input_ids", "attention_mask", "labels")}

    def smoothed(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.1)

    fixed = GradWatch(every=3, mlflow=False, probe=probe, loss_fn=smoothed)
    _train_pair(tmp_path / "fixed", fixed, label_smoothing_factor=0.1)
    assert [r.verdict for r in fixed.reports] == ["ok"] * 3, fixed.reports[0].summary()


def test_on_alert_stop_ends_the_trainer_early(tmp_path: Path) -> None:
    # thresholds below the rounding noise (~1e-8) make every check "alert": stop at the first
    watch = GradWatch(every=3, mlflow=False, on_alert="stop", first_step=False,
                      thresholds={"warn": 1e-12, "alert": 1e-11})
    trainer = _train_pair(tmp_path, watch)
    assert trainer.state.global_step == 3
    assert watch.reports[-1].verdict == "alert"


def test_gradient_accumulation_checks_once_per_optimizer_step(tmp_path: Path) -> None:
    watch = GradWatch(every=2, mlflow=False, first_step=False)
    trainer = _train_pair(tmp_path, watch, gradient_accumulation_steps=2,
                          per_device_train_batch_size=4)
    assert trainer.state.global_step == 6
    assert [r.probe["step"] for r in watch.reports] == [2, 4, 6]
    # the probe is the latest micro-batch the model saw in training mode
    assert all(r.probe["batch"]["input_ids"] == "int64[4, 12]" for r in watch.reports)
