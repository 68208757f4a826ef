"""Verdicts on real Hugging Face architectures (tests/support/hf_zoo.py: 15 models built from
configs, batches padded by the real collators, each model's own loss).

With the per-check budget GradWatch's adaptive budget gives at every=1000 (its floor, 12
evaluations): a clean model reads "ok" after a real check of every tensor (float64 verified,
joint screen with a resolution under the warn threshold); a one-row ×1.5 backward bug in an
attention or MLP weight reads "alert" blamed on that tensor and row; a module that computes in
float32 where the guard cannot see reads "error" naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch import GradWatch
from gradwatch.watch.budget import MINIMUM
from tests.support.mlflow_server import MlflowServer

pytest.importorskip("transformers")

from tests.support.hf_zoo import ZOO, plant_float32_op, plant_row_bug

#: The adaptive budget's floor: what a check of these models gets at every=1000.
BUDGET = MINIMUM
NAMES = sorted(ZOO)


def _check(model: Any, batch: Any) -> gradwatch.CheckReport:
    return gradwatch.check_module(model, batch, budget=BUDGET)


def _strongest_row(model: Any, batch: Any, name: str) -> int:
    """The row of `name` with the largest float64 gradient (a bug there changes the layer's
    textbook distance most; a row whose gradient is ~0 hides any bug)."""
    shadow = copy.deepcopy(model).double().eval()
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    with gradwatch.engine.precision.Float64Guard():  # type: ignore[attr-defined]
        loss = shadow(**batch64).loss
    grad = torch.autograd.grad(loss, dict(shadow.named_parameters())[name])[0]
    return int(grad.reshape(grad.shape[0], -1).norm(dim=1).argmax())


@pytest.mark.parametrize("name", NAMES)
def test_clean_model_reads_ok_after_a_real_check(name: str) -> None:
    entry = ZOO[name]
    model, batch = entry.build(), entry.batch(0)
    report = _check(model, batch)
    assert report.verdict == "ok", report.summary()
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert report.coverage["screened"] == tensors == len(report.layers)
    assert report.precision["delta_j_relative"] < 1e-13  # type: ignore[operator]
    # a typical tensor: a relative error ten times under the alert threshold shows
    assert report.precision["screen_resolution"] < 0.1 * report.thresholds.alert  # type: ignore[operator]
    assert report.rel_distance < 1e-6 and report.estimated
    if entry.pad_token_id is not None and "input_ids" in batch:
        assert (batch["input_ids"] == entry.pad_token_id).any()  # really padded


@pytest.mark.parametrize("name,target", [(n, t) for n in NAMES for t in ZOO[n].targets])
def test_one_row_bug_alerts_on_that_tensor(name: str, target: str) -> None:
    entry = ZOO[name]
    model, batch = entry.build(), entry.batch(0)
    row = _strongest_row(model, batch, target)
    plant_row_bug(model, target, row=row, factor=1.5)
    report = _check(model, batch)
    assert report.verdict == "alert", report.summary()
    blamed, layer = report.worst_layers(1)[0]
    assert blamed == target, report.summary()
    assert layer.verdict == "alert" and report.coverage["localised"] >= 1
    assert layer.worst and layer.worst[0].index[0] == row  # the located row's elements
    # the alert's reason and the layer's table name the same worst element
    element_reason = next((r for r in report.reasons if "have rel_error" in r and target in r),
                          None)
    if element_reason is not None:  # (the layer may alert on its distance alone)
        assert f"worst {list(layer.worst[0].index)}:" in element_reason
    assert report.evaluations <= BUDGET + 96  # localisation is bounded


@pytest.mark.parametrize("name", ["llama", "t5", "bert", "vit", "whisper"])
def test_a_float32_only_module_reads_error_naming_it(name: str) -> None:
    entry = ZOO[name]
    model, batch = entry.build(), entry.batch(0)
    module = entry.targets[1].rsplit(".", 1)[0]  # the first MLP input projection
    plant_float32_op(model, module)
    report = _check(model, batch)
    assert report.verdict == "error", report.summary()
    assert "float64 precision was lost" in report.reasons[0]
    assert f"module '{module}'" in report.reasons[0], report.reasons[0]


def test_causal_lm_through_the_trainer_with_mlflow(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF Trainer + report_to=["mlflow"] on the zoo's LLaMA (RMSNorm, rotary, float32 upcasts):
    every check screens every tensor and reads ok; the same with a planted bug alerts on it."""
    from mlflow import MlflowClient
    from transformers import Trainer, TrainingArguments

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-zoo-llama")
    entry = ZOO["llama"]
    rows = [entry.batch(seed) for seed in range(6)]
    examples = [{key: value[i] for key, value in batch.items()}
                for batch in rows for i in range(batch["input_ids"].shape[0])]
    client = MlflowClient(mlflow_server.url)
    outcomes = {}
    for bug in (False, True):
        model = entry.build()
        if bug:
            plant_row_bug(model, entry.targets[0], row=_strongest_row(model, rows[0],
                                                                      entry.targets[0]))
        watch = GradWatch(every=2, spool_dir=tmp_path / f"spool-{bug}")
        args = TrainingArguments(
            output_dir=str(tmp_path / f"out-{bug}"), per_device_train_batch_size=4,
            max_steps=6, learning_rate=1e-3, use_cpu=True, save_strategy="no",
            report_to=["mlflow"], disable_tqdm=True, seed=0, data_seed=0,
            dataloader_num_workers=0, logging_steps=1,
        )
        Trainer(model=model, args=args, train_dataset=examples,
                callbacks=[watch]).train()
        outcomes[bug] = watch
        verdicts = client.get_metric_history(watch.run_id, "gradwatch/verdict")
        screened = client.get_metric_history(watch.run_id, "gradwatch/coverage/screened")
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        assert [m.step for m in verdicts] == [1, 2, 4, 6]
        assert [m.value for m in screened] == [tensors] * 4
        expected = 2.0 if bug else 0.0
        assert [m.value for m in verdicts] == [expected] * 4, [
            r.summary() for r in watch.reports]
    buggy = outcomes[True].reports[-1]
    assert buggy.worst_layers(1)[0][0] == entry.targets[0]
